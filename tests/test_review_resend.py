"""Review of the overwrite policy's resend path (pacs.ingest: a resend is
written beside the copy it replaces, ``<sop>.resent.dcm`` and ``<sop>.dcm``
alternating, the row switched to it by the index commit), against real
peers: `pacs serve`, pynetdicom associations, PostgreSQL, SeaweedFS S3.

1. the replaced copy was deleted right after the commit: a C-GET / C-MOVE
   (or a WADO-RS study retrieve, a routing send) that had looked the study
   up before the resend found its object gone and failed that instance
   (written over in place before, it failed too: other bytes than its row
   described). The replaced copy now stays for the readers' grace, as
   ``pacs compress``'s originals do, and is deleted by the tombstone sweep.
2. an index lost while both copies were stored (within that grace, or a
   crash's leftover): ``pacs reindex`` indexed whichever of the two its
   workers committed last (the names alternate, they do not tell), so the
   replaced copy came back; ``verify --repair`` then reported the other as
   a duplicate for ever. The copy written last is indexed, and the one it
   replaced is removed by ``verify --repair`` as superseded.
3. a resend of a compressed instance leaves ``<sop>.jls.dcm`` for its
   readers; ``pacs compress`` within that grace (or after a crash between
   an encoding's write and its commit) took the taken key for a duplicate:
   reported compressed, nothing done, run after run (filesystem store).
4. an index restored from before an instance came, both copies of its
   resend stored: ``verify --repair`` adopted the replaced one (listed
   first); the acknowledged correction stayed a duplicate orphan. The copy
   written last is adopted.
5. a resend refused by the index (0xA703) was dropped only when it replaced
   a copy under the very key it was first meant for; the third copy (back
   under <sop>.dcm, free once the first one's grace was over) was left
   behind, a duplicate orphan ``verify`` reported for ever.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet
from sqlalchemy import select, update

from storage import FileStore

from .conftest import Backend, PacsServer, make_backend
from .dicomfiles import make_ct
from .test_dimse_failures import scu_store_file
from .test_maintenance_review import _json
from .peers import index_writes_fail
from .test_review_leftovers import INDEX_FAILED
from .test_maintenance_review import _study as ct_study


@pytest.fixture(params=["sqlite-fs", "pg-s3"])
def overwriting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    """An archive under the overwrite policy (one test's)."""
    backend: Backend = make_backend(request.param, request)
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    yield server
    server.stop()


def _study(tmp_path: Path, count: int, **common: Any) -> list[Path]:
    """*count* CT images of one new study and series, numbered 1..count."""
    study, series = generate_uid(), generate_uid()
    return [make_ct(tmp_path / f"i{n}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=n,
                    PatientID="RSND1", PatientName="NGUYEN^VAN AN", **common) for n in range(1, count + 1)]


def _corrected(path: Path, out: Path, **changes: Any) -> Path:
    """*path*'s object sent again with *changes* (a corrected resend)."""
    ds = dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out)
    return out


def _row(server: PacsServer, sop_uid: str) -> Any:
    from pacs.index.models import Instance

    core = server.core()
    try:
        with core.engine.connect() as conn:
            return conn.execute(select(Instance.storage_key, Instance.sha256, Instance.size_bytes)
                                .where(Instance.sop_uid == sop_uid)).one()
    finally:
        core.close()


