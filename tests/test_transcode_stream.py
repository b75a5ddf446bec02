"""Retrieval with conversion against a running `pacs serve`: lossless
encoders keep every pixel (colour stored plane by plane too), and a change
of element encoding only (Implicit <-> Explicit VR Little Endian, Big Endian
to Little Endian, corrected patient data) streams the pixel data instead of
holding the object in memory (issue 9 scenario 8: `pacs serve` below 300 MB
whatever the object's size), over WADO-RS (instances and frames) and C-GET.

Memory is the server's resident set sampled while it answers, compared with
just before the request."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from .conftest import Backend, PacsServer, pydicom_file, run_dcmtk

# A multi-frame object of 96 MiB: 192 frames of 512 x 512 x 16 bit.
FRAMES, SIZE = 192, 512
BIG_BYTES = FRAMES * SIZE * SIZE * 2
# What the server may grow by while it sends such an object (or four):
# without streaming it is several times the object.
GROWTH_LIMIT_MB = 48
ACCEPT = 'multipart/related; type="application/dicom"'
STUDY_PATIENT = ("079000111222", "PHAM^THI MAI")


def _new_uids(ds: Dataset, study: str | None = None, series: str | None = None) -> Dataset:
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _pixels() -> np.ndarray:
    return (np.arange(FRAMES * SIZE * SIZE, dtype=np.uint32) % 4093).astype(np.uint16).reshape(FRAMES, SIZE, SIZE)


def _big(path: Path, syntax: str, study: str, patient: tuple[str, str], pixels: np.ndarray) -> Dataset:
    """A 96 MiB multi-frame object in *syntax*, written by pydicom."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    _new_uids(ds, study)
    ds.PatientID, ds.PatientName = patient
    ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "OT", 1, 9
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SmallestImagePixelValue = 0  # US or SS: byte order matters
    big_endian = syntax == ExplicitVRBigEndian
    ds.PixelData = pixels.byteswap().tobytes() if big_endian else pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.DataSetTrailingPadding = b"\0" * 16
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=not big_endian,
               enforce_file_format=True)
    return ds


def _planar(ds: Dataset) -> Dataset:
    """The same colour pixels stored plane by plane (Planar Configuration 1)."""
    if ds.get("PlanarConfiguration", 0) == 1:
        return ds
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = ds.pixel_array.reshape(frames, ds.Rows, ds.Columns, 3)
    ds.PixelData = np.ascontiguousarray(arr.transpose(0, 3, 1, 2)).tobytes()
    ds.PlanarConfiguration = 1
    return ds


class Objects:
    """What the module's archive holds, by role."""

    def __init__(self) -> None:
        self.colour: dict[str, Dataset] = {}
        self.big: dict[str, Dataset] = {}
        self.pixels = np.zeros(0)
        self.study = ""
        self.mixed_study = ""
        self.big_endian_study = ""
        self.big_endian: Dataset | None = None
        self.compressed = Dataset()


