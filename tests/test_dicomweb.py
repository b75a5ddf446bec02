"""Issue 4: DICOMweb (QIDO-RS, WADO-RS, STOW-RS), WADO-URI and rendering,
driven by dicomweb-client (a real client) against a running `pacs serve`."""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, dataset_bytes, pydicom_file
from .peers import create_database, drop_database, wait_until
from .qr_corpus import series_uid, study_uid, write_corpus


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def web(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive with the Q/R corpus, the sample studies and pydicom files."""
    tmp = tmp_path_factory.mktemp(f"web-{request.param}")
    pg = create_database() if request.param == "pg-s3" else None
    env: dict[str, str] = {}
    storage = None
    if request.param == "pg-s3":
        s3 = request.getfixturevalue("s3_server")
        storage = s3.url(f"web-{tmp.name[-8:].lower().replace('_', '-')}")
        env = {"PACS_S3_ACCESS_KEY": s3.access_key, "PACS_S3_SECRET_KEY": s3.secret_key}
    server = PacsServer(tmp / "data", Backend(request.param, pg, storage, env))
    write_corpus(tmp / "in" / "corpus")
    samples = request.getfixturevalue("samples")
    for name in ("CT_small.dcm", "RG1_UNCI.dcm", "US1_J2KR.dcm", "examples_ybr_color.dcm", "MR_small_RLE.dcm"):
        (tmp / "in" / name).write_bytes(pydicom_file(name).read_bytes())
    server.cli("import", str(tmp / "in"), str(samples))
    server.start()
    server.samples = samples  # type: ignore[attr-defined]
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def client(server: PacsServer) -> DICOMwebClient:
    return DICOMwebClient(f"http://127.0.0.1:{server.http_port}/dicom-web", headers=server.auth_headers)


def uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


# -- QIDO-RS -------------------------------------------------------------------------------
def test_qido_matches_the_index(web: PacsServer) -> None:
    c = client(web)
    studies = c.search_for_studies(search_filters={"PatientName": "nguyen*"})
    names = {s["00100010"]["Value"][0]["Alphabetic"] for s in studies}
    assert {"Nguyễn^Văn An", "Nguyễn^Thị Hoa", "NGUYEN^VAN AN"} <= names
    s1 = [s for s in studies if uid(s, "0020000D") == study_uid("S1")][0]
    assert s1["00201208"]["Value"] == [3]
    assert s1["00080061"]["Value"] == ["CT", "MR"]
    assert s1["00100020"]["vr"] == "LO"
    assert s1["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study_uid('S1')}")
    series = c.search_for_series(study_uid("S1"))
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "MR"]
    instances = c.search_for_instances(study_uid("S1"))
    assert len(instances) == 3


def test_qido_parameters(web: PacsServer) -> None:
    with web.http() as http:
        by_tag = http.get("/dicom-web/studies", params={"00100020": "001085012345"}).json()
        assert {uid(s, "0020000D") for s in by_tag} == {study_uid("S1"), study_uid("S2")}
        fuzzy = http.get("/dicom-web/studies", params={"PatientName": "hoa", "fuzzymatching": "true"}).json()
        assert [uid(s, "0020000D") for s in fuzzy] == [study_uid("S3")]
        ranged = http.get("/dicom-web/studies", params={"StudyDate": "20240101-20240229", "AccessionNumber": "ACC*"})
        assert {uid(s, "0020000D") for s in ranged.json()} == {study_uid("S1"), study_uid("S2"), study_uid("S5")}
        everything = http.get("/dicom-web/studies", params={"StudyInstanceUID": study_uid("S1"), "includefield": "all"})
        assert "00201206" in everything.json()[0] and "00100030" in everything.json()[0]
        page1 = http.get("/dicom-web/studies", params={"limit": 2, "AccessionNumber": "ACC*"}).json()
        page2 = http.get("/dicom-web/studies", params={"limit": 2, "offset": 2, "AccessionNumber": "ACC*"}).json()
        assert len(page1) == 2 and len(page2) == 2
        assert not {uid(s, "0020000D") for s in page1} & {uid(s, "0020000D") for s in page2}
        empty = http.get("/dicom-web/studies", params={"PatientName": "NOBODY"})
        assert empty.status_code == 200 and empty.json() == []
        assert empty.headers["content-type"].startswith("application/dicom+json")
        for bad in ({"Bogus": "1"}, {"limit": "x"}, {"StudyInstanceUID": "1.2.*"}, {"includefield": "Nope"}):
            response = http.get("/dicom-web/studies", params=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]
        for bad_uid in ("not-a-uid", "1.2.3%0A", "1.02.3", "1." + "2" * 64):
            for path in (f"/dicom-web/studies/{bad_uid}/series", f"/dicom-web/studies/{bad_uid}/metadata"):
                response = http.get(path)
                assert response.status_code == 400 and "invalid UID" in response.json()["error"], path
        wado_uri = http.get("/wado", params={"requestType": "WADO", "studyUID": "1.2.3\n", "seriesUID": "1.2",
                                             "objectUID": "1.2"})
        assert wado_uri.status_code == 400


# -- WADO-RS -------------------------------------------------------------------------------
def test_wado_instances_as_stored_and_metadata(web: PacsServer) -> None:
    c = client(web)
    core = web.core()
    try:
        for study in (study_uid("S1"), study_uid("S6")):
            retrieved = c.retrieve_study(study, media_types=(("application/dicom", "*"),))
            assert retrieved
            for ds in retrieved:
                stored = core.reader.stored_instance(str(ds.SOPInstanceUID))
                assert stored is not None
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=True)
                assert dataset_bytes(out.getvalue()) == dataset_bytes(core.store.read_bytes(stored.storage_key))
        meta = c.retrieve_study_metadata(study_uid("S1"))
        assert len(meta) == 3
        assert all("7FE00010" in m and "BulkDataURI" in m["7FE00010"] for m in meta)
        assert {m["00100010"]["Value"][0]["Alphabetic"] for m in meta} == {"Nguyễn^Văn An"}
    finally:
        core.close()


def test_wado_default_syntax_decodes_compressed(web: PacsServer) -> None:
    c = client(web)
    found = c.search_for_instances(study_uid("S6"))
    series, sop = uid(found[0], "0020000E"), uid(found[0], "00080018")
    plain = c.retrieve_instance(
        study_uid("S6"), series, sop, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),)
    )
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    stored = c.retrieve_instance(study_uid("S6"), series, sop, media_types=(("application/dicom", "*"),))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(plain.pixel_array, stored.pixel_array)
    with web.http() as http:
        url = f"/dicom-web/studies/{study_uid('S6')}/series/{series}/instances/{sop}"
        # Naming the type without a transfer syntax asks for Explicit VR LE (PS3.18 8.7.3.5).
        default = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert default.status_code == 200
        assert "transfer-syntax=1.2.840.10008.1.2.1" in default.headers["content-type"]
        refused = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
        assert refused.status_code == 406


def test_wado_frames(web: PacsServer) -> None:
    c = client(web)
    found = c.search_for_instances(study_uid("S1"))
    ct = [f for f in found if uid(f, "0020000E").endswith(".1")][0]
    frames = c.retrieve_instance_frames(study_uid("S1"), uid(ct, "0020000E"), uid(ct, "00080018"), frame_numbers=[1])
    assert len(frames[0]) == 32 * 32 * 2
    number = int(ct["00200013"]["Value"][0])
    expected = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * number) % 4096
    assert np.array_equal(np.frombuffer(frames[0], dtype="<u2").reshape(32, 32), expected)
    mr = [f for f in found if uid(f, "0020000E").endswith(".2")][0]
    decoded = c.retrieve_instance_frames(study_uid("S1"), uid(mr, "0020000E"), uid(mr, "00080018"), frame_numbers=[1])
    assert len(decoded[0]) == 32 * 32 * 2  # J2K frame decoded to octet-stream
    as_stored = c.retrieve_instance_frames(
        study_uid("S1"), uid(mr, "0020000E"), uid(mr, "00080018"), frame_numbers=[1],
        media_types=(("image/jp2", "1.2.840.10008.1.2.4.90"),),
    )
    assert as_stored[0][:4] == b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream, as stored
    with web.http() as http:
        base = f"/dicom-web/studies/{study_uid('S1')}/series/{uid(ct, '0020000E')}/instances/{uid(ct, '00080018')}"
        assert http.get(base + "/frames/9").status_code == 404
        assert http.get(base + "/frames/a,b").status_code == 400


# -- rendering ---------------------------------------------------------------------------------
def _reference_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function, computed here independently."""
    x = pixels.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, y)
    y = np.where(x > center - 0.5 + (width - 1) / 2, 255, y)
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def test_rendered_ct_window_matches_reference(web: PacsServer) -> None:
    manifest = json.loads((web.samples / "manifest.json").read_text())  # type: ignore[attr-defined]
    ct = [s for s in manifest["studies"] if s["name"] == "ct"][0]
    series = ct["series"][0]
    path = web.samples / series["files"][0]  # type: ignore[attr-defined]
    ds = dcmread(path)
    sop = str(ds.SOPInstanceUID)
    url = f"/dicom-web/studies/{ct['study_instance_uid']}/series/{series['series_instance_uid']}/instances/{sop}"
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    with web.http() as http:
        for center, width in ((40, 400), (-600, 1500)):
            png = http.get(url + "/rendered", params={"window": f"{center},{width},linear"},
                           headers={"Accept": "image/png"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            image = np.asarray(Image.open(io.BytesIO(png.content)))
            assert image.shape == (ds.Rows, ds.Columns)
            assert np.abs(image.astype(int) - _reference_window(hu, center, width)).max() <= 1
        jpeg = http.get(url + "/rendered", params={"viewport": "256,256", "quality": "80"})
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (256, 256)
        thumb = http.get(f"/dicom-web/studies/{ct['study_instance_uid']}/thumbnail")
        assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 128
        assert http.get(url + "/rendered", params={"window": "abc"}).status_code == 400
        assert http.get(url + "/frames/5/rendered").status_code == 404


def test_rendered_monochrome1_and_colour(web: PacsServer) -> None:
    c = client(web)
    with web.http() as http:
        for name, check in (("RG1_UNCI.dcm", "mono1"), ("US1_J2KR.dcm", "rgb"), ("examples_ybr_color.dcm", "rgb")):
            ds = dcmread(pydicom_file(name))
            found = c.search_for_instances(str(ds.StudyInstanceUID), search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)})
            series = uid(found[0], "0020000E")
            url = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{series}/instances/{ds.SOPInstanceUID}/rendered"
            pixels = ds.pixel_array if "NumberOfFrames" not in ds or int(ds.NumberOfFrames) == 1 else ds.pixel_array[0]
            if check == "mono1":
                # MONOCHROME1 with a window over the whole range: the lowest
                # value is shown white and the highest black.
                from pydicom.pixels import apply_modality_lut

                values = apply_modality_lut(pixels, ds)
                low, high = float(values.min()), float(values.max())
                window = f"{(low + high) / 2},{high - low + 1},linear"
                png = http.get(url, params={"window": window}, headers={"Accept": "image/png"})
                image = np.asarray(Image.open(io.BytesIO(png.content)))
                assert image[np.unravel_index(np.argmin(values), values.shape)] >= 254
                assert image[np.unravel_index(np.argmax(values), values.shape)] <= 1
                continue
            image = np.asarray(Image.open(io.BytesIO(http.get(url, headers={"Accept": "image/png"}).content)))
            assert image.shape == (*pixels.shape[:2], 3)
            # pydicom hands decoded JPEG/J2K colour back as RGB already.
            assert np.abs(image.astype(int) - pixels.astype(int)).mean() < 3


