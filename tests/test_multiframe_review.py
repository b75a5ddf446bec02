"""Big multi-frame objects (tomosynthesis, enhanced CT/MR) converted from one
compression to another against a running `pacs serve`, over real sockets.

A JPEG-LS object asked as JPEG 2000 lossless (WADO-RS ``transfer-syntax=``,
a routing rule's ``--transcode``, a C-MOVE peer taking only another codec)
was read, decoded and re-encoded whole in memory: ~1.1 GB peak for a 300 MB
tomosynthesis. It now goes frame by frame (each frame decoded and encoded
as it is sent), and the frames being converted at once in the process are
bounded, so that several clients of one big object do not each hold their
buffers.

Memory is the server's peak resident set (VmHWM), reset through
/proc/PID/clear_refs just before each request."""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from .conftest import Backend, PacsServer
from .peers import wait_until
from .test_routing import Receiver

MB = 1 << 20
ACCEPT = 'multipart/related; type="application/dicom"'
# The recoded object: 20 frames of 1024x1024 16-bit, 40 MB decoded.
FRAMES, SIDE = 20, 1024
# What the server may grow by converting it: the whole-object path holds it
# several times over (read, decoded, encoded: 100-170 MB here); frame by frame
# holds a frame or two and the JPEG 2000 encoder's own buffers.
RECODE_GROWTH_LIMIT = 70 * MB
# The object read by several clients at once: 2 frames of 18 MB decoded.
# Each response holds the frame it sends (18 MB each); a frame being decoded
# costs ~75 MB more, and those are bounded in the process (codec_work). Eight
# clients took the server ~450 MB up (the decoder's iterator kept each
# response's last compressed and decoded frame, and whole frames were copied
# again by the HTTP layer), then ~290-330 MB; with the frames held at once
# bounded too (pacs.pixel_memory: 24 MB, one of these) and the allocator
# giving back what a big frame's decode freed, ~125 MB.
BIG_FRAMES, BIG_SIDE = 2, 3072
CLIENTS = 8
CONCURRENT_GROWTH_LIMIT = 200 * MB


def _pixels(frames: int, side: int, seed: int) -> np.ndarray:
    """12-bit samples: a gradient with noise (JPEG-LS does not make it tiny),
    each frame's first samples naming it."""
    rng = np.random.default_rng(seed)
    ramp = (np.arange(side * side, dtype=np.uint32) % 3000).astype(np.uint16).reshape(side, side)
    arr = np.empty((frames, side, side), dtype=np.uint16)
    for n in range(frames):
        arr[n] = ramp + rng.integers(0, 64, (side, side), dtype=np.uint16)
        arr[n, 0, :4] = (n, n, 0xABC, n)
    return arr


