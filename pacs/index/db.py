"""Engines for the index: SQLite (WAL, embedded default) and PostgreSQL.

SQLite is tuned for an appliance that must not lose acknowledged data:
WAL journal with ``synchronous=FULL`` (a commit is on disk when it returns),
foreign keys on, a generous busy timeout so several processes can share
the file. Write transactions start with ``BEGIN IMMEDIATE`` (requested
with the ``immediate`` execution option) so two writers queue on the lock
instead of failing on a read-to-write upgrade.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATEs of a transaction PostgreSQL aborted so that another could go on:
# a deadlock victim (40P01) and a serialization failure (40001). Nothing of
# it was applied, and run again it normally succeeds.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
# Runs of one transaction before such a failure is given to the caller.
TRANSACTION_ATTEMPTS = 5
# Upper bound (seconds) of the random pause before the second run, doubled
# for each further one: two victims of one another do not meet again in step.
RETRY_PAUSE = 0.05


class ConcurrentChange(Exception):
    """A row the transaction had read was deleted (or changed) by another
    writer before the transaction could lock it. Run again, the transaction
    sees the other's outcome (e.g. an HIS update of a patient a deletion
    just removed makes the patient anew)."""


def is_transient(exc: BaseException) -> bool:
    """Whether *exc* failed a transaction only because of another one at the
    same moment (:data:`RETRYABLE_SQLSTATES`, :class:`ConcurrentChange`)."""
    if isinstance(exc, ConcurrentChange):
        return True
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES


def retry_transaction(run: Callable[[], T], *, what: str, attempts: int | None = None,
                      retry_on: Callable[[BaseException], bool] = is_transient) -> T:
    """``run()`` -- one whole transaction -- run again after a short random
    pause while it fails with an error *retry_on* accepts (by default a
    deadlock victim, a serialization failure, a :class:`ConcurrentChange`),
    at most *attempts* (default :data:`TRANSACTION_ATTEMPTS`) times in all;
    the last error is raised. *what* names the transaction in the log (no
    patient data: database errors quote the statement's parameters, so only
    the error's type and SQLSTATE are logged)."""
    # The module's value when called, not when defined: the tests lower it to
    # reach what a peer is answered once every run lost.
    attempts = TRANSACTION_ATTEMPTS if attempts is None else attempts
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except Exception as exc:
            if attempt == attempts or not retry_on(exc):
                raise
            log.info("%s: %s (%s); running it again (%d of %d)", what, type(exc).__name__,
                     getattr(getattr(exc, "orig", None), "sqlstate", None) or "no SQLSTATE", attempt + 1, attempts)
            time.sleep(random.uniform(0, RETRY_PAUSE * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that reads, then writes: ``BEGIN IMMEDIATE`` on SQLite,
    so it waits for the write lock up front instead of failing with
    "database is locked" when another writer committed after its read.
    Committed at the end of the block, rolled back on an exception."""
    with engine.connect().execution_options(immediate=True) as conn, conn.begin():
        yield conn


def retry_write(engine: Engine, work: Callable[[Connection], T], *, what: str, attempts: int | None = None,
                retry_on: Callable[[BaseException], bool] = is_transient) -> T:
    """``work(conn)`` in a :func:`write_transaction`, committed, its result
    returned; the whole transaction run again as :func:`retry_transaction`
    does (*what*, *attempts*, *retry_on* are its).

    Each run is a whole new transaction: *work* must have no effect outside
    it (a file stored, a message sent, a counter kept in memory), or only
    one that is safe to repeat."""
    def once() -> T:
        with write_transaction(engine) as conn:
            return work(conn)

    return retry_transaction(once, what=what, attempts=attempts, retry_on=retry_on)


def db_now(conn: Connection) -> datetime:
    """The instant every node agrees on, aware (UTC), for claims, leases,
    due times and grace periods shared through the index.

    On PostgreSQL the database server's clock (``now()``: the start of
    *conn*'s transaction): nodes whose clocks drift apart (no NTP) would
    otherwise take over each other's claims early or wait minutes too long.
    SQLite is only ever shared by processes of one machine, whose clock it is."""
    if conn.dialect.name == "postgresql":
        moment: datetime = conn.execute(select(func.now())).scalar_one()
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return datetime.now(UTC)


def discard_connection(conn: Connection | None) -> None:
    """Throw away a kept connection after an error (it may be broken: the
    server restarted, a lock timed out); never raises."""
    if conn is None:
        return
    try:
        conn.invalidate()
        conn.close()
    except Exception:
        pass


def private_file(path: Path) -> None:
    """Create *path* (if missing) readable by its owner and group only, or
    take the world's access away from an existing one.

    The index holds patients' names, password and token hashes: 0644 (the
    usual umask) let every local account read it. SQLite gives its -wal and
    -shm files the database file's mode, so this covers them too.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        return
    except FileExistsError:
        pass
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o007:
            os.chmod(path, mode & ~0o007)
    except OSError:
        pass  # not ours to change (another account's read-only use)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_index_engine(url: str, *, pool_size: int = 10, role: str = "") -> Engine:
    """Create the engine for *url* with the settings the index relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            private_file(Path(parsed.database))
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 60},
            pool_size=pool_size,
            max_overflow=20,
        )
        _configure_sqlite(engine)
        return engine
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if pool_size <= 0:
        kwargs = {"poolclass": NullPool}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=20)
    if parsed.get_backend_name() == "postgresql":
        # Named, so that an upgrade can tell the archive's servers of another
        # version from a DBA's psql (see pacs.index.schema.other_servers).
        name = f"{APPLICATION_NAME} {SCHEMA_HEAD}" + (f" {role}" if role else "")
        kwargs["connect_args"] = {"application_name": name, **PG_NETWORK_LIMITS}
    return create_engine(url, **kwargs)


APPLICATION_NAME = "filmless-pacs"
# The schema revision this code works on (the newest migration; a test keeps
# them equal). PostgreSQL sessions carry it in their application name, so an
# upgrade can tell servers of another version (which would fail on the
# upgraded schema) from nodes of its own starting beside it.
SCHEMA_HEAD = "0036"
# Bytes the SQLite -wal file is cut back to once the WAL restarts (at the
# commit after a complete checkpoint). Without a limit the file keeps the
# largest size it ever reached: a reader holding one snapshot for a minute
# during ingest (a backup) left 184 MB for as long as the server ran
# (bench/README.md, 2026-12-06). Well above the ~4-6 MB the WAL cycles through
# between automatic checkpoints, so that steady ingest never truncates and
# regrows it. Read at each connection (the tests lower it).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# How long a SQLite connection waits for another's lock (several processes
# share the file: a writer queues behind the group commit of another).
BUSY_TIMEOUT_MS = 60_000
# A database host that vanishes from the network (no RST, no FIN) held every
# C-STORE, C-FIND and HTTP request for as long as the kernel retransmits
# (minutes): libpq gives up connecting after 5 s, on unacknowledged data after
# 30 s, and on an idle connection whose peer is gone after ~30 s of keepalives.
# Only a client-side limit: a long maintenance query that is answered is not cut.
PG_NETWORK_LIMITS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own
        # implicit transactions cannot do BEGIN IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA cache_size=-65536")
        # Per connection: whichever process's writer restarts the WAL truncates it.
        cursor.execute(f"PRAGMA journal_size_limit={int(WAL_SIZE_LIMIT)}")
        # DICOM matching is case-sensitive (names are matched on folded,
        # upper-case columns) and a case-sensitive LIKE 'ABC%' can use an index.
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            # Each statement is its own transaction: a BEGIN here would hold
            # a read snapshot until the connection closes (stale reads, and
            # the WAL could never be checkpointed past it).
            return
        if options.get("immediate"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


@dataclass(frozen=True)
class WalCheckpoint:
    """What :func:`checkpoint_wal` did to a -wal file that had outgrown
    :data:`WAL_SIZE_LIMIT`."""

    before: int  # bytes of the -wal file
    after: int
    # Every frame is in the database file.
    complete: bool
    # Frames were left behind for a reader still on an older snapshot (the
    # WAL then grows with every commit until it ends); not when another
    # process's checkpoint was running.
    held_back: bool


def sqlite_file(engine: Engine) -> Path | None:
    """The index's SQLite file, None on PostgreSQL or in memory."""
    if not is_sqlite(engine) or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database)


def checkpoint_wal(engine: Engine) -> WalCheckpoint | None:
    """Checkpoint a SQLite index whose -wal file has grown beyond
    :data:`WAL_SIZE_LIMIT`, and empty the file when nothing needs it any more;
    None when there is nothing to do (PostgreSQL, a WAL within the limit).

    SQLite checkpoints on its own at a commit once the WAL holds 1000 pages,
    but it cannot go past a page a reader's snapshot still needs: a reader
    holding one for a minute during ingest (a backup) grows the WAL by
    hundreds of MB, and if ingest then stops, no commit comes to checkpoint
    it (readers search the whole WAL for every page; a crash replays it all
    at the next start). Never waits: PASSIVE copies what no reader needs
    without taking the write lock; only if that left nothing behind does
    TRUNCATE reset the file, with no busy wait, so a writer (another
    process's ingest too) or a reader still on the WAL makes it give up at
    once (the next round tries again) instead of queueing ingest behind it.
    """
    path = sqlite_file(engine)
    if path is None:
        return None
    wal = Path(f"{path}-wal")
    try:
        before = wal.stat().st_size
    except FileNotFoundError:
        return None
    if before <= WAL_SIZE_LIMIT:
        return None
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        busy, frames, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        complete = not busy and frames == copied
        held_back = not busy and copied < frames
        if complete:
            # FULL, RESTART and TRUNCATE take the write lock first and then
            # wait (the busy timeout) for readers to leave the WAL: writers
            # would wait as long.
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        after = wal.stat().st_size
    except FileNotFoundError:
        after = 0
    return WalCheckpoint(before, after, complete, held_back)


# Rows of the instances table from which the planner's statistics matter,
# and the factor it may grow or shrink by before they are gathered again.
STATISTICS_FROM_ROWS = 1000
STATISTICS_DRIFT = 2.0


def refresh_statistics(engine: Engine) -> int | None:
    """Gather SQLite's planner statistics (``ANALYZE``) when there are none
    yet or the instances table has grown or shrunk by :data:`STATISTICS_DRIFT`
    since (shrunk at the ends of its rowids: see below); the rows counted
    then, None when nothing was done (PostgreSQL: autovacuum analyses on its
    own).

    Without statistics SQLite guesses, and a C-FIND by patient name prefix
    scanned every study instead of using the name indexes: 73 ms at 100,000
    studies against 2.4 ms with statistics, growing with the archive
    (bench/README.md, 2026-12-06). A full ANALYZE made no hot query's plan
    worse where the sampled one (``analysis_limit``, as ``PRAGMA optimize``
    does) made the study list sort every study. It holds the write lock for
    its duration (0.4 s at 961,000 instances), hence only on such a drift."""
    if not is_sqlite(engine):
        return None
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # Not count(*) each round: it reads a whole index of the table (5 ms
        # warm at a million rows, the disk's time cold). The span of the
        # rowids is two B-tree seeks (each in a subquery: min() and max() in
        # one SELECT scan the table), and never less than the count: a span
        # under the threshold, or at most twice the last count, is a table
        # that has not reached it or doubled. Counted only otherwise, and
        # the count decides, as rows deleted amid the span (a purge by
        # modality, a study deleted by hand) leave holes: a table half holes
        # would be analysed every round. A span under half the last count is
        # a table halved (the oldest studies purged); halved by holes alone,
        # the table keeps its statistics until its span has doubled: they
        # overstate its size, not which index finds fewer rows.
        low, high = conn.exec_driver_sql(
            "SELECT (SELECT min(rowid) FROM instances), (SELECT max(rowid) FROM instances)").one()
        span = high - low + 1 if high is not None else 0
        if span < STATISTICS_FROM_ROWS:
            return None
        has_table = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'").first()
        stat = conn.exec_driver_sql(
            "SELECT stat FROM sqlite_stat1 WHERE tbl = 'instances' LIMIT 1").scalar() if has_table else None
        counted = int(str(stat).split()[0]) if stat else 0
        if counted and counted / STATISTICS_DRIFT <= span <= counted * STATISTICS_DRIFT:
            return None
        rows = int(conn.exec_driver_sql("SELECT count(*) FROM instances").scalar() or 0)
        if rows < STATISTICS_FROM_ROWS:
            return None
        if counted and counted / STATISTICS_DRIFT <= rows <= counted * STATISTICS_DRIFT:
            return None
        conn.exec_driver_sql("ANALYZE")
    return rows
