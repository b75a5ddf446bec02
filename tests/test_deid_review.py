"""Reviewer findings on de-identification (export and routing), each against
real peers: a running `pacs serve`, `pacs` CLI subprocesses, DCMTK storescp
as C-STORE destinations (one taking every syntax, one Implicit VR Little
Endian only) and a second `pacs serve` as STOW-RS target.

One server per module: each test owns its rules (matched on its own calling
AE or Patient ID) so the tests do not see each other's jobs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from pacs.deidentify import Deidentifier

from .conftest import PACS, Backend, PacsServer, pydicom_file
from .dicomfiles import make_ct
from .peers import dcmtk, wait_port, wait_until
from .test_routing import Receiver
from .test_routing_review import _jobs

SALT = "deid-review-salt"
NAME, CCCD = "NGUYEN VAN THANH", "079075001234"
PREAMBLE = b"II*\x00" + f"Patient {NAME} CCCD {CCCD} BHYT DN4797912345678".encode().ljust(124, b"\x00")
ROOT = "1.2.826.0.1.3680043.9.7134.91"


class _Receiver(Receiver):
    """storescp with its own transfer syntax flags (+xi: Implicit VR Little Endian only)."""

    def __init__(self, workdir: Path, aet: str, *flags: str) -> None:
        super().__init__(workdir)
        self.aet, self.flags = aet, flags

    def start(self) -> _Receiver:
        args = [dcmtk("storescp"), "-v", *self.flags, "-od", str(self.workdir / "in"), "-aet", self.aet,
                str(self.port)]
        self.proc = subprocess.Popen(args, env={**os.environ, "TCP_NODELAY": "1"},
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_port(self.port, proc=self.proc)
        return self


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("deid-review")
    every = _Receiver(tmp / "every", "EVERY", "+xa").start()
    little = _Receiver(tmp / "little", "LITTLE", "+xi").start()  # an old receiver: Implicit VR Little Endian only
    reader = PacsServer(tmp / "reader", Backend("sqlite-fs", None, None, {})).start()
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "2"})
    server.cli("ae", "add", "EVERY", "--host", "127.0.0.1", "--port", str(every.port))
    server.cli("ae", "add", "LITTLE", "--host", "127.0.0.1", "--port", str(little.port))
    server.start()
    try:
        yield {"tmp": tmp, "every": every, "little": little, "reader": reader, "server": server}
    finally:
        server.stop()
        reader.stop()
        every.stop()
        little.stop()


def _all_done(server: PacsServer, rule: str, count: int) -> bool:
    jobs = _jobs(server, rule)
    return len(jobs) == count and all(j["state"] == "done" for j in jobs)


def _store(server: PacsServer, path: Path, calling: str, *flags: str) -> str:
    result = server.storescu(*flags, str(path), calling=calling)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _received(receiver: Receiver, count: int, timeout: float = 90) -> dict[str, Path]:
    assert wait_until(lambda: len(receiver.files()) >= count, timeout=timeout), receiver.files()
    return receiver.files()


def _export(server: PacsServer, *args: str, rc: int = 0) -> dict:
    result = server.cli("export", *args, "--json", check=False)
    assert result.returncode == rc, result.stdout + result.stderr
    return json.loads(result.stdout)


def _audit(cli: PacsServer, study: str) -> list[dict]:
    return json.loads(cli.cli("audit", "--study", study, "--format", "json").stdout)


# -- 1. the File Preamble ---------------------------------------------------------------------
def test_the_file_preamble_does_not_leave_in_deidentified_exports_and_routes(peers: dict) -> None:
    server, reader, tmp = peers["server"], peers["reader"], peers["tmp"]
    # The Deidentifier itself: a dataset read with a text preamble is written with a zero one.
    ds = make_ct(tmp / "pre-unit.dcm", PatientName="NGUYEN^VAN THANH")
    original = dcmread(ds)
    original.preamble = PREAMBLE
    cleaned = Deidentifier(SALT).apply(copy.deepcopy(original))
    assert cleaned.preamble == b"\0" * 128
    cleaned.save_as(tmp / "pre-unit-out.dcm", enforce_file_format=True)
    assert (tmp / "pre-unit-out.dcm").read_bytes()[:128] == b"\0" * 128

    # A CD the patient brought: imported as a file, preamble and all.
    server.cli("route", "add", "pre-stow", "--if", "PatientID=PRE-1", "--to-url",
               f"http://127.0.0.1:{reader.http_port}/dicom-web", "--auth", f"Bearer {reader.token}", "--deidentify")
    cd = tmp / "cd"
    cd.mkdir()
    study = f"{ROOT}.1.1"
    path = make_ct(cd / "IMG0001.dcm", PatientName="NGUYEN^VAN THANH", PatientID="PRE-1", StudyInstanceUID=study)
    ds = dcmread(path)
    ds.preamble = PREAMBLE
    ds.save_as(path, enforce_file_format=True)
    assert NAME.encode() in path.read_bytes()
    server.cli("import", "--route", str(cd))  # routed: a CD the patient brought for this visit

    _export(server, study, "--out", str(tmp / "pre-export"), "--deidentify")
    (exported,) = (tmp / "pre-export").rglob("*.dcm")
    data = exported.read_bytes()
    assert data[:128] == b"\0" * 128
    assert NAME.encode() not in data and CCCD.encode() not in data

    # The other hospital's archive, reached by a de-identifying STOW-RS route.
    assert wait_until(lambda: _all_done(server, "pre-stow", 1), timeout=60), _jobs(server, "pre-stow")
    stored = [f for f in (reader.data_dir / "objects").rglob("*") if f.is_file() and ".tmp" not in f.parts]
    assert stored
    for f in stored:
        data = f.read_bytes()
        assert data[:128] == b"\0" * 128, data[:128]
        assert NAME.encode() not in data and CCCD.encode() not in data


# -- 2. one patient, one pseudonym --------------------------------------------------------------
def test_one_patient_gets_one_pseudonym_whether_or_not_the_modality_sends_the_issuer(peers: dict) -> None:
    server, every, tmp = peers["server"], peers["every"], peers["tmp"]
    before = set(every.files())
    server.cli("route", "add", "pseudo", "--if", "CallingAE=PSEUDO", "--to-ae", "EVERY", "--deidentify")
    ct = make_ct(tmp / "issuer-ct.dcm", PatientID="BN20249001", IssuerOfPatientID="BVCR",
                 PatientName="NGUYEN^VAN THANH", StudyInstanceUID=f"{ROOT}.2.1")
    walk_in = make_ct(tmp / "issuer-us.dcm", PatientID="BN20249001", PatientName="NGUYEN^VAN THANH",
                      StudyInstanceUID=f"{ROOT}.2.2")  # no Issuer of Patient ID
    _store(server, ct, "PSEUDO")
    _store(server, walk_in, "PSEUDO")
    core = server.core()
    try:
        from sqlalchemy import select

        from pacs.index.models import Study

        with core.engine.connect() as conn:
            patients = set(conn.execute(select(Study.patient_pk).where(
                Study.study_uid.in_([f"{ROOT}.2.1", f"{ROOT}.2.2"]))).scalars())
    finally:
        core.close()
    assert len(patients) == 1, "the index files both studies under one patient"

    _export(server, f"{ROOT}.2.1", f"{ROOT}.2.2", "--out", str(tmp / "pseudo"), "--deidentify")
    exported = [dcmread(f, stop_before_pixels=True) for f in (tmp / "pseudo").rglob("*.dcm")]
    assert len(exported) == 2 and len({ds.StudyInstanceUID for ds in exported}) == 2
    assert len({ds.PatientID for ds in exported}) == 1, [ds.PatientID for ds in exported]

    assert wait_until(lambda: _all_done(server, "pseudo", 2), timeout=60), _jobs(server, "pseudo")
    routed = [dcmread(f, stop_before_pixels=True) for uid, f in _received(every, len(before) + 2).items()
              if uid not in before]
    assert len({ds.PatientID for ds in routed}) == 1, [ds.PatientID for ds in routed]
    assert {ds.PatientID for ds in routed} == {ds.PatientID for ds in exported}


# -- 3. routing is audited ------------------------------------------------------------------------
def test_routing_a_study_out_is_audited_with_destination_rule_and_new_study_uid(peers: dict) -> None:
    server, every, tmp = peers["server"], peers["every"], peers["tmp"]
    before = set(every.files())
    server.cli("route", "add", "to-other", "--if", "CallingAE=AUDITED", "--to-ae", "EVERY", "--deidentify")
    study = f"{ROOT}.3.1"
    for i in range(2):
        _store(server, make_ct(tmp / f"audited-{i}.dcm", StudyInstanceUID=study, PatientID="AUD-1"), "AUDITED")
    assert wait_until(lambda: _all_done(server, "to-other", 2), timeout=60), _jobs(server, "to-other")
    new_studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                   for uid, f in _received(every, len(before) + 2).items() if uid not in before}
    assert len(new_studies) == 1 and study not in new_studies
    (new_study,) = new_studies

    def exports() -> list[dict]:
        return [e for e in _audit(server, study) if e["action"] == "export"]

    def delivered() -> int:
        return sum(int(m.group(1)) for e in exports() if (m := re.search(r"(\d+) instances delivered", e["detail"])))

    # Written by the server's audit thread within a fraction of a second.
    assert wait_until(lambda: delivered() == 2, timeout=10), _audit(server, study)
    events = exports()
    assert all(e["outcome"] == "success" and e["patient_id"] == "AUD-1" for e in events), events
    for e in events:
        assert "EVERY" in e["detail"] and "to-other" in e["detail"], e
        assert "de-identified" in e["detail"] and new_study in e["detail"], e


# -- 5. Big Endian to a little endian only destination ---------------------------------------------
def _big_endian_ct(path: Path) -> tuple[Path, np.ndarray]:
    ds = dcmread(pydicom_file("CT_small.dcm"))
    for tag in [t for t in ds.keys() if t.is_private or ds[t].VR == "SQ"]:
        del ds[tag]
    pixels = ds.pixel_array.copy()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.5.1", f"{ROOT}.5.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.5.3"
    ds.PatientName, ds.PatientID = "Vo^Van Kiet", "BE-1"
    ds.PixelData = pixels.astype(">i2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.set_original_encoding(False, False)
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(dcmread(path).pixel_array, pixels)
    return path, pixels


def test_a_big_endian_object_reaches_a_little_endian_only_destination(peers: dict) -> None:
    server, little, tmp = peers["server"], peers["little"], peers["tmp"]
    server.cli("route", "add", "old-plain", "--if", "CallingAE=OLD_CT", "--to-ae", "LITTLE")
    server.cli("route", "add", "old-deid", "--if", "CallingAE=OLD_CT", "--to-ae", "LITTLE", "--deidentify")
    path, pixels = _big_endian_ct(tmp / "be.dcm")
    sop = _store(server, path, "OLD_CT", "-xb")
    assert wait_until(lambda: _all_done(server, "old-plain", 1) and _all_done(server, "old-deid", 1),
                      timeout=60), (_jobs(server, "old-plain"), _jobs(server, "old-deid"))
    files = _received(little, 2)
    plain = dcmread(files[sop])
    (deid,) = [dcmread(f) for uid, f in files.items() if uid != sop]
    for ds in (plain, deid):
        assert ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
        assert np.array_equal(ds.pixel_array, pixels)
    assert plain.PatientID == "BE-1" and deid.PatientID != "BE-1" and deid.PatientIdentityRemoved == "YES"


# -- 6. the audit record of pacs export --------------------------------------------------------------
def test_export_audit_names_the_person_what_was_written_and_the_new_study(tmp_path: Path) -> None:
    cli = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    src = tmp_path / "in"
    src.mkdir()
    study = f"{ROOT}.6.1"
    for i in range(3):
        make_ct(src / f"{i}.dcm", StudyInstanceUID=study, PatientID="EXP-1",
                BurnedInAnnotation="YES" if i == 2 else "NO")
    cli.cli("import", str(src))
    # What `sudo -u pacs pacs export ...` (README) puts in the environment.
    env = {**cli.env, "SUDO_USER": "alice", "SUDO_UID": "1001"}
    result = subprocess.run([PACS, "export", study, "--out", "for-bv-115", "--deidentify", "--json",
                             *cli.common_args()], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr  # one object withheld
    report = json.loads(result.stdout)
    assert report["instances"] == 2 and report["not_exported_burned_in"]["count"] == 1
    (new_study,) = [p.name for p in (tmp_path / "for-bv-115").iterdir()]
    assert report["study_map"] == {study: new_study}

    (event,) = [e for e in _audit(cli, study) if e["action"] == "export"]
    import getpass

    assert event["user"] == f"alice (as {getpass.getuser()})"
    assert event["outcome"] != "success"
    assert str(tmp_path / "for-bv-115") in event["detail"]
    assert "2 instances written" in event["detail"] and "1 withheld" in event["detail"], event["detail"]
    assert new_study in event["detail"]


# -- 7. the salt is backed up ----------------------------------------------------------------------
def test_a_restored_appliance_keeps_its_deidentification_secret(tmp_path: Path) -> None:
    old = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    src = tmp_path / "in"
    src.mkdir()
    study = f"{ROOT}.7.1"
    make_ct(src / "ct.dcm", StudyInstanceUID=study, PatientID="SALT-1")
    old.cli("import", str(src))
    old.cli("export", study, "--out", str(tmp_path / "before"), "--deidentify")
    old.cli("backup", "--out", str(tmp_path / "index.bak"))
    # Disaster recovery on a new machine: the objects from the file backup, the index from `pacs backup`.
    new = PacsServer(tmp_path / "new", Backend("sqlite-fs", None, None, {}))
    new.data_dir.mkdir()
    shutil.copytree(old.data_dir / "objects", new.data_dir / "objects")
    new.cli("restore", str(tmp_path / "index.bak"), "--yes")
    new.cli("export", study, "--out", str(tmp_path / "after"), "--deidentify")
    before = [dcmread(f, stop_before_pixels=True) for f in (tmp_path / "before").rglob("*.dcm")]
    after = [dcmread(f, stop_before_pixels=True) for f in (tmp_path / "after").rglob("*.dcm")]
    assert [p.name for p in (tmp_path / "after").iterdir()] == [p.name for p in (tmp_path / "before").iterdir()]
    assert [(d.StudyInstanceUID, d.SOPInstanceUID, d.PatientID) for d in after] == \
        [(d.StudyInstanceUID, d.SOPInstanceUID, d.PatientID) for d in before]


# -- 8. Type 2 sequences of SR and KOS ----------------------------------------------------------------
def test_sr_and_kos_keep_an_empty_referenced_performed_procedure_step_sequence(tmp_path: Path) -> None:
    sr = dcmread(pydicom_file("test-SR.dcm"))
    kos = Dataset()
    kos.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    kos.SOPInstanceUID, kos.StudyInstanceUID, kos.SeriesInstanceUID = f"{ROOT}.8.3", f"{ROOT}.8.1", f"{ROOT}.8.2"
    kos.Modality, kos.PatientID = "KO", "KOS-1"
    kos.file_meta = FileMetaDataset()
    kos.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    kos.file_meta.MediaStorageSOPClassUID, kos.file_meta.MediaStorageSOPInstanceUID = kos.SOPClassUID, kos.SOPInstanceUID
    for i, ds in enumerate((sr, kos)):
        step = Dataset()
        step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
        step.ReferencedSOPInstanceUID = f"{ROOT}.8.99"
        ds.ReferencedPerformedProcedureStepSequence = Sequence([step])
        out = tmp_path / f"{i}.dcm"
        Deidentifier(SALT).apply(ds).save_as(out, enforce_file_format=True)
        back = dcmread(out)
        assert "ReferencedPerformedProcedureStepSequence" in back, ds.SOPClassUID
        assert len(back.ReferencedPerformedProcedureStepSequence) == 0


# -- 9. the salt's first use by concurrent callers ----------------------------------------------------
def test_concurrent_first_use_of_the_salt_gives_every_caller_the_same_one(tmp_path: Path) -> None:
    from pacs.maintenance.export import deidentify_salt

    for trial in range(40):
        folder = tmp_path / f"d{trial}"
        pacs = SimpleNamespace(settings=SimpleNamespace(deidentify_salt=None, data_dir=folder))
        barrier = threading.Barrier(6)
        results: list[object] = []

        def first_use() -> None:
            barrier.wait()
            try:
                results.append(deidentify_salt(pacs))
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                results.append(exc)

        threads = [threading.Thread(target=first_use) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 6 and all(isinstance(r, str) and r for r in results), results
        assert len(set(results)) == 1, results
        assert (folder / "deidentify.salt").read_text().strip() == results[0]
        assert (folder / "deidentify.salt").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in folder.iterdir()] == ["deidentify.salt"]  # no temporary file left


# -- 4. large objects: the pixel data are streamed, never held -------------------------------------
BIG_FRAMES = 150  # 1024 x 1024 x 16 bit: 2 MiB a frame, 315 MB


def _big_object(path: Path, frames: int = BIG_FRAMES) -> tuple[int, str]:
    """A multi-frame secondary capture of *frames* 1024x1024 frames, written
    without holding it (header by pydicom, then the Pixel Data element);
    (pixel data length, sha256 of its value)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Trần^Thị Bích", "BIG-1", "19800101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT}.4.1", f"{ROOT}.4.2"
    ds.SOPInstanceUID, ds.SOPClassUID = f"{ROOT}.4.3", "1.2.840.10008.5.1.4.1.1.7.3"
    ds.Modality, ds.StudyDate, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "OT", "20240201", "BIG1", 1, 1
    ds.ConversionType, ds.BurnedInAnnotation = "WSD", "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 1024, 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    frame = np.random.default_rng(7).integers(0, 4096, size=1024 * 1024, dtype=np.uint16).tobytes()
    length = len(frame) * frames
    digest = hashlib.sha256()
    with open(path, "ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for index in range(frames):
            data = struct.pack("<Q", index) + frame[8:]  # every frame different
            digest.update(data)
            out.write(data)
    return length, digest.hexdigest()


def _pixel_digest(path: Path) -> tuple[int, str]:
    """(length, sha256) of a file's Pixel Data value, read in chunks."""
    ds = dcmread(path, defer_size=1024)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    digest, left = hashlib.sha256(), raw.length
    with open(path, "rb") as f:
        f.seek(raw.value_tell)
        while left:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, "the file ends inside its Pixel Data"
            digest.update(chunk)
            left -= len(chunk)
    return raw.length, digest.hexdigest()


def _peak_memory(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _export_peak(server: PacsServer, study: str, out: Path) -> int:
    """Peak RSS (bytes) of a `pacs export --deidentify` of *study*, measured
    alone by a wrapper process whose only child it is."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    result = subprocess.run([sys.executable, "-c", wrapper, PACS, "export", study, "--out", str(out),
                             "--deidentify", "--json", *server.common_args()],
                            capture_output=True, text=True, env=server.env, timeout=600)
    code, peak_kb = json.loads(result.stdout)
    assert code == 0, result.stderr
    return peak_kb * 1024


def test_deidentifying_route_and_export_stream_a_large_object(peers: dict) -> None:
    server, every, tmp = peers["server"], peers["every"], peers["tmp"]
    source = tmp / "big.dcm"
    length, digest = _big_object(source)
    study = f"{ROOT}.4.1"
    server.cli("route", "add", "ai", "--if", "CallingAE=AI_FEED", "--to-ae", "EVERY", "--deidentify")
    before = set(every.files())
    peak = _peak_memory(server.proc.pid)
    try:
        _store(server, source, "AI_FEED")
        source.unlink()
        assert wait_until(lambda: _all_done(server, "ai", 1), timeout=300), _jobs(server, "ai")
        grown = _peak_memory(server.proc.pid) - peak
        (received,) = [f for uid, f in _received(every, len(before) + 1).items() if uid not in before]
        try:
            assert _pixel_digest(received) == (length, digest)
            ds = dcmread(received, stop_before_pixels=True)
            assert ds.PatientIdentityRemoved == "YES" and ds.PatientID != "BIG-1"
            assert "Trần" not in str(ds.PatientName)
        finally:
            received.unlink()
        # Ingest and route together: nowhere near the object's size (was ~4x it).
        assert grown < length, f"pacs serve grew by {grown / 1e6:.0f} MB routing a {length / 1e6:.0f} MB object"
        assert not list((server.data_dir / "tmp").glob("route-*")), "the streamed copy is removed once sent"

        _store(server, make_ct(tmp / "small.dcm", StudyInstanceUID=f"{ROOT}.4.9"), "SMALL")
        small = _export_peak(server, f"{ROOT}.4.9", tmp / "small-export")
        big = _export_peak(server, study, tmp / "big-export")
        (exported,) = (tmp / "big-export").rglob("*.dcm")
        assert _pixel_digest(exported) == (length, digest)
        assert dcmread(exported, stop_before_pixels=True).PatientIdentityRemoved == "YES"
        assert big - small < length, f"pacs export took {(big - small) / 1e6:.0f} MB more for the large object"
    finally:
        source.unlink(missing_ok=True)
        shutil.rmtree(tmp / "big-export", ignore_errors=True)
        server.cli("delete", study, "--reason", "test data", "--yes", check=False)
