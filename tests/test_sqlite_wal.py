"""The SQLite index's -wal file after a long reader (a backup, a long query,
a sqlite3 shell left in a transaction): SQLite cannot checkpoint past a
snapshot a reader still holds, so the WAL grows with every commit meanwhile,
and without a limit the file keeps that size for as long as the server runs.

In-process core on a real SQLite file; the reader is a connection of its own.
The WAL is grown by writing rows to a real index table (the audit trail);
the size limit is lowered so that a few MB show what hundreds do in service.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select

from pacs.app import Pacs
from pacs.index import db
from pacs.index.db import write_transaction
from pacs.index.models import AuditEvent, Instance
from pacs.settings import load_settings
from pacs import sweeper as sweeper_module
from pacs.sweeper import Sweeper

MB = 1024 * 1024
LIMIT = 1 * MB
events_t = AuditEvent.__table__
instances_t = Instance.__table__


@pytest.fixture
def pacs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pacs]:
    monkeypatch.setattr(db, "WAL_SIZE_LIMIT", LIMIT)  # before the first connection: each reads it
    core = Pacs.open(load_settings(data_dir=tmp_path / "data"))
    try:
        yield core
    finally:
        core.close()


def _index(pacs: Pacs) -> Path:
    return Path(pacs.engine.url.database or "")


def _wal_bytes(pacs: Pacs) -> int:
    wal = Path(f"{_index(pacs)}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _write(pacs: Pacs, kib: int) -> None:
    """One committed transaction adding about *kib* KiB of rows."""
    rows = [dict(at=datetime.now(UTC), user="wal-test", role="", client="", protocol="http", action="query",
                 outcome="success", study_uid="", patient_id="", detail=f"{n:06d}" + "x" * 2042)
            for n in range(max(1, kib // 2))]
    with write_transaction(pacs.engine) as conn:
        conn.execute(insert(events_t), rows)


def _count(pacs: Pacs) -> int:
    with pacs.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(events_t).where(events_t.c.user == "wal-test")).scalar_one()


class Reader:
    """Another connection in a read transaction: its snapshot stays until release()."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN")
        self.rows = self.conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]

    def release(self) -> None:
        assert self.conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] == self.rows  # still its snapshot
        self.conn.execute("COMMIT")
        self.conn.close()


def _grown_behind_a_reader(pacs: Pacs, megabytes: int) -> tuple[Reader, int]:
    """A reader holding a snapshot while *megabytes* MB of commits go on:
    the reader, and the -wal file's size then."""
    _write(pacs, 64)
    reader = Reader(_index(pacs))
    for _ in range(megabytes):
        _write(pacs, 1024)
    return reader, _wal_bytes(pacs)


def test_wal_file_is_cut_back_once_a_long_reader_is_gone(pacs: Pacs) -> None:
    reader, grown = _grown_behind_a_reader(pacs, 6)
    # More than SQLite's 1000-page automatic checkpoint: it ran at each commit, but the reader needs every page.
    assert grown > 5 * MB
    reader.release()
    # Ingest goes on: SQLite's own checkpoint now completes and the next transaction restarts the WAL, which
    # used to keep its largest size for good.
    for _ in range(3):
        _write(pacs, 4)
    assert _wal_bytes(pacs) <= LIMIT, (grown, _wal_bytes(pacs))
    assert _count(pacs) == 32 + 6 * 512 + 3 * 2


def test_sweeper_round_checkpoints_a_wal_no_commit_will(pacs: Pacs, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="pacs.sweeper")
    monkeypatch.setattr(sweeper_module, "WAL_WARN_BYTES", 2 * MB)

    def wal_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "WAL" in r.getMessage()]

    reader, grown = _grown_behind_a_reader(pacs, 2)
    assert grown > 2 * MB
    sweeper = Sweeper(pacs)
    # The reader still needs the WAL: the round leaves it as it is (and does not wait for the reader),
    # and says why, once: not again each round while the WAL has not doubled.
    sweeper.round()
    sweeper.round()
    assert _wal_bytes(pacs) >= grown
    assert len(wal_lines()) == 1 and wal_lines()[0].startswith(f"index WAL is {grown // MB} MB and cannot be "
                                                                 "checkpointed: a reader keeps an old snapshot")
    reader.release()
    # Ingest has stopped: no commit comes to checkpoint; the sweeper's next round does, and empties the file.
    sweeper.round()
    assert _wal_bytes(pacs) == 0
    assert _count(pacs) == 32 + 2 * 512
    assert wal_lines()[1:] == [f"index WAL checkpointed: {grown // MB} MB -> 0 MB"]
    # Nothing more to do: no further line.
    sweeper.round()
    assert len(wal_lines()) == 2


