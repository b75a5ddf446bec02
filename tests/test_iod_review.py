"""Objects that are not plain CT slices, over DICOMweb (review of the IOD
breadth): a video (MPEG-2, H.264, HEVC) is served as its stream at its
Pixel Data bulk data URI, /rendered and WADO-URI; the Pixel Data
BulkDataURI's length does not grow with the frame count; Float and Double
Float Pixel Data keep their own tag and VR in metadata and bulk data."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .conftest import Backend, PacsServer
from .test_dicomweb_more import _parts

ROOT = "1.2.826.0.1.3680043.8.498.77"
STUDY = generate_uid(prefix=ROOT + ".1.")
# Transfer syntax -> (its own media type, the stream's first bytes).
VIDEOS = {
    "1.2.840.10008.1.2.4.100": ("video/mpeg", b"\x00\x00\x01\xb3"),  # MPEG-2 MP@ML
    "1.2.840.10008.1.2.4.102": ("video/mp4", b"\x00\x00\x00\x01\x67"),  # H.264 High Profile 4.1
    "1.2.840.10008.1.2.4.107": ("video/H265", b"\x00\x00\x00\x01\x40\x01"),  # HEVC Main
}
MANY_FRAMES = 1500  # a frame-number list of these was ~8 KB: nginx's default limit
FLOATS = {"FloatPixelData": ("7FE00008", "OF", 32, np.float32),
          "DoubleFloatPixelData": ("7FE00009", "OD", 64, np.float64)}


def _base(kind: str) -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID = "IOD^REVIEW", "IOD1"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT + ".2.")
    ds.SOPInstanceUID = generate_uid(prefix=ROOT + ".3.")
    ds.SeriesDescription = kind
    return ds


def _video(ts: str, stream: bytes) -> Dataset:
    """A 75-frame endoscopy clip whose stream is split over two fragments
    (the stream is their concatenation, PS3.5 8.2), empty offset table."""
    ds = _base("video " + ts)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1.1"  # Video Endoscopic Image Storage
    ds.Modality = "ES"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 480, 640, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_PARTIAL_420", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = 75, 40.0, 0x00181063
    ds.PixelData = encapsulate([stream[:30000], stream[30000:]])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _many_frames() -> Dataset:
    ds = _base("many frames")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 4, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = MANY_FRAMES
    ds.PixelData = (np.arange(16 * MANY_FRAMES) % 251).astype(np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _float_map(keyword: str) -> Dataset:
    _, _, bits, dtype = FLOATS[keyword]
    ds = _base(keyword)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 16, 16, 2, 1
    ds.PhotometricInterpretation, ds.BitsAllocated = "MONOCHROME2", bits
    setattr(ds, keyword, np.linspace(-1.5, 3000.25, 512).astype(dtype).tobytes())
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("iod-review")
    inbox = tmp / "in"
    inbox.mkdir()
    objects: dict[str, Dataset] = {}
    streams: dict[str, bytes] = {}
    for ts, (_, head) in VIDEOS.items():
        streams[ts] = head + os.urandom(50000 - len(head))
        objects[ts] = _video(ts, streams[ts])
    objects["many"] = _many_frames()
    for keyword in FLOATS:
        objects[keyword] = _float_map(keyword)
    for key, ds in objects.items():
        ds.save_as(inbox / f"{key}.dcm", enforce_file_format=True)
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(inbox))
    server.start()
    server.objects, server.streams = objects, streams  # type: ignore[attr-defined]
    yield server
    server.stop()


def _url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _objects(web: PacsServer) -> dict[str, Dataset]:
    return web.objects  # type: ignore[attr-defined,no-any-return]


def _path(uri: str) -> str:
    """An absolute BulkDataURI as a path on the test client's server."""
    return "/dicom-web/" + uri.split("/dicom-web/", 1)[1]


