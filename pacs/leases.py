"""Leases: a shared background job runs on one node of the cluster at a time.

Routing jobs are rows claimed with ``SELECT ... FOR UPDATE SKIP LOCKED``;
the maintenance jobs (``pacs purge --yes``, ``compress``, ``migrate``,
``reindex``, ``verify --repair``) are whole-archive passes instead, so they
take a named lease in the ``job_leases`` table before they start:

- acquiring is one atomic statement, ``INSERT ... ON CONFLICT (name) DO
  UPDATE ... WHERE job_leases.expires_at < now`` (PostgreSQL and SQLite
  both have it), then the row is read back in the same transaction: the
  lease is ours when it carries our token. Two nodes racing for a free
  lease serialise on the primary key, and the loser sees the winner's row;
- a heartbeat thread pushes ``expires_at`` forward every ``ttl / 3`` while
  the job runs; leaving the ``with`` block deletes the row;
- a holder that dies (SIGKILL, power loss) stops heartbeating, so its lease
  expires ``ttl`` seconds after its last heartbeat and the job can run again.
  A row is never taken over before it expires, so a long job that keeps
  heartbeating is never run twice.

Times come from the database server on PostgreSQL (``now()``) so nodes whose
clocks disagree still agree on who holds a lease; SQLite is only ever shared
by processes of one machine, so its clock is the local one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .errors import PacsError
from .index.db import db_now as _now, write_transaction
from .index.models import JobLease

log = logging.getLogger(__name__)

leases_t: Table = JobLease.__table__  # type: ignore[assignment]

# Long enough that a busy database or a GC pause never loses a lease that is
# heartbeating every ttl/3, short enough that a crashed holder blocks little.
DEFAULT_TTL = 60.0
TTL_ENV = "PACS_LEASE_TTL"


class LeaseHeld(PacsError):
    """Another process holds the lease; ``info`` says who and until when."""

    def __init__(self, info: LeaseInfo) -> None:
        self.info = info
        super().__init__(
            f"{info.name} is already running on node {info.holder} (process {info.token}, "
            f"since {_fmt(info.acquired_at)}, last heartbeat {_fmt(info.heartbeat)}, "
            f"lease until {_fmt(info.expires_at)})"
        )


@dataclass(frozen=True)
class LeaseInfo:
    """A lease row as read from the index."""

    name: str
    holder: str
    token: str
    acquired_at: datetime
    expires_at: datetime
    heartbeat: datetime


def _fmt(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _aware(at: datetime) -> datetime:
    # SQLite hands DateTime(timezone=True) values back naive; they were written in UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def lease_ttl() -> float:
    """The lease time-to-live in seconds: ``PACS_LEASE_TTL``, default 60."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL
    ttl = float(raw)
    if ttl <= 0:
        raise ValueError(f"{TTL_ENV} must be a positive number of seconds, not {raw!r}")
    return ttl


def _row(conn: Connection, name: str) -> LeaseInfo | None:
    row = conn.execute(select(leases_t).where(leases_t.c.name == name)).mappings().first()
    if row is None:
        return None
    return LeaseInfo(
        name=row["name"], holder=row["holder"], token=row["token"], acquired_at=_aware(row["acquired_at"]),
        expires_at=_aware(row["expires_at"]), heartbeat=_aware(row["heartbeat"]),
    )


def current(engine: Engine, name: str) -> LeaseInfo | None:
    """Who holds lease *name* now; None when it is free (absent or expired)."""
    with engine.connect() as conn:
        info = _row(conn, name)
        if info is None or info.expires_at < _now(conn):
            return None
        return info


def _try_acquire(engine: Engine, name: str, holder: str, token: str, ttl: float) -> LeaseInfo:
    """One atomic attempt; returns the row as it is afterwards (ours or not)."""
    # BEGIN IMMEDIATE on SQLite: the write lock is taken first, so the upsert
    # and the read-back see one consistent state.
    with write_transaction(engine) as conn:
        now = _now(conn)
        values = {
            "name": name, "holder": holder, "token": token,
            "acquired_at": now, "expires_at": now + timedelta(seconds=ttl), "heartbeat": now,
        }
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(leases_t).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[leases_t.c.name],
            set_={k: stmt.excluded[k] for k in ("holder", "token", "acquired_at", "expires_at", "heartbeat")},
            # Only a lease whose holder stopped heartbeating may be taken over.
            where=leases_t.c.expires_at < now,
        )
        conn.execute(stmt)
        info = _row(conn, name)
    assert info is not None  # the upsert inserted it or it was there
    return info


