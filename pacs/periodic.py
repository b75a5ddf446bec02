"""The shape of a node's background workers (routing, HL7 outbound, storage
commitment reports, the tombstone sweeper): one daemon thread running a
round every few seconds until the server stops."""

from __future__ import annotations

import logging
import threading
from typing import Self

log = logging.getLogger(__name__)


class Periodic:
    """Runs :meth:`round` every ``interval`` seconds in a thread of its own,
    until :meth:`stop`; :meth:`wake` starts the next round at once.

    A round that raises is reported by :meth:`round_failed` and the next one
    tries again: an index or a peer that is down must not end the worker."""

    thread_name = "periodic"
    # How long stop() waits for a round in progress.
    join_timeout = 30.0
    # False: the first round comes one interval after start().
    round_at_start = False

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the worker; waits up to ``join_timeout`` for its round."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.join_timeout)

    def wake(self) -> None:
        """Start the next round now rather than at the end of the interval."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def round(self) -> None:
        """One round of the worker's work."""
        raise NotImplementedError

    def round_failed(self, exc: Exception) -> None:
        """One line, not a traceback each interval (the index is down...)."""
        log.warning("%s: %s", self.thread_name, (str(exc).splitlines() or [repr(exc)])[0][:200])

    def _run(self) -> None:
        if not self.round_at_start and self._pause():
            return
        while True:
            try:
                self.round()
            except Exception as exc:
                self.round_failed(exc)
            if self._pause():
                return

    def _pause(self) -> bool:
        """Wait for the next round; True once stopped."""
        self._wake.wait(self.interval)
        self._wake.clear()
        return self._stop.is_set()
