"""Rendering and viewer review findings, against a running `pacs serve`:
1-bit frames of a size not a multiple of 8 (a SEG) served each as a value
of its own; an object in Implicit VR under an explicit syntax's name
rendered as its frames are served; out-of-range frames named by the
client's own numbers; and, in a real browser (Debian's Chromium), the
window of an enhanced object's functional groups, a PDF in a series of
another modality, and a study header without birth date or accession."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, pydicom_file
from .test_dicomweb_more import _parts
from .test_web_viewer import _log_in, page, viewer_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Three 5x5 frames of a 1-bit SEG: 25 bits each, so frames 2 and 3 start inside a byte.
SEG_FRAMES = np.zeros((3, 5, 5), np.uint8)
SEG_FRAMES[0, 0, :] = 1
SEG_FRAMES[1, :, 0] = 1
SEG_FRAMES[2] = np.eye(5, dtype=np.uint8)
# Written in Implicit VR while its meta says JPEG Baseline (explicit VR).
IMPLICIT_UNDER_EXPLICIT = "SC_rgb_jpeg.dcm"


def _base(sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Render^Review", "RENDER-REVIEW"
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240101", modality, 1, 1
    return ds


def _seg() -> Dataset:
    ds = _base("1.2.840.10008.5.1.4.1.1.66.4", "SEG")
    ds.Rows = ds.Columns = 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 0, 0, 3
    ds.PixelData = pack_bits(SEG_FRAMES.ravel())
    ds["PixelData"].VR = "OB"
    return ds


def _url(ds: Any) -> str:
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("render-review")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    inbox = tmp / "in"
    inbox.mkdir()
    seg = _seg()
    seg.save_as(inbox / "seg.dcm", enforce_file_format=True)
    (inbox / IMPLICIT_UNDER_EXPLICIT).write_bytes(pydicom_file(IMPLICIT_UNDER_EXPLICIT).read_bytes())
    server.cli("import", str(inbox))
    server.start()
    server.seg = seg  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_one_bit_frames_are_each_a_value_of_their_own(web: PacsServer) -> None:
    """Frames of 25 bits come as 4 bytes each, pixel 1 in bit 0 (PS3.5
    8.1.1): frame 1 was cut to 3 bytes, frames 2 and 3 were bit-shifted."""
    seg = web.seg  # type: ignore[attr-defined]
    with web.http() as http:
        response = http.get(_url(seg) + "/frames/1,2,3",
                            headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    bodies = [body for _, body in _parts(response)]
    expected = [np.packbits(frame.ravel(), bitorder="little").tobytes() for frame in SEG_FRAMES]
    assert [b.hex() for b in bodies] == [e.hex() for e in expected]


def test_implicit_vr_under_an_explicit_syntax_renders(web: PacsServer) -> None:
    """An object whose frames are served (pydicom's SC_rgb_jpeg.dcm) is
    rendered too: rendered, thumbnail and WADO-URI were a 422."""
    ds = dcmread(pydicom_file(IMPLICIT_UNDER_EXPLICIT))
    url = _url(ds)
    with web.http() as http:
        frames = http.get(url + "/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
        assert frames.status_code == 200, frames.text
        rendered = http.get(url + "/rendered", headers={"Accept": "image/png"})
        assert rendered.status_code == 200, rendered.text
        shown = np.asarray(Image.open(io.BytesIO(rendered.content)).convert("RGB"))
        assert np.array_equal(shown, ds.pixel_array)  # RGB passes through as decoded
        thumbnail = http.get(url + "/thumbnail")
        assert thumbnail.status_code == 200, thumbnail.text
        wado = http.get("/wado", params={"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                                         "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID})
        assert wado.status_code == 200, wado.text
        assert wado.headers["content-type"] == "image/jpeg"


def test_out_of_range_frames_are_named_as_the_client_numbered_them(web: PacsServer) -> None:
    """A 404 says the 1-based number asked for, not the renderer's 0-based index."""
    seg = web.seg  # type: ignore[attr-defined]
    with web.http() as http:
        wado = http.get("/wado", params={"requestType": "WADO", "studyUID": seg.StudyInstanceUID,
                                         "seriesUID": seg.SeriesInstanceUID, "objectUID": seg.SOPInstanceUID,
                                         "frameNumber": "9"})
        assert wado.status_code == 404
        assert "frameNumber 9 is out of range: the instance has 3 frame(s)" in wado.text, wado.text
        for number in (0, 4):
            thumbnail = http.get(_url(seg) + f"/frames/{number}/thumbnail")
            assert thumbnail.status_code == 404
            assert f"frame {number} is out of range: the instance has 3 frame(s)" in thumbnail.text, thumbnail.text
            assert "0-based" not in thumbnail.text


# -- the web viewer ------------------------------------------------------------------------------
def _stow(server: PacsServer, ds: Dataset) -> None:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    body, content_type = build_multipart_related([("application/dicom", out.getvalue())])
    with server.http() as http:
        response = http.post("/dicom-web/studies", content=body,
                             headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text


def _enhanced_ct() -> Dataset:
    """Two frames whose rescale and window are only in functional groups,
    as Enhanced CT keeps them: shared 40/400, frame 2 its own 300/1500."""
    ds = _base("1.2.840.10008.5.1.4.1.1.2.1", "CT")
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = 2
    hu = np.tile(np.linspace(-200, 280, 64), (64, 1)).round().astype(np.int16)
    ds.PixelData = np.stack([(hu + 1024).astype(np.uint16)] * 2).tobytes()
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared, own = Dataset(), Dataset()
    shared.WindowCenter, shared.WindowWidth = 40, 400
    own.WindowCenter, own.WindowWidth = 300, 1500
    groups = Dataset()
    groups.PixelValueTransformationSequence = Sequence([rescale])
    groups.FrameVOILUTSequence = Sequence([shared])
    ds.SharedFunctionalGroupsSequence = Sequence([groups])
    second = Dataset()
    second.FrameVOILUTSequence = Sequence([own])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), second])
    return ds


