"""DICOMweb as OHIF, dicomweb-client and EMRs read it (review of 2026-12-06):
metadata that a browser's JSON.parse accepts whatever floats an object
holds, person names kept beside an empty value, and a study holding a
video retrieved whole when the client did not name a transfer syntax."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


from .conftest import Backend, PacsServer
from .dicomfiles import H264, as_h264_clip
from .test_dicomweb_more import _parts
from .test_ui_review import _stow

ROOT = "1.2.826.0.1.3680043.8.498.78"


def _base(study: str, **values: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.PatientName, ds.PatientID = "WEB^REVIEW", "WEB1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT + ".2.")
    ds.SOPInstanceUID = generate_uid(prefix=ROOT + ".3.")
    ds.Modality = "OT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _image(study: str) -> Dataset:
    ds = _base(study, Modality="ES")
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 4, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(16))
    return ds


def _video(study: str) -> Dataset:
    """An endoscopy clip stored as H.264 (lossy; nothing here decodes it)."""
    return as_h264_clip(_base(study, Modality="ES", SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.1.1"), 20000)


def _odd_values(study: str) -> Dataset:
    """Values modalities do write: IEEE NaN and infinities in FL/FD (also
    inside a sequence), a trailing backslash in a multi-valued name, an
    empty value among several."""
    ds = _base(study)
    ds.add_new(0x00189087, "FD", float("nan"))  # Diffusion b-value
    ds.add_new(0x00189089, "FD", [float("inf"), 0.0, 1.0])  # Diffusion Gradient Orientation
    item = Dataset()
    item.add_new(0x00189089, "FD", [float("-inf"), 0.5, 0.5])
    ds.add_new(0x00189117, "SQ", [item])  # MR Diffusion Sequence
    ds.add_new(0x00181100, "DS", "350")
    ds.OperatorsName = ["SMITH^J", ""]
    ds.PerformingPhysicianName = ["", "JONES^A"]
    ds.ImageType = ["DERIVED", "", "AXIAL"]
    return ds


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("web-review-2")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.start()
    study = generate_uid(prefix=ROOT + ".1.")
    objects = {"odd": _odd_values(generate_uid(prefix=ROOT + ".1.")), "image": _image(study), "video": _video(study)}
    _stow(server, list(objects.values()))
    server.objects = objects  # type: ignore[attr-defined]
    yield server
    server.stop()


def _objects(web: PacsServer) -> dict[str, Dataset]:
    return web.objects  # type: ignore[attr-defined,no-any-return]


def _url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _strict_json(text: str) -> Any:
    """JSON as a browser's JSON.parse reads it: no NaN or Infinity words."""
    def refuse(word: str) -> None:
        raise ValueError(f"{word} is not JSON (RFC 8259)")

    return json.loads(text, parse_constant=refuse)


def test_metadata_with_non_finite_floats_is_json(web: PacsServer) -> None:
    """An FD of NaN or an infinity (IEEE 754 allows them) made the metadata
    carry the bare words NaN and Infinity: not JSON, so OHIF's JSON.parse
    failed on the whole series. They are strings now, in sequences too."""
    ds = _objects(web)["odd"]
    with web.http() as http:
        for path in (f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata", _url(ds) + "/metadata"):
            response = http.get(path)
            assert response.status_code == 200, response.text
            meta = _strict_json(response.text)[0]
            assert meta["00189087"]["Value"] == ["NaN"]
            assert meta["00189089"]["Value"] == ["Infinity", 0.0, 1.0]
            assert meta["00189117"]["Value"][0]["00189089"]["Value"] == ["-Infinity", 0.5, 0.5]
            assert meta["00181100"]["Value"] == [350.0]


def test_metadata_keeps_names_beside_an_empty_value(web: PacsServer) -> None:
    """Operators' Name "SMITH^J\\" lost both names (pydicom raised on the
    empty one and the element went out without Value); an empty value
    among several is null (PS3.18 F.2.5), the others are kept."""
    ds = _objects(web)["odd"]
    with web.http() as http:
        meta = http.get(_url(ds) + "/metadata").json()[0]
    assert meta["00081070"] == {"vr": "PN", "Value": [{"Alphabetic": "SMITH^J"}, None]}
    assert meta["00081050"] == {"vr": "PN", "Value": [None, {"Alphabetic": "JONES^A"}]}
    assert meta["00080008"] == {"vr": "CS", "Value": ["DERIVED", None, "AXIAL"]}
    assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "WEB^REVIEW"}]}