@pytest.fixture(scope="module", params=["sqlite-fs", "sqlite-s3"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, Objects]]:
    tmp = tmp_path_factory.mktemp(f"transcode-{request.param}")
    env: dict[str, str] = {}
    storage = None
    if request.param.endswith("s3"):
        s3 = request.getfixturevalue("s3_server")
        storage = s3.url(f"tc-{tmp.name[-8:].lower().replace('_', '-')}")
        env = {"PACS_S3_ACCESS_KEY": s3.access_key, "PACS_S3_SECRET_KEY": s3.secret_key}
    server = PacsServer(tmp / "data", Backend(request.param, None, storage, env))
    objects = Objects()
    first, second, third = tmp / "in1", tmp / "in2", tmp / "in3"
    for folder in (first, second, third):
        folder.mkdir()
    # Colour and monochrome objects for the lossless encoders.
    sources = {
        "rgb8-planar": dcmread(pydicom_file("color-pl.dcm")),
        "rgb16-planar": _planar(dcmread(pydicom_file("SC_rgb_16bit.dcm"))),
        "rgb8-planar-2frames": _planar(dcmread(pydicom_file("SC_rgb_2frame.dcm"))),
        "rgb8": dcmread(pydicom_file("SC_rgb.dcm")),
        "rgb16": dcmread(pydicom_file("SC_rgb_16bit.dcm")),
        "mono16": dcmread(pydicom_file("MR_small.dcm")),
        "mono8": dcmread(pydicom_file("OBXXXX1A.dcm")),
    }
    for name, ds in sources.items():
        _new_uids(ds)
        ds.save_as(first / f"{name}.dcm", enforce_file_format=True)
        objects.colour[name] = ds
    # One study: an anchor giving the study's patient, then 96 MiB objects,
    # one of which names another patient (its values become corrections).
    objects.study = generate_uid()
    anchor = _new_uids(dcmread(pydicom_file("CT_small.dcm")), objects.study)
    anchor.PatientID, anchor.PatientName = STUDY_PATIENT
    anchor.save_as(first / "anchor.dcm", enforce_file_format=True)
    objects.pixels = _pixels()
    objects.big["implicit"] = _big(second / "implicit.dcm", ImplicitVRLittleEndian, objects.study, STUDY_PATIENT,
                                   objects.pixels)
    objects.big["big-endian"] = _big(second / "big-endian.dcm", ExplicitVRBigEndian, objects.study, STUDY_PATIENT,
                                     objects.pixels)
    objects.big["corrected"] = _big(third / "corrected.dcm", ExplicitVRLittleEndian, objects.study,
                                    ("OTHER01", "Other^Person"), objects.pixels)
    # The same pixels RLE-compressed, in a study of their own.
    _big(tmp / "rle-source.dcm", ExplicitVRLittleEndian, generate_uid(), STUDY_PATIENT, objects.pixels)
    rle = dcmread(tmp / "rle-source.dcm")
    rle.compress(RLELossless, generate_instance_uid=False)
    rle.save_as(first / "rle.dcm", enforce_file_format=True)
    objects.compressed = dcmread(first / "rle.dcm", stop_before_pixels=True)
    del rle
    # A study whose second instance is in a syntax nothing here decodes.
    objects.mixed_study = generate_uid()
    ct = _new_uids(dcmread(pydicom_file("CT_small.dcm")), objects.mixed_study)
    ct.SeriesNumber = 1
    ct.save_as(first / "mixed-ct.dcm", enforce_file_format=True)
    video = _new_uids(dcmread(pydicom_file("CT_small.dcm")), objects.mixed_study)
    video.SeriesNumber = 2
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 124])
    video["PixelData"].VR = "OB"
    video.save_as(first / "mixed-video.dcm", enforce_file_format=True)
    # A small Big Endian object with a native one in a study of their own.
    objects.big_endian_study = generate_uid()
    be = _new_uids(dcmread(pydicom_file("MR_small_bigendian.dcm")), objects.big_endian_study)
    be.save_as(first / "be.dcm", enforce_file_format=True)
    objects.big_endian = dcmread(first / "be.dcm")
    neighbour = _new_uids(dcmread(pydicom_file("CT_small.dcm")), objects.big_endian_study)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        setattr(neighbour, keyword, be.get(keyword, ""))
    neighbour.save_as(first / "be-neighbour.dcm", enforce_file_format=True)
    for folder in (first, second, third):
        server.cli("import", str(folder))
    server.start()
    yield server, objects
    server.stop()


# -- measuring ------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class PeakGrowth:
    """The server's resident memory while a block runs, above what it was
    just before (MB)."""

    def __init__(self, server: PacsServer) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid
        self.before = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_kb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> PeakGrowth:
        self.before = self.peak = _rss_kb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kb(self.pid))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024

    @property
    def peak_mb(self) -> float:
        return self.peak / 1024


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    assert response.status_code == 200, response.text[:300]
    boundary = response.headers["content-type"].split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    pieces = response.content.split(b"--" + boundary)[1:-1]
    parts = []
    for piece in pieces:
        head, body = piece.split(b"\r\n\r\n", 1)
        parts.append((head.decode(), body.removesuffix(b"\r\n")))
    return parts


