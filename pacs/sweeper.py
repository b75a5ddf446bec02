"""The background finisher of deletions: objects whose index rows are gone
and whose tombstones are due (an object `pacs compress` replaced, once
readers had their grace; a deletion that died half way) leave the store
while `pacs serve` runs, not only at the next `pacs verify --repair` or
`pacs purge --yes`. Each node runs one; tombstones are finished under row
locks (see :mod:`pacs.index.tombstones`), so two nodes never delete one
object twice, and a row an ingest claimed back is never touched.

On SQLite the same round checkpoints a -wal file that a long reader let
grow (see :func:`pacs.index.db.checkpoint_wal`) and gathers the planner's
statistics when the archive doubled or halved since the last time (see
:func:`pacs.index.db.refresh_statistics`)."""

from __future__ import annotations

import logging

from .app import Pacs
from .index import tombstones
from .index.db import checkpoint_wal, refresh_statistics
from .periodic import Periodic

log = logging.getLogger(__name__)
MB = 1024 * 1024
# A -wal file that cannot be checkpointed is reported from this size on, and
# again each time it doubles: a snapshot someone keeps (a sqlite3 shell left
# in a transaction) grows it until the disk is full.
WAL_WARN_BYTES = 1024 * MB


class Sweeper(Periodic):
    """Finishes due tombstones every *interval* seconds."""

    thread_name = "tombstone-sweeper"

    def __init__(self, pacs: Pacs, *, interval: float = 300.0) -> None:
        super().__init__(interval)
        self.pacs = pacs
        self._wal_warned = 0

    def sweep(self) -> int:
        """One round: objects deleted."""
        done = tombstones.finish_all(self.pacs.engine, self.pacs.store)
        if done.deleted or done.failed:
            log.info("tombstones: %d objects deleted, %d to try again", len(done.deleted), len(done.failed))
        return len(done.deleted)

    def checkpoint(self) -> None:
        """Checkpoint the SQLite index's WAL if it has grown (see
        :func:`pacs.index.db.checkpoint_wal`); logs what it reclaimed."""
        done = checkpoint_wal(self.pacs.engine)
        if done is None:
            return
        if done.after < done.before:
            log.info("index WAL checkpointed: %d MB -> %d MB", done.before // MB, done.after // MB)
        if done.complete:
            self._wal_warned = 0
        elif done.held_back and done.before >= max(WAL_WARN_BYTES, 2 * self._wal_warned):
            self._wal_warned = done.before
            log.warning("index WAL is %d MB and cannot be checkpointed: a reader keeps an old snapshot of the "
                        "index (a backup, a long query, a sqlite3 shell left in a transaction)", done.before // MB)

    def analyse(self) -> None:
        """Refresh the SQLite index's planner statistics when the archive has
        doubled or halved since (see :func:`pacs.index.db.refresh_statistics`)."""
        rows = refresh_statistics(self.pacs.engine)
        if rows is not None:
            log.info("index statistics gathered (ANALYZE) at about %d instances", rows)

    def round(self) -> None:
        try:
            self.sweep()
        finally:
            # Also when the store is down and the sweep failed.
            try:
                self.checkpoint()
            finally:
                self.analyse()