# -- STOW-RS -------------------------------------------------------------------------------------
def _ct_bytes(**changes: object) -> bytes:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_stow_mix_of_good_and_bad_parts(web: PacsServer) -> None:
    before = web.stats()["instances"]
    good1, good2 = _ct_bytes(), _ct_bytes()
    parts = [
        ("application/dicom", good1),
        ("application/dicom", b"this is not dicom at all" * 10),
        ("application/dicom", good2[: len(good2) // 2]),  # truncated
        ("application/dicom", _ct_bytes(StudyInstanceUID=None)),
        ("application/dicom", good2),
    ]
    body, content_type = build_multipart_related(parts)
    with web.http() as http:
        response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    result = response.json()
    referenced = result["00081199"]["Value"]
    failed = result["00081198"]["Value"]
    assert {r["00081155"]["Value"][0] for r in referenced} == {
        str(dcmread(io.BytesIO(good1)).SOPInstanceUID), str(dcmread(io.BytesIO(good2)).SOPInstanceUID)
    }
    assert sorted(f["00081197"]["Value"][0] for f in failed) == [0xA900, 0xC000, 0xC000]
    assert all(f["0040A160"]["Value"][0] for f in failed)  # a reason text for each
    assert web.stats()["instances"] == before + 2


def test_stow_with_dicomweb_client_and_status_codes(web: PacsServer) -> None:
    c = client(web)
    ds = dcmread(io.BytesIO(_ct_bytes()))
    result = c.store_instances([ds])
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    retrieved = c.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                    media_types=(("application/dicom", "*"),))
    assert retrieved.SOPInstanceUID == ds.SOPInstanceUID
    with web.http() as http:
        bad, content_type = build_multipart_related([("application/dicom", b"garbage")])
        assert http.post("/dicom-web/studies", content=bad, headers={"Content-Type": content_type}).status_code == 409
        assert http.post("/dicom-web/studies", content=b"x", headers={"Content-Type": "application/json"}).status_code == 415
        assert http.post("/dicom-web/studies", content=b"--nope", headers={"Content-Type": "multipart/related; type=\"application/dicom\""}).status_code == 400
        wrong_study, content_type = build_multipart_related([("application/dicom", _ct_bytes())])
        other = generate_uid()
        response = http.post(f"/dicom-web/studies/{other}", content=wrong_study, headers={"Content-Type": content_type})
        assert response.status_code == 409
        assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def test_stow_resend_and_conflicting_duplicate(web: PacsServer) -> None:
    """A resend of the same object is stored (idempotent); another object under
    a SOP Instance UID already kept in another study is refused with 0x0111
    and points nowhere: the first copy stays."""
    original = _ct_bytes()
    ds = dcmread(io.BytesIO(original))
    edited = dcmread(io.BytesIO(original))
    edited.StudyInstanceUID = generate_uid()
    edited.PatientName = "Khác^Bệnh Nhân"
    out = io.BytesIO()
    edited.save_as(out, enforce_file_format=True)
    with web.http() as http:
        for _ in range(2):
            body, content_type = build_multipart_related([("application/dicom", original)])
            response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 200, response.text
            assert f"/studies/{ds.StudyInstanceUID}/series/" in response.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
        body, content_type = build_multipart_related([("application/dicom", out.getvalue())])
        response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 409, response.text
        result = response.json()
        failure = result["00081198"]["Value"][0]
        assert failure["00081197"]["Value"] == [0x0111]
        assert str(ds.StudyInstanceUID) in failure["0040A160"]["Value"][0]
        assert "00081190" not in result  # no RetrieveURL of a study where nothing was stored
        assert http.get(f"/dicom-web/studies/{edited.StudyInstanceUID}/metadata").status_code == 404
        kept = http.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata").json()
    assert any(item["00080018"]["Value"] == [str(ds.SOPInstanceUID)] for item in kept)


# -- WADO-URI, OpenAPI, health ---------------------------------------------------------------------
def test_wado_uri(web: PacsServer) -> None:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    params = {"requestType": "WADO", "studyUID": str(ds.StudyInstanceUID), "seriesUID": str(ds.SeriesInstanceUID),
              "objectUID": str(ds.SOPInstanceUID)}
    with web.http() as http:
        jpeg = http.get("/wado", params=params)
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (ds.Columns, ds.Rows)
        small = http.get("/wado", params={**params, "contentType": "image/png", "rows": "64",
                                         "windowCenter": "40", "windowWidth": "400"})
        assert Image.open(io.BytesIO(small.content)).size[1] == 64
        dicom = http.get("/wado", params={**params, "contentType": "application/dicom"})
        assert dcmread(io.BytesIO(dicom.content)).SOPInstanceUID == ds.SOPInstanceUID
        assert http.get("/wado", params={**params, "requestType": "X"}).status_code == 400
        assert http.get("/wado", params={**params, "objectUID": "1.2.3.4"}).status_code == 404
        assert http.get("/wado", params={**params, "windowCenter": "40"}).status_code == 400


def test_rendered_sizes_and_frame_numbers_as_ps3_18_says(web: PacsServer) -> None:
    """WADO-URI rows alone is the returned image's height, its width following
    the image (a 640 x 480 ultrasound asked rows=100 came back 100 x 75);
    imageQuality beyond 100 is a 400 (was taken as 100); frame numbers start
    at 1 (a thumbnail of frame 0 was the middle frame) and a list has no
    empty items."""
    us = dcmread(pydicom_file("US1_J2KR.dcm"), stop_before_pixels=True)
    params = {"requestType": "WADO", "studyUID": str(us.StudyInstanceUID), "seriesUID": str(us.SeriesInstanceUID),
              "objectUID": str(us.SOPInstanceUID), "contentType": "image/png"}
    clip = dcmread(pydicom_file("examples_ybr_color.dcm"), stop_before_pixels=True)
    frames = (f"/dicom-web/studies/{clip.StudyInstanceUID}/series/{clip.SeriesInstanceUID}"
              f"/instances/{clip.SOPInstanceUID}/frames")
    with web.http() as http:
        assert Image.open(io.BytesIO(http.get("/wado", params={**params, "rows": "100"}).content)).size == (133, 100)
        assert Image.open(io.BytesIO(http.get("/wado", params={**params, "columns": "320"}).content)).size == (320, 240)
        assert Image.open(io.BytesIO(http.get("/wado", params={**params, "rows": "100", "columns": "100"}).content)
                          ).size == (100, 75)
        assert http.get("/wado", params={**params, "imageQuality": "150"}).status_code == 400
        assert http.get(frames + "/0/thumbnail").status_code == 404
        assert http.get(frames + "/2/thumbnail").status_code == 200
        assert http.get(frames + "/1,,2/rendered").status_code == 400


def test_openapi_and_health(web: PacsServer) -> None:
    with web.http() as http:
        spec = http.get("/openapi.json").json()
        for path in ("/dicom-web/studies", "/dicom-web/studies/{study}/series/{series}/instances/{sop}/rendered",
                     "/wado", "/health"):
            assert path in spec["paths"], path
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["index"] == "ok" and health["storage"] == "ok"


# -- conformance findings (PS3.18) --------------------------------------------------------------------
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def _ct_params() -> dict[str, str]:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    return {"requestType": "WADO", "studyUID": str(ds.StudyInstanceUID), "seriesUID": str(ds.SeriesInstanceUID),
            "objectUID": str(ds.SOPInstanceUID)}


def test_transfer_syntax_decided_before_the_body(web: PacsServer) -> None:
    """Explicit VR Big Endian (retired) is refused with a 406 before any byte
    of the body, on WADO-RS and WADO-URI; every syntax that is offered gives a
    complete, readable object (one instance and a whole study)."""
    p = _ct_params()
    url = f"/dicom-web/studies/{p['studyUID']}/series/{p['seriesUID']}/instances/{p['objectUID']}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax={}'
    with web.http() as http:
        refused = http.get(url, headers={"Accept": accept.format(BIG_ENDIAN)})
        assert refused.status_code == 406 and "1.2.840.10008.1.2.2" in refused.json()["error"]
        uri = http.get("/wado", params={**p, "contentType": "application/dicom", "transferSyntax": BIG_ENDIAN})
        assert uri.status_code == 406 and uri.json()["error"]
    syntaxes = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
                "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")
    with web.http() as http:
        for ts in syntaxes:
            for body in (_dicom_parts(http.get(url, headers={"Accept": accept.format(ts)}))[0],
                         http.get("/wado", params={**p, "contentType": "application/dicom", "transferSyntax": ts}).content):
                ds = dcmread(io.BytesIO(body))
                assert ds.file_meta.TransferSyntaxUID == ts and ds.pixel_array.shape == (ds.Rows, ds.Columns)
        # A whole study (CT and J2K-compressed MR) in RLE: every part complete.
        study = _dicom_parts(http.get(f"/dicom-web/studies/{study_uid('S1')}",
                                      headers={"Accept": accept.format("1.2.840.10008.1.2.5")}))
        assert [str(dcmread(io.BytesIO(b)).file_meta.TransferSyntaxUID) for b in study] == ["1.2.840.10008.1.2.5"] * 3


