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
changed or removed later is detected (``pacs audit-archive --verify`` with
every archive file: an archive's record is often inside a newer archive,
which took it along with the other old events).

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
from collections.abc import Iterable, Iterator
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
# An archive's record, as archive_audit writes its detail.
_RECORD = re.compile(r"(\d+) events pk (\d+)-(\d+) before (\S+) to (\S+) sha256=([0-9a-f]{64})")
TRAIL = "the audit trail"

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
    replaced: str | None = None  # a file an interrupted run left, never recorded, written over

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArchiveCheck:
    file: str
    ok: bool = False
    events: int = 0
    first_pk: int | None = None
    last_pk: int | None = None
    first_at: str | None = None
    last_at: str | None = None
    sha256: str | None = None
    previous_sha256: str | None = None
    in_trail: bool | None = None  # the index's audit-archive event names this file and hash
    recorded_in: str | None = None  # where its hash is vouched for: the trail, or another file given
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArchiveSetCheck:
    """The files given to ``--verify`` and the hash chain they make."""
    files: list[ArchiveCheck]
    linked: int = 0  # archives of the chain found among the files
    chain: list[str] = field(default_factory=list)  # missing or mismatched links

    @property
    def ok(self) -> bool:
        return not self.chain and all(c.ok for c in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {"files": [c.as_dict() for c in self.files], "linked": self.linked, "chain": self.chain,
                "ok": self.ok}


@dataclass(frozen=True)
class _Record:
    """An archive as an ``audit-archive`` event recorded it, and where that event is."""
    sha256: str
    file: str
    first_pk: int
    last_pk: int
    before: str
    where: str

    def describe(self) -> str:
        return (f"{self.file} (events pk {self.first_pk}-{self.last_pk} before {self.before}, "
                f"sha256 {self.sha256}, recorded in {self.where})")


def _record(detail: str, where: str) -> _Record | None:
    """The archive an ``audit-archive`` event's *detail* records, found in *where*."""
    match = _RECORD.search(detail)
    if not match:
        return None
    return _Record(sha256=match.group(6), file=match.group(5), first_pk=int(match.group(2)),
                   last_pk=int(match.group(3)), before=match.group(4), where=where)


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
            if _recorded(pacs, path):
                raise ArchiveError(f"{path} exists already and the trail records it: these events were "
                                   "archived before and are still in the index?")
            # A run stopped between naming the file and recording it (killed,
            # or its deletion failed): nothing vouches for that file, and its
            # events never left the index, so this one takes its place.
            report.replaced = str(path)
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


def _recorded(pacs: Pacs, path: Path) -> bool:
    """Whether the trail records the archive *path*, by its content's hash or its name."""
    sha = verify_archive(path).sha256
    with pacs.engine.connect() as conn:
        records = [_record(d, TRAIL) for d in conn.execute(
            select(events_t.c.detail).where(events_t.c.action == ACTION)).scalars()]
    return any(r is not None and (r.sha256 == sha or r.file == path.name) for r in records)


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


def verify_archive(path: Path) -> ArchiveCheck:
    """Check an archive file on its own: readable, its hash and count as its
    trailer says (:func:`verify_archives` checks it against the trail)."""
    return _read(path)[0]


def _read(path: Path) -> tuple[ArchiveCheck, list[str]]:
    """The check of *path* on its own, and the details of the archive records
    (``audit-archive`` events) it carries."""
    check = ArchiveCheck(file=str(path))
    records: list[str] = []
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
                    check.first_pk = check.first_pk if check.first_pk is not None else value.get("pk")
                    check.first_at = check.first_at or value.get("at")
                    check.last_pk, check.last_at = value.get("pk"), value.get("at")
                    if value.get("action") == ACTION:
                        records.append(str(value.get("detail") or ""))
    except (OSError, EOFError, ValueError) as exc:  # gzip, JSON and UTF-8 errors
        check.problems.append(f"unreadable: {exc}")
    check.sha256 = digest.hexdigest()
    if trailer is None:
        check.problems.append("no trailer: the file is cut short")
    else:
        if trailer.get("sha256") != check.sha256:
            check.problems.append("the content does not match the trailer's sha256 (changed after archiving: "
                                  "damaged or forged)")
        if trailer.get("events") != check.events:
            check.problems.append(f"{check.events} events where the trailer says {trailer.get('events')}")
    check.ok = not check.problems
    return check, records


def verify_archives(paths: list[Path], pacs: Pacs) -> ArchiveSetCheck:
    """Check archive files against the trail and against each other.

    Each file must match its own trailer and a hash something trusted
    vouches for: an archive record of the live trail, a record carried by
    another file given that is vouched for itself (older archives' records
    leave the trail with the events of their day), or the previous_sha256 of
    such a file. The chain is then walked from the live trail's newest
    archive back to the first one: every archive of it not among *paths*,
    and every vouched-for archive record without its file, is a missing link.
    """
    read = [_read(path) for path in paths]
    with pacs.engine.connect() as conn:
        details = conn.execute(select(events_t.c.detail).where(events_t.c.action == ACTION)
                               .order_by(events_t.c.pk)).scalars().all()
    live = [r for r in (_record(d, TRAIL) for d in details) if r is not None]
    known = {r.sha256: r for r in live}  # the archives trusted records describe
    # By content, not name: an archive may be copied or renamed on its way to long-term storage.
    vouched = {r.sha256: TRAIL for r in live}  # trusted hash -> who vouches for it
    sound = [(c, records) for c, records in read if c.ok]
    for check, _ in sound:
        check.in_trail = check.sha256 in known
    progress = True
    while progress:  # a file vouched for vouches for the archives it names, which may be given too
        progress = False
        for check, records in sound:
            if check.recorded_in is not None or check.sha256 not in vouched:
                continue
            check.recorded_in = vouched[check.sha256]
            progress = True
            name = Path(check.file).name
            for record in (_record(d, name) for d in records):
                if record is not None:
                    known.setdefault(record.sha256, record)
                    vouched.setdefault(record.sha256, name)
            if check.previous_sha256:
                vouched.setdefault(check.previous_sha256, f"the header of {name}")
    for check, _ in sound:
        if check.recorded_in is None:
            check.problems.append(_unvouched(check, known.values()))
            check.ok = False
    result = ArchiveSetCheck(files=[c for c, _ in read])
    _walk_chain(result, live[-1].sha256 if live else None, known, [c for c, _ in sound if c.ok])
    return result


def _unvouched(check: ArchiveCheck, known: Iterable[_Record]) -> str:
    """Why nothing given vouches for a file that matches its own trailer."""
    same = next((r for r in known if (r.first_pk, r.last_pk) == (check.first_pk, check.last_pk)), None)
    if same is not None:
        return (f"the content does not match the sha256 recorded for its events: {same.describe()}; "
                "changed after archiving and its trailer recomputed (forged), or left by an archive run "
                "that never completed")
    return (f"recorded nowhere given: neither the audit trail nor the other files given record an archive "
            f"with this sha256 or its events (pk {check.first_pk}-{check.last_pk}); an archive's record "
            "often left the trail inside a newer archive: pass every archive file together "
            "(or it was made by another server, or by a run that never completed)")


def _walk_chain(result: ArchiveSetCheck, newest: str | None, known: dict[str, _Record],
                files: list[ArchiveCheck]) -> None:
    """Follow previous_sha256 from the trail's newest archive through *files*
    (each vouched for), noting every archive of the chain that is not among
    them, and every archive a trusted record names that is not among them
    (the other files of *result* are named when they hold its events)."""
    by_sha = {c.sha256: c for c in files}
    seen: set[str] = set()
    missing: dict[str, tuple[int, str]] = {}  # sha -> (order, problem)
    current, newer = newest, None
    while current is not None and current not in seen:
        seen.add(current)
        check = by_sha.get(current)
        if check is not None:
            result.linked += 1
            current, newer = check.previous_sha256, check
            continue
        missing[current] = _missing(current, known.get(current), newer, result.files)
        # Past the gap, the older files given are still chained to each other.
        older = [c for c in files if c.sha256 not in seen
                 and (newer is None or (c.last_pk or 0) < (newer.first_pk or 0))]
        if not older:
            break
        current = max(older, key=lambda c: c.last_pk or 0).sha256
    for sha, record in known.items():
        if sha not in by_sha and sha not in missing:
            missing[sha] = _missing(sha, record, None, result.files)
    result.chain = [problem for _, problem in sorted(missing.values())]


def _missing(sha: str, record: _Record | None, newer: ArchiveCheck | None,
             files: list[ArchiveCheck]) -> tuple[int, str]:
    """A missing link of the chain, named as well as what is known allows,
    with its place in the chain (for the order of the report)."""
    if record is not None:
        problem = f"missing archive: {record.describe()}"
        holders = [Path(c.file).name for c in files if (c.first_pk, c.last_pk) == (record.first_pk, record.last_pk)]
        return record.first_pk, problem + (f"; {', '.join(holders)} holds these events, not this content"
                                           if holders else "")
    named_by = Path(newer.file).name if newer is not None else TRAIL
    before = f", events before {newer.first_at}" if newer is not None and newer.first_at else ""
    return ((newer.first_pk or 0) - 1 if newer is not None else 0,
            f"missing archive: the one with sha256 {sha} that {named_by} names as the one before it{before}")
