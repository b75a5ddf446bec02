"""Audit retention: move old audit events out of the index into archive files.

The live trail is append-only (triggers refuse UPDATE and DELETE) and grows
by about one row per operation: tens of millions of rows after a few years
of a busy hospital. Medical-record rules want the trail kept for as long as
the records, not necessarily in the live database. ``pacs audit-archive
--before DATE --to DIR`` writes every event older than DATE to one gzip
JSON-lines file, reads the file back and checks it, and only then deletes
exactly those rows, in one transaction that lifts the append-only guard for
itself alone. The archive is recorded in the trail that stays (an
``audit-archive`` event with the file's name, its event range and its
SHA-256), and each archive names the SHA-256 of the one before it, so a file
changed or removed later is detected (``pacs audit-archive --verify``).

File layout: a header line (``{"archive": ..., "previous_sha256": ...}``),
one line per event (the form ``pacs audit --format json`` prints), and a
trailer line ``{"trailer": {"events": N, "sha256": H}}`` where H is the
SHA-256 of every line before it, newline included.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select

from ..app import Pacs
from ..audit import Event, events_t
from ..index.db import is_sqlite, write_transaction
from ..timezones import hospital_zone
from .common import BATCH, NullProgress, Progress, batched, os_user

FORMAT = "filmless-pacs audit archive 1"
ACTION = "audit-archive"
# The youngest cut-off accepted: events of the last day may still be on
# their way to the index (written in batches, or held through an outage).
MIN_AGE = timedelta(days=1)
# Events deleted per transaction: SQLite has one writer, and a serving
# appliance's ingest and audit writes wait for each transaction (PostgreSQL's
# ALTER TABLE ... DISABLE TRIGGER holds its audit inserts likewise).
DELETE_BATCH = 5_000
_SHA = re.compile(r"sha256=([0-9a-f]{64})")

# The guard migration 0005 installed, lifted and restored inside the
# archiving transaction only (DDL is transactional on both databases).
_PG_TRIGGER = "trg_audit_events_append_only"
_SQLITE_DELETE_TRIGGER = ("CREATE TRIGGER trg_audit_events_no_delete BEFORE DELETE ON audit_events "
                          "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END")


class ArchiveError(Exception):
    """The archive could not be made or checked; nothing was deleted."""


@dataclass
class ArchiveReport:
    before: str
    events: int = 0
    first_pk: int | None = None
    last_pk: int | None = None
    first_at: str | None = None
    last_at: str | None = None
    file: str | None = None
    sha256: str | None = None
    previous_sha256: str | None = None
    deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArchiveCheck:
    file: str
    ok: bool = False
    events: int = 0
    sha256: str | None = None
    previous_sha256: str | None = None
    in_trail: bool | None = None  # the index's audit-archive event names this file and hash
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cutoff_of(day: date, pacs: Pacs, now: datetime | None = None) -> datetime:
    """The start of *day* in the hospital's time zone, as UTC; ``ValueError``
    when it is less than :data:`MIN_AGE` ago."""
    try:
        cutoff = datetime.combine(day, time(0), hospital_zone(pacs.settings)).astimezone(UTC)
    except OverflowError:  # 0001-01-01 east of UTC
        raise ValueError(f"--before {day.isoformat()} is not a date the trail can hold") from None
    if cutoff > (now or datetime.now(UTC)) - MIN_AGE:
        raise ValueError(f"--before {day.isoformat()} is too recent: archive only events more than a day old")
    return cutoff


def archive_audit(pacs: Pacs, before: date, folder: Path, *, progress: Progress | None = None) -> ArchiveReport:
    """Move the audit events older than *before* (a hospital-local date) to
    a new archive file in *folder*; see the module docstring."""
    progress = progress or NullProgress()
    cutoff = cutoff_of(before, pacs)
    report = ArchiveReport(before=before.isoformat())
    old = events_t.c.at < cutoff
    with pacs.engine.connect() as conn:
        count, first, last = conn.execute(select(func.count(), func.min(events_t.c.pk), func.max(events_t.c.pk))
                                          .where(old)).one()
        if not count:
            return report
        report.previous_sha256 = _last_archive_sha(conn)
    folder.mkdir(parents=True, exist_ok=True)
    in_range = and_(old, events_t.c.pk.between(first, last))
    progress.start("archiving audit events", total=int(count))
    path, pks = _write(pacs, folder, in_range, report, progress)
    check = verify_archive(path)
    if not check.ok or check.events != report.events or check.sha256 != report.sha256:
        path.unlink(missing_ok=True)
        raise ArchiveError(f"{path} did not read back as written: {'; '.join(check.problems) or 'hash differs'}")
    record = Event(action=ACTION, user=os_user(), role="admin", protocol="cli",
                   detail=(f"{report.events} events pk {report.first_pk}-{report.last_pk} before {report.before} "
                           f"to {path.name} sha256={report.sha256}"))
    for number, chunk in enumerate(batched(pks, DELETE_BATCH)):
        try:
            report.deleted += _delete_chunk(pacs, chunk, cutoff, record if number == 0 else None)
        except BaseException as exc:
            if number == 0:
                path.unlink(missing_ok=True)  # nothing deleted, nothing recorded
                raise
            # The file is recorded and holds every event; the ones left are in both.
            raise ArchiveError(f"{report.deleted} of {report.events} archived events left the index, then: {exc}; "
                               f"the others stay in it and are in {path.name} too (a later archive holds them "
                               "again: count each event once, by its pk)") from exc
    return report


def _delete_chunk(pacs: Pacs, pks: list[int], cutoff: datetime, record: Event | None) -> int:
    """Delete archived events *pks* (ascending) in one transaction, with the
    archive's *record* written first in the first one: the record and the
    deletion stand or fall together, and the record takes a pk above every
    archived event (SQLite would reuse a freed highest pk)."""
    with write_transaction(pacs.engine) as conn:
        if record is not None:
            conn.execute(insert(events_t).values(**asdict(record)))
        with _append_only_lifted(conn):
            deleted = conn.execute(delete(events_t).where(
                events_t.c.pk.between(pks[0], pks[-1]), events_t.c.at < cutoff)).rowcount
            if deleted != len(pks):
                # An event of the range reached the index after it was read:
                # it is in no file, so none of the range goes (the transaction rolls back).
                raise ArchiveError(f"{deleted} events to delete where {len(pks)} were archived; "
                                   "nothing of this range deleted, run the command again")
    return deleted


def _last_archive_sha(conn: Connection) -> str | None:
    detail = conn.execute(select(events_t.c.detail).where(events_t.c.action == ACTION)
                          .order_by(events_t.c.pk.desc()).limit(1)).scalar()
    match = _SHA.search(detail or "")
    return match.group(1) if match else None


def _event_json(row: Any) -> dict[str, Any]:
    event = dict(row._mapping)
    event["at"] = event["at"].isoformat()
    return event


def _write(pacs: Pacs, folder: Path, in_range: Any, report: ArchiveReport,
           progress: Progress) -> tuple[Path, array[int]]:
    """Write the events to a temporary file, make it durable and give it its
    final name (``audit-FIRSTDAY-LASTDAY-pkFIRST-LAST.jsonl.gz``); the path
    and the written events' pks, ascending."""
    digest = hashlib.sha256()
    pks: array[int] = array("q")
    temporary = folder / f".audit-archive-{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            def line(value: dict[str, Any], *, hashed: bool = True) -> None:
                data = (json.dumps(value, ensure_ascii=False, sort_keys=True) + "\n").encode()
                if hashed:
                    digest.update(data)
                out.write(data)

            line({"archive": FORMAT, "before": report.before, "server": pacs.settings.ae_title,
                  "created": datetime.now(UTC).isoformat(), "previous_sha256": report.previous_sha256})
            for row in _rows(pacs, in_range):
                event = _event_json(row)
                report.events += 1
                report.first_pk = report.first_pk if report.first_pk is not None else event["pk"]
                report.first_at = report.first_at or event["at"]
                report.last_pk, report.last_at = event["pk"], event["at"]
                pks.append(event["pk"])
                line(event)
                progress.advance()
            report.sha256 = digest.hexdigest()
            line({"trailer": {"events": report.events, "sha256": report.sha256}}, hashed=False)
            out.close()
            raw.flush()
            os.fsync(raw.fileno())
        name = (f"audit-{report.first_at[:10].replace('-', '')}-{report.last_at[:10].replace('-', '')}"  # type: ignore[index]
                f"-pk{report.first_pk}-{report.last_pk}.jsonl.gz")
        path = folder / name
        if path.exists():
            raise ArchiveError(f"{path} exists already: these events were archived before and are still in the index?")
        os.rename(temporary, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temporary.unlink(missing_ok=True)
    report.file = str(path)
    return path, pks


def _rows(pacs: Pacs, in_range: Any) -> Iterator[Any]:
    """The events of the range in pk order, a page at a time (keyset)."""
    last = None
    while True:
        query = select(events_t).where(in_range).order_by(events_t.c.pk).limit(BATCH)
        if last is not None:
            query = query.where(events_t.c.pk > last)
        with pacs.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].pk