# -- 1: a reader that looked the study up before a resend ------------------------------
def test_a_retrieve_under_way_while_an_instance_is_resent_sends_every_instance(
        overwriting: PacsServer, tmp_path: Path) -> None:
    files = _study(tmp_path, 2)
    for f in files:
        assert scu_store_file(overwriting, f) == 0
    resent = _corrected(files[1], tmp_path / "resent.dcm", StudyDescription="CT NGUC CO CAN QUANG")
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        if not received:
            # The modality sends instance 2 again while the workstation's
            # C-GET, which resolved the study already, is at instance 1.
            assert scu_store_file(overwriting, resent) == 0
        received.append(bytes(event.request.AffectedSOPInstanceUID, "ascii"))
        return 0x0000

    ae = AE(ae_title="PYGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", overwriting.dicom_port, ae_title=overwriting.ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = dcmread(files[0]).StudyInstanceUID
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    final = responses[-1]
    assert (int(final.Status), int(final.NumberOfFailedSuboperations or 0)) == (0x0000, 0), final
    assert len(received) == 2
    # The resend is stored and indexed all the same.
    sop = str(dcmread(resent).SOPInstanceUID)
    row = _row(overwriting, sop)
    core = overwriting.core()
    try:
        data = core.store.read_bytes(row.storage_key)
    finally:
        core.close()
    assert b"CT NGUC CO CAN QUANG" in data and hashlib.sha256(data).hexdigest() == row.sha256
    # The replaced copy stays for such readers (a deletion due after the
    # grace, not an orphan), then goes with the sweep.
    _verify_ok(overwriting)
    old_keys = [k for k in _keys(overwriting) if k != row.storage_key and sop in k]
    assert len(old_keys) == 1
    _graces_over(overwriting)
    _verify_ok(overwriting, "--repair")
    assert [k for k in _keys(overwriting) if sop in k] == [row.storage_key]
    _verify_ok(overwriting)


def _keys(server: PacsServer) -> list[str]:
    core = server.core()
    try:
        return sorted(info.key for info in core.store.list())
    finally:
        core.close()


def _verify_ok(server: PacsServer, *args: str) -> None:
    result = server.cli("verify", "--json", *args, check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], report


def _graces_over(server: PacsServer) -> None:
    """The readers' grace of every replaced object over (as 11 minutes later)."""
    from pacs.index.tombstones import tombstones_t

    core = server.core()
    try:
        with core.engine.begin() as conn:
            conn.execute(update(tombstones_t).values(created_at=datetime.now(UTC) - timedelta(minutes=11)))
    finally:
        core.close()


# -- 2: an index rebuilt from the objects within a resend's grace ------------------------
def test_reindex_within_the_grace_of_resends_indexes_the_copies_last_received(tmp_path: Path) -> None:
    """The index lost within 10 minutes of corrected resends: the store
    holds the replaced copy beside the one indexed, under the other of the
    two alternating keys. `pacs reindex` indexed whichever its workers
    committed last: the replaced copy (the wrong patient's name, the
    measurement the modality corrected) was back."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    try:
        files = _study(tmp_path, 4)
        for f in files:
            assert scu_store_file(server, f) == 0
        # Instances 1 and 2 corrected once (the newest under <sop>.resent.dcm),
        # 3 and 4 twice (the newest under <sop>.dcm again).
        newest: dict[str, Path] = {}
        for n, f in enumerate(files):
            sop = str(dcmread(f).SOPInstanceUID)
            for time in range(1 if n < 2 else 2):
                newest[sop] = _corrected(f, tmp_path / f"fix{n}-{time}.dcm", PatientName=f"TRAN^THI BICH^{time}")
                assert scu_store_file(server, newest[sop]) == 0
        before = {sop: _row(server, sop).storage_key for sop in newest}
        assert sorted(k.endswith(".resent.dcm") for k in before.values()) == [False, False, True, True]
    finally:
        server.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{server.data_dir}/index.sqlite{suffix}").unlink(missing_ok=True)
    rebuilt = server.cli("reindex", "--json", check=False)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert (report["indexed"], report["superseded"]["count"], report["duplicates"]["count"]) == (4, 4, 0), report
    core = server.core()
    try:
        for sop, path in newest.items():
            row = _row(server, sop)
            assert row.storage_key == before[sop], json.loads(rebuilt.stdout)
            assert dcmread(path).PatientName == dcmread(io.BytesIO(core.store.read_bytes(row.storage_key))).PatientName
    finally:
        core.close()
    # The copies they replaced are told apart and cleared by verify --repair.
    _verify_ok(server, "--repair")
    assert _keys(server) == sorted(before.values())
    _verify_ok(server)


# -- 3: pacs compress within the grace of a resend of a compressed instance -------------
def test_compress_of_a_resend_of_a_compressed_instance_within_the_grace(tmp_path: Path) -> None:
    """A compressed instance (<sop>.jls.dcm) sent again uncompressed is
    stored as <sop>.dcm, the compressed copy kept for its readers' grace.
    `pacs compress` within it found its key taken, took the instance for a
    duplicate and reported it compressed: nothing was, and every run within
    the grace said so again. (So did a rerun after a crash between an
    encoding's write and its commit, which its docstring says encodes it
    again over that key.) The encoding now replaces such a copy."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    try:
        _, files = ct_study(tmp_path / "in", "c", "RSND3", patient_name="LE^VAN TAM", n=1)
        sop = str(dcmread(files[0]).SOPInstanceUID)
        assert scu_store_file(server, files[0]) == 0
        assert _json(server, "compress")["compressed"] == 1
        assert _row(server, sop).storage_key.endswith(".jls.dcm")
        resent = _corrected(files[0], tmp_path / "resent.dcm", PatientName="LE^VAN TAM^CORRECTED")
        assert scu_store_file(server, resent) == 0
        assert not _row(server, sop).storage_key.endswith(".jls.dcm")
        again = _json(server, "compress")
        row = _row(server, sop)
        assert again["compressed"] == 1 and row.storage_key.endswith(".jls.dcm"), again
        core = server.core()
        try:
            stored = dcmread(io.BytesIO(core.store.read_bytes(row.storage_key)))
            assert hashlib.sha256(core.store.read_bytes(row.storage_key)).hexdigest() == row.sha256
        finally:
            core.close()
        assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert str(stored.PatientName) == "LE^VAN TAM^CORRECTED"
        _verify_ok(server)
        _graces_over(server)
        _verify_ok(server, "--repair")
        assert [k for k in _keys(server) if sop in k] == [row.storage_key]
    finally:
        server.stop()


# -- 4: an index restored from before the instance, both copies stored -------------------
@pytest.mark.parametrize("same_second", [False, True])
def test_repair_after_a_restore_adopts_the_copy_received_last(tmp_path: Path, same_second: bool) -> None:
    """`pacs restore` of a backup taken before an instance came, while the
    store still held a corrected resend beside the copy it replaced (within
    its grace; the restore sets such deletions aside): `verify --repair`
    adopted the first copy it listed, <sop>.dcm, the replaced one, and the
    acknowledged correction was a duplicate orphan, or with the older copy
    now rewritten by its adoption, removed as superseded. Written in the
    same second (S3 keeps whole seconds), the correction is adopted."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    backup = tmp_path / "index.backup"
    try:
        first, = _study(tmp_path, 1)
        assert server.cli("backup", "--out", str(backup), "--json").returncode == 0
        assert scu_store_file(server, first) == 0
        resent = _corrected(first, tmp_path / "resent.dcm", PatientName="NGUYEN^VAN AN^CORRECTED")
        assert scu_store_file(server, resent) == 0
        sop = str(dcmread(first).SOPInstanceUID)
        assert _row(server, sop).storage_key.endswith(".resent.dcm")
    finally:
        server.stop()
    if same_second:
        store = FileStore(server.data_dir / "objects")
        folder = _row_key_folder(store, sop)
        for name in (f"{sop}.dcm", f"{sop}.resent.dcm"):
            os.utime(store.path_for(f"{folder}/{name}"), (1_700_000_000, 1_700_000_000))
    assert server.cli("restore", str(backup), "--yes", "--json").returncode == 0
    result = server.cli("verify", "--repair", "--json", check=False)
    assert result.returncode == 0, result.stdout
    row = _row(server, sop)
    core = server.core()
    try:
        data = core.store.read_bytes(row.storage_key)
    finally:
        core.close()
    assert b"NGUYEN^VAN AN^CORRECTED" in data and hashlib.sha256(data).hexdigest() == row.sha256
    assert [k for k in _keys(server) if sop in k] == [row.storage_key]
    _verify_ok(server)


def _row_key_folder(store: FileStore, sop: str) -> str:
    """The study/series folder of *sop*'s objects."""
    return next(info.key for info in store.list() if sop in info.key).rsplit("/", 1)[0]


# -- 5: a resend refused (index down) once the replaced copy's key is free again --------
def test_a_refused_resend_under_the_free_alternate_key_is_not_left_behind(tmp_path: Path) -> None:
    """The third copy of an instance goes under <sop>.dcm again, free once
    the first copy's grace is over; its index commit failed (0xA703): its
    object was left behind (only a resend replacing a copy under that very
    key was dropped), and `pacs verify` reported a duplicate orphan that
    `--repair` could not clear."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    try:
        first, = _study(tmp_path, 1)
        sop = str(dcmread(first).SOPInstanceUID)
        assert scu_store_file(server, first) == 0
        second = _corrected(first, tmp_path / "second.dcm", PatientName="NGUYEN^VAN AN^2")
        assert scu_store_file(server, second) == 0
        _graces_over(server)
        _verify_ok(server, "--repair")  # the first copy's object goes
        kept = _row(server, sop)
        assert [k for k in _keys(server) if sop in k] == [kept.storage_key]
        third = _corrected(first, tmp_path / "third.dcm", PatientName="NGUYEN^VAN AN^3")
        index_writes_fail(server, "UPDATE", True)
        try:
            assert scu_store_file(server, third) == INDEX_FAILED
        finally:
            index_writes_fail(server, "UPDATE", False)
        assert _row(server, sop) == kept
        assert [k for k in _keys(server) if sop in k] == [kept.storage_key]
        _verify_ok(server)
    finally:
        server.stop()
