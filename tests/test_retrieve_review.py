"""Retrieve review fixes (C-GET, C-MOVE, `pacs remote get`), against a real
`pacs serve` with DCMTK getscu / movescu / storescp and pynetdicom peers:

1. a C-GET SCU preferring Big Endian, Deflated or a compression gets every
   object (the archive accepted the requester's first syntax and then could
   not send in it); a C-GET whose every object fails says why (0xA702 with
   an Error Comment);
2. `pacs remote get` keeps compressed objects as the source holds them
   (one context per SOP class made the source decompress everything);
3. an odd-length Deflated data set goes out with its trailing NULL byte
   (DCMTK peers dropped the association: "Odd Fragment Length");
4. a compressed object under 32 MB going to an uncompressed-only peer is
   decoded frame by frame, not whole in memory;
5. C-MOVE sub-operations name the requester as Move Originator.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
)

from .conftest import Backend, PacsServer, dataset_bytes, free_port, pydicom_file, run_dcmtk
from .peers import dcmtk, wait_port
from .test_transcode_stream import GROWTH_LIMIT_MB, PeakGrowth

PATIENT = ("079000555666", "TRAN^VAN MIX")
# One study, one series per file, each kept in its own transfer syntax.
MIXED_FILES = [
    "CT_small.dcm",  # Explicit VR Little Endian
    "test-SR.dcm",  # Explicit VR Little Endian, no pixels
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "JPGExtended.dcm",  # JPEG Extended
    "US1_J2KR.dcm",  # JPEG 2000 lossless
    "OBXXXX1A_rle.dcm",  # RLE lossless (the same SOP class as the J2K one)
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
]
# A JPEG Baseline cine under the 32 MB that once decided on frame-by-frame
# decoding, decoded many times the growth limit.
CINE_FRAMES, CINE_ROWS, CINE_COLUMNS = 120, 480, 640


@dataclass
class Archive:
    server: PacsServer
    mixed_study: str = ""
    mixed: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file imported
    deflate_study: str = ""
    deflate: dict[str, Path] = field(default_factory=dict)
    cine: Dataset = field(default_factory=Dataset)
    storescp_port: int = 0  # MOVEDEST
    pydest_port: int = 0  # PYDEST


def _copy_into(name: str, out: Path, study: str, number: int, patient: tuple[str, str],
               born_and_sex: tuple[str, str] = ("19800101", "F")) -> tuple[str, Path]:
    ds = dcmread(pydicom_file(name))
    ds.PatientID, ds.PatientName = patient
    # One patient as the study's: a later series with another birth date or
    # sex is corrected to the study's on retrieval, and no longer as stored.
    ds.PatientBirthDate, ds.PatientSex = born_and_sex
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.{number}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{number}.1"
    ds.SeriesNumber, ds.InstanceNumber = number, 1
    path = out / f"{number:02d}_{name}"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path


def _cine(path: Path) -> Dataset:
    """A JPEG Baseline US cine (YBR_FULL_422, as dcmcjpeg writes colour)."""
    y, x = np.mgrid[0:CINE_ROWS, 0:CINE_COLUMNS]
    rng = np.random.default_rng(3)
    grey = ((np.sin(x / 17.0) * np.cos(y / 23.0) + 1) * 100).astype(np.uint8) + rng.integers(0, 40, (CINE_ROWS, CINE_COLUMNS), dtype=np.uint8)
    rgb = np.stack([grey, grey, grey // 2], axis=-1)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=90, subsampling=1)
    frame = out.getvalue()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US Multi-frame
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "079000777888", "PHAM^CINE"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = CINE_ROWS, CINE_COLUMNS, CINE_FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 33.3
    ds.PixelData = encapsulate([frame] * CINE_FRAMES, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("retrieve-review")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    archive = Archive(server, mixed_study=generate_uid(entropy_srcs=None)[:48])
    inbox = tmp / "in"
    inbox.mkdir()
    for number, name in enumerate(MIXED_FILES, start=1):
        uid, path = _copy_into(name, inbox, archive.mixed_study, number, PATIENT)
        archive.mixed[uid] = path
    # pydicom's image_dfl.dcm: its deflated data set is 4,303 bytes (odd), in
    # its own study with a CT.
    dfl = pydicom_file("image_dfl.dcm")
    original = dcmread(dfl, stop_before_pixels=True)
    archive.deflate_study = str(original.StudyInstanceUID)
    archive.deflate[str(original.SOPInstanceUID)] = dfl
    # The CT names image_dfl's patient as image_dfl does (no birth date or
    # sex): whichever the import stores first, neither is corrected, so the
    # deflated one is sent as stored.
    uid, path = _copy_into("CT_small.dcm", inbox, archive.deflate_study, 77,
                           (original.PatientID, str(original.PatientName)),
                           (original.get("PatientBirthDate") or "", original.get("PatientSex") or ""))
    archive.deflate[uid] = path
    (inbox / "image_dfl.dcm").write_bytes(dfl.read_bytes())
    archive.cine = _cine(tmp / "cine.dcm")
    server.cli("import", str(inbox), str(tmp / "cine.dcm"))
    archive.storescp_port, archive.pydest_port = free_port(), free_port()
    server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(archive.storescp_port))
    server.cli("ae", "add", "PYDEST", "--host", "127.0.0.1", "--port", str(archive.pydest_port))
    server.start()
    yield archive
    server.stop()


class StoreSCP:
    """DCMTK storescp as MOVEDEST, bit-preserving."""

    def __init__(self, out: Path, port: int, *flags: str) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", *flags, "-od", str(out), "-aet", "MOVEDEST", str(port)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc=self.proc)

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def received(self) -> dict[str, Path]:
        return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in self.out.iterdir()}


def _getscu(server: PacsServer, out: Path, study: str, *flags: str) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return run_dcmtk("getscu", "-v", "+B", *flags, "-S", "-od", str(out), "-aec", server.ae_title,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                     "127.0.0.1", str(server.dicom_port), timeout=600)


def _movescu(server: PacsServer, study: str, dest: str = "MOVEDEST") -> subprocess.CompletedProcess[str]:
    return run_dcmtk("movescu", "-v", "-S", "-aem", dest, "-aec", server.ae_title,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                     "127.0.0.1", str(server.dicom_port), timeout=600)


def _final_counts(stderr: str) -> dict[str, int]:
    """getscu's final report: {"Completed": n, "Failed": n, ...}."""
    counts: dict[str, int] = {}
    for line in stderr.splitlines():
        if "Number of" in line and "Suboperations" in line:
            name, value = line.split(":", 1)[1].split(":")
            counts[name.split()[2]] = int(value)
    return counts