def _dicom_parts(response: object) -> list[bytes]:
    """The part bodies of a multipart/related answer (status 200 checked)."""
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    content_type = response.headers["content-type"]  # type: ignore[attr-defined]
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    pieces = response.content.split(b"--" + boundary)[1:-1]  # type: ignore[attr-defined]
    return [piece.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for piece in pieces]


def _studies(http: object, params: object) -> set[str]:
    response = http.get("/dicom-web/studies", params=params)  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    return {uid(s, "0020000D") for s in response.json()}


def test_qido_uid_lists(web: PacsServer) -> None:
    """PS3.18 8.3.4.1: a list of UIDs as repeated keys or comma-separated;
    ModalitiesInStudy as a comma list; other keys given twice are a 400."""
    s1, s2, s6 = study_uid("S1"), study_uid("S2"), study_uid("S6")
    with web.http() as http:
        assert _studies(http, [("StudyInstanceUID", s1), ("StudyInstanceUID", s2)]) == {s1, s2}
        assert _studies(http, {"StudyInstanceUID": f"{s1},{s2}"}) == {s1, s2}
        assert _studies(http, [("0020000D", f"{s1},{s6}"), ("StudyInstanceUID", s2)]) == {s1, s2, s6}
        mr_or_dx = _studies(http, {"ModalitiesInStudy": "MR,DX"})
        assert mr_or_dx == _studies(http, {"ModalitiesInStudy": "MR"}) | _studies(http, {"ModalitiesInStudy": "DX"})
        assert {s1, s2, s6} <= mr_or_dx
        both = [("SeriesInstanceUID", series_uid("S1", 0)), ("SeriesInstanceUID", series_uid("S1", 1))]
        series = http.get(f"/dicom-web/studies/{s1}/series", params=both)
        assert sorted(uid(s, "0020000E") for s in series.json()) == sorted(v for _, v in both)
        twice = http.get("/dicom-web/studies", params=[("PatientName", "A*"), ("PatientName", "B*")])
        assert twice.status_code == 400 and "PatientName" in twice.json()["error"]
        other_study = http.get(f"/dicom-web/studies/{s1}/series", params={"StudyInstanceUID": s2})
        assert other_study.status_code == 400


