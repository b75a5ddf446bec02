"""DICOMweb (PS3.18) findings of an exploratory test with dicomweb-client and
raw HTTP: malformed values in metadata, nested BulkDataURIs, frames of odd
encodings, stored-syntax negotiation, keep-alive after a 500, includefield,
STOW reason codes, rendered studies and HEAD, against a running `pacs serve`."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, dataset_bytes, pydicom_file
from .test_dicomweb import _http_answer

# Pydicom files served by the archive (their UIDs are their own, distinct).
AS_IS = ("badVR.dcm", "waveform_ecg.dcm", "OBXXXX1A_expb.dcm", "SC_rgb_small_odd_big_endian.dcm",
         "SC_ybr_full_422_uncompressed.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm",
         "US1_J2KI.dcm")
# A study of three CTs, one with a Series Number that is no number (IS 'abc').
BAD_IS_STUDY = generate_uid()
# Two CTs and a waveform (nothing to render) in one study.
MIXED_STUDY = generate_uid()
# Seconds the module's server gives a client to send its request headers.
HEADER_TIMEOUT = 5
# A study whose stored object goes missing (an unexpected error).
LOST_STUDY = generate_uid()


def _write(path: Path, ds: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)  # type: ignore[attr-defined]
    return path


def _copy(name: str, study: str | None = None, **changes: object) -> object:
    ds = dcmread(pydicom_file(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study:
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("web-more")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT)})
    inbox = tmp / "in"
    for name in AS_IS:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(pydicom_file(name).read_bytes())
    # JPEG-lossy.dcm has JPEG-LL.dcm's SOP Instance UID.
    _write(inbox / "jpeg-lossy.dcm", _copy("JPEG-lossy.dcm"))
    for n in range(3):
        ds = _copy("CT_small.dcm", BAD_IS_STUDY)
        if n == 2:
            del ds.SeriesNumber
            ds.add(RawDataElement(Tag(0x00200011), "IS", 4, b"abc ", 0, False, True))
        _write(inbox / f"bad-is-{n}.dcm", ds)
    for n in range(2):
        _write(inbox / f"mixed-ct-{n}.dcm", _copy("CT_small.dcm", MIXED_STUDY))
    _write(inbox / "mixed-ecg.dcm", _copy("waveform_ecg.dcm", MIXED_STUDY))
    lost = _copy("CT_small.dcm", LOST_STUDY)
    _write(inbox / "lost.dcm", lost)
    server.cli("import", str(inbox))
    server.start()
    server.lost_sop = str(lost.SOPInstanceUID)  # type: ignore[attr-defined]
    yield server
    server.stop()


def _url(name_or_ds: object) -> str:
    ds = dcmread(pydicom_file(name_or_ds), stop_before_pixels=True) if isinstance(name_or_ds, str) else name_or_ds
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"  # type: ignore[attr-defined]
            f"/instances/{ds.SOPInstanceUID}")  # type: ignore[attr-defined]


def _parts(response: object) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of each part of a multipart/related answer (200 checked)."""
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    content_type = response.headers["content-type"]  # type: ignore[attr-defined]
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    pieces = response.content.split(b"--" + boundary)[1:-1]  # type: ignore[attr-defined]
    parts = []
    for piece in pieces:
        head, body = piece.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode().strip().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, body.removesuffix(b"\r\n")))
    return parts


# -- 1. malformed numbers in metadata and QIDO ------------------------------------------------
def test_metadata_survives_invalid_numbers(web: PacsServer) -> None:
    """An IS of '1A' (NumberOfFrames) or 'abc' (SeriesNumber) in one stored
    object: its study's metadata is still answered, the element without the
    invalid value, and the log warns."""
    bad = dcmread(pydicom_file("badVR.dcm"), stop_before_pixels=True)
    with web.http() as http:
        for path in (f"/dicom-web/studies/{bad.StudyInstanceUID}/metadata", _url("badVR.dcm") + "/metadata"):
            response = http.get(path)
            assert response.status_code == 200, response.text
            meta = response.json()[0]
            assert meta["00280008"] == {"vr": "IS"}  # '1A' left out
            assert meta["00280010"]["Value"] == [10]  # the rest is there
            assert meta["300C0002"]["Value"][0]["300C0020"]["Value"][0]["300C0022"]["Value"] == [1]
        study = http.get(f"/dicom-web/studies/{BAD_IS_STUDY}/metadata")
        assert study.status_code == 200, study.text
        series_numbers = sorted(str(m["00200011"].get("Value")) for m in study.json())
        assert series_numbers == ["None", "[1]", "[1]"], series_numbers
    assert "DICOM JSON: invalid IS value of (00280008) left out" in web.log_text()


