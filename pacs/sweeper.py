"""The background finisher of deletions: objects whose index rows are gone
and whose tombstones are due (an object `pacs compress` replaced, once
readers had their grace; a deletion that died half way) leave the store
while `pacs serve` runs, not only at the next `pacs verify --repair` or
`pacs purge --yes`. Each node runs one; tombstones are finished under row
locks (see :mod:`pacs.index.tombstones`), so two nodes never delete one
object twice, and a row an ingest claimed back is never touched."""

from __future__ import annotations

import logging

from .app import Pacs
from .index import tombstones
from .periodic import Periodic

log = logging.getLogger(__name__)


class Sweeper(Periodic):
    """Finishes due tombstones every *interval* seconds."""

    thread_name = "tombstone-sweeper"

    def __init__(self, pacs: Pacs, *, interval: float = 300.0) -> None:
        super().__init__(interval)
        self.pacs = pacs

    def sweep(self) -> int:
        """One round: objects deleted."""
        done = tombstones.finish_all(self.pacs.engine, self.pacs.store)
        if done.deleted or done.failed:
            log.info("tombstones: %d objects deleted, %d to try again", len(done.deleted), len(done.failed))
        return len(done.deleted)

    def round(self) -> None:
        self.sweep()
