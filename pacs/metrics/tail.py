"""Counters of the rows a table of the index gains, read from the index.

Ingest runs in several processes (DICOM workers) and on several nodes, so a
counter kept in memory by whoever stored an object would be right for no
single scrape. The rows themselves are the shared truth: each scrape reads
the rows added since the last one (by primary key, a range on the key's own
index, so the cost follows what arrived, not the archive's size) and adds
them up by label. A row deleted later was still received: the counter never
goes down. It starts at 0 when this process first reads it, as a Prometheus
counter does at a restart (``rate()`` and ``increase()`` take that in).

Keys are not committed in key order everywhere. On PostgreSQL two
transactions take keys 100 and 101 from the sequence and 101 may commit
first; a key is also used up by an insert that found a duplicate or rolled
back, and never shows. Rows above a missing key are counted as they appear
and remembered, and the missing key is waited for :data:`LAG` seconds
before the count moves past it for good. On SQLite keys are given out by
the one writer in commit order, so there are no such gaps; but deleting the
newest rows lets SQLite give their keys out again, which the count follows
(it starts again from the new highest key).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Column, Connection, Select, func, select

# Seconds a missing key is waited for (a transaction holding it not yet
# committed) before the count passes it. Ingest transactions last
# milliseconds; a deadlock retry or a stalled disk some seconds.
LAG = 60.0
# Rows read per query, so a first scrape after a long pause (a day of
# ingest) reads in pages, never the whole day into memory at once.
PAGE = 20_000
# Label sets kept at most per counter: a label a peer chooses (its calling
# AE title) must not grow the scrape without bound. Later ones go to OTHER.
MAX_SERIES = 1_000
OTHER = "other"

Key = tuple[str, ...]


class LabelCounts:
    """Amounts added up per label values, at most :data:`MAX_SERIES` sets."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.counts: dict[Key, float] = {}

    def add(self, labels: Key, amount: float = 1.0) -> None:
        if labels not in self.counts and len(self.counts) >= MAX_SERIES:
            labels = tuple(OTHER for _ in labels)
        self.counts[labels] = self.counts.get(labels, 0.0) + amount

    def samples(self) -> list[tuple[dict[str, str], float]]:
        """The counts as (labels, value)."""
        return [(dict(zip(self.names, key, strict=True)), value) for key, value in sorted(self.counts.items())]


class TableTail:
    """Hands each row that appears in a table to *on_row*, once.

    *key* is the table's integer primary key column; *query* selects the
    rows above a key (the key first)."""

    def __init__(self, key: Column[Any], query: Callable[[int], Select[Any]], on_row: Callable[[Any], None], *,
                 lag: float = LAG, clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.query = query
        self.on_row = on_row
        self.lag = lag
        self.clock = clock
        # Every key up to floor is settled (counted, or given up on).
        self.floor: int | None = None
        # Keys above floor already counted -> when first seen.
        self._seen: dict[int, float] = {}

    def refresh(self, conn: Connection) -> None:
        """Hand over what appeared since the last refresh (the first one
        only notes where the table ends)."""
        top = int(conn.execute(select(func.max(self.key))).scalar() or 0)
        if self.floor is None:
            self.floor = top
            return
        if top < self.floor:
            # The newest rows were deleted: SQLite hands their keys out again.
            self.floor = top
            self._seen.clear()
        now = self.clock()
        after = self.floor
        while True:
            rows = conn.execute(self.query(after).order_by(self.key).limit(PAGE)).all()
            for row in rows:
                pk = int(row[0])
                if pk not in self._seen:
                    self._seen[pk] = now
                    self.on_row(row)
            if len(rows) < PAGE:
                break
            after = int(rows[-1][0])
        self._settle(now)

    def _settle(self, now: float) -> None:
        """Move the floor over the keys counted without a gap below them,
        and over the gaps older than the lag."""
        assert self.floor is not None
        old = [pk for pk, seen in self._seen.items() if now - seen >= self.lag]
        if old:
            # What is missing below a key seen LAG ago is not coming.
            self.floor = max(self.floor, max(old))
        while self.floor + 1 in self._seen:
            self.floor += 1
        self._seen = {pk: seen for pk, seen in self._seen.items() if pk > self.floor}
