"""Recovery review fixes, on real peers (DCMTK storescu into `pacs serve`,
PostgreSQL, the `pacs` CLI, the object store on disk):

- a study deleted after `pacs compress` came back with `pacs reindex` (its
  originals stayed for compress's readers' grace), with no warning;
- after `pacs compress` and an index loss, reindex indexed a random mix of
  originals and re-encodings and reported duplicates no command cleared;
- the "delete" audit event of a deletion was written after its commit, by
  the asynchronous writer: a purge killed midway, or a process dying after
  an HTTP DELETE, lost events of studies it had deleted.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from storage import FileStore

from .conftest import Backend, PacsServer
from .peers import PACS, wait_until
from .test_maintenance_review import _json
from .test_maintenance_review import _study as ct_study


def _study(out: Path, name: str, patient_id: str, n: int = 2, study_date: str = "20240101") -> tuple[str, list[Path]]:
    """*n* uncompressed CT images of one new study, as files to send."""
    return ct_study(out, name, patient_id, n=n, study_date=study_date)


def _send(server: PacsServer, *files: Path) -> None:
    sent = server.storescu(*(str(p) for p in files))
    assert sent.returncode == 0, sent.stderr


def _stored_keys(data_dir: Path) -> list[str]:
    return sorted(info.key for info in FileStore(data_dir / "objects").list())


def _lose_index(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{data_dir}/index.sqlite{suffix}").unlink(missing_ok=True)


def _rows(server: PacsServer) -> dict[str, str]:
    """SOP Instance UID -> storage key of every indexed instance."""
    core = server.core()
    try:
        return {i.sop_uid: i.storage_key for i in core.reader.iter_stored()}
    finally:
        core.close()


def test_a_study_deleted_after_compress_does_not_come_back_with_reindex(tmp_path: Path) -> None:
    """`pacs delete` removed the re-encodings but left the originals to
    compress's 10-minute readers' grace; an index lost meanwhile, `pacs
    reindex` indexed them again: the wrong-patient study was back."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        keep, keep_files = _study(tmp_path / "in", "keep", "P-KEEP")
        wrong, wrong_files = _study(tmp_path / "in", "wrong", "P-WRONG")
        _send(server, *keep_files, *wrong_files)
        compressed = _json(server, "compress")
        assert compressed["compressed"] == 4 and compressed["old_objects_pending"] == 4
        deleted = _json(server, "delete", wrong, "--reason", "sent to the wrong patient", "--yes")
        assert deleted["instances"] == 2
    finally:
        server.stop()
    # The deletion is final: no copy of the deleted study is left in the store.
    stored = _stored_keys(tmp_path / "data")
    assert len(stored) == 4 and not [k for k in stored if k.startswith(wrong + "/")]

    _lose_index(tmp_path / "data")
    rebuilt = server.cli("reindex", check=False)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    studies = {key.split("/")[0] for key in _rows(server).values()}
    assert studies == {keep}
    # The operator is told what a rebuild cannot bring back.
    said = " ".join((rebuilt.stdout + rebuilt.stderr).split())
    assert "pacs restore" in said and "users" in said and "AE registry" in said
    assert "deletions still under way" in said


