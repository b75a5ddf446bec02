"""How long a secret guessed wrong too often stays locked: a share link's
birth year (pacs.shares), a radiologist's signing PIN (pacs.signing_keys).

The first lock is FIRST_LOCK; each further lock in a row is twice the one
before, up to MAX_LOCK: a birth year has about a hundred likely values,
which a flat 15 minutes per run of wrong answers let a finder of a lost
receipt try within a day."""

from __future__ import annotations

from datetime import timedelta

FIRST_LOCK = timedelta(minutes=15)
MAX_LOCK = timedelta(days=1)


def lock_length(lockouts: int) -> timedelta:
    """The lock after the *lockouts*-th run of wrong answers (1: the first)."""
    return min(FIRST_LOCK * 2 ** min(max(lockouts - 1, 0), 16), MAX_LOCK)
