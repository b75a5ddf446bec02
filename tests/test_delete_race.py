"""A modality resending an instance while its study is being deleted (`pacs
delete`, `pacs purge`): the keys follow the UIDs, so the resend writes the
very key the deletion is deleting. Whatever the order, the resend is either
refused with a status the modality retries (0xA702, "being deleted") or
acknowledged and then kept, row and object; `pacs verify` finds nothing
wrong afterwards. The race is made deterministic by pausing the deletion
inside its object deletion (or before it) while a real DCMTK storescu
resends to a running `pacs serve`. Both backends."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .peers import run_dcmtk


def _send_study(server: PacsServer, folder: Path, patient: str, count: int = 3) -> tuple[str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = [make_ct(folder / f"{n}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, PatientID=patient,
                     InstanceNumber=n + 1) for n in range(count)]
    assert server.storescu(*map(str, files)).returncode == 0
    return study, files


def _resend_copy(original: Path, folder: Path) -> Path:
    """The same instance (same UIDs, so the same storage key) with other bytes,
    so that the test can see when the server has written it."""
    import pydicom

    ds = pydicom.dcmread(original)
    ds.ImageComments = "sent again"
    path = folder / "resend.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _storescu(server: PacsServer, path: Path) -> subprocess.CompletedProcess[str]:
    # -d prints the C-STORE response: status and Error Comment.
    return run_dcmtk("storescu", "-d", "-aet", "CT1", "-aec", server.ae_title, "127.0.0.1",
                     str(server.dicom_port), str(path))


def _status(result: subprocess.CompletedProcess[str]) -> str:
    """The C-STORE response status storescu received, as DCMTK prints it (e.g. "0x0000")."""
    out = result.stdout + result.stderr
    found = re.search(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", out)
    if found:
        return found.group(1).lower()
    raise AssertionError(f"no C-STORE response in storescu's output:\n{out[-3000:]}")


def _key_of(core: Any, sop_uid: str) -> str | None:
    return core.reader.instance_key(sop_uid)


def _checksum(core: Any, key: str) -> str | None:
    try:
        return core.store.checksum(key)
    except Exception:
        return None


def _wait(predicate: Callable[[], bool], what: str) -> None:
    # A guard against a hang only: nothing is measured.
    deadline = time.monotonic() + 120
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


def _verified(server: PacsServer) -> dict[str, Any]:
    checked = json.loads(server.cli("verify", "--json", check=False).stdout)
    assert checked["ok"], checked
    return checked


class _ResendDuringDelete:
    """Wraps the core's ``store.delete``: at the first delete of *key*, a
    storescu resends *path* in the background, and the delete goes on only
    once the server has written the resent object over *key* (its index
    transaction then meets the deletion: before or after, it must not win
    with its object gone)."""

    def __init__(self, server: PacsServer, core: Any, key: str, path: Path) -> None:
        self.server, self.core, self.key, self.path = server, core, key, path
        self.before = _checksum(core, key)
        self.result: subprocess.CompletedProcess[str] | None = None
        self.thread: threading.Thread | None = None
        self.real_delete = core.store.delete
        core.store.delete = self.delete

    def _send(self) -> None:
        self.result = _storescu(self.server, self.path)

    def delete(self, key: str) -> None:
        if key == self.key and self.thread is None:
            self.thread = threading.Thread(target=self._send, daemon=True)
            self.thread.start()
            _wait(lambda: _checksum(self.core, key) not in (None, self.before),
                  "the server writing the resent object")
        self.real_delete(key)

    def finish(self) -> subprocess.CompletedProcess[str]:
        assert self.thread is not None, "the deletion never deleted the resent key"
        self.thread.join(timeout=300)
        assert self.result is not None
        return self.result


def _refused_or_kept(server: PacsServer, core: Any, sop_uid: str, resend: Path,
                     result: subprocess.CompletedProcess[str]) -> str:
    """The resend's outcome: "refused" (then retried here, acknowledged) or "kept"."""
    status = _status(result)
    outcome = "kept"
    if status != "0x0000":
        assert status == "0xa702", result.stdout + result.stderr
        assert "being deleted" in result.stdout + result.stderr
        outcome = "refused"
        retried = _storescu(server, resend)
        assert _status(retried) == "0x0000", retried.stdout + retried.stderr
    key = _key_of(core, sop_uid)
    assert key is not None, "an acknowledged instance is not indexed"
    assert core.store.exists(key), "an acknowledged instance's object is gone"
    return outcome