def _pdf(modality: str) -> Dataset:
    """A scanned form as an Encapsulated PDF, without birth date, sex or accession."""
    ds = _base("1.2.840.10008.5.1.4.1.1.104.1", modality)
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "", "", ""
    ds.BurnedInAnnotation, ds.DocumentTitle = "NO", "Phiếu chỉ định"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    return ds


def _shown(page: Any) -> None:
    page.wait_for_function(
        "() => { const i = document.querySelector('#viewer-image'); return i && i.complete && i.naturalWidth > 0; }")


def test_viewer_starts_from_the_window_of_the_functional_groups(page: Any, viewer_server: PacsServer) -> None:
    """The W/L label and a drag start from the window the server renders
    with (Frame VOI LUT, per frame, and the rescale of the functional
    groups): it said C 2048 / W 4096 and a 2-pixel drag turned the image black."""
    from playwright.sync_api import expect

    ds = _enhanced_ct()
    _stow(viewer_server, ds)
    page.goto(f"/#/study/{ds.StudyInstanceUID}")
    _log_in(page)
    _shown(page)
    label = page.locator("#wl-label")
    expect(label).to_have_text(re.compile(r"^C 40 / W 400 "))
    page.locator("#viewport").focus()
    page.keyboard.press("ArrowDown")  # frame 2 has a window of its own
    expect(page.locator("#slice-label")).to_have_attribute("data-index", "2")
    expect(label).to_have_text(re.compile(r"^C 300 / W 1500 "))
    page.keyboard.press("ArrowUp")
    expect(label).to_have_text(re.compile(r"^C 40 / W 400 "))
    _shown(page)

    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 30, y, steps=3)
    page.mouse.up(button="right")
    # 30 px right from W 400 at 400/300 units a pixel
    expect(label).to_have_text("C 40 / W 440")
    expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"window=40,440,linear"))
    assert not page.errors, page.errors


def test_viewer_opens_a_pdf_whatever_its_series_modality(page: Any, viewer_server: PacsServer) -> None:
    """An Encapsulated PDF in an OT series is a document to open, not a
    slice that fails to render ("Không tải được ảnh", no link)."""
    from playwright.sync_api import expect

    ds = _pdf("OT")
    _stow(viewer_server, ds)
    page.goto(f"/#/study/{ds.StudyInstanceUID}")
    _log_in(page)
    link = page.locator(".document-link")
    expect(link).to_have_count(1)
    expect(link).to_be_visible()
    expect(page.locator("#viewer-error")).not_to_contain_text("Không tải được ảnh")
    document = page.request.get(link.get_attribute("href"))
    assert document.status == 200 and document.body().startswith(b"%PDF"), document.status
    assert not page.errors, page.errors


def test_study_header_leaves_out_empty_values(page: Any, viewer_server: PacsServer) -> None:
    """No birth date, sex or accession: those items are left out, not shown as "null"."""
    from playwright.sync_api import expect

    ds = _pdf("DOC")
    _stow(viewer_server, ds)
    page.goto(f"/#/study/{ds.StudyInstanceUID}")
    _log_in(page)
    header = page.locator("#study-header")
    expect(page.locator("#patient-name")).to_have_text("Render Review")
    expect(page.locator("#patient-id")).to_have_text("RENDER-REVIEW")
    assert "null" not in header.inner_text(), header.inner_text()
    expect(page.locator("#patient-birth")).to_have_count(0)
    expect(page.locator("#study-accession")).to_have_count(0)
    assert not page.errors, page.errors