def _url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _get_whole(server: PacsServer, url: str, accept: str) -> httpx.Response:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers=server.auth_headers,
                      timeout=600) as http:
        return http.get(url, headers={"Accept": accept})


def _check_big(data: bytes, syntax: str | tuple[str, ...], pixels: np.ndarray, original: Dataset) -> None:
    got = dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID in ((syntax,) if isinstance(syntax, str) else syntax)
    assert (got.PatientID, str(got.PatientName)) == STUDY_PATIENT  # corrections applied
    assert got.SOPInstanceUID == original.SOPInstanceUID and got.NumberOfFrames == FRAMES
    assert got.SmallestImagePixelValue == 0 and got.BitsStored == 12
    assert got.PixelData == pixels.tobytes(), "pixel data changed"
    assert got.DataSetTrailingPadding == b"\0" * 16


# -- finding 1: lossless encoders keep the pixels ----------------------------------------------
@pytest.mark.parametrize("target", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_targets_keep_pixels_of_planar_colour(archive: tuple[PacsServer, Objects], target: str,
                                                       tmp_path: Path) -> None:
    """RGB stored plane by plane (Planar Configuration 1) was RLE-encoded as
    if interleaved: every segment held the bytes of the wrong plane, and the
    object still claimed to be lossless. Every lossless target gives back
    exactly the stored pixels (8 and 16 bit, 1 and 2 frames, colour by
    plane and by pixel, monochrome), decoded by pydicom and, for RLE, by
    DCMTK's dcmdrle too."""
    server, objects = archive
    with server.http() as http:
        for name, original in objects.colour.items():
            response = http.get(_url(original), headers={"Accept": f"{ACCEPT}; transfer-syntax={target}"})
            ((_, body),) = _parts(response)
            got = dcmread(io.BytesIO(body))
            assert got.file_meta.TransferSyntaxUID == target, name
            assert np.array_equal(got.pixel_array, original.pixel_array), f"{name}: pixels changed in {target}"
            if target == RLELossless:
                encoded, decoded = tmp_path / f"{name}.rle.dcm", tmp_path / f"{name}.dec.dcm"
                encoded.write_bytes(body)
                result = run_dcmtk("dcmdrle", str(encoded), str(decoded))
                assert result.returncode == 0, result.stderr
                assert np.array_equal(dcmread(decoded).pixel_array, original.pixel_array), f"{name}: DCMTK disagrees"


# -- findings 2 and 5: element encoding changes stream the pixels ------------------------------
@pytest.mark.parametrize(
    ("role", "accept", "syntax"),
    [
        # What most modalities send, asked with the default syntax (Explicit VR LE).
        ("implicit", ACCEPT, ExplicitVRLittleEndian),
        # Corrected patient data, as stored.
        ("corrected", f"{ACCEPT}; transfer-syntax=*", ExplicitVRLittleEndian),
        # Big Endian: the default syntax is Explicit VR LE (PS3.18 8.7.3), byte-swapped on the way.
        ("big-endian", ACCEPT, ExplicitVRLittleEndian),
        ("corrected", f"{ACCEPT}; transfer-syntax={ImplicitVRLittleEndian}", ImplicitVRLittleEndian),
    ],
)
def test_header_only_conversions_stream_the_pixel_data(archive: tuple[PacsServer, Objects], role: str, accept: str,
                                                       syntax: str) -> None:
    server, objects = archive
    original = objects.big[role]
    with PeakGrowth(server) as memory:
        response = _get_whole(server, _url(original), accept)
    ((head, body),) = _parts(response)
    assert f"transfer-syntax={syntax}" in head or "transfer-syntax=*" in accept
    _check_big(body, syntax, objects.pixels, original)
    assert memory.growth_mb < GROWTH_LIMIT_MB, (
        f"{role}: the server grew by {memory.growth_mb:.0f} MB sending a {BIG_BYTES >> 20} MB object")
    assert memory.peak_mb < 300


@pytest.mark.parametrize(
    ("role", "accept", "syntax"),
    [
        # Native to a lossless compression: encoded frame by frame.
        ("implicit", f"{ACCEPT}; transfer-syntax={RLELossless}", RLELossless),
        ("implicit", f"{ACCEPT}; transfer-syntax={JPEGLSLossless}", JPEGLSLossless),
        # Compressed to the default syntax: decoded frame by frame.
        ("compressed", ACCEPT, ExplicitVRLittleEndian),
    ],
)
def test_codec_changes_go_frame_by_frame(archive: tuple[PacsServer, Objects], role: str, accept: str,
                                         syntax: str) -> None:
    server, objects = archive
    original = objects.compressed if role == "compressed" else objects.big[role]
    with PeakGrowth(server) as memory:
        response = _get_whole(server, _url(original), accept)
    ((head, body),) = _parts(response)
    assert f"transfer-syntax={syntax}" in head
    got = dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == original.SOPInstanceUID and got.NumberOfFrames == FRAMES
    assert np.array_equal(got.pixel_array, objects.pixels), "pixels changed"
    assert got.DataSetTrailingPadding == b"\0" * 16
    assert memory.growth_mb < GROWTH_LIMIT_MB, (
        f"{role} -> {syntax}: the server grew by {memory.growth_mb:.0f} MB converting a {BIG_BYTES >> 20} MB object")


def test_four_concurrent_default_retrieves_of_an_implicit_object(archive: tuple[PacsServer, Objects]) -> None:
    server, objects = archive
    original = objects.big["implicit"]
    sizes: list[int] = []

    def fetch() -> None:
        received = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers=server.auth_headers,
                          timeout=600) as http:
            with http.stream("GET", _url(original), headers={"Accept": ACCEPT}) as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes():
                    received += len(chunk)
        sizes.append(received)

    with PeakGrowth(server) as memory:
        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(sizes) == 4 and all(size > BIG_BYTES for size in sizes)
    assert memory.growth_mb < GROWTH_LIMIT_MB, f"the server grew by {memory.growth_mb:.0f} MB for four requests"
    assert memory.peak_mb < 300