# -- 1. video ---------------------------------------------------------------------------
@pytest.mark.parametrize("ts", VIDEOS)
def test_video_metadata_points_at_its_playable_stream(web: PacsServer, ts: str) -> None:
    """OHIF plays the BulkDataURI of 7FE00010, asking video/mp4 (Accept or
    ?accept=): it is the whole stream, the fragments concatenated, byte for
    byte, typed as PS3.18 Table 8.7.3-5 says (it was a list of 75 frame
    numbers answering 422)."""
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    media_type = VIDEOS[ts][0]
    with web.http() as http:
        meta = http.get(_url(ds) + "/metadata").json()[0]
        assert meta["7FE00010"]["vr"] == "OB"
        uri = _path(meta["7FE00010"]["BulkDataURI"])
        assert uri == _url(ds) + "/bulk/7FE00010"
        for response in (http.get(uri, headers={"Accept": media_type}),
                         http.get(uri, params={"accept": media_type})):
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == media_type
            assert response.headers["content-length"] == str(len(stream))
            assert response.content == stream


def test_hevc_is_also_served_as_mp4(web: PacsServer) -> None:
    """PS3.18 lists HEVC under video/mp4 as well as video/H265; OHIF asks video/mp4."""
    ts = "1.2.840.10008.1.2.4.107"
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    with web.http() as http:
        for path in ("/bulk/7FE00010", "/rendered"):
            response = http.get(_url(ds) + path, headers={"Accept": "video/mp4"})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "video/mp4" and response.content == stream


def test_video_bulk_data_as_multipart(web: PacsServer) -> None:
    """Without a single-part type the bulk data is multipart/related, the
    stream its one part (typed video/..., also when asked as octet-stream
    as stored); decoded octets cannot be had: a 406 saying why."""
    ts = "1.2.840.10008.1.2.4.102"
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    url = _url(ds) + "/bulk/7FE00010"
    with web.http() as http:
        for accept in (None, 'multipart/related; type="video/mp4"',
                       'multipart/related; type="application/octet-stream"; transfer-syntax=*'):
            response = http.get(url, headers={"Accept": accept} if accept else {})
            (headers, body), = _parts(response)
            assert body == stream
            assert headers["content-type"] == f"video/mp4; transfer-syntax={ts}"
            assert headers["content-location"].endswith(url)
        refused = http.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert refused.status_code == 406 and "video" in refused.json()["error"]


