"""The durable outbox: messages for other systems, delivered at least once.

Rows are claimed with a conditional UPDATE (state and lease checked in the
WHERE clause), which is atomic on SQLite and PostgreSQL alike: two nodes
never send the same message at once, and a sender that dies mid-send only
delays the message until its lease expires.

The lease is the claim: the ``next_attempt_at`` a claim or a renewal wrote
is the holder's token (:attr:`Message.lease`). Every claim and renewal
writes a later instant than the row held (a claim needs the lease to have
run out, and adds a whole lease to a "now" at or past it), so a token is
never handed out twice, whatever the nodes' clocks. A sender renews the
lease of what it still has to send before each send (:func:`renew`), and
:func:`mark_failed`, :func:`release` and :func:`renew` change a row only
while it still carries the caller's token: a sender whose lease ran out
(stalled, or slower than its lease) and another node took the message over
sends nothing more of it and changes nothing of its row -- it cannot put a
message the other node delivered back to pending, nor send a stale copy
after the later messages of its order. A delivery, however, is a fact:
:func:`mark_sent` records it also after the claim passed on, as long as the
message is still undelivered, so that it is not sent once more.

Order: messages about the same thing (their *key*: the order, or the study
when no order is linked; :func:`message_key`) are delivered one after the
other in the order they were queued. Only the oldest undelivered message of
a key is ever claimed, so a message in backoff (the HIS refused it, or is
down) holds back the later ones of its order, never those of other orders.
A dead message (the HIS kept answering AE) does not hold its key back: it
waits for an operator (:func:`retry`), and a later message of the same kind
and key that reaches the HIS supersedes it (state "superseded": a newer
status or report version replaced it, so it is never resent out of order).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select, update

from .index.db import db_now, write_transaction
from .index.models import OutboundMessage

log = logging.getLogger(__name__)
outbox = OutboundMessage.__table__
LEASE = timedelta(minutes=2)
UNDELIVERED = ("pending", "sending")
STATES = ("pending", "sending", "sent", "dead", "superseded")
# The status of a report (ORU^R01) posted as wrong for the patient it was sent
# for, its study moved to another (pacs.orders, ris_bridge.outbound).
REPORT_WRONG_PATIENT = "wrong"
# How the last error of a message begins when the HIS took it and sent no ACK
# (ris_bridge.outbound): it may hold it all the same.
NO_ACK = "HIS sent no ACK"


@dataclass(frozen=True)
class Message:
    pk: int
    kind: str
    data: dict[str, Any]
    attempts: int
    last_error: str = ""
    key: str = ""
    # The claim: the next_attempt_at this holder wrote (None: not claimed).
    lease: datetime | None = None


def _now(conn: Connection) -> datetime:
    # The database's clock (see db_now): leases and due times are compared
    # by every node, and one whose clock runs ahead would take over messages
    # another node is still sending.
    return db_now(conn)


def message_key(kind: str, data: dict[str, Any], pk: int = 0) -> str:
    """What a message is about, for in-order delivery: its order (by the
    order's row), else its study. Reports name it (``key``); an order status
    carries the order row. For an order of several scheduled steps that row
    is its first step's, in status messages and study links alike
    (pacs.orders), so whichever step moved, one order is one key. Unknown
    shapes get their own key (no ordering)."""
    if data.get("key"):
        return str(data["key"])
    order = data.get("order") or {}
    if kind == "order_status" and order.get("pk") is not None:
        return f"order:{order['pk']}"
    if data.get("study_uid"):
        return f"study:{data['study_uid']}"
    if order.get("accession_number"):
        return f"accession:{order['accession_number']}"
    return f"message:{pk}"


# (database, pk, created_at) -> key: a payload never changes, so each is
# parsed once per process; created_at tells a row apart from one that had
# its pk before (a restored index, another database in the same process).
_keys: dict[tuple[str, int, Any], str] = {}


def _keys_of(conn: Any, rows: list[Any]) -> dict[int, str]:
    """The keys of outbox *rows* (with pk and created_at)."""
    database = conn.engine.url.render_as_string(hide_password=True)
    ident = {row.pk: (database, row.pk, row.created_at) for row in rows}
    missing = [pk for pk, cached in ident.items() if cached not in _keys]
    for start in range(0, len(missing), 500):
        chunk = missing[start : start + 500]
        for row in conn.execute(select(outbox.c.pk, outbox.c.kind, outbox.c.payload).where(outbox.c.pk.in_(chunk))):
            _keys[ident[row.pk]] = message_key(row.kind, json.loads(row.payload), row.pk)
    found = {pk: _keys[cached] for pk, cached in ident.items() if cached in _keys}
    if len(_keys) > 200_000:  # bounded: forget all but what is asked now
        _keys.clear()
        _keys.update({ident[pk]: key for pk, key in found.items()})
    return found


def enqueue(conn: Connection, destination: str, kind: str, data: dict[str, Any], *,
            owned_for: timedelta | None = None) -> int:
    """Queue a message in *conn*'s transaction (the change it reports commits
    with it); its pk. *owned_for*: the caller delivers it first and owns it
    that long ("sending" under a lease); should the caller die, any node's
    sender takes it over once the lease has run out. A caller that owns it
    needs its claim to settle it: :func:`enqueue_owned`."""
    return enqueue_owned(conn, destination, kind, data, owned_for).pk if owned_for else _insert(
        conn, destination, kind, data, "pending", _now(conn))


def enqueue_owned(conn: Connection, destination: str, kind: str, data: dict[str, Any],
                  owned_for: timedelta) -> Message:
    """Queue a message the caller delivers first, claimed by it for
    *owned_for* (:func:`enqueue`): the message with its claim, for
    :func:`mark_sent`, :func:`release` and :func:`renew`."""
    lease = _now(conn) + owned_for
    pk = _insert(conn, destination, kind, data, "sending", lease)
    return Message(pk, kind, data, 0, "", message_key(kind, data, pk), lease)


def _insert(conn: Connection, destination: str, kind: str, data: dict[str, Any], state: str,
            due: datetime) -> int:
    return int(conn.execute(
        outbox.insert().values(
            destination=destination, kind=kind, payload=json.dumps(data, default=str),
            state=state, attempts=0, next_attempt_at=due, created_at=_now(conn),
        )
    ).inserted_primary_key[0])


def claim_due(engine: Engine, destination: str, limit: int = 20, *, lease: timedelta = LEASE) -> list[Message]:
    """Claim up to *limit* messages that are due (pending, or stuck past
    their lease) and are the oldest undelivered message of their key: at
    most one per key, in queue order; each held for *lease* (claim no more
    than that covers, and :func:`renew` before each send)."""
    with engine.connect() as conn:
        now = _now(conn)
        due = and_(
            outbox.c.destination == destination,
            outbox.c.state.in_(UNDELIVERED),
            outbox.c.next_attempt_at <= now,
        )
        waiting = conn.execute(
            select(outbox.c.pk, outbox.c.created_at, outbox.c.next_attempt_at)
            .where(outbox.c.destination == destination, outbox.c.state.in_(UNDELIVERED))
            .order_by(outbox.c.pk)
        ).all()
        keys = _keys_of(conn, waiting)
        heads: list[int] = []
        seen: set[str] = set()
        for row in waiting:
            key = keys.get(row.pk, f"message:{row.pk}")
            if key in seen:
                continue  # an older message of its order is not delivered yet
            seen.add(key)
            if _aware(row.next_attempt_at) <= now:
                heads.append(row.pk)
                if len(heads) >= limit:
                    break
        candidates = conn.execute(
            select(outbox.c.pk, outbox.c.kind, outbox.c.payload, outbox.c.attempts, outbox.c.last_error)
            .where(outbox.c.pk.in_(heads))
            .order_by(outbox.c.pk)
        ).all() if heads else []
    claimed = []
    for row in candidates:
        with engine.begin() as conn:
            # Whoever moves next_attempt_at past "now" first owns the message;
            # the instant written is its claim (later than any before it).
            won = conn.execute(
                update(outbox)
                .where(outbox.c.pk == row.pk, due)
                .values(state="sending", next_attempt_at=now + lease)
            ).rowcount
        if won:
            data = json.loads(row.payload)
            claimed.append(Message(row.pk, row.kind, data, row.attempts, row.last_error or "",
                                   message_key(row.kind, data, row.pk), now + lease))
    return claimed


def _held(message: Message) -> Any:
    """WHERE clause: *message*'s row still carries its holder's claim."""
    if message.lease is None:
        raise ValueError(f"outbox message {message.pk} was not claimed")
    return and_(outbox.c.pk == message.pk, outbox.c.state == "sending", outbox.c.next_attempt_at == message.lease)


def _lost(message: Message, what: str) -> None:
    log.warning("outbox message %d: its claim ran out and passed to another sender; not %s here",
                message.pk, what)


def renew(engine: Engine, messages: list[Message], lease: timedelta = LEASE) -> list[Message]:
    """Extend the claim on *messages* (a sender's batch, before each send):
    those still held, in order, with their new claim. A message whose lease
    ran out and was claimed again (or settled) elsewhere is dropped (logged):
    its holder must not send it."""
    if not messages:
        return []
    held = []
    with engine.begin() as conn:
        now = _now(conn)
        for message in messages:
            still = _held(message)
            # Always later than the claim it replaces: tokens never repeat.
            until = max(now + lease, _aware(message.lease) + timedelta(microseconds=1))  # type: ignore[arg-type]
            if conn.execute(update(outbox).where(still).values(next_attempt_at=until)).rowcount:
                held.append(replace(message, lease=until))
            else:
                _lost(message, "sent")
    return held


def _aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def mark_sent(engine: Engine, message: Message) -> int | None:
    """The message reached its destination. Dead messages of the same kind
    and key queued before it are superseded by it; returns how many. Also
    recorded when the claim passed to another sender meanwhile, as long as
    the message is still undelivered (pending or sending): it did reach the
    destination, and must not be sent again. None (nothing changed) when it
    was settled elsewhere already (sent, or parked by the other sender)."""
    pk = message.pk
    # Reads, then writes: BEGIN IMMEDIATE on SQLite (a deferred transaction
    # failed "database is locked" at once under load, and the HIS got the
    # message a second time).
    with write_transaction(engine) as conn:
        row = conn.execute(select(outbox.c.kind, outbox.c.payload, outbox.c.destination, outbox.c.state,
                                  outbox.c.next_attempt_at).where(outbox.c.pk == pk)).first()
        if row is None:
            return 0
        # Whoever holds the claim now: the message did arrive.
        if not conn.execute(
            update(outbox).where(outbox.c.pk == pk, outbox.c.state.in_(UNDELIVERED))
            .values(state="sent", sent_at=_now(conn), last_error="")
        ).rowcount:
            log.warning("outbox message %d: delivered again after its claim ran out; another sender "
                        "settled it already", pk)
            return None
        if row.state != "sending" or message.lease is None or _aware(row.next_attempt_at) != message.lease:
            log.warning("outbox message %d: delivered after its claim ran out; recorded as sent", pk)
        key = message_key(row.kind, json.loads(row.payload), pk)
        older_dead = conn.execute(
            select(outbox.c.pk, outbox.c.created_at).where(
                outbox.c.destination == row.destination, outbox.c.state == "dead",
                outbox.c.kind == row.kind, outbox.c.pk < pk)
        ).all()
        replaced = _replaced_by(conn, [other for other, other_key in _keys_of(conn, older_dead).items()
                                       if other_key == key], json.loads(row.payload))
        if replaced:
            conn.execute(
                update(outbox)
                .where(outbox.c.pk.in_(replaced), outbox.c.state == "dead")
                .values(state="superseded", last_error=func.substr(
                    f"superseded by message {pk}; " + outbox.c.last_error, 1, 500))
            )
        return len(replaced)


def _retraction_of(data: dict[str, Any]) -> tuple[str, str] | None:
    """The patient (ID, issuer) a report posted as wrong retracts it for; None for any other message."""
    if data.get("status") != REPORT_WRONG_PATIENT:
        return None
    order = data.get("order") or {}
    return str(order.get("patient_id") or ""), str(order.get("issuer") or "")


def _replaced_by(conn: Connection, dead: list[int], sent: dict[str, Any]) -> list[int]:
    """Of the *dead* messages of a key, those the message *sent* replaces. A
    report posted as wrong for the patient its study left is replaced by
    nothing but a retraction for that same patient: the report sent after it
    for the study's new patient tells the HIS nothing of the first one's
    record, and superseded, the retraction could never be retried."""
    if not dead:
        return dead
    payloads = conn.execute(select(outbox.c.pk, outbox.c.payload).where(outbox.c.pk.in_(dead))).all()
    retracting = _retraction_of(sent)
    return [row.pk for row in payloads
            if (retracted := _retraction_of(json.loads(row.payload))) is None or retracted == retracting]


def mark_failed(engine: Engine, message: Message, error: str, *, dead: bool, retry_in: float) -> bool:
    """A try that did not deliver *message*: pending again after *retry_in*
    s, or *dead*. Only while the caller still holds its claim; False (logged,
    nothing changed) when another sender has it now, or delivered it."""
    with engine.begin() as conn:
        changed = conn.execute(
            update(outbox)
            .where(_held(message))
            .values(
                state="dead" if dead else "pending",
                attempts=outbox.c.attempts + 1,
                last_error=error[:500],
                next_attempt_at=_now(conn) + timedelta(seconds=retry_in),
            )
        ).rowcount
    if not changed:
        _lost(message, "marked failed")
    return bool(changed)


def release(engine: Engine, messages: list[Message], retry_in: float) -> int:
    """Give claimed messages back unsent (their turn comes after *retry_in*
    s); those another sender holds now are left alone. How many went back."""
    released = 0
    if not messages:
        return 0
    with engine.begin() as conn:
        due = _now(conn) + timedelta(seconds=retry_in)
        for message in messages:
            released += conn.execute(
                update(outbox).where(_held(message)).values(state="pending", next_attempt_at=due)
            ).rowcount
    return released


def state_of(engine: Engine, pk: int) -> str | None:
    """A message's state, or None when there is no such message."""
    with engine.connect() as conn:
        return conn.execute(select(outbox.c.state).where(outbox.c.pk == pk)).scalar()


def depth(engine: Engine) -> dict[str, int]:
    """Messages per state (queue depth for stats and health)."""
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state)).all()
    return {state: int(n) for state, n in rows}