class Lease:
    """A lease this process holds; a daemon thread keeps it alive."""

    def __init__(self, engine: Engine, info: LeaseInfo, ttl: float) -> None:
        self.engine = engine
        self.name, self.holder, self.token = info.name, info.holder, info.token
        self.ttl = ttl
        # Set when a heartbeat found the lease taken over (this process was
        # stalled past the TTL): the job may have overlapped with another run.
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(self.ttl / 3, 0.1)
        while not self._stop.wait(interval):
            try:
                kept = self.extend()
            except Exception as exc:  # noqa: BLE001 - the database may come back before the lease expires
                log.warning("lease %s: heartbeat failed (%s), retrying", self.name, exc.__class__.__name__)
                continue
            if not kept:
                self.lost = True
                log.error("lease %s: lost (another process took it over after it expired); "
                          "this run may have overlapped with another", self.name)
                return

    def extend(self) -> bool:
        """Push the expiry ``ttl`` seconds forward; False if the lease is no longer ours."""
        with write_transaction(self.engine) as conn:
            now = _now(conn)
            result = conn.execute(
                update(leases_t)
                .where(leases_t.c.name == self.name, leases_t.c.token == self.token)
                .values(expires_at=now + timedelta(seconds=self.ttl), heartbeat=now)
            )
            return (result.rowcount or 0) == 1

    def release(self) -> None:
        """Stop heartbeating and free the lease (only if it is still ours)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(max(self.ttl, 5.0))
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(delete(leases_t).where(leases_t.c.name == self.name, leases_t.c.token == self.token))
        except Exception as exc:  # noqa: BLE001 - it expires by itself anyway
            log.warning("lease %s: could not release (%s); it expires within %.0f s",
                        self.name, exc.__class__.__name__, self.ttl)


def acquire(
    engine: Engine,
    name: str,
    node: str,
    ttl: float = DEFAULT_TTL,
    *,
    wait: bool = False,
    on_wait: Callable[[LeaseInfo], None] | None = None,
) -> Lease:
    """Take lease *name* for *node* or raise :class:`LeaseHeld`; with *wait*,
    poll until it is free instead (*on_wait* is told about the holder once)."""
    if ttl <= 0:
        raise ValueError("a lease needs a positive TTL")
    token = f"{_machine()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    told = False
    # Polling a few times per TTL notices a released lease quickly and an
    # expired one within a fraction of the TTL, without hammering the index.
    poll = min(5.0, max(0.1, ttl / 4))
    while True:
        info = _try_acquire(engine, name, node, token, ttl)
        if info.token == token:
            log.info("lease %s acquired by %s", name, node)
            return Lease(engine, info, ttl)
        if _holder_died_here(info.token) and _drop(engine, name, info.token):
            # Killed on this machine (kill -9, OOM): its lease is not worth
            # waiting out a TTL for; the job can be rerun, as after an expiry.
            log.warning("lease %s of process %s taken over: that process is gone", name, info.token)
            continue
        if not wait:
            raise LeaseHeld(info)
        if not told and on_wait is not None:
            on_wait(info)
            told = True
        time.sleep(poll)


def _machine() -> str:
    """Where a process id means something: the host name and, when known, the
    PID namespace (containers sharing the host's name and network have
    their own process ids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").replace(":", "")
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/{namespace}"


def _holder_died_here(token: str) -> bool:
    """The token's process ran where this one runs and no longer exists."""
    parts = token.rsplit(":", 2)
    if len(parts) != 3:
        return False
    machine, pid, _ = parts
    # A token without a namespace (older versions, no /proc) is never judged here.
    if "/" not in machine or machine != _machine() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def _drop(engine: Engine, name: str, token: str) -> bool:
    with write_transaction(engine) as conn:
        gone = conn.execute(delete(leases_t).where(leases_t.c.name == name, leases_t.c.token == token))
    return bool(gone.rowcount)


@contextmanager
def lease(
    engine: Engine,
    name: str,
    node: str,
    ttl: float = DEFAULT_TTL,
    *,
    wait: bool = False,
    on_wait: Callable[[LeaseInfo], None] | None = None,
) -> Iterator[Lease]:
    """Hold lease *name* for the duration of the ``with`` block.

    Raises :class:`LeaseHeld` (naming the holder) when another process holds
    it and *wait* is false; otherwise waits until it is released or expires.
    The lease is heartbeated while the block runs and released at its end,
    also when the block raises.
    """
    held = acquire(engine, name, node, ttl, wait=wait, on_wait=on_wait)
    try:
        yield held
    finally:
        held.release()