def _image(pixels: np.ndarray) -> Dataset:
    """A Multi-frame Grayscale Word SC image of *pixels* (no Pixel Data yet)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "MF0001", "TRAN^THI BICH"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
    frames, rows, columns = pixels.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _jpeg_ls(path: Path, pixels: np.ndarray) -> Dataset:
    """A Multi-frame Grayscale Word SC image of *pixels*, stored JPEG-LS lossless."""
    ds = _image(pixels)
    ds.compress(JPEGLSLossless, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path, stop_before_pixels=True)


def _deflated(path: Path, pixels: np.ndarray) -> Dataset:
    """The same image stored Deflated Explicit VR Little Endian."""
    ds = _image(pixels)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path, stop_before_pixels=True)


class Objects:
    """What the module's archive holds, and the routing destination."""

    def __init__(self) -> None:
        self.tmp = Path()
        self.receiver: Receiver | None = None
        self.recoded = Dataset()
        self.recoded_pixels = np.zeros(0)
        self.big = Dataset()
        self.big_pixels = np.zeros(0)
        self.deflated = Dataset()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, Objects]]:
    tmp = tmp_path_factory.mktemp("multiframe")
    inbox = tmp / "in"
    inbox.mkdir()
    objects = Objects()
    objects.recoded_pixels = _pixels(FRAMES, SIDE, 1)
    objects.recoded = _jpeg_ls(inbox / "recoded.dcm", objects.recoded_pixels)
    objects.big_pixels = _pixels(BIG_FRAMES, BIG_SIDE, 2)
    objects.big = _jpeg_ls(inbox / "big.dcm", objects.big_pixels)
    objects.deflated = _deflated(inbox / "deflated.dcm", objects.big_pixels)
    small = _jpeg_ls(inbox / "small.dcm", _pixels(2, 64, 3))
    objects.tmp = tmp
    objects.receiver = Receiver(tmp / "every").start()  # storescp +xa: every syntax
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(inbox))
    server.cli("ae", "add", "EVERY", "--host", "127.0.0.1", "--port", str(objects.receiver.port))
    server.start()
    # The codecs' imports and first buffers, not counted as any test's growth.
    with _client(server) as http:
        for target in (JPEG2000Lossless, RLELossless, ExplicitVRLittleEndian):
            _single_part(http.get(_url(small), headers={"Accept": f"{ACCEPT}; transfer-syntax={target}"}))
    try:
        yield server, objects
    finally:
        server.stop()
        objects.receiver.stop()


def _status_kb(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def _reset_peak(server: PacsServer) -> int:
    """Reset the server's peak RSS (VmHWM) to its current RSS; that RSS in bytes."""
    assert server.proc is not None
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
    return _status_kb(server.proc.pid, "VmRSS") * 1024


def _peak(server: PacsServer) -> int:
    assert server.proc is not None
    return _status_kb(server.proc.pid, "VmHWM") * 1024


def _url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _client(server: PacsServer) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers=server.auth_headers, timeout=300)


def _single_part(response: httpx.Response) -> tuple[str, bytes]:
    assert response.status_code == 200, response.text[:300]
    boundary = response.headers["content-type"].split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    (piece,) = response.content.split(b"--" + boundary)[1:-1]
    head, body = piece.split(b"\r\n\r\n", 1)
    return head.decode(), body.removesuffix(b"\r\n")


@pytest.mark.parametrize("target", [JPEG2000Lossless, RLELossless])
def test_jpeg_ls_object_in_another_compression_goes_frame_by_frame(archive: tuple[PacsServer, Objects],
                                                                   target: str) -> None:
    """WADO-RS of a JPEG-LS multi-frame object with ``transfer-syntax=`` of
    another lossless codec: the same pixels, one encapsulated item per frame
    after an empty Basic Offset Table, and the server's peak memory grows by
    far less than the object decoded (whole, it grew by ~4 times that)."""
    server, objects = archive
    original = objects.recoded
    with _client(server) as http:
        before = _reset_peak(server)
        response = http.get(_url(original), headers={"Accept": f"{ACCEPT}; transfer-syntax={target}"})
        grown = _peak(server) - before
    head, body = _single_part(response)
    assert f"transfer-syntax={target}" in head
    got = dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == original.SOPInstanceUID and got.NumberOfFrames == FRAMES
    assert got.PhotometricInterpretation == "MONOCHROME2" and got.BitsStored == 12
    assert got["PixelData"].is_undefined_length
    assert len(list(generate_frames(got.PixelData, number_of_frames=FRAMES))) == FRAMES
    assert np.array_equal(got.pixel_array, objects.recoded_pixels), "pixels changed"
    assert grown < RECODE_GROWTH_LIMIT, (
        f"JPEG-LS -> {target}: the server grew by {grown // MB} MB converting {FRAMES} frames "
        f"({objects.recoded_pixels.nbytes // MB} MB decoded)")