def test_video_byte_ranges(web: PacsServer) -> None:
    """A browser's <video> seeks with Range (Safari plays nothing without):
    a range across the two fragments, the last bytes, and one past the end."""
    ts = "1.2.840.10008.1.2.4.100"
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    url = _url(ds) + "/bulk/7FE00010?accept=video/mpeg"
    with web.http() as http:
        part = http.get(url, headers={"Range": "bytes=29000-31999"})
        assert part.status_code == 206, part.text
        assert part.headers["content-range"] == f"bytes 29000-31999/{len(stream)}"
        assert part.content == stream[29000:32000]
        tail = http.get(url, headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == stream[-100:]
        past = http.get(url, headers={"Range": f"bytes={len(stream)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(stream)}"
        assert http.get(url).headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("ts", VIDEOS)
def test_rendered_video_is_the_stream(web: PacsServer, ts: str) -> None:
    """/rendered of a video answers the stream when the Accept allows its
    type (*/* too); an image type is a 406 that names the video types."""
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    media_type = VIDEOS[ts][0]
    with web.http() as http:
        for accept in (media_type, "*/*", f"image/jpeg;q=0.5, {media_type}"):
            response = http.get(_url(ds) + "/rendered", headers={"Accept": accept})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == media_type and response.content == stream
        refused = http.get(_url(ds) + "/rendered", headers={"Accept": "image/jpeg"})
        assert refused.status_code == 406
        assert "video" in refused.json()["error"] and media_type in refused.json()["error"]


@pytest.mark.parametrize("ts", VIDEOS)
def test_wado_uri_video(web: PacsServer, ts: str) -> None:
    """WADO-URI contentType=video/... (and no contentType) gives the
    stream; an image contentType is a 406 listing what can be had."""
    ds, stream = _objects(web)[ts], web.streams[ts]  # type: ignore[attr-defined]
    media_type = VIDEOS[ts][0]
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
             "objectUID": ds.SOPInstanceUID}
    with web.http() as http:
        for extra in ({"contentType": media_type}, {}):
            response = http.get("/wado", params={**query, **extra})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == media_type and response.content == stream
        refused = http.get("/wado", params={**query, "contentType": "image/jpeg"})
        assert refused.status_code == 406 and media_type in refused.json()["error"]


def test_frames_of_a_video_are_refused_with_the_reason(web: PacsServer) -> None:
    """A video's frames are one stream: frames/N (and its rendered form,
    which the viewer asked for) is a 422 that says so and where the stream is."""
    ds = _objects(web)["1.2.840.10008.1.2.4.102"]
    with web.http() as http:
        for path in ("/frames/1", "/frames/1,2", "/frames/1/rendered"):
            response = http.get(_url(ds) + path)
            assert response.status_code == 422, (path, response.text)
            error = response.json()["error"]
            assert "video" in error and "bulk/7FE00010" in error


def test_viewer_knows_a_series_is_a_video(web: PacsServer) -> None:
    """The built-in viewer plays instances flagged as video in a <video>
    element, instead of asking for 75 frames that all fail."""
    with web.http() as http:
        study = http.get(f"/api/studies/{STUDY}")
        assert study.status_code == 200, study.text
    flags = {i["sop_uid"]: i["video"] for s in study.json()["series"] for i in s["instances"]}
    for ts, (media_type, _) in VIDEOS.items():
        assert flags[_objects(web)[ts].SOPInstanceUID] == media_type
    assert flags[_objects(web)["many"].SOPInstanceUID] is None


# -- 6. the Pixel Data BulkDataURI of a multi-frame object ------------------------------------
def test_multiframe_bulk_data_uri_is_short_and_serves_every_frame(web: PacsServer) -> None:
    """The BulkDataURI names the Pixel Data, not its 1,500 frame numbers (a
    URI past 8 KB is a 414 behind a default nginx); it serves every frame,
    one part each, in order."""
    ds = _objects(web)["many"]
    with web.http() as http:
        uri = http.get(_url(ds) + "/metadata").json()[0]["7FE00010"]["BulkDataURI"]
        assert uri.endswith(_url(ds) + "/bulk/7FE00010") and len(uri) < 300
        parts = _parts(http.get(_path(uri)))
    assert len(parts) == MANY_FRAMES
    assert b"".join(body for _, body in parts) == ds.PixelData
    assert parts[-1][0]["content-location"].endswith(f"/frames/{MANY_FRAMES}")


# -- 2. Float and Double Float Pixel Data ------------------------------------------------------
@pytest.mark.parametrize("keyword", FLOATS)
def test_float_pixel_data_keeps_its_tag_and_vr(web: PacsServer, keyword: str) -> None:
    """A Parametric Map's Float (OF) / Double Float (OD) Pixel Data is
    described by its own tag and VR (it was 7FE00010 OW: read as integers),
    and its BulkDataURI gives the values; 7FE00010 is not there."""
    tag, vr, _, _ = FLOATS[keyword]
    ds = _objects(web)[keyword]
    with web.http() as http:
        meta = http.get(_url(ds) + "/metadata").json()[0]
        assert meta[tag]["vr"] == vr and "7FE00010" not in meta
        uri = _path(meta[tag]["BulkDataURI"])
        assert uri == _url(ds) + f"/bulk/{tag}"
        parts = _parts(http.get(uri))
        assert b"".join(body for _, body in parts) == getattr(ds, keyword)
        assert all(h["content-type"] == "application/octet-stream" for h, _ in parts)
        missing = http.get(_url(ds) + "/bulk/7FE00010")
        assert missing.status_code == 404 and tag in missing.json()["error"]