def test_frames_of_an_object_with_an_invalid_number_of_frames(web: PacsServer) -> None:
    """NumberOfFrames '1A': the frame is still served (the index's count)."""
    with web.http() as http:
        frame = _frame(http, "badVR.dcm")
    assert frame == dcmread(pydicom_file("badVR.dcm"))["PixelData"].value[: 10 * 10 * 4]


def test_dicom_json_of_invalid_numbers() -> None:
    """QIDO's direct writer hands a value that is no number to the Dataset
    path (not a ValueError, a 500), which writes the element without it;
    valid numbers among invalid ones keep their positions."""
    from pydicom.dataset import Dataset

    from viewer_api.dicomjson import NotDirect, to_json, values_json

    with pytest.raises(NotDirect):
        values_json([(0x00200011, "IS", "abc")])
    ds = Dataset()
    ds.add(RawDataElement(Tag(0x00200011), "IS", 4, b"abc ", 0, False, True))
    ds.add(RawDataElement(Tag(0x00200032), "DS", 8, b"1\\x\\2.5 ", 0, False, True))
    ds.SeriesDescription = "kept"
    assert to_json(ds) == {"0008103E": {"vr": "LO", "Value": ["kept"]}, "00200011": {"vr": "IS"},
                           "00200032": {"vr": "DS", "Value": [1.0, None, 2.5]}}


def test_qido_survives_invalid_numbers(web: PacsServer) -> None:
    with web.http() as http:
        for path in (f"/dicom-web/studies/{BAD_IS_STUDY}/series", f"/dicom-web/studies/{BAD_IS_STUDY}/instances"):
            response = http.get(path, params={"includefield": "all"})
            assert response.status_code == 200, response.text
            assert len(response.json()) == 3


# -- 2. BulkDataURIs inside sequences ------------------------------------------------------------
def test_bulk_data_uris_in_sequences_are_distinct_and_retrievable(web: PacsServer) -> None:
    """PS3.18 F.2.6: every BulkDataURI can be retrieved; WaveformData of the
    two WaveformSequence items are two URIs giving two different values."""
    ecg = dcmread(pydicom_file("waveform_ecg.dcm"))
    with web.http() as http:
        meta = http.get(_url("waveform_ecg.dcm") + "/metadata").json()[0]
        items = meta["54000100"]["Value"]
        uris = [item["54001010"]["BulkDataURI"] for item in items]
        assert len(set(uris)) == 2
        for uri, item in zip(uris, ecg.WaveformSequence, strict=True):
            parts = _parts(http.get(uri))
            assert len(parts) == 1 and parts[0][1] == item.WaveformData
        sequence = http.get(_url("waveform_ecg.dcm") + "/bulk/54000100")
        assert sequence.status_code == 404 and "not bulk data" in sequence.json()["error"]
        assert http.get(_url("waveform_ecg.dcm") + "/bulk/54000100/7/54001010").status_code == 404
        assert http.get(_url("waveform_ecg.dcm") + "/bulk/54000100/x/54001010").status_code == 400
        assert http.get(_url("waveform_ecg.dcm") + "/bulk/00100010").status_code == 404  # text, not bulk


# -- 3. frames ---------------------------------------------------------------------------------
def _frame(http: object, name: str, number: int = 1) -> bytes:
    parts = _parts(http.get(_url(name) + f"/frames/{number}"))  # type: ignore[attr-defined]
    assert parts[0][0]["content-type"].startswith("application/octet-stream")
    return parts[0][1]