def test_study_retrieve_with_big_objects_streams(archive: tuple[PacsServer, Objects]) -> None:
    """The whole study at the default syntax: implicit, big endian and
    corrected objects, each complete and in Explicit VR Little Endian."""
    server, objects = archive
    with PeakGrowth(server) as memory:
        response = _get_whole(server, f"/dicom-web/studies/{objects.study}", ACCEPT)
    parts = _parts(response)
    assert len(parts) == 4
    by_uid = {str(ds.SOPInstanceUID): ds for ds in objects.big.values()}
    for _, body in parts:
        got = dcmread(io.BytesIO(body), stop_before_pixels=True)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        if str(got.SOPInstanceUID) in by_uid:
            _check_big(body, ExplicitVRLittleEndian, objects.pixels, by_uid[str(got.SOPInstanceUID)])
    assert memory.growth_mb < GROWTH_LIMIT_MB, f"the server grew by {memory.growth_mb:.0f} MB"


def test_big_endian_object_in_a_study_with_dicomweb_client(archive: tuple[PacsServer, Objects]) -> None:
    """A study holding an Explicit VR Big Endian object was a 406 for the
    default syntax; dicomweb-client's retrieve_study now gets it in Explicit
    VR Little Endian with the same pixels and attributes."""
    server, objects = archive
    client = DICOMwebClient(f"http://127.0.0.1:{server.http_port}/dicom-web", headers=server.auth_headers)
    got = {str(ds.SOPInstanceUID): ds for ds in client.retrieve_study(objects.big_endian_study)}
    assert len(got) == 2
    original = objects.big_endian
    assert original is not None
    converted = got[str(original.SOPInstanceUID)]
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, original.pixel_array)
    for elem in original:
        if elem.tag != 0x7FE00010 and elem.tag.element != 0 and elem.VR != "SQ":
            assert converted[elem.tag].value == elem.value, elem.keyword