def test_study_with_a_video_is_retrieved_when_no_syntax_is_named(web: PacsServer) -> None:
    """A study holding an H.264 clip was a 406 to every client that named
    no transfer syntax (no Accept, */*, dicomweb-client's retrieve_study):
    PS3.18 8.7.3.4 lets lossy pixel data go in their own syntax when the
    default syntax is only implied. The image is still converted to the
    default syntax; a client naming Explicit VR Little Endian gets the 406."""
    objects = _objects(web)
    image, video = objects["image"], objects["video"]
    study = f"/dicom-web/studies/{image.StudyInstanceUID}"
    expected = {str(image.SOPInstanceUID): ExplicitVRLittleEndian, str(video.SOPInstanceUID): H264}
    with web.http() as http:
        for accept in (None, "*/*", 'multipart/related; type="application/dicom"', "application/dicom",
                       f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}, '
                       'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5'):
            for path, sops in ((study, expected), (_url(video), {str(video.SOPInstanceUID): H264})):
                response = http.get(path, headers={"Accept": accept} if accept else {})
                assert response.status_code == 200, (accept, response.text)
                got = {}
                for headers, body in _parts(response):
                    part = dcmread(io.BytesIO(body))
                    got[str(part.SOPInstanceUID)] = str(part.file_meta.TransferSyntaxUID)
                    assert headers["content-type"].endswith(f"transfer-syntax={part.file_meta.TransferSyntaxUID}")
                assert got == sops, accept
                # One syntax in the answer's Content-Type only if every part is in it.
                assert "transfer-syntax" not in response.headers["content-type"], accept
        named = http.get(study, headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'})
        assert named.status_code == 406 and "H.264" in named.json()["error"]
    client = DICOMwebClient(f"http://127.0.0.1:{web.http_port}/dicom-web", headers=web.auth_headers)
    retrieved = client.retrieve_study(str(image.StudyInstanceUID))
    assert {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID) for ds in retrieved} == expected


def _wado_uri(ds: Dataset, **params: str) -> dict[str, str]:
    return {"requestType": "WADO", "studyUID": str(ds.StudyInstanceUID), "seriesUID": str(ds.SeriesInstanceUID),
            "objectUID": str(ds.SOPInstanceUID), **params}


def test_wado_uri_video_wildcards_and_bad_syntax(web: PacsServer) -> None:
    """WADO-URI as WADO-RS: the video as stored to contentType=application/dicom
    with no transferSyntax (was a 406); image/* is the JPEG of an image (was a
    406: no wildcard but */* was read); an invalid transferSyntax is a 400
    (PS3.18 9.1.2.1.5), not a 406 naming it as a syntax we lack."""
    objects = _objects(web)
    image, video = objects["image"], objects["video"]
    with web.http() as http:
        got = http.get("/wado", params=_wado_uri(video, contentType="application/dicom"))
        assert got.status_code == 200, got.text
        assert str(dcmread(io.BytesIO(got.content)).file_meta.TransferSyntaxUID) == H264
        named = http.get("/wado", params=_wado_uri(video, contentType="application/dicom",
                                                   transferSyntax=ExplicitVRLittleEndian))
        assert named.status_code == 406, named.text
        for wildcard, expected in (("image/*", "image/jpeg"), ("image/png, image/*", "image/png"),
                                   ("application/*", "application/dicom")):
            got = http.get("/wado", params=_wado_uri(image, contentType=wildcard))
            assert got.status_code == 200 and got.headers["content-type"].startswith(expected), (wildcard, got.text)
        assert http.get("/wado", params=_wado_uri(image, contentType="text/*")).status_code == 406
        bad = http.get("/wado", params=_wado_uri(image, contentType="application/dicom", transferSyntax="abc"))
        assert bad.status_code == 400 and "transferSyntax" in bad.json()["error"], bad.text
        stored = http.get("/wado", params=_wado_uri(image, contentType="application/dicom", transferSyntax="*"))
        assert stored.status_code == 200, stored.text
