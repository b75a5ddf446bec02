"""Figures only this node knows, registered by whoever owns them: `pacs
serve` adds its DICOM listeners (the single-process server, the TLS one,
the worker pool's shared connection counts) so that /metrics can say how
many associations this node has open, whichever process holds them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Source = Callable[[], int | None]


class NodeFigures:
    """The live sources of one `pacs serve` (empty in a command)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dicom: list[Source] = []

    def add_dicom(self, source: Source) -> None:
        """*source* gives the DICOM associations (connections) a listener
        of this node holds now, or None when it cannot tell."""
        with self._lock:
            self._dicom.append(source)

    def dicom_open(self) -> int | None:
        """Open DICOM associations on this node; None without a listener."""
        with self._lock:
            sources = list(self._dicom)
        known = []
        for source in sources:
            try:
                value = source()
            except Exception as exc:  # a stopped listener must not fail the scrape
                log.debug("DICOM association count not read: %s", exc)
                continue
            if value is not None:
                known.append(value)
        return sum(known) if known else None
