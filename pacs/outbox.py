"""The durable outbox: messages for other systems, delivered at least once.

Rows are claimed with a conditional UPDATE (state and lease checked in the
WHERE clause), which is atomic on SQLite and PostgreSQL alike: two nodes
never send the same message at once, and a sender that dies mid-send only
delays the message until its lease expires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, select, update

from .index.models import OutboundMessage

outbox = OutboundMessage.__table__
LEASE = timedelta(minutes=2)


@dataclass(frozen=True)
class Message:
    pk: int
    kind: str
    data: dict[str, Any]
    attempts: int


def _now() -> datetime:
    return datetime.now(UTC)


def claim_due(engine: Engine, destination: str, limit: int = 20) -> list[Message]:
    """Claim up to *limit* messages that are due (pending, or stuck past their lease)."""
    now = _now()
    due = and_(
        outbox.c.destination == destination,
        outbox.c.state.in_(["pending", "sending"]),
        outbox.c.next_attempt_at <= now,
    )
    with engine.connect() as conn:
        candidates = conn.execute(
            select(outbox.c.pk, outbox.c.kind, outbox.c.payload, outbox.c.attempts)
            .where(due)
            .order_by(outbox.c.pk)
            .limit(limit)
        ).all()
    claimed = []
    for row in candidates:
        with engine.begin() as conn:
            # Whoever moves next_attempt_at past "now" first owns the message.
            won = conn.execute(
                update(outbox)
                .where(outbox.c.pk == row.pk, due)
                .values(state="sending", next_attempt_at=now + LEASE)
            ).rowcount
        if won:
            claimed.append(Message(row.pk, row.kind, json.loads(row.payload), row.attempts))
    return claimed


def mark_sent(engine: Engine, pk: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.pk == pk).values(state="sent", sent_at=_now(), last_error=""))


def mark_failed(engine: Engine, pk: int, error: str, *, dead: bool, retry_in: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.pk == pk)
            .values(
                state="dead" if dead else "pending",
                attempts=outbox.c.attempts + 1,
                last_error=error[:500],
                next_attempt_at=_now() + timedelta(seconds=retry_in),
            )
        )


def release(engine: Engine, pks: list[int], retry_in: float) -> None:
    """Give claimed messages back unsent (their turn comes after *retry_in* s)."""
    if not pks:
        return
    with engine.begin() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.pk.in_(pks), outbox.c.state == "sending")
            .values(state="pending", next_attempt_at=_now() + timedelta(seconds=retry_in))
        )


def depth(engine: Engine) -> dict[str, int]:
    """Messages per state (queue depth for stats and health)."""
    from sqlalchemy import func

    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state)).all()
    return {state: int(n) for state, n in rows}