@pytest.mark.timeout(30)
def test_checkpoint_gives_way_to_readers_and_writers(pacs: Pacs) -> None:
    """The reset takes the write lock: it must never hold it while waiting for a
    reader (ingest would wait as long, up to the busy timeout of 60 s), nor
    wait for a writer (another process's group commit)."""
    _write(pacs, 1024)  # fewer pages than SQLite's own checkpoint waits for
    grown = _wal_bytes(pacs)
    assert grown > LIMIT
    sweeper = Sweeper(pacs)
    # A reader whose snapshot is the newest, read from the WAL: every frame can be copied, but the WAL cannot
    # be restarted under it. Waiting for it here would never end (it is released below, on this thread).
    reader = Reader(_index(pacs))
    sweeper.checkpoint()
    assert _wal_bytes(pacs) == grown
    _write(pacs, 4)  # no lock was left behind
    reader.release()
    grown = _wal_bytes(pacs)
    # A writer in its transaction (as another process's ingest): the reset gives way. (The checkpoint alone:
    # the round's tombstone sweep is a writer too, and would wait for this one.)
    writer = sqlite3.connect(_index(pacs), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO audit_events (at, user, role, client, protocol, action, outcome, study_uid, "
                   "patient_id, detail) VALUES ('2026-12-06 00:00:00', 'wal-test', '', '', 'dicom', 'query', "
                   "'success', '', '', '')")
    sweeper.checkpoint()
    assert _wal_bytes(pacs) == grown
    writer.execute("COMMIT")
    writer.close()
    sweeper.checkpoint()
    assert _wal_bytes(pacs) == 0
    assert _count(pacs) == 512 + 2 + 1


# -- planner statistics --------------------------------------------------------------------------
def _analysed_rows(pacs: Pacs) -> int | None:
    """The instances counted by the last ANALYZE (None: never run)."""
    with sqlite3.connect(_index(pacs)) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone():
            return None
        row = conn.execute("SELECT stat FROM sqlite_stat1 WHERE tbl = 'instances' LIMIT 1").fetchone()
        return int(row[0].split()[0]) if row else None


def _store(pacs: Pacs, tmp_path: Path, count: int) -> None:
    """*count* new CT instances of one patient, ingested."""
    from pacs.ingest import Origin

    from .dicomfiles import make_ct

    for _ in range(count):
        path = make_ct(tmp_path / f"{len(list(tmp_path.glob('*.dcm')))}.dcm", PatientID="STAT1")
        assert pacs.ingest_file(path, Origin("dimse", "CT1")).status == 0


def test_statistics_are_gathered_once_the_archive_doubled(pacs: Pacs, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite had no planner statistics ever (nothing ran ANALYZE): it
    guessed, and a C-FIND by patient name prefix scanned every study (73 ms
    at 100,000 studies, 2.4 ms with statistics). The sweeper's round gathers
    them once the archive is big enough, and again when it doubled, not
    every round (the write lock is held meanwhile). The threshold is lowered
    from 1,000 instances to 4."""
    monkeypatch.setattr(db, "STATISTICS_FROM_ROWS", 4)
    rounds = Sweeper(pacs)

    def store(count: int) -> None:
        _store(pacs, tmp_path, count)

    store(3)
    rounds.round()
    assert _analysed_rows(pacs) is None  # too small to matter
    store(2)
    rounds.round()
    assert _analysed_rows(pacs) == 5
    store(4)  # 9: not yet twice 5
    rounds.round()
    assert _analysed_rows(pacs) == 5
    store(2)
    rounds.round()
    assert _analysed_rows(pacs) == 11


def test_instances_are_counted_only_when_their_span_drifted(pacs: Pacs, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sweeper round (300 s) counted the instances, reading a whole
    index of the table, to find no drift almost always. The span of their
    rowids (two seeks) is never below the count: only a span out of bounds
    is counted, and the count decides, as rows deleted amid the span are
    holes, not rows. A span halved is a table halved (the oldest purged)."""
    from pacs.maintenance.common import delete_instance_rows

    monkeypatch.setattr(db, "STATISTICS_FROM_ROWS", 4)
    rounds = Sweeper(pacs)
    counts: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == "SELECT count(*) FROM instances":
            counts.append(statement)

    def pks() -> list[int]:
        with pacs.engine.connect() as conn:
            return list(conn.execute(select(instances_t.c.pk).order_by(instances_t.c.pk)).scalars())

    event.listen(pacs.engine, "before_cursor_execute", seen)
    _store(pacs, tmp_path, 10)
    rounds.analyse()
    assert _analysed_rows(pacs) == 10 and len(counts) == 1  # no statistics yet: counted
    rounds.analyse()
    assert len(counts) == 1  # nothing new: not counted again
    delete_instance_rows(pacs.engine, pks()[2:8])  # 4 left, their span 10
    rounds.analyse()
    assert len(counts) == 1
    _store(pacs, tmp_path, 11)  # 15 in a span of 21: counted, not twice 10
    rounds.analyse()
    assert len(counts) == 2 and _analysed_rows(pacs) == 10
    delete_instance_rows(pacs.engine, pks()[:-4])  # the oldest purged: 4 in a span of 4
    rounds.analyse()
    assert _analysed_rows(pacs) == 4