def list_messages(engine: Engine, state: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """Messages for an operator (newest first), without their patient data:
    kind, key, state, attempts, last error, times."""
    stmt = select(outbox.c.pk, outbox.c.destination, outbox.c.kind, outbox.c.payload, outbox.c.state,
                  outbox.c.attempts, outbox.c.last_error, outbox.c.created_at, outbox.c.next_attempt_at,
                  outbox.c.sent_at).order_by(outbox.c.pk.desc()).limit(limit)
    if state:
        stmt = stmt.where(outbox.c.state == state)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    listed = []
    for row in rows:
        data = json.loads(row.payload)
        order = data.get("order") or {}
        listed.append({
            "id": row.pk, "destination": row.destination, "kind": row.kind,
            "key": message_key(row.kind, data, row.pk), "accession": order.get("accession_number", ""),
            "status": data.get("status", ""), "state": row.state, "attempts": row.attempts,
            "last_error": row.last_error or "", "created_at": row.created_at,
            "next_attempt_at": row.next_attempt_at if row.state in UNDELIVERED else None,
            "sent_at": row.sent_at,
        })
    return listed


def retry(engine: Engine, *, pk: int | None = None) -> list[int]:
    """Give dead messages (one, or all) another round: pending, due now,
    their attempts and rejections counted afresh. Returns the ids retried.
    A retried message is again the oldest undelivered one of its key, so
    later messages of its order wait for it."""
    stmt = update(outbox).where(outbox.c.state == "dead")
    if pk is not None:
        stmt = stmt.where(outbox.c.pk == pk)
    with write_transaction(engine) as conn:
        now = _now(conn)
        pks = conn.execute(
            select(outbox.c.pk).where(outbox.c.state == "dead", *([outbox.c.pk == pk] if pk is not None else []))
        ).scalars().all()
        if pks:
            conn.execute(
                stmt.where(outbox.c.pk.in_(pks)).values(
                    state="pending", attempts=0, next_attempt_at=now,
                    last_error=func.substr("retried by an operator; " + outbox.c.last_error, 1, 500),
                )
            )
    return list(pks)
