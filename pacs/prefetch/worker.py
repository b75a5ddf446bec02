"""The prefetch worker of `pacs serve`: claims due jobs one after the other
(every node of a cluster runs one; a job's claim and the per-patient rule of
:mod:`.jobs` keep two nodes off the same job and the same patient) and runs
them (:func:`.run.run_claimed`). Waiting jobs cost one indexed query per
round; a job whose old PACS is down waits its backoff, never in a loop."""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import SQLAlchemyError

from .. import remote
from ..app import Pacs
from ..forwarding import node_name
from ..periodic import Periodic
from . import jobs
from .run import lease, run_claimed

log = logging.getLogger(__name__)

# Seconds between two looks for due jobs: an order's priors start coming
# within this of its placement (or of `pacs prefetch retry`).
INTERVAL = 2.0
PRUNE_EVERY = 3600.0


class Prefetcher(Periodic):
    """Runs due prefetch jobs every few seconds."""

    thread_name = "prefetch"
    round_at_start = True

    def __init__(self, pacs: Pacs, *, interval: float = INTERVAL) -> None:
        super().__init__(interval)
        self.pacs = pacs
        self.node = node_name(pacs)
        self._pruned_at: float | None = None
        # Ends the running job's retrieve when the server stops (see remote.Cancel).
        self._cancel = remote.Cancel()

    def start(self) -> Prefetcher:
        # A typo in prefetch_sources (any 1-16 characters pass as an AE
        # title: OLDPAC, a JSON list) is said now, not by each job's tries.
        for title, _method in self.pacs.settings.prefetch_source_methods:
            if self.pacs.aes.lookup(title) is None:
                log.warning("prefetch_sources: %s is not in the AE registry: no prior can be fetched from it until "
                            "it is registered (pacs ae add %s --host H --port P) or the setting is corrected",
                            title, title)
        released = jobs.release_node(self.pacs.engine, self.node, self.pacs.settings.prefetch_max_attempts)
        if released:
            log.warning("prefetch: %d job(s) this node was running when it stopped (killed or crashed) are queued "
                        "again, or dead after their last try (pacs prefetch list)", released)
        return super().start()

    def stop(self) -> None:
        """Stop: the running job's association is aborted and the job given
        back (run_claimed releases it), so the server is not held."""
        self._stop.set()
        self._cancel.set()
        super().stop()

    def round(self) -> None:
        self._prune()
        while not self.stopping:
            job = jobs.claim_next(self.pacs.engine, self.node, lease(), self.pacs.settings.prefetch_max_attempts)
            if job is None:
                return
            with remote.cancellable(self._cancel):
                state = run_claimed(self.pacs, job, stopping=lambda: self.stopping)
            log.info("prefetch job %d%s: %s", job.pk, f" (order {job.accession})" if job.accession else "",
                     state or "taken over by another node")

    def _prune(self) -> None:
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        try:
            pruned = jobs.prune(self.pacs.engine)
        except SQLAlchemyError as exc:
            log.warning("prefetch: pruning finished jobs failed: %s", str(exc).splitlines()[0][:200])
            return
        if pruned:
            log.info("prefetch: %d finished job(s) older than %d days deleted", pruned, jobs.KEEP_DONE.days)