def test_frames_of_8_bit_ow_big_endian_are_not_word_swapped(web: PacsServer) -> None:
    """OW in Big Endian is swapped per 16-bit word even for 8-bit pixels
    (PS3.5 7.3), odd lengths included: the frame is the pixels as pydicom reads them."""
    with web.http() as http:
        for name in ("OBXXXX1A_expb.dcm", "SC_rgb_small_odd_big_endian.dcm"):
            assert _frame(http, name) == dcmread(pydicom_file(name)).pixel_array.tobytes(), name


def test_native_ybr_full_422_frames_are_two_bytes_per_pixel(web: PacsServer) -> None:
    """PS3.3 C.7.6.3.1.2: native YBR_FULL_422 holds Y for each pixel and a
    CB, CR pair per two pixels; the frame is that, as stored."""
    ybr = dcmread(pydicom_file("SC_ybr_full_422_uncompressed.dcm"))
    with web.http() as http:
        frame = _frame(http, "SC_ybr_full_422_uncompressed.dcm")
    assert len(frame) == ybr.Rows * ybr.Columns * 2
    assert frame == ybr.PixelData[: len(frame)]


def test_frames_of_a_deflated_object(web: PacsServer) -> None:
    """Deflated Explicit VR Little Endian cannot be read by byte range: the
    object is inflated and its frames served; the metadata names them."""
    with web.http() as http:
        assert _frame(http, "image_dfl.dcm") == dcmread(pydicom_file("image_dfl.dcm")).pixel_array.tobytes()
        meta = http.get(_url("image_dfl.dcm") + "/metadata").json()[0]
        assert meta["7FE00010"]["BulkDataURI"].endswith(_url("image_dfl.dcm") + "/bulk/7FE00010")
        (_, body), = _parts(http.get(_url("image_dfl.dcm") + "/bulk/7FE00010"))
        assert body == dcmread(pydicom_file("image_dfl.dcm")).pixel_array.tobytes()


