"""Group commit: many receivers, one transaction (and one fsync) per batch.

Leader/follower, without a thread of its own: a receiver that finds no
commit in progress becomes the leader and commits its record, plus every
record that queued up meanwhile, in one transaction; then it wakes the
owners of those records and hands leadership to the next waiter, if any.
A lone association therefore pays exactly one transaction per object and no
thread hand-off; with several associations the cost of a commit (an fsync on
SQLite) is shared. Nothing is acknowledged before its batch committed.

If a batch fails, each of its records is retried in a transaction of its
own so one bad record cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, text
from sqlalchemy.exc import IntegrityError, OperationalError

from ..routing import create_jobs
from . import tombstones
from .db import discard_connection, is_sqlite, is_transient, retry_transaction
from .models import CommitmentConflict
from .writer import AddResult, IndexRecord, IndexWriter, InstanceRejected, Outcome, rejection_among

log = logging.getLogger(__name__)
# Runs of a batch's transaction (see _worth_retrying).
INGEST_ATTEMPTS = 3


class CommitterClosed(RuntimeError):
    pass


class _Waiter:
    __slots__ = ("record", "result", "error", "done", "lead", "event")

    def __init__(self, record: IndexRecord) -> None:
        self.record = record
        self.result: AddResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False
        self.event = threading.Event()


class GroupCommitter:
    """Serialises index writes of one process into batched transactions."""

    def __init__(self, engine: Engine, writer: IndexWriter, batch_max: int = 256) -> None:
        self._engine = engine
        self._writer = writer
        self._batch_max = max(1, batch_max)
        self._lock = threading.Lock()
        self._pending: deque[_Waiter] = deque()
        self._busy = False
        self._closed = False
        self._conn: Connection | None = None

    def submit(self, record: IndexRecord) -> AddResult:
        """Index *record*; returns once it is committed (or raises)."""
        waiter = _Waiter(record)
        with self._lock:
            if self._closed:
                raise CommitterClosed("index committer is shut down")
            self._pending.append(waiter)
            if not self._busy:
                self._busy = waiter.lead = True
        while not waiter.lead:
            waiter.event.wait()
            waiter.event.clear()
            if waiter.done:
                return _outcome(waiter)
        self._lead()
        return _outcome(waiter)

    def _lead(self) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(self._batch_max, len(self._pending)))]
        try:
            self._commit(batch)
        finally:
            for w in batch:
                w.done = True
                w.event.set()
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.event.set()
                else:
                    self._busy = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            busy = self._busy
        if not busy and self._conn is not None:
            self._conn.close()
            self._conn = None

    def _commit(self, batch: list[_Waiter]) -> None:
        try:
            results = self._transaction([w.record for w in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            log.warning("index batch of %d failed (%s); retrying one by one", len(batch), exc)
            for w in batch:
                try:
                    w.result = self._transaction([w.record])[0]
                except Exception as single_exc:
                    w.error = single_exc
            return
        for w, result in zip(batch, results, strict=True):
            w.result = result

    def _transaction(self, records: list[IndexRecord]) -> list[AddResult]:
        return retry_transaction(lambda: self._transaction_once(records), what="index batch",
                                 attempts=INGEST_ATTEMPTS, retry_on=_worth_retrying)

    def _transaction_once(self, records: list[IndexRecord]) -> list[AddResult]:
        # In Study Instance UID order (each study's records in arrival order):
        # the instances' counters lock their study rows in the order the batch
        # is written, and an HIS update of a patient locks that patient's
        # studies in this order too (pacs.orders.lock_patient_studies), as
        # do other batches: no two of them wait for each other in a cycle.
        order = sorted(range(len(records)), key=lambda i: records[i].header.study_uid)
        try:
            conn = self._connection()
            with conn.begin():
                added = {i: self._writer.add(conn, records[i]) for i in order}
                results = [added[i] for i in range(len(records))]
                if self._writer.overwrite and not is_sqlite(self._engine):
                    _refuse_rejected_meanwhile(conn, records, results)
                _settle(conn, records, results)
                return results
        except InstanceRejected:
            # Rolled back by the block: the connection is fine, the cache may
            # name the rows the record made (its new study and series).
            self._writer.clear_cache()
            raise
        except Exception:
            # A cached key may point at a purged row, PostgreSQL may have
            # restarted: forget the cache, and retry on a fresh connection.
            self._writer.clear_cache()
            self._drop_connection()
            raise

    def add_jobs(self, routes: list[Any], sop_uid: str, study_uid: str) -> None:
        """Routing jobs for an instance already indexed, outside the batches."""
        with self._engine.connect().execution_options(immediate=True) as conn, conn.begin():
            create_jobs(conn, routes, sop_uid, study_uid, datetime.now(UTC))

    def record_conflict(self, sop_uid: str, calling_ae: str, study_uid: str, series_uid: str) -> None:
        """Keep that *calling_ae*'s object for *sop_uid* (to go into *study_uid*
        / *series_uid*) was refused as a UID conflict, outside the batches:
        its storage commitment must fail (see pacs.commitment)."""
        conflicts = CommitmentConflict.__table__
        same = ((conflicts.c.sop_uid == sop_uid) & (conflicts.c.calling_ae == calling_ae)
                & (conflicts.c.study_uid == study_uid) & (conflicts.c.series_uid == series_uid))
        with self._engine.connect().execution_options(immediate=True) as conn, conn.begin():
            # A modality retrying the refused object must not grow the table.
            conn.execute(delete(conflicts).where(same))
            conn.execute(insert(conflicts).values(sop_uid=sop_uid, calling_ae=calling_ae, study_uid=study_uid,
                                                  series_uid=series_uid, received_at=datetime.now(UTC)))

    def clear_conflicts(self, sop_uid: str, calling_ae: str) -> None:
        """*calling_ae* stored *sop_uid* into the kept study and series: its
        earlier conflicts for the UID no longer stand."""
        conflicts = CommitmentConflict.__table__
        with self._engine.connect().execution_options(immediate=True) as conn, conn.begin():
            conn.execute(delete(conflicts).where(conflicts.c.sop_uid == sop_uid,
                                                 conflicts.c.calling_ae == calling_ae))

    def replace(self, record: IndexRecord) -> AddResult:
        """Make the index row of *record*'s instance describe *record* (the
        overwrite policy, for one instance), outside the batches."""
        with self._engine.begin() as conn:
            result = IndexWriter(overwrite=True).add(conn, record)
            _settle(conn, [record], [result])
            return result

    @contextmanager
    def instance_lock(self, sop_uid: str) -> Iterator[None]:
        """Hold, for the block, the lock of *sop_uid* that every node sharing
        this index takes: a PostgreSQL transaction-scoped advisory lock, on
        a connection of its own (the batches commit on another one). None on
        SQLite, an index of one node (whose ingestor serialises copies of one
        instance across its processes with file locks, pacs.instance_locks).
        Raises what the database raises when the lock cannot be taken."""
        if is_sqlite(self._engine):
            yield
            return
        conn = self._engine.connect()
        try:
            conn.begin()
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                         {"key": f"filmless-pacs instance {sop_uid}"})
        except BaseException:
            discard_connection(conn)
            raise
        try:
            yield
        finally:
            # The rollback lets go of the lock. If it fails the connection is
            # dropped, which lets go too: the block's outcome stands either way.
            try:
                conn.rollback()
                conn.close()
            except Exception:
                discard_connection(conn)

    def _connection(self) -> Connection:
        # One connection kept for the leader (only one leads at a time): no
        # pool checkout and reset-on-return per batch.
        if self._conn is None or self._conn.closed:
            self._conn = self._engine.connect().execution_options(immediate=True)
        return self._conn

    def _drop_connection(self) -> None:
        discard_connection(self._conn)
        self._conn = None


def _worth_retrying(exc: BaseException) -> bool:
    """A batch is run again after a deadlock (or another transient error, see
    pacs.index.db.is_transient), a key its stale cache named (IntegrityError)
    or a lost connection; not after SQLite's "database is locked": its lock
    was already waited for (busy_timeout), another wait would only hold the
    modality longer."""
    return is_transient(exc) or (isinstance(exc, IntegrityError | OperationalError)
                                 and "database is locked" not in str(exc))


def _refuse_rejected_meanwhile(conn: Connection, records: list[IndexRecord], results: list[AddResult]) -> None:
    """PostgreSQL: an instance inserted while a rejection note's deletion of
    its row was under way (a corrected resend, overwrite policy) is refused.
    Its INSERT waited for that row's deletion (the SOP Instance UID's unique
    key), then went in: its NOT EXISTS (rejected_instances) was read before
    the deletion committed. This later statement sees the rejection; the
    batch rolls back and the record is refused alone. (One query a batch;
    SQLite runs one writer at a time. Keep-first never inserts past a row
    being deleted: the ingest found that row first and answered a duplicate,
    or its INSERT began after the deletion committed and saw the rejection.)"""
    inserted = [rec.header.sop_uid for rec, res in zip(records, results, strict=True)
                if res.outcome is Outcome.INSERTED]
    if inserted and (rejected := rejection_among(conn, inserted)) is not None:
        raise rejected


def _settle(conn: Connection, records: list[IndexRecord], results: list[AddResult]) -> None:
    """Rows just inserted (or replaced) whose key a deletion is deleting, or
    deleted: claimed or refused in this transaction (see pacs.index.tombstones)."""
    tombstones.settle(conn, [(rec.storage_key, rec.object_present, rec.written, rec.source)
                             for rec, res in zip(records, results, strict=True)
                             if res.outcome in (Outcome.INSERTED, Outcome.REPLACED)])


def _outcome(waiter: _Waiter) -> AddResult:
    if waiter.error is not None:
        raise waiter.error
    assert waiter.result is not None
    return waiter.result