def test_reindex_after_compress_indexes_the_reencodings_and_repair_clears_the_originals(tmp_path: Path) -> None:
    """Both `<sop>.dcm` and `<sop>.jls.dcm` stored (an index lost within
    the readers' grace): parallel reindex workers indexed whichever came
    first, reindex and verify reported duplicates for ever (exit 1)."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        study, files = _study(tmp_path / "in", "s", "P-0001", n=8)
        _send(server, *files)
        assert _json(server, "compress")["compressed"] == 8
    finally:
        server.stop()
    assert len(_stored_keys(tmp_path / "data")) == 16

    _lose_index(tmp_path / "data")
    rebuilt = _json(server, "reindex")
    assert rebuilt["indexed"] == 8 and rebuilt["duplicates"]["count"] == 0
    assert rebuilt["superseded"]["count"] == 8
    rows = _rows(server)
    assert len(rows) == 8 and all(key.endswith(".jls.dcm") for key in rows.values())

    assert _json(server, "verify", rc=1)["orphans"]["count"] == 8  # the originals, until repaired
    repaired = _json(server, "verify", "--repair")
    assert repaired["ok"] and repaired["superseded_removed"]["count"] == 8
    assert repaired["adopted"]["count"] == 0 and repaired["duplicate_orphans"]["count"] == 0
    assert _stored_keys(tmp_path / "data") == sorted(rows.values())
    assert _json(server, "verify")["ok"]
    assert _rows(server) == rows


def _lock_waiters(admin: Any, database: str) -> int:
    """Sessions of *database* waiting for a lock (*admin* in autocommit: a
    transaction would keep reading one snapshot of the statistics)."""
    return int(admin.execute(text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"
        " AND pid <> pg_backend_pid()"), {"db": database}).scalar_one())


def _count(url: str, sql: str) -> int:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def test_a_killed_purge_keeps_the_audit_event_of_every_study_it_deleted(tmp_path: Path, pg_url: str) -> None:
    """The event was queued for the asynchronous writer after each study's
    commit: a purge killed midway had deleted studies the trail never named.
    Inserts into the audit table are held (a lock) while the purge runs, so
    the kill comes while events wait, whatever the machine's speed."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    server = PacsServer(tmp_path / "data", Backend("pg-fs", pg_url, None, {})).start()
    try:
        for name in ("a", "b", "c"):
            _send(server, *_study(tmp_path / "in", name, f"P-{name}", study_date="20000101")[1])
    finally:
        server.stop()
    engine = create_engine(pg_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin, engine.connect() as holder:
            holder.execute(text("LOCK TABLE audit_events IN SHARE MODE"))  # INSERTs wait, reads do not
            purge = subprocess.Popen([PACS, "purge", "--older-than", "365", "--yes", *server.common_args()],
                                     env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                database = make_url(pg_url).database or ""
                assert wait_until(lambda: _lock_waiters(admin, database) > 0 or purge.poll() is not None)
            finally:
                purge.send_signal(signal.SIGKILL)
                purge.communicate()
            holder.rollback()
    finally:
        engine.dispose()
    gone = 3 - _count(pg_url, "SELECT count(*) FROM studies")
    audited = _count(pg_url, "SELECT count(*) FROM audit_events WHERE action = 'delete'")
    assert audited == gone, f"{gone} studies deleted, {audited} deletions in the audit trail"

    # Run again to the end: every study deleted, each audited once.
    server.cli("purge", "--older-than", "365", "--yes")
    assert _count(pg_url, "SELECT count(*) FROM studies") == 0
    assert _count(pg_url, "SELECT count(*) FROM audit_events WHERE action = 'delete'") == 3


def test_an_http_delete_commits_its_audit_event_with_the_deletion(tmp_path: Path, pg_url: str) -> None:
    """DELETE /api/studies/{uid}: the access event was written by the
    middleware after the answer, asynchronously; now with the rows'
    deletion, and once."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    server = PacsServer(tmp_path / "data", Backend("pg-fs", pg_url, None, {})).start()
    try:
        study, files = _study(tmp_path / "in", "s", "P-HTTP")
        _send(server, *files)
        # What the store made the server audit is written: the lock below holds only the deletion's.
        assert wait_until(lambda: _count(pg_url, "SELECT count(*) FROM audit_events WHERE action = 'store'") > 0)
        answers: list[httpx.Response] = []
        engine = create_engine(pg_url)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin, engine.connect() as holder:
                holder.execute(text("LOCK TABLE audit_events IN SHARE MODE"))
                with server.http() as client:
                    request = threading.Thread(target=lambda: answers.append(client.delete(
                        f"/api/studies/{study}", params={"reason": "wrong patient"})))
                    request.start()
                    database = make_url(pg_url).database or ""
                    assert wait_until(lambda: _lock_waiters(admin, database) > 0)
                    # The audit insert waits: the deletion has not committed without it.
                    assert admin.execute(text("SELECT count(*) FROM studies WHERE study_uid = :s"),
                                         {"s": study}).scalar_one() == 1
                    holder.rollback()
                    request.join(60)
        finally:
            engine.dispose()
        assert answers and answers[0].status_code == 200, answers
        server.stop()  # the audit writer flushes what it holds
        rows = _count(pg_url, f"SELECT count(*) FROM audit_events WHERE action = 'delete' AND study_uid = '{study}'")
        assert rows == 1
        assert _count(pg_url, f"SELECT count(*) FROM audit_events WHERE action = 'delete' AND study_uid = '{study}'"
                              " AND detail LIKE '%reason: wrong patient%' AND patient_id = 'P-HTTP'") == 1
    finally:
        server.stop()
