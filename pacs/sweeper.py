"""The background finisher of deletions: objects whose index rows are gone
and whose tombstones are due (an object `pacs compress` replaced, once
readers had their grace; a deletion that died half way) leave the store
while `pacs serve` runs, not only at the next `pacs verify --repair` or
`pacs purge --yes`. Each node runs one; tombstones are finished under row
locks (see :mod:`pacs.index.tombstones`), so two nodes never delete one
object twice, and a row an ingest claimed back is never touched."""

from __future__ import annotations

import logging
import threading

from .app import Pacs
from .index import tombstones

log = logging.getLogger(__name__)


class Sweeper:
    """Finishes due tombstones every *interval* seconds."""

    def __init__(self, pacs: Pacs, *, interval: float = 300.0) -> None:
        self.pacs, self.interval = pacs, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tombstone-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def sweep(self) -> int:
        """One round: objects deleted."""
        done = tombstones.finish_all(self.pacs.engine, self.pacs.store)
        if done.deleted or done.failed:
            log.info("tombstones: %d objects deleted, %d to try again", len(done.deleted), len(done.failed))
        return len(done.deleted)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception as exc:  # the index or the store is down: the next round tries again
                log.warning("tombstone sweep: %s", str(exc).splitlines()[0][:200])