# -- finding 3: frames --------------------------------------------------------------------------
def test_all_frames_of_a_big_object_stream_one_at_a_time(archive: tuple[PacsServer, Objects]) -> None:
    server, objects = archive
    original = objects.big["big-endian"]
    numbers = ",".join(str(n) for n in range(1, FRAMES + 1))
    with PeakGrowth(server) as memory:
        response = _get_whole(server, f"{_url(original)}/frames/{numbers}", 'multipart/related; type="application/octet-stream"')
    parts = _parts(response)
    assert len(parts) == FRAMES
    assert parts[0][1] == objects.pixels[0].tobytes() and parts[-1][1] == objects.pixels[-1].tobytes()
    assert memory.growth_mb < GROWTH_LIMIT_MB, f"the server grew by {memory.growth_mb:.0f} MB sending frames"


# -- finding 4: refused before the first byte ---------------------------------------------------
def test_study_with_an_undecodable_instance_is_refused_before_the_body(archive: tuple[PacsServer, Objects]) -> None:
    """The second instance's syntax has no decoder here: the study asked in
    Explicit VR Little Endian by name is a 406 naming it, not a 200 whose
    body breaks off at that instance; as stored it is complete (and, the
    video being lossy, so it is when the default syntax is only implied:
    tests/test_review_dicomweb.py)."""
    server, objects = archive
    with server.http() as http:
        refused = http.get(f"/dicom-web/studies/{objects.mixed_study}",
                           headers={"Accept": f"{ACCEPT}; transfer-syntax={ExplicitVRLittleEndian}"})
        assert refused.status_code == 406, refused.status_code
        assert "MPEG2" in refused.json()["error"]
        as_stored = http.get(f"/dicom-web/studies/{objects.mixed_study}",
                             headers={"Accept": f"{ACCEPT}; transfer-syntax=*"})
        assert len(_parts(as_stored)) == 2


# -- C-GET shares the conversion -----------------------------------------------------------------
def test_c_get_converts_headers_and_streams_pixels(archive: tuple[PacsServer, Objects], tmp_path: Path) -> None:
    """getscu takes Little Endian only for this SOP class: the implicit,
    big endian and corrected 96 MiB objects are converted (header
    re-encoded, pixel data streamed): the server stays small and the
    objects are right."""
    server, objects = archive
    out = tmp_path / "got"
    out.mkdir()
    with PeakGrowth(server) as memory:
        result = run_dcmtk("getscu", "-S", "+xi", "+B", "-od", str(out), "-aec", server.ae_title,
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={objects.study}",
                           "127.0.0.1", str(server.dicom_port), timeout=600)
    assert result.returncode == 0, result.stderr
    received = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in out.iterdir()}
    assert len(received) == 4
    for original in objects.big.values():
        _check_big(received[str(original.SOPInstanceUID)].read_bytes(),
                   (ExplicitVRLittleEndian, ImplicitVRLittleEndian), objects.pixels, original)
    assert memory.growth_mb < GROWTH_LIMIT_MB, f"the server grew by {memory.growth_mb:.0f} MB over C-GET"
    assert server.alive()


def test_frames_and_retrieve_of_planar_colour_as_stored_untouched(archive: tuple[PacsServer, Objects]) -> None:
    """The common case is unchanged: as stored is the stored bytes."""
    server, objects = archive
    original = objects.colour["rgb8-planar"]
    with server.http() as http:
        ((_, body),) = _parts(http.get(_url(original), headers={"Accept": f"{ACCEPT}; transfer-syntax=*"}))
    assert np.array_equal(dcmread(io.BytesIO(body)).pixel_array, original.pixel_array)