def _pixels_equal(got: Dataset, original: Dataset) -> bool:
    return bool(np.array_equal(got.pixel_array, original.pixel_array))


# -- finding 1 --------------------------------------------------------------------------------
def test_c_get_in_any_preferred_syntax_gets_every_object(archive: Archive, tmp_path: Path) -> None:
    """getscu preferring Big Endian, Deflated, JPEG lossless, JPEG 2000
    lossless, RLE or JPEG lossy (each also proposing the uncompressed
    syntaxes in the same context) gets the whole mixed study: the archive
    accepts only a syntax it can produce from any object there, and converts
    to it. Objects whose stored syntax was accepted come as stored; lossless
    ones keep their pixels. A C-GET whose every object fails says why."""
    server = archive.server
    originals = {uid: dcmread(path) for uid, path in archive.mixed.items()}
    for flag in ("+xb", "+xd", "+xs", "+xv", "+xr", "+xy"):
        out = tmp_path / flag
        result = _getscu(server, out, archive.mixed_study, flag)
        counts = _final_counts(result.stderr)
        assert (counts.get("Completed"), counts.get("Failed")) == (len(archive.mixed), 0), f"{flag}: {result.stderr[-1500:]}"
        assert result.returncode == 0, f"{flag}: {result.stderr[-1500:]}"
        received = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in out.iterdir()}
        assert set(received) == set(archive.mixed), flag
        for uid, path in received.items():
            got, original = dcmread(path), originals[uid]
            syntax = got.file_meta.TransferSyntaxUID
            if syntax == original.file_meta.TransferSyntaxUID:
                assert dataset_bytes(path.read_bytes()) == dataset_bytes(archive.mixed[uid].read_bytes()), (flag, uid)
            else:
                assert not syntax.is_encapsulated, (flag, uid, syntax.name)
                if "PixelData" in original and original.file_meta.TransferSyntaxUID in (JPEG2000Lossless, RLELossless):
                    assert _pixels_equal(got, original), (flag, uid)
    # The US class proposed with JPEG Baseline only: the JPEG 2000 object
    # cannot be given in it (no lossy encoder); the final 0xA702 says why.
    ae = AE(ae_title="PYGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(UltrasoundImageStorage, [JPEGBaseline8Bit])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                         ext_neg=[build_role(UltrasoundImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = archive.mixed_study
    us = [uid for uid, path in archive.mixed.items() if "US1_J2KR" in path.name]
    identifier.SeriesInstanceUID = us[0].rsplit(".", 1)[0]
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    final = responses[-1]
    assert int(final.Status) == 0xA702 and int(final.NumberOfFailedSuboperations) == 1
    assert "JPEG Baseline" in final.get("ErrorComment", ""), final
    # The operator's log gives that reason, not pynetdicom's error for the
    # marker of an unsendable object, which read as a damaged object.
    log_text = server.log_text()
    assert f"cannot send {us[0]}" in log_text
    assert "required element are missing" not in log_text


# -- finding 2 --------------------------------------------------------------------------------
def test_remote_get_keeps_compressed_objects_as_the_source_holds_them(archive: Archive, tmp_path: Path) -> None:
    """`pacs remote get` from another `pacs serve`: each instance arrives in
    its stored syntax with the same data set bytes (JPEG 2000 lossless, RLE,
    JPEG Baseline... were stored decompressed, several times their size)."""
    source = archive.server
    dest = PacsServer(tmp_path / "dest", Backend("sqlite-fs", None, None, {}), ae_title="PACS_B")
    dest.cli("ae", "add", source.ae_title, "--host", "127.0.0.1", "--port", str(source.dicom_port))
    got = json.loads(dest.cli("remote", "get", source.ae_title, "--study", archive.mixed_study, "--json").stdout)
    assert (got["completed"], got["failed"], got["stored"]) == (len(archive.mixed), 0, len(archive.mixed)), got

    def held(server: PacsServer) -> dict[str, tuple[str, str]]:
        core = server.core()
        try:
            return {i.sop_uid: (i.transfer_syntax_uid,
                                hashlib.sha256(dataset_bytes(core.store.read_bytes(i.storage_key))).hexdigest())
                    for i in core.reader.iter_stored(archive.mixed_study)}
        finally:
            core.close()

    assert held(dest) == held(source)


# -- finding 3 --------------------------------------------------------------------------------
def _inflated(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def test_odd_deflated_data_sets_are_padded_to_even_length(archive: Archive, tmp_path: Path) -> None:
    """The stored image_dfl.dcm (odd deflated length) and a CT, C-MOVEd to
    DCMTK storescp taking every syntax: both arrive (storescp refused the
    odd PDV and dropped the association), the deflated one padded to even
    length and inflating to the original elements. WADO-RS conversions to
    Deflated are even too (PS3.5 A.5)."""
    server = archive.server
    with StoreSCP(tmp_path / "dest", archive.storescp_port, "+xa") as scp:
        result = _movescu(server, archive.deflate_study)
        received = scp.received()
    assert result.returncode == 0 and "Final Move Response (Success)" in result.stderr, result.stderr[-1500:]
    assert set(received) == set(archive.deflate)
    for uid, path in received.items():
        original = dataset_bytes(archive.deflate[uid].read_bytes())
        sent = dataset_bytes(path.read_bytes())
        assert len(sent) % 2 == 0, uid
        if dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            assert len(original) % 2 == 1  # the stored object stays as it is
            assert sent == original + b"\0"
            assert _inflated(sent) == _inflated(original)
        else:
            assert sent == original
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={DeflatedExplicitVRLittleEndian}'
    lengths = {}
    with server.http() as http:
        for uid, path in [*archive.mixed.items(), *archive.deflate.items()]:
            ds = dcmread(path, stop_before_pixels=True)
            if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
                continue  # its stored syntax: the stored bytes as they are
            url = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{uid}"
            response = http.get(url, headers={"Accept": accept})
            assert response.status_code == 200, (path.name, response.text[:300])
            boundary = response.headers["content-type"].split("boundary=", 1)[1].split(";")[0].strip('"').encode()
            body = response.content.split(b"--" + boundary)[1].split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
            assert dcmread(io.BytesIO(body)).SOPInstanceUID == uid
            lengths[path.name] = len(dataset_bytes(body))
    assert not {name: n for name, n in lengths.items() if n % 2}


# -- finding 4 --------------------------------------------------------------------------------
def test_small_compressed_object_is_decoded_frame_by_frame_for_uncompressed_peers(
        archive: Archive, tmp_path: Path) -> None:
    """A JPEG Baseline cine of a few MB that decodes to ~110 MB, to storescp
    and getscu taking Implicit VR Little Endian only: the server grows by
    less than the growth limit (it decoded such objects whole, and the peers
    waited for the whole decode before a byte came)."""
    server, cine = archive.server, archive.cine
    decoded = CINE_FRAMES * CINE_ROWS * CINE_COLUMNS * 3
    assert archive.server.stats()["instances"] and decoded > 100 * 1024**2
    with StoreSCP(tmp_path / "moved", archive.storescp_port, "+xi") as scp, PeakGrowth(server) as moving:
        result = _movescu(server, str(cine.StudyInstanceUID))
        received = scp.received()
    assert result.returncode == 0 and "Final Move Response (Success)" in result.stderr, result.stderr[-1500:]
    with PeakGrowth(server) as getting:
        result = _getscu(server, tmp_path / "got", str(cine.StudyInstanceUID), "+xi")
    assert result.returncode == 0 and _final_counts(result.stderr).get("Completed") == 1, result.stderr[-1500:]
    (fetched,) = (tmp_path / "got").iterdir()
    for path, syntaxes in ((received[str(cine.SOPInstanceUID)], (ImplicitVRLittleEndian,)),
                           (fetched, (ImplicitVRLittleEndian, ExplicitVRLittleEndian))):
        got = dcmread(path)
        assert got.file_meta.TransferSyntaxUID in syntaxes, path
        assert got.NumberOfFrames == CINE_FRAMES and len(got.PixelData) == decoded
    for what, memory in (("C-MOVE", moving), ("C-GET", getting)):
        assert memory.growth_mb < GROWTH_LIMIT_MB, (
            f"{what}: the server grew by {memory.growth_mb:.0f} MB sending a {decoded >> 20} MB decoded object")


# -- finding 5 --------------------------------------------------------------------------------
def test_move_sub_operations_name_the_requester_as_originator(archive: Archive) -> None:
    """PS3.7 9.1.1.1: the C-STORE sub-operations of a C-MOVE carry the Move
    Originator AE Title of the C-MOVE's requester (it was the archive's own
    title) and the C-MOVE's Message ID."""
    server = archive.server
    seen: list[tuple[str, int]] = []

    def on_store(event: evt.Event) -> int:
        seen.append((str(event.request.MoveOriginatorApplicationEntityTitle).strip(),
                     int(event.request.MoveOriginatorMessageID)))
        return 0x0000

    dest = AE(ae_title="PYDEST")
    for cx in AllStoragePresentationContexts:
        dest.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    listener = dest.start_server(("127.0.0.1", archive.pydest_port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = archive.deflate_study
        try:
            responses = [s for s, _ in assoc.send_c_move(identifier, "PYDEST", StudyRootQueryRetrieveInformationModelMove,
                                                        msg_id=7)]
        finally:
            assoc.release()
    finally:
        listener.shutdown()
    assert int(responses[-1].Status) == 0x0000
    assert seen == [("PYSCU", 7)] * len(archive.deflate)