@contextmanager
def _append_only_lifted(conn: Connection) -> Iterator[None]:
    """Let this transaction (and no other) delete audit rows."""
    if is_sqlite(conn.engine):
        conn.exec_driver_sql("DROP TRIGGER trg_audit_events_no_delete")
        yield
        conn.exec_driver_sql(_SQLITE_DELETE_TRIGGER)
    else:
        # ALTER TABLE locks the table until the commit, so no other session
        # deletes while the trigger is off; their inserts wait a moment.
        conn.exec_driver_sql(f"ALTER TABLE audit_events DISABLE TRIGGER {_PG_TRIGGER}")
        yield
        conn.exec_driver_sql(f"ALTER TABLE audit_events ENABLE TRIGGER {_PG_TRIGGER}")


def verify_archive(path: Path, pacs: Pacs | None = None) -> ArchiveCheck:
    """Check an archive file: readable, its hash and count as its trailer
    says, and (with *pacs*) recorded in the trail with that hash."""
    check = ArchiveCheck(file=str(path))
    digest = hashlib.sha256()
    trailer: dict[str, Any] | None = None
    try:
        with gzip.open(path, "rb") as handle:
            for number, data in enumerate(handle):
                if trailer is not None:
                    check.problems.append(f"line {number + 1}: text after the trailer")
                    break
                value = json.loads(data)
                if "trailer" in value:
                    trailer = value["trailer"]
                    continue
                digest.update(data)
                if number == 0:
                    if value.get("archive") != FORMAT:
                        check.problems.append("not a filmless-pacs audit archive (header)")
                        break
                    check.previous_sha256 = value.get("previous_sha256")
                else:
                    check.events += 1
    except (OSError, EOFError, ValueError) as exc:  # gzip, JSON and UTF-8 errors
        check.problems.append(f"unreadable: {exc}")
    check.sha256 = digest.hexdigest()
    if trailer is None:
        check.problems.append("no trailer: the file is cut short")
    else:
        if trailer.get("sha256") != check.sha256:
            check.problems.append("the content does not match the trailer's sha256 (changed after archiving)")
        if trailer.get("events") != check.events:
            check.problems.append(f"{check.events} events where the trailer says {trailer.get('events')}")
    if pacs is not None and not check.problems:
        with pacs.engine.connect() as conn:
            details = conn.execute(select(events_t.c.detail).where(events_t.c.action == ACTION)).scalars().all()
        # By content, not name: an archive may be copied or renamed on its way to long-term storage.
        check.in_trail = any(f"sha256={check.sha256}" in d for d in details)
        if not check.in_trail:
            check.problems.append("the audit trail records no archive with this sha256 (made elsewhere, "
                                  "or its record was archived too: check against the newer archive)")
    check.ok = not check.problems
    return check