def test_c_get_decodes_a_large_compressed_object_frame_by_frame(archive: tuple[PacsServer, Objects],
                                                                  tmp_path: Path) -> None:
    """getscu takes uncompressed syntaxes only: the 96 MiB RLE object is
    decoded one frame at a time as it is sent."""
    server, objects = archive
    out = tmp_path / "got"
    out.mkdir()
    with PeakGrowth(server) as memory:
        result = run_dcmtk("getscu", "-S", "+B", "-od", str(out), "-aec", server.ae_title,
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={objects.compressed.StudyInstanceUID}",
                           "127.0.0.1", str(server.dicom_port), timeout=600)
    assert result.returncode == 0, result.stderr
    (received,) = out.iterdir()
    got = dcmread(received)
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert got.SOPInstanceUID == objects.compressed.SOPInstanceUID
    assert np.array_equal(got.pixel_array, objects.pixels)
    assert memory.growth_mb < GROWTH_LIMIT_MB, f"the server grew by {memory.growth_mb:.0f} MB over C-GET"


# -- every stored bit kept, or the conversion refused ------------------------------------------
def _image(path: Path, pixels: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
           planar: int | None = None, extra: bytes = b"") -> Dataset:
    """A native Explicit VR Little Endian object of *pixels* (rows, columns[, samples])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    _new_uids(ds)
    ds.PatientID, ds.PatientName, ds.Modality = "079000333444", "LE^VAN BIT", "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = photometric
    if planar is not None:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    data = pixels.transpose(2, 0, 1) if planar == 1 else pixels
    ds.PixelData = np.ascontiguousarray(data).astype(pixels.dtype.newbyteorder("<")).tobytes() + extra
    ds.save_as(path, enforce_file_format=True)
    return ds


def _raw_samples(ds: Dataset) -> np.ndarray:
    from pydicom.pixels import get_decoder

    arr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, as_rgb=False, correct_unused_bits=False)
    return arr


def test_lossless_means_every_stored_bit(tmp_path: Path) -> None:
    """Findings of a codec tester: `pacs compress` and conversions to JPEG-LS /
    JPEG 2000 dropped the bits above Bits Stored (an overlay kept in bit 15)
    while the check, on pydicom's masked pixel_array, called it identical;
    YBR_FULL samples served uncompressed were turned into rounded RGB; colour
    stored plane by plane kept Planar Configuration 1 inside JPEG-LS while its
    frames came out pixel by pixel; bytes after the described pixels were
    dropped; a float image asked for as JPEG-LS was a 200 with a broken object."""
    from .test_maintenance import Cli

    rng = np.random.default_rng(7)
    smooth = (np.add.outer(np.arange(64), np.arange(64)) * 31 % 4096).astype(np.uint16)
    overlay = smooth | ((rng.random((64, 64)) < 0.1).astype(np.uint16) << 15)  # an overlay in bit 15
    colour = np.stack([np.add.outer(np.arange(32), np.arange(32)) * k % 256 for k in (1, 2, 3)], -1).astype(np.uint8)
    inbox = tmp_path / "in"
    inbox.mkdir()
    objects = {
        "overlay": _image(inbox / "overlay.dcm", overlay, bits_stored=12),
        "plain": _image(inbox / "plain.dcm", smooth, bits_stored=12),
        "planar": _image(inbox / "planar.dcm", colour, bits_stored=8, photometric="RGB", planar=1),
        "ybr": _image(inbox / "ybr.dcm", colour, bits_stored=8, photometric="YBR_FULL", planar=0),
        "padded": _image(inbox / "padded.dcm", smooth, bits_stored=12, extra=b"\x07\x00" * 50),
    }
    originals = {name: _raw_samples(dcmread(inbox / f"{name}.dcm")) for name in objects}
    # Signed 12-bit samples whose negative values were not sign-extended
    # (0x0FFF for -1): zeros above Bits Stored are padding, not data (the
    # regression tester's mlut_18.dcm was refused by the first fix).
    signed = _image(inbox / "signed.dcm", (smooth.astype(np.int16) - 2048).astype(np.uint16) & 0x0FFF, bits_stored=12)
    signed.PixelRepresentation = 1
    signed.save_as(inbox / "signed.dcm", enforce_file_format=True)
    objects["signed"] = signed
    signed_values = dcmread(inbox / "signed.dcm").pixel_array.copy()
    assert signed_values.min() == -2048
    floating = _image(inbox / "float.dcm", smooth, bits_stored=16)
    del floating.PixelData
    floating.BitsAllocated = floating.BitsStored = 32
    del floating.HighBit, floating.PixelRepresentation
    floating.FloatPixelData = smooth.astype("<f4").tobytes()
    floating.save_as(inbox / "float.dcm", enforce_file_format=True)
    objects["float"] = floating
    data = tmp_path / "data"
    cli = Cli(data)
    assert cli.json("import", str(inbox))["stored"] == len(objects)
    report = cli.json("compress", "--codec", "jpeg-ls")
    skipped = {item["sop_uid"]: item for item in report["skipped"]["not encodable"]["items"]}
    assert set(skipped) == {str(objects["overlay"].SOPInstanceUID), str(objects["padded"].SOPInstanceUID)}
    assert "Bits Stored" in skipped[str(objects["overlay"].SOPInstanceUID)]["detail"]
    assert report["compressed"] == 4 and report["failed"]["count"] == 0

    server = PacsServer(data, Backend("sqlite-fs", None, None, {})).start()
    try:
        with server.http() as http:
            def retrieve(name: str, syntax: str) -> httpx.Response:
                accept = f"{ACCEPT}; transfer-syntax={syntax}"
                return http.get(_url(objects[name]), headers={"Accept": accept})

            assert retrieve("float", JPEGLSLossless).status_code == 406  # was a 200 with a broken object
            for name in originals:  # as stored: every bit as sent
                got = dcmread(io.BytesIO(_parts(retrieve(name, "*"))[0][1]))
                assert np.array_equal(_raw_samples(got), originals[name]), name
            kept = dcmread(io.BytesIO(_parts(retrieve("signed", "*"))[0][1]))
            assert kept.file_meta.TransferSyntaxUID == JPEGLSLossless
            assert np.array_equal(kept.pixel_array, signed_values)
            planar = dcmread(io.BytesIO(_parts(retrieve("planar", "*"))[0][1]))
            assert planar.file_meta.TransferSyntaxUID == JPEGLSLossless and planar.PlanarConfiguration == 0
            ybr = dcmread(io.BytesIO(_parts(retrieve("ybr", ExplicitVRLittleEndian))[0][1]))
            assert ybr.PhotometricInterpretation == "YBR_FULL"
            assert np.array_equal(_raw_samples(ybr), originals["ybr"])  # not rounded through RGB
            # The overlay's bits cannot be kept by JPEG-LS or JPEG 2000: refused, not dropped...
            for syntax in (JPEGLSLossless, JPEG2000Lossless):
                assert retrieve("overlay", syntax).status_code == 406, syntax
            # ...RLE keeps every bit of each byte.
            rle = dcmread(io.BytesIO(_parts(retrieve("overlay", RLELossless))[0][1]))
            assert rle.file_meta.TransferSyntaxUID == RLELossless
            assert np.array_equal(_raw_samples(rle), originals["overlay"])
    finally:
        server.stop()


def test_parallel_jpeg2000_conversions_do_not_crash_the_server(tmp_path: Path) -> None:
    """pylibjpeg-openjpeg's encoder is not thread-safe: a viewer fetching
    several instances as JPEG 2000 at once crashed `pacs serve` with SIGSEGV
    (found by a regression tester). Encodes to JPEG 2000 take turns."""
    import concurrent.futures

    inbox = tmp_path / "in"
    inbox.mkdir()
    study, series = generate_uid(), generate_uid()
    objects = []
    for n in range(8):
        ds = _new_uids(dcmread(pydicom_file("CT_small.dcm")), study, series)
        ds.save_as(inbox / f"ct{n}.dcm", enforce_file_format=True)
        objects.append(ds)
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        server.cli("import", str(inbox))
        accept = f"{ACCEPT}; transfer-syntax={JPEG2000Lossless}"
        with server.http() as http:
            def fetch(ds: Dataset) -> int:
                with httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=120) as own:
                    return own.get(_url(ds), headers={"Accept": accept}).status_code

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for _ in range(20):  # without the turns the server died within a few rounds
                    assert list(pool.map(fetch, objects)) == [200] * len(objects)
        assert server.alive()
    finally:
        server.stop()