def test_undecodable_frame_is_406_not_415(tmp_path: Path) -> None:
    """A frame the codecs cannot decode to octet-stream: 406 (the client can
    still take it as stored), never 415 (a request-body status)."""
    from pacs.frames import FrameError, decoded_frame

    ds = dcmread(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdbnot a jpeg at all\xff\xd9"])
    path = _write(tmp_path / "broken.dcm", ds)
    with pytest.raises(FrameError) as caught:
        decoded_frame(path, 1)
    assert caught.value.http_status == 406 and "transfer-syntax=*" in str(caught.value)


# -- 4. the stored compressed syntax, asked for by name -------------------------------------------
def test_stored_compressed_syntax_can_be_asked_for(web: PacsServer) -> None:
    accept = 'multipart/related; type="application/dicom"; transfer-syntax={}'
    lossy = dcmread(io.BytesIO((web.data_dir.parent / "in" / "jpeg-lossy.dcm").read_bytes()))
    with web.http() as http:
        for name_or_ds, ts in (("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"), ("JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),
                               ("US1_J2KI.dcm", "1.2.840.10008.1.2.4.91"), (lossy, "1.2.840.10008.1.2.4.51")):
            response = http.get(_url(name_or_ds), headers={"Accept": accept.format(ts)})
            parts = _parts(response)
            assert f"transfer-syntax={ts}" in parts[0][0]["content-type"]
            got = dcmread(io.BytesIO(parts[0][1]))
            assert got.file_meta.TransferSyntaxUID == ts
            source = pydicom_file(name_or_ds) if isinstance(name_or_ds, str) else web.data_dir.parent / "in" / "jpeg-lossy.dcm"
            assert dataset_bytes(parts[0][1]) == dataset_bytes(source.read_bytes())
        # A syntax an instance is neither stored in nor convertible to stays a 406.
        refused = http.get(_url("JPEG-LL.dcm"), headers={"Accept": accept.format("1.2.840.10008.1.2.4.50")})
        assert refused.status_code == 406


# -- 5. a 500 keeps the connection usable ----------------------------------------------------------------
def test_connection_survives_a_500(web: PacsServer) -> None:
    """A stored object gone from storage is a 500 with the JSON error body
    naming the cause, and the keep-alive connection stays usable."""
    sop = web.lost_sop  # type: ignore[attr-defined]
    for path in web.data_dir.rglob(f"{sop}*"):
        path.unlink()
    request = (f"GET /dicom-web/studies/{LOST_STUDY}/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {web.token}\r\n\r\n").encode()
    follow = (f"GET /dicom-web/studies?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Authorization: Bearer {web.token}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", web.http_port), timeout=30) as sock:
        sock.sendall(request)
        first = _http_answer(sock)
        assert first.startswith(b"HTTP/1.1 500"), first[:200]
        assert b"missing from the archive's store" in first
        sock.sendall(follow)
        try:
            second = _http_answer(sock)
        except ConnectionResetError:
            second = b"reset"
        assert second.startswith(b"HTTP/1.1 200"), second[:200]


# -- 6. includefield ----------------------------------------------------------------------------------
def test_includefield_of_an_attribute_not_indexed_is_left_out(web: PacsServer) -> None:
    """PS3.18 8.3.4.3 (C-FIND return keys): a DICOM attribute the archive
    does not index is not returned; only a name that is no attribute is a 400."""
    with web.http() as http:
        for field in ("ImagePositionPatient", "00200032", "SliceThickness", "00091001",
                      "ImagePositionPatient,SOPInstanceUID"):
            response = http.get(f"/dicom-web/studies/{BAD_IS_STUDY}/instances", params={"includefield": field})
            assert response.status_code == 200, (field, response.text)
            assert len(response.json()) == 3 and all("00200032" not in i for i in response.json())
        bogus = http.get(f"/dicom-web/studies/{BAD_IS_STUDY}/instances", params={"includefield": "Nope"})
        assert bogus.status_code == 400 and "Nope" in bogus.json()["error"]


# -- 7. STOW-RS reason codes ---------------------------------------------------------------------------
def test_stow_non_dicom_part_into_a_study_is_c000(web: PacsServer) -> None:
    """Not DICOM is 0xC000 whether or not the request names a study (the
    part is parsed before its study is compared)."""
    with web.http() as http:
        body, content_type = build_multipart_related([("application/dicom", b"%PDF-1.4 not a DICOM file" * 4)])
        response = http.post(f"/dicom-web/studies/{generate_uid()}", content=body,
                             headers={"Content-Type": content_type})
    assert response.status_code == 409
    failure = response.json()["00081198"]["Value"][0]
    assert failure["00081197"]["Value"] == [0xC000], failure


def test_stow_metadata_and_bulk_data_is_415(web: PacsServer) -> None:
    """Metadata and bulk data (PS3.18 10.5.1.2.2) is not supported: one
    clear 415 for the request, not a 0x0122 per part."""
    meta = b'[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}]'
    body, content_type = build_multipart_related([("application/dicom+json", meta),
                                                  ("application/octet-stream", b"\0" * 64)],
                                                 type_param="application/dicom+json")
    with web.http() as http:
        response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 415 and "metadata and bulk data" in response.json()["error"]


def test_stow_response_type_not_supported_is_406(web: PacsServer) -> None:
    """Accept: application/dicom+xml (not implemented): 406 before anything
    is stored; DICOM JSON as before."""
    before = web.stats()["instances"]
    out = io.BytesIO()
    _copy("CT_small.dcm").save_as(out, enforce_file_format=True)  # type: ignore[attr-defined]
    body, content_type = build_multipart_related([("application/dicom", out.getvalue())])
    with web.http() as http:
        response = http.post("/dicom-web/studies", content=body,
                             headers={"Content-Type": content_type, "Accept": "application/dicom+xml"})
        assert response.status_code == 406
        assert web.stats()["instances"] == before
        response = http.post("/dicom-web/studies", content=body,
                             headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom+json"


# -- 8. rendered study ----------------------------------------------------------------------------------------
def test_rendered_study_parts_are_named_and_left_out_ones_said(web: PacsServer) -> None:
    with web.http() as http:
        instances = http.get(f"/dicom-web/studies/{MIXED_STUDY}/instances").json()
        ecg = [i for i in instances if i["00080016"]["Value"][0] == "1.2.840.10008.5.1.4.1.1.9.1.1"][0]
        ct_sops = {i["00080018"]["Value"][0] for i in instances} - {ecg["00080018"]["Value"][0]}
        response = http.get(f"/dicom-web/studies/{MIXED_STUDY}/rendered", headers={"Accept": "image/png"})
        parts = _parts(response)
        assert len(parts) == 2
        locations = [h["content-location"] for h, _ in parts]
        assert {re.search(r"/instances/([0-9.]+)/rendered$", loc).group(1) for loc in locations} == ct_sops  # type: ignore[union-attr]
        assert all(h["content-type"] == "image/png" and body.startswith(b"\x89PNG") for h, body in parts)
        warning = response.headers["warning"]
        assert warning.startswith("299 ") and "1 of 3" in warning and ecg["00080018"]["Value"][0] in warning
        # A study of one single-frame instance: the instance's URL.
        ybr = dcmread(pydicom_file("US1_J2KI.dcm"), stop_before_pixels=True)
        single = _parts(http.get(f"/dicom-web/studies/{ybr.StudyInstanceUID}/rendered"))
        assert single[0][0]["content-location"].endswith(f"/instances/{ybr.SOPInstanceUID}/rendered")
        # The PS3.18 Accept of a multipart rendered answer names the parts' type (it was 406).
        typed = http.get(f"/dicom-web/studies/{MIXED_STUDY}/rendered",
                         headers={"Accept": 'multipart/related; type="image/png"'})
        assert typed.status_code == 200 and 'type="image/png"' in typed.headers["content-type"]
        assert all(h["content-type"] == "image/png" for h, _ in _parts(typed))
        assert http.get(f"/dicom-web/studies/{MIXED_STUDY}/rendered",
                        headers={"Accept": 'multipart/related; type="application/dicom"'}).status_code == 406
        # One instance asked for in that form: a multipart answer of one part.
        one = http.get(locations[0], headers={"Accept": 'multipart/related; type="image/png"'})
        assert one.status_code == 200 and 'type="image/png"' in one.headers["content-type"]
        assert len(_parts(one)) == 1


# -- 9. HEAD ----------------------------------------------------------------------------------------------
def test_head_where_get_exists(web: PacsServer) -> None:
    """RFC 9110 9.3.2: HEAD answers GET's status and headers, no body, and
    the connection goes on (a streamed study is not read to the end)."""
    with web.http() as http:
        for path, media_type in ((f"/dicom-web/studies/{MIXED_STUDY}/metadata", "application/dicom+json"),
                                 (f"/dicom-web/studies/{MIXED_STUDY}", "multipart/related"),
                                 ("/dicom-web/studies", "application/dicom+json"),
                                 (_url("JPEG-LL.dcm") + "/rendered", "image/jpeg")):
            head = http.head(path)
            assert head.status_code == 200, path
            assert head.headers["content-type"].startswith(media_type) and head.content == b""
            assert http.get(path).status_code == 200
        assert http.head("/dicom-web/studies/1.2.3/metadata").status_code == 404


def test_clients_that_never_complete_their_headers_are_cut_off(web: PacsServer) -> None:
    """A client that connects and sends nothing, or sends its headers a byte at
    a time (slowloris), held its connection for good: enough of them and the
    appliance accepts no EMR or viewer request."""
    import select
    import time

    silent = socket.create_connection(("127.0.0.1", web.http_port), timeout=60)
    dribbler = socket.create_connection(("127.0.0.1", web.http_port), timeout=60)
    dribbler.sendall(b"GET /health HTTP/1.1\r\nHost: pacs\r\nX-Slow: ")
    answer = b""
    give_up = time.monotonic() + 12 * HEADER_TIMEOUT
    with silent, dribbler:
        while time.monotonic() < give_up:
            readable, _, _ = select.select([dribbler], [], [], 0.5)
            if readable:
                chunk = dribbler.recv(4096)
                if not chunk:
                    break
                answer += chunk
            else:
                dribbler.sendall(b"a")
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert silent.recv(100) == b""  # closed without an answer: it asked nothing
    # Everyone else is served meanwhile and after.
    assert web.http().get("/health").status_code == 200
