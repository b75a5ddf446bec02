"""Reviewer findings on the HTTP APIs, against a real `pacs serve` on
PostgreSQL (NUL in a value is refused there, unlike SQLite): STOW-RS and
search audit events naming studies and patients, WADO-RS negotiation
falling back to the client's next choice, frames read by offset (offset
tables, fragments, malformed objects), rendered sizes bounded, control
characters and huge offsets refused with 400, and frame media types."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid

from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, pydicom_file
from .peers import create_database, drop_database
from .qr_corpus import study_uid, write_corpus
from .test_dicomweb_more import _parts

# A study of many patients with long IDs: the names of who was shown do not
# fit one audit event's indexed column.
MANY_STUDY_DATE = "19990101"
MANY_PATIENTS = 40
LONG_ID = "P" * 58  # + a 2-digit number: 60 characters
# Objects made from pydicom's color3d_jpeg_baseline.dcm (120 JPEG frames, 640x480, YBR_FULL_422).
FRAMES = 120
BIG_FRAMES = 1500


def _copy(name: str, **changes: object) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(pydicom_file(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _save(ds: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _color_frames() -> list[bytes]:
    ds = dcmread(pydicom_file("color3d_jpeg_baseline.dcm"))
    return list(generate_frames(ds.PixelData, number_of_frames=FRAMES))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("http-review")
    pg = create_database()
    served = PacsServer(tmp / "data", Backend("pg-fs", pg, None, {}))
    inbox = tmp / "in"
    write_corpus(inbox / "corpus")
    for name in ("CT_small.dcm", "SC_rgb_jpeg.dcm", "color3d_jpeg_baseline.dcm", "MR_small_RLE.dcm"):
        (inbox / name).write_bytes(pydicom_file(name).read_bytes())
    frames = _color_frames()
    # The same frames in two fragments each: with a Basic Offset Table, and
    # without one (frames told apart by their end-of-image markers).
    objects: dict[str, Any] = {}
    for key, bot in (("two-fragments-bot", True), ("two-fragments-no-bot", False)):
        ds = _copy("color3d_jpeg_baseline.dcm")
        ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=bot)
        objects[key] = ds
        _save(ds, inbox / f"{key}.dcm")
    # 1500 frames (no offset table, one fragment each): frames near the end
    # are read by offset, not by walking every fragment before them.
    big = _copy("color3d_jpeg_baseline.dcm", NumberOfFrames=BIG_FRAMES)
    big.PixelData = encapsulate([frames[n % FRAMES] for n in range(BIG_FRAMES)], has_bot=False)
    objects["big"] = big
    _save(big, inbox / "big.dcm")
    for n in range(MANY_PATIENTS):
        _save(_copy("CT_small.dcm", PatientID=f"{LONG_ID}{n:02d}", StudyDate=MANY_STUDY_DATE),
              inbox / "many" / f"{n}.dcm")
    served.cli("import", str(inbox))
    served.start()
    served.objects = objects  # type: ignore[attr-defined]
    served.frames = frames  # type: ignore[attr-defined]
    try:
        yield served
    finally:
        served.stop()
        drop_database(pg)


def _url(ds: Any) -> str:
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def _file_url(name: str) -> str:
    return _url(dcmread(pydicom_file(name), stop_before_pixels=True))


def _events(server: PacsServer, wanted: int, **params: str) -> list[dict[str, Any]]:
    """Audit events (newest first), once *wanted* of them are written."""
    deadline = time.monotonic() + 20
    while True:
        with server.http() as http:
            events = http.get("/api/audit", params=params).json()
        if len(events) >= wanted or time.monotonic() > deadline:
            return events  # type: ignore[no-any-return]
        time.sleep(0.2)


# -- 1. STOW-RS names the studies and patients it stored ----------------------------------------
def test_stow_audit_names_each_study_and_patient(server: PacsServer) -> None:
    one = _copy("CT_small.dcm", PatientID="STOW-A")
    two = _copy("CT_small.dcm", PatientID="STOW-B")
    bodies = []
    for ds in (one, two):
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        bodies.append(("application/dicom", out.getvalue()))
    body, content_type = build_multipart_related(bodies)
    modality = server.make_token("stow.audit", "modality")
    with server.http(token=modality) as http:
        response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    events = _events(server, 2, user="stow.audit", action="store")
    assert {(e["study_uid"], e["patient_id"], e["outcome"]) for e in events} == {
        (str(one.StudyInstanceUID), "STOW-A", "success"), (str(two.StudyInstanceUID), "STOW-B", "success")}
    # `pacs audit --study UID` (the same query) finds each.
    for ds, patient in ((one, "STOW-A"), (two, "STOW-B")):
        found = _events(server, 1, study=str(ds.StudyInstanceUID))
        assert [(e["action"], e["patient_id"]) for e in found] == [("store", patient)]


# -- 2. searches name the patients shown --------------------------------------------------------
def test_searches_name_the_patients_shown(server: PacsServer) -> None:
    token = server.make_token("search.audit", "radiologist")
    with server.http(token=token) as http:
        qido = http.get("/dicom-web/studies", params={"PatientName": "nguyen*"})
        assert qido.status_code == 200 and qido.json()
        worklist = http.get("/api/worklist", params={"q": "nguyen"})
        assert worklist.status_code == 200 and worklist.json()["items"]
        fhir = http.get("/fhir/ImagingStudy", params={"identifier": "ACC*"})
        assert fhir.status_code == 200
        imaging = http.get("/fhir/ImagingStudy", params={"patient.identifier": "001085012345"})
        assert imaging.status_code == 200 and imaging.json()["total"] == 2
        s1 = study_uid("S1")
        http.put(f"/api/studies/{s1}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
        assert http.post(f"/api/studies/{s1}/report/sign").status_code == 200
        reports = http.get("/fhir/DiagnosticReport", params={"patient.identifier": "001085012345"})
        assert reports.status_code == 200 and reports.json()["total"] == 1
    events = _events(server, 7, user="search.audit")
    queries = [e for e in reversed(events) if e["action"] == "query"]
    shown = [set(e["patient_id"].split("\\")) for e in queries]
    # Each with the issuer of its ID (ID^^^issuer, HL7 CX).
    nguyen = {"001085012345^^^CCCD", "079190000111^^^CCCD", "OLD123^^^CCCD"}
    assert shown[0] == nguyen  # QIDO-RS
    assert shown[1] == nguyen  # the worklist
    assert shown[3] == {"001085012345^^^CCCD"}  # ImagingStudy
    assert shown[4] == {"001085012345^^^CCCD"}  # DiagnosticReport


def test_many_patients_shown_are_named_in_bounded_events(server: PacsServer) -> None:
    """40 patient IDs of 60 characters do not fit one event (PostgreSQL
    indexes at most ~2.7 kB): they are spread over several, all written."""
    token = server.make_token("many.audit", "radiologist")
    with server.http(token=token) as http:
        found = http.get("/dicom-web/studies", params={"StudyDate": MANY_STUDY_DATE})
        assert found.status_code == 200 and len(found.json()) == MANY_PATIENTS
    expected = {f"{LONG_ID}{n:02d}" for n in range(MANY_PATIENTS)}
    deadline = time.monotonic() + 20
    while True:
        events = _events(server, 2, user="many.audit")
        named = {p for e in events for p in e["patient_id"].split("\\")}
        if named == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert named == expected
    assert len(events) >= 2 and all(len(e["patient_id"].encode()) <= 2000 for e in events)
    assert {(e["action"], e["outcome"], e["detail"]) for e in events} == {
        ("query", "success", f"/dicom-web/studies?StudyDate={MANY_STUDY_DATE}")}


# -- 3. WADO-RS negotiation ----------------------------------------------------------------------
def test_instance_falls_back_to_the_clients_next_choice(server: PacsServer) -> None:
    accept = ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
              'multipart/related; type="application/dicom"; q=0.1')
    with server.http() as http:
        response = http.get(_file_url("CT_small.dcm"), headers={"Accept": accept})
        assert response.status_code == 200, response.text
        assert "transfer-syntax=1.2.840.10008.1.2.1" in response.headers["content-type"]
        (headers, body), = _parts(response)
        assert dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        # Nothing acceptable at all: still a 406 saying why.
        only = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        refused = http.get(_file_url("CT_small.dcm"), headers={"Accept": only})
        assert refused.status_code == 406 and "JPEG Baseline" in refused.text


def test_metadata_answers_the_negotiated_json_type(server: PacsServer) -> None:
    with server.http() as http:
        url = _file_url("CT_small.dcm") + "/metadata"
        plain = http.get(url, headers={"Accept": "application/json;q=0.5,application/dicom+json;q=0.1"})
        assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
        dicom = http.get(url)
        assert dicom.headers["content-type"].startswith("application/dicom+json")
        assert plain.json() == dicom.json()


# -- 4. frames by offset ---------------------------------------------------------------------------
AS_STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@pytest.mark.parametrize("key", ["two-fragments-bot", "two-fragments-no-bot"])
def test_frames_of_fragmented_objects(server: PacsServer, key: str) -> None:
    ds = server.objects[key]  # type: ignore[attr-defined]
    numbers = [1, 2, 60, FRAMES]
    with server.http() as http:
        parts = _parts(http.get(_url(ds) + "/frames/" + ",".join(map(str, numbers)),
                                headers={"Accept": AS_STORED}))
    assert [body for _, body in parts] == [server.frames[n - 1] for n in numbers]  # type: ignore[attr-defined]
    assert all(h["content-type"].startswith("image/jpeg") for h, _ in parts)


def test_many_frames_of_a_large_object(server: PacsServer) -> None:
    big = server.objects["big"]  # type: ignore[attr-defined]
    numbers = list(range(1200, BIG_FRAMES + 1))
    with server.http() as http:
        parts = _parts(http.get(_url(big) + "/frames/" + ",".join(map(str, numbers)),
                                headers={"Accept": AS_STORED}))
        assert [body for _, body in parts] == [server.frames[(n - 1) % FRAMES] for n in numbers]  # type: ignore[attr-defined]
        bulk = _parts(http.get(_url(big) + "/bulk/7FE00010", headers={"Accept": AS_STORED}))
        assert len(bulk) == BIG_FRAMES and bulk[-1][1] == server.frames[(BIG_FRAMES - 1) % FRAMES]  # type: ignore[attr-defined]


def test_frame_of_an_object_with_a_misleading_header(server: PacsServer) -> None:
    """SC_rgb_jpeg.dcm's header is Implicit VR under JPEG Baseline's name:
    read as explicit, the pixel data looked malformed (a 500)."""
    ds = dcmread(pydicom_file("SC_rgb_jpeg.dcm"))
    stored = next(generate_frames(ds.PixelData, number_of_frames=1))
    with server.http() as http:
        (headers, body), = _parts(http.get(_file_url("SC_rgb_jpeg.dcm") + "/frames/1", headers={"Accept": AS_STORED}))
        assert body == stored and headers["content-type"].startswith("image/jpeg")
        (_, decoded), = _parts(http.get(_file_url("SC_rgb_jpeg.dcm") + "/frames/1"))
    assert np.array_equal(np.frombuffer(decoded, np.uint8).reshape(256, 256, 3), pixel_array(ds))


# -- 5. rendered sizes ------------------------------------------------------------------------------
def _image(response: Any) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_rendered_is_never_blown_up(server: PacsServer) -> None:
    """Enlarged to fit the viewport, but to 2048 pixels at most on the longer
    side (8192 x 8192 was 200 MB per request)."""
    url = _file_url("color3d_jpeg_baseline.dcm")  # 640 x 480
    with server.http() as http:
        assert _image(http.get(url + "/rendered", params={"viewport": "8192,8192"})).size == (2048, 1536)
        assert _image(http.get(url + "/rendered", params={"viewport": "1280,1280"})).size == (1280, 960)
        assert _image(http.get(url + "/rendered", params={"viewport": "320,320"})).size == (320, 240)
        region = _image(http.get(url + "/rendered", params={"viewport": "8192,8192,0,0,100000,100000"}))
        assert region.size[0] * region.size[1] <= 2048 * 2048
        crop = _image(http.get(url + "/rendered", params={"viewport": "8192,8192,100,100,50,40"}))
        assert crop.size == (2048, 1638)
        thumb = _image(http.get(url + "/thumbnail", params={"viewport": "8192,8192"}))
        assert thumb.size == (512, 384)
        assert _image(http.get(url + "/thumbnail")).size == (128, 96)


# -- 6, 7. control characters and huge offsets -----------------------------------------------------
@pytest.mark.parametrize("path", [
    "/dicom-web/studies?PatientName=%00", "/dicom-web/studies?PatientID=%00",
    "/dicom-web/studies?AccessionNumber=%00", "/dicom-web/studies?StudyDescription=%00",
    "/dicom-web/studies?StudyInstanceUID=1.2%00", "/dicom-web/series?PatientName=a%01b",
    "/api/worklist?q=%00", "/api/worklist?patient_id=%00", "/api/studies/1.2%00",
    "/fhir/Patient?name=%00", "/fhir/Patient?identifier=%00", "/fhir/ImagingStudy?identifier=%00",
    "/fhir/DiagnosticReport?patient.identifier=%00", "/api/audit?study=%00", "/api/audit?user=%1F",
    "/api/worklist?offset=9223372036854775808", "/api/worklist?offset=2147483648",
])
def test_control_characters_and_huge_offsets_are_400(server: PacsServer, path: str) -> None:
    with server.http() as http:
        response = http.get(path)
        assert response.status_code == 400, (path, response.status_code, response.text)
        if path.startswith("/fhir/"):
            assert response.json()["resourceType"] == "OperationOutcome"
        else:
            assert "control character" in response.text or "offset" in response.text
        assert http.get("/api/worklist", params={"offset": 2**31 - 1}).status_code == 200


# -- 8. frame media types and representations ----------------------------------------------------
def test_uncompressed_frames_of_lossy_ybr_are_rgb_as_the_converted_instance(server: PacsServer) -> None:
    url = _file_url("color3d_jpeg_baseline.dcm")
    with server.http() as http:
        (_, frame), = _parts(http.get(url + "/frames/2"))
        (_, instance), = _parts(http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}))
    converted = dcmread(io.BytesIO(instance))
    assert converted.PhotometricInterpretation == "RGB"
    assert len(frame) == 640 * 480 * 3
    assert np.array_equal(np.frombuffer(frame, np.uint8).reshape(480, 640, 3), converted.pixel_array[1])


@pytest.mark.parametrize(("asked", "answered"), [
    ('multipart/related; type="image/dicom-rle"', "image/dicom-rle"),
    ('multipart/related; type="image/x-dicom-rle"', "image/x-dicom-rle"),
    (AS_STORED, "image/dicom-rle"),
])
def test_rle_frames_use_the_name_asked_for(server: PacsServer, asked: str, answered: str) -> None:
    with server.http() as http:
        (headers, _), = _parts(http.get(_file_url("MR_small_RLE.dcm") + "/frames/1", headers={"Accept": asked}))
    assert headers["content-type"].split(";")[0] == answered


def test_audit_format_not_offered_is_400(server: PacsServer) -> None:
    with server.http() as http:
        refused = http.get("/api/audit", params={"format": "xml"})
        assert refused.status_code == 400 and "format" in refused.json()["error"]
        assert http.get("/api/audit", params={"format": "syslog", "limit": 1}).status_code == 200