def test_qido_returns_higher_level_attributes(web: PacsServer) -> None:
    """PS3.18 10.6.3.3.2-3: all series carry the study's attributes, all
    instances the study's and the series', a study's instances the series';
    an instance attribute asked of series is not returned."""
    s1 = study_uid("S1")
    study_tags = {"00100010", "00100020", "00080020", "00080050", "0020000D", "00200010"}
    series_tags = {"00080060", "00200011", "0020000E"}
    with web.http() as http:
        all_series = http.get("/dicom-web/series", params={"StudyInstanceUID": s1}).json()
        assert len(all_series) == 2 and all(study_tags | series_tags <= set(s) for s in all_series)
        assert all_series[0]["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn An"
        all_instances = http.get("/dicom-web/instances", params={"StudyInstanceUID": s1}).json()
        assert len(all_instances) == 3
        assert all(study_tags | series_tags | {"00080018"} <= set(i) for i in all_instances)
        assert {i["00080060"]["Value"][0] for i in all_instances} == {"CT", "MR"}
        of_study = http.get(f"/dicom-web/studies/{s1}/instances").json()
        assert len(of_study) == 3 and all(series_tags <= set(i) for i in of_study)
        included = http.get("/dicom-web/series", params={"StudyInstanceUID": s1, "includefield": "SOPInstanceUID"})
        assert included.status_code == 200 and all("00080018" not in s for s in included.json())


def test_qido_accept(web: PacsServer) -> None:
    """QIDO answers DICOM JSON (or plain JSON) and 406 to anything else,
    XML included (not implemented)."""
    with web.http() as http:
        for accept in ("image/png", "text/html", 'multipart/related; type="application/dicom+xml"'):
            response = http.get("/dicom-web/studies", headers={"Accept": accept})
            assert response.status_code == 406, accept
            assert "application/dicom+json" in response.json()["error"]
        for accept, media_type in (("application/dicom+json", "application/dicom+json"),
                                   ("application/json", "application/json"), ("*/*", "application/dicom+json"),
                                   ("text/html, */*;q=0.8", "application/dicom+json")):
            response = http.get("/dicom-web/series", headers={"Accept": accept})
            assert response.status_code == 200 and response.headers["content-type"] == media_type, accept


def test_wado_uri_refuses_what_it_does_not_do(web: PacsServer) -> None:
    """anonymize and region are refused (400, saying so), never ignored."""
    p = _ct_params()
    with web.http() as http:
        for extra, word in (({"contentType": "application/dicom", "anonymize": "yes"}, "anonymi"),
                            ({"region": "0.0,0.0,0.5,0.5"}, "region")):
            response = http.get("/wado", params={**p, **extra})
            assert response.status_code == 400 and word in response.json()["error"], extra


def _http_answer(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 answer (head and Content-Length body), which may
    come in several segments."""
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.I)
        if sep and (length is None or len(body) >= int(length.group(1))):
            return answer
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk


def test_a_stalled_upload_ends_with_408_and_leaves_no_spooled_part(tmp_path: Path) -> None:
    """A STOW-RS body whose link goes silent halfway (no FIN, no RST) is ended
    after the network timeout (dicom_timeout) with 408, its spooled part
    deleted; before, the connection and the part stayed until a restart."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DICOM_TIMEOUT": "2"}).start()
    try:
        boundary = "stall-boundary"
        head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + b"\0" * 200_000
        request = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {server.token}\r\n"
                   f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
                   f"Content-Length: {10_000_000}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
            sock.sendall(request + head)  # then silence: 200 kB of 10 MB sent
            answer = _http_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"stalled" in answer
        assert wait_until(lambda: not list((server.data_dir / "stow-spool").glob("*.part")), timeout=30)
    finally:
        server.stop()
