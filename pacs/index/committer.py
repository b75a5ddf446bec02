"""Group commit: many receivers, one committing thread, one fsync per batch.

Each receiver thread submits its record and blocks until the transaction
that holds it has committed; the committer takes everything waiting (up to a
batch limit), writes it in one transaction and wakes all the submitters. A
lone association pays one commit per object, exactly as without batching;
with several associations the cost of a commit (an fsync on SQLite) is
shared. Nothing is acknowledged before its batch committed.

If a batch fails, each of its records is retried in a transaction of its
own so one bad record cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from .writer import AddResult, IndexRecord, IndexWriter, StaleCache

log = logging.getLogger(__name__)

_STOP = object()


class CommitterClosed(RuntimeError):
    pass


class GroupCommitter:
    """Serialises index writes of one process into batched transactions."""

    def __init__(self, engine: Engine, writer: IndexWriter, batch_max: int = 256) -> None:
        self._engine = engine
        self._writer = writer
        self._batch_max = max(1, batch_max)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="index-committer", daemon=True)
        self._thread.start()

    def submit(self, record: IndexRecord) -> AddResult:
        """Index *record*; returns once it is committed (or raises)."""
        if self._closed:
            raise CommitterClosed("index committer is shut down")
        future: Future[AddResult] = Future()
        self._queue.put((record, future))
        return future.result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout=30)

    # -- the committing thread ------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, batch: list[tuple[IndexRecord, Future[AddResult]]]) -> None:
        try:
            results = self._transaction([rec for rec, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("index batch of %d failed (%s); retrying one by one", len(batch), exc)
            for rec, future in batch:
                try:
                    future.set_result(self._transaction([rec])[0])
                except Exception as single_exc:
                    future.set_exception(single_exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    def _transaction(self, records: list[IndexRecord], attempts: int = 3) -> list[AddResult]:
        for attempt in range(attempts):
            try:
                with self._engine.connect().execution_options(immediate=True) as conn:
                    with conn.begin():
                        return [self._writer.add(conn, rec) for rec in records]
            except (StaleCache, IntegrityError, OperationalError):
                # A cached key may point at a purged row, a lock may have
                # timed out, PostgreSQL may have restarted: forget the cache
                # and retry on a fresh connection.
                self._writer.clear_cache()
                if attempt == attempts - 1:
                    raise
            except Exception:
                self._writer.clear_cache()
                raise
        raise AssertionError("unreachable")