def test_a_resend_written_before_its_object_is_deleted_is_refused_then_stored(
        pacs_server: PacsServer, tmp_path: Path) -> None:
    """The resend writes its object after the rows were deleted and before
    the objects are: the deletion then deletes it. Acknowledging it (as the
    check-then-delete did) left a row without its object; now it is refused
    with 0xA702, and the modality's retry stores it."""
    import pydicom

    from pacs.maintenance import delete as deletion

    server = pacs_server
    study, files = _send_study(server, tmp_path / "s", "RACE-1")
    resend = _resend_copy(files[0], tmp_path)
    sop_uid = pydicom.dcmread(resend).SOPInstanceUID
    core = server.core()
    try:
        key = _key_of(core, sop_uid)
        assert key is not None
        hook = _ResendDuringDelete(server, core, key, resend)
        report = deletion.delete_target(core, deletion.Target(study), reason="gửi nhầm", user="tester")
        assert report.instances == 3
        result = hook.finish()
        outcome = _refused_or_kept(server, core, sop_uid, resend, result)
        assert outcome == "refused"  # its object was deleted under it: never acknowledged
        assert server.stats()["instances"] == 1
    finally:
        core.close()
    _verified(server)


def test_a_resend_before_the_objects_go_is_kept(
        pacs_server: PacsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows deleted, objects not yet: the resend takes its key back in its
    index transaction (acknowledged) and the deletion skips that object."""
    import pydicom
    from sqlalchemy import select

    from pacs.index.tombstones import tombstones_t
    from pacs.maintenance import delete as deletion

    server = pacs_server
    study, files = _send_study(server, tmp_path / "s", "RACE-2")
    resend = _resend_copy(files[1], tmp_path)
    sop_uid = pydicom.dcmread(resend).SOPInstanceUID
    core = server.core()
    results: list[subprocess.CompletedProcess[str]] = []
    check = deletion.indexed_among

    def resend_first(engine: Any, keys: list[str]) -> set[str]:
        if not results:
            results.append(_storescu(server, resend))  # between the rows' deletion and the objects'
        return check(engine, keys)

    monkeypatch.setattr(deletion, "indexed_among", resend_first)
    try:
        key = _key_of(core, sop_uid)
        report = deletion.delete_target(core, deletion.Target(study), reason="ảnh thử", user="tester")
        assert _status(results[0]) == "0x0000"
        assert _refused_or_kept(server, core, sop_uid, resend, results[0]) == "kept"
        assert report.kept_resent == 1 and report.objects_deleted == 2, report
        assert _checksum(core, key) != hashlib_sha256(files[1])  # the resent bytes are the ones kept
        with core.engine.connect() as conn:
            outcomes = dict(conn.execute(select(tombstones_t.c.storage_key, tombstones_t.c.outcome)).all())
        assert outcomes[key] == "kept" and sorted(outcomes.values()) == ["deleted", "deleted", "kept"]
    finally:
        core.close()
    _verified(server)


def hashlib_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_purge_has_no_window_either(pacs_server: PacsServer, tmp_path: Path) -> None:
    """`pacs purge` deleted every object of a purged study without looking:
    a resend stored and indexed meanwhile lost its object. Now as for a deletion."""
    import pydicom

    from pacs.maintenance.purge import PurgeRules, purge

    server = pacs_server
    _study, files = _send_study(server, tmp_path / "s", "RACE-3")
    resend = _resend_copy(files[2], tmp_path)
    sop_uid = pydicom.dcmread(resend).SOPInstanceUID
    core = server.core()
    try:
        key = _key_of(core, sop_uid)
        hook = _ResendDuringDelete(server, core, key, resend)
        report = purge(core, PurgeRules(modalities=("CT",)), execute=True, user="tester")
        assert report.deleted_studies == 1
        result = hook.finish()
        assert _refused_or_kept(server, core, sop_uid, resend, result) == "refused"
        assert server.stats()["instances"] == 1
    finally:
        core.close()
    _verified(server)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_an_interrupted_deletion_is_finished_by_verify_repair(pacs_server: PacsServer, tmp_path: Path) -> None:
    """Rows and tombstones committed, then the deletion died: `pacs verify`
    counts the objects as pending (not orphans), `--repair` deletes them
    (never adopts them back) and finishes the tombstones."""
    import pydicom
    from sqlalchemy import delete, select

    from pacs.index import tombstones
    from pacs.index.db import write_transaction
    from pacs.index.models import Study

    server = pacs_server
    study, files = _send_study(server, tmp_path / "s", "RACE-4", count=2)
    core = server.core()
    try:
        keys = [k for k in (_key_of(core, pydicom.dcmread(f).SOPInstanceUID) for f in files) if k]
        with write_transaction(core.engine) as conn:
            tombstones.record(conn, keys, "delete-crashed")
            conn.execute(delete(Study).where(Study.study_uid == study))
    finally:
        core.close()
    checked = json.loads(server.cli("verify", "--json", check=False).stdout)
    assert checked["pending_purge"] == 2 and checked["orphans"]["count"] == 0, checked
    repaired = json.loads(server.cli("verify", "--repair", "--json", check=False).stdout)
    assert repaired["purged_leftovers"] == 2 and repaired["adopted"]["count"] == 0, repaired
    core = server.core()
    try:
        assert not any(core.store.exists(k) for k in keys)
        with core.engine.connect() as conn:
            assert set(conn.execute(select(tombstones.tombstones_t.c.outcome)).scalars()) == {"deleted"}
    finally:
        core.close()
    assert server.stats()["instances"] == 0
    _verified(server)


def _waiting_for_a_lock(engine: Any) -> bool:
    from sqlalchemy import text

    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND wait_event_type = 'Lock'")).scalar())


@pytest.mark.parametrize("backend", ["pg-fs"], indirect=True)
def test_an_instance_indexed_while_its_study_is_deleted_leaves_no_orphan(pacs_server: PacsServer,
                                                                         tmp_path: Path) -> None:
    """PostgreSQL: an instance being indexed into the study (its object stored,
    its row inserted, not committed yet) when the deletion starts. The
    deletion selected the instances before that commit and its cascade
    deleted the new row after it: the object had no tombstone and stayed an
    orphan, which verify --repair adopted back. Now the deletion waits for
    the ingest's transaction, then deletes its object with the others."""
    import io

    from sqlalchemy import select

    from pacs.index.models import Instance, Series, Study
    from pacs.maintenance import delete as deletion

    server = pacs_server
    study, _files = _send_study(server, tmp_path / "s", "RACE-5")
    core = server.core()
    instances = Instance.__table__
    try:
        conn = core.engine.connect()
        ingest = conn.begin()
        row = conn.execute(select(instances).join(Series, Series.pk == instances.c.series_pk)
                           .join(Study, Study.pk == Series.study_pk).where(Study.study_uid == study)
                           .limit(1)).mappings().one()
        new_sop = generate_uid()
        new_key = row["storage_key"].rsplit("/", 1)[0] + f"/{new_sop}.dcm"
        core.store.put(new_key, io.BytesIO(core.store.read_bytes(row["storage_key"])))
        values = {k: v for k, v in row.items() if k != "pk"} | {"sop_uid": new_sop, "storage_key": new_key}
        conn.execute(instances.insert().values(**values))

        done: dict[str, Any] = {}

        def delete_study() -> None:
            try:
                done["report"] = deletion.delete_target(core, deletion.Target(study), reason="gửi nhầm",
                                                        user="tester")
            except BaseException as exc:  # reported by the assertion below
                done["error"] = exc

        worker = threading.Thread(target=delete_study, daemon=True)
        worker.start()
        _wait(lambda: _waiting_for_a_lock(core.engine), "the deletion waiting for the ingest's transaction")
        ingest.commit()
        conn.close()
        worker.join(timeout=120)
        assert "error" not in done, done.get("error")
        assert done["report"].instances == 4  # the three sent and the one indexed meanwhile
        assert not core.store.exists(new_key), "the instance indexed meanwhile left its object behind"
    finally:
        core.close()
    checked = _verified(server)
    assert checked["orphans"]["count"] == 0, checked