def test_routing_rule_recodes_a_jpeg_ls_object_frame_by_frame(archive: tuple[PacsServer, Objects]) -> None:
    """A rule ``--transcode j2k-lossless`` on a multi-frame object a
    modality sent as JPEG-LS: the destination gets it as JPEG 2000 lossless
    with the same pixels, and neither its storing nor its routing grows the
    server by the object several times over (the copy was decoded and
    re-encoded whole in memory: ~1.1 GB for a 300 MB tomosynthesis)."""
    server, objects = archive
    receiver = objects.receiver
    assert receiver is not None
    copy = dcmread(objects.tmp / "in" / "recoded.dcm")
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = objects.tmp / "routed.dcm"
    copy.save_as(path, enforce_file_format=True)
    del copy
    server.cli("route", "add", "to-j2k", "--if", "CallingAE=MF_JLS", "--to-ae", "EVERY",
               "--transcode", "j2k-lossless")
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    before = _reset_peak(server)
    result = server.storescu("-xt", str(path), calling="MF_JLS")  # JPEG-LS lossless, as stored
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until(lambda: sop in receiver.files(), timeout=90), "not routed"
    grown = _peak(server) - before
    got = dcmread(receiver.files()[sop])
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert got.NumberOfFrames == FRAMES
    assert np.array_equal(got.pixel_array, objects.recoded_pixels), "pixels changed"
    assert grown < RECODE_GROWTH_LIMIT, (
        f"stored and routed as JPEG 2000: the server grew by {grown // MB} MB for {FRAMES} frames "
        f"({objects.recoded_pixels.nbytes // MB} MB decoded)")


def test_a_big_object_only_a_whole_conversion_can_do_is_refused(archive: tuple[PacsServer, Objects]) -> None:
    """A Deflated object asked as JPEG 2000 is still converted whole (its
    pixel data cannot be read by range); at 36 MB decoded, more than such a
    conversion may hold, it is a 406 naming why before any byte, rather
    than ~150 MB of server memory. As stored it still streams."""
    server, objects = archive
    original = objects.deflated
    with _client(server) as http:
        before = _reset_peak(server)
        refused = http.get(_url(original), headers={"Accept": f"{ACCEPT}; transfer-syntax={JPEG2000Lossless}"})
        grown = _peak(server) - before
        assert refused.status_code == 406, refused.text[:300]
        assert "in memory" in refused.text and "more than the 32 MB" in refused.text, refused.text[:300]
        assert grown < RECODE_GROWTH_LIMIT, f"the server grew by {grown // MB} MB refusing it"
        head, body = _single_part(http.get(_url(original), headers={"Accept": f"{ACCEPT}; transfer-syntax=*"}))
    assert f"transfer-syntax={DeflatedExplicitVRLittleEndian}" in head
    assert dcmread(io.BytesIO(body)).PixelData == objects.big_pixels.tobytes()


# Last: the frames converted at once leave the allocator's heap larger, which
# would hide the growth the tests above look for.
def test_concurrent_conversions_of_big_frames_take_turns(archive: tuple[PacsServer, Objects]) -> None:
    """Eight clients retrieving at once a JPEG-LS object of 18 MB frames by
    default (Explicit VR Little Endian: decoded frame by frame) all get
    every pixel, and the server grows by less than eight decodes at once
    would take it: the frames being decoded take turns."""
    server, objects = archive
    original = objects.big
    expected = objects.big_pixels.tobytes()

    def fetch(_: int) -> bool:
        with _client(server) as http:
            body = _single_part(http.get(_url(original), headers={"Accept": ACCEPT}))[1]
        got = dcmread(io.BytesIO(body))
        return got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and got.PixelData == expected

    before = _reset_peak(server)
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(fetch, range(CLIENTS)))
    grown = _peak(server) - before
    assert all(results), "pixels changed"
    assert grown < CONCURRENT_GROWTH_LIMIT, (
        f"{CLIENTS} clients at once: the server grew by {grown // MB} MB decoding frames of "
        f"{objects.big_pixels[0].nbytes // MB} MB")
