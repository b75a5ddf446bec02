"""Rendered images and thumbnails review findings, against a running `pacs
serve`: a window written with an empty value among several (a trailing
backslash, "40\\") is still the object's window, and a series or study whose
middle instance is a video clip (MPEG-4 / H.264, which nothing here decodes)
still has a thumbnail, of one of its stills. Expected pixels are computed
here by hand from PS3.3 C.11.2.1.2.1 (LINEAR)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


from .conftest import Backend, PacsServer
from .dicomfiles import as_h264_clip
from .test_ui_review import _stow

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Stored values 0..4095 of a 16x16 CT; HU = stored - 1024.
CT_STORED = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)


def _base(study: str, series: str, number: int, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber = "Render^Review", "RENDER-REVIEW-2", modality, 1
    return ds


def _ct(window_center: str, window_width: str, intercept: str = "-1024") -> Dataset:
    """A CT whose window (and rescale) is written as a modality may: "40\\"
    (VR DS, the second value empty), its pairs by position."""
    ds = _base(generate_uid(), generate_uid(), 1, "1.2.840.10008.5.1.4.1.1.2", "CT")
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.add_new(0x00281052, "DS", intercept)
    ds.RescaleSlope = "1"
    ds.add_new(0x00281050, "DS", window_center)
    ds.add_new(0x00281051, "DS", window_width)
    ds.PixelData = CT_STORED.tobytes()
    return ds


def _still(study: str, series: str, number: int) -> Dataset:
    ds = _base(study, series, number, "1.2.840.10008.5.1.4.1.1.6.1", "US")
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(0, 256, 16))
    return ds


def _clip(study: str, series: str, number: int) -> Dataset:
    """A cine loop stored as H.264 between the stills of its series, as
    ultrasound and endoscopy systems send them."""
    return as_h264_clip(_base(study, series, number, "1.2.840.10008.5.1.4.1.1.3.1", "US"), 4000)


# (Window Center, Window Width[, Rescale Intercept]) as written; the window is 40 / 400 HU in each.
WINDOWS = {
    "trailing": ("40\\", "400\\"),
    "second pair incomplete": ("40\\300", "400\\"),
    "first pair empty": ("\\40", "\\400"),
    "intercept with a trailing backslash": ("40", "400", "-1024\\"),
}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("render-review-2")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.start()
    cts = {name: _ct(*values) for name, values in WINDOWS.items()}
    study, series = generate_uid(), generate_uid()
    ultrasound = [_still(study, series, 1), _clip(study, series, 2), _still(study, series, 3)]
    _stow(server, [*cts.values(), *ultrasound])
    server.cts, server.ultrasound = cts, ultrasound  # type: ignore[attr-defined]
    yield server
    server.stop()


def _url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _pixels(response: object) -> np.ndarray:
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    return np.asarray(Image.open(io.BytesIO(response.content)))  # type: ignore[attr-defined]


def _soft_tissue() -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, c = 40, w = 400, on HU = stored - 1024, to 0..255."""
    hu = CT_STORED.astype(np.float64) - 1024
    y = ((hu - 39.5) / 399 + 0.5) * 255
    y = np.where(hu <= 39.5 - 199.5, 0.0, np.where(hu > 39.5 + 199.5, 255.0, y))
    return np.floor(y + 0.5).astype(np.uint8)


@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_with_an_empty_value_among_several_is_the_objects_window(web: PacsServer, name: str) -> None:
    """Window Center "40\\" / Width "400\\" (an empty second value): the
    whole window was dropped for it and the CT rendered with its min/max
    (-1024..3056 HU: soft tissue one flat grey) in /rendered and in the
    EMR's WADO-URI JPEG link alike. The first pair with both values is the
    window (PS3.3 C.11.2.1.2: the pairs go by position). A Rescale
    Intercept "-1024\\" was taken as 0: every value 1024 HU too high."""
    ds = web.cts[name]  # type: ignore[attr-defined]
    expected = _soft_tissue()
    with web.http() as http:
        rendered = _pixels(http.get(_url(ds) + "/rendered", headers={"Accept": "image/png"}))
        wado = _pixels(http.get("/wado", params={
            "requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID, "contentType": "image/png"}))
    assert rendered.tolist() == expected.tolist()
    assert wado.tolist() == expected.tolist()


def test_series_and_study_thumbnails_skip_a_video_clip_in_the_middle(web: PacsServer) -> None:
    """Still, clip, still: the middle instance was the H.264 clip, and the
    series' and the study's thumbnail a 415 ("cannot be decoded") though
    two stills could be shown. The representative is now the middle one of
    what can be rendered; the clip's own thumbnail still says why it has none."""
    first, clip, last = web.ultrasound  # type: ignore[attr-defined]
    series = f"/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    with web.http() as http:
        for path in (series + "/thumbnail", f"/dicom-web/studies/{first.StudyInstanceUID}/thumbnail"):
            response = http.get(path, headers={"Accept": "image/png"})
            thumbnail = _pixels(response)
            assert response.headers["content-type"] == "image/png"
            # A still (4x4 grey ramp, enlarged): its corners are its darkest and brightest pixels.
            assert thumbnail.ndim == 2 and thumbnail[0, 0] < 16 and thumbnail[-1, -1] > 200, path
        assert http.get(_url(clip) + "/thumbnail").status_code == 415
