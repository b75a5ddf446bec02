"""Storage maintenance commands of the `pacs` CLI (verify, reindex, migrate,
purge, compress, export) and of the HL7 outbox (list, retry). Registered by
:func:`register` from pacs.cli.

Each command opens the appliance, runs one job of :mod:`pacs.maintenance`
and prints a rich summary (or one JSON object with ``--json``); a progress
bar is drawn on stderr when it is a terminal. Exit codes: 0 done and nothing
wrong, 1 problems found (or left), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

if TYPE_CHECKING:
    from pacs.leases import LeaseHeld

from .console import TextTable, err, out


WAIT_HELP = "if another node runs this job now, wait for it instead of exiting with 1"


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add the maintenance subcommands to the `pacs` parser."""
    p = sub.add_parser("verify", help="check every object against the index, find orphans; --repair adopts them")
    common(p, json_flag=True)
    p.add_argument("--repair", action="store_true", help="adopt valid orphans through the ingest path")
    p.add_argument("--drop-missing", action="store_true",
                   help="with --repair: delete index rows whose object is missing")
    p.add_argument("--quick", action="store_true", help="compare sizes only (no sha256: reads no object)")
    p.add_argument("--workers", type=int, default=4, help="objects checked in parallel (default 4)")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("reindex", help="rebuild the index from the object store (disaster recovery)")
    common(p, json_flag=True)
    p.add_argument("--workers", type=int, default=4, help="objects parsed in parallel (default 4)")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("migrate", help="copy every object to another store, verified; --switch to use it")
    common(p, json_flag=True)
    p.add_argument("--to", required=True, dest="target", metavar="URL",
                   help="file:///path or s3://BUCKET?endpoint=H:P (keys in PACS_S3_ACCESS_KEY/SECRET_KEY)")
    p.add_argument("--switch", action="store_true",
                   help="after a complete verified copy, set storage_url in the config file")
    p.add_argument("--limit", type=int, help="copy at most N objects now (rerun to continue)")
    p.add_argument("--workers", type=int, default=4, help="objects copied in parallel (default 4)")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("purge", help="retention: delete studies matching rules (dry run unless --yes)")
    common(p, json_flag=True)
    p.add_argument("--older-than", type=int, metavar="DAYS",
                   help="study date (received date if none) more than DAYS days ago")
    p.add_argument("--modality", action="append", metavar="M", help="a series of this modality (repeatable)")
    p.add_argument("--status", action="append", choices=["unread", "draft", "signed"],
                   help="latest report status (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="only show what would be deleted (the default)")
    mode.add_argument("--yes", action="store_true", help="really delete")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("compress", help="losslessly compress stored uncompressed images")
    common(p, json_flag=True)
    p.add_argument("--codec", choices=["jpeg-ls", "j2k"], default="jpeg-ls")
    p.add_argument("--study", action="append", metavar="UID", help="only this study (repeatable)")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("export", help="write studies to a folder or a .zip, optionally de-identified, or as a "
                                      "DICOM CD/USB file-set (--media)")
    common(p, json_flag=True)
    p.add_argument("studies", nargs="+", metavar="STUDY_UID")
    p.add_argument("--out", required=True, type=Path, metavar="DIR|FILE.zip")
    p.add_argument("--deidentify", action="store_true", help="PS3.15 Basic Profile, consistent UIDs and pseudonyms")
    p.add_argument("--salt", help="de-identification secret (default: the appliance's own)")
    p.add_argument("--include-burned-in", action="store_true",
                   help="with --deidentify: also write objects with burned-in annotation (identifying text in the "
                        "pixels, not removed); by default they are left out and listed")
    p.add_argument("--media", action="store_true",
                   help="a DICOM file-set for a patient's CD or USB stick (IHE PDI): DICOMDIR, README.TXT and "
                        "DICOM/PAT00001/STU00001/SER00001/IMG00001...; other hospitals' PACS and CD viewers read it")
    p.add_argument("--uncompressed", action="store_true",
                   help="with --media: every object in Explicit VR Little Endian (STD-GEN-CD) instead of as stored")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("delete", help="delete a study, series or instance sent in error (a dry run unless --yes)")
    common(p, json_flag=True)
    p.add_argument("study", metavar="STUDY_UID")
    p.add_argument("--series", default="", metavar="UID", help="only this series of the study")
    p.add_argument("--instance", default="", metavar="UID", help="only this instance (with --series)")
    p.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    p.add_argument("--force", action="store_true",
                   help="also a study with a signed report (part of the patient's record: its reports go with it)")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("audit-archive", help="retention: move audit events older than a date to a verified "
                                               "archive file, or check archive files (--verify)")
    common(p, json_flag=True)
    p.add_argument("--before", type=_date, metavar="YYYY-MM-DD",
                   help="archive the events before this day (hospital time; at least a day ago)")
    p.add_argument("--to", type=Path, dest="folder", metavar="DIR", help="folder for the archive file")
    p.add_argument("--verify", nargs="+", type=Path, metavar="FILE",
                   help="check archive files instead: give every archive file of this server (e.g. DIR/audit-*.jsonl.gz) "
                        "to check the whole chain, from the trail's newest archive back to the first; an older "
                        "archive's record is inside a newer archive, and a file left out is reported missing")
    p.add_argument("--wait", action="store_true", help=WAIT_HELP)
    p.set_defaults(func=cmd_audit_archive)

    p = sub.add_parser("outbox", help="messages to the HIS (ORM status, ORU reports) and storage commitment reports: list, retry dead ones")
    o_sub = p.add_subparsers(dest="outbox_command", required=True)
    q = o_sub.add_parser("list", help="counts per state and the latest messages (no patient data)")
    common(q, json_flag=True)
    q.add_argument("--state", choices=["pending", "sending", "sent", "dead", "superseded"])
    q.add_argument("--limit", type=int, default=100, help="messages listed, newest first (default 100)")
    q = o_sub.add_parser("retry", help="send dead messages again (one, or all)")
    common(q, json_flag=True)
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, dest="message_id", metavar="N", help="the message N")
    which.add_argument("--all-dead", action="store_true", help="every dead message")
    p.set_defaults(func=cmd_outbox)


# -- plumbing -------------------------------------------------------------------
def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pacs.app import Pacs
    from pacs.cli import creates_store, settings_from, setup_logging

    settings = settings_from(args)
    setup_logging(settings.log_level if not args.json else "WARNING")
    return Pacs.open(settings, create_store=creates_store(args))


@contextmanager
def _exclusive(args: argparse.Namespace, pacs: Any, job: str | None) -> Iterator[None]:
    """Hold the cluster-wide lease of *job* around the block (see pacs.leases),
    none when *job* is None; raises LeaseHeld when another node holds it and
    --wait was not given."""
    if job is None:
        yield
        return
    from pacs.forwarding import node_name
    from pacs.leases import LeaseInfo, lease, lease_ttl

    def waiting(info: LeaseInfo) -> None:
        err.print(f"waiting: {job} is running on node {info.holder} (lease until {info.expires_at:%H:%M:%S} UTC)")

    with lease(pacs.engine, job, node_name(pacs), lease_ttl(), wait=args.wait, on_wait=waiting) as held:
        yield
    if held.lost:
        err.print(f"[yellow]the {job} lease was lost while running (this node stalled longer than "
                  "PACS_LEASE_TTL): another node may have run it at the same time[/yellow]")


def _held(args: argparse.Namespace, exc: LeaseHeld) -> None:
    """Another node runs the job: say who (the command exits 1; --wait waits instead)."""
    if args.json:
        print(json.dumps({"error": "lease held", "job": exc.info.name, "holder": exc.info.holder,
                          "process": exc.info.token, "expires_at": exc.info.expires_at.isoformat()}))
    err.print(f"[red]not started:[/red] {exc}; run it again later, or add --wait")


class _Bar:
    """The jobs' progress hook as a rich bar on stderr (when it is a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self._progress: Progress | None = None
        if not quiet and err.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err, transient=True,
            )
        self._task: Any = None

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, description: str, total: int | None = None) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _usage(message: str) -> int:
    err.print(f"[red]{message}[/red]")
    return 2


def _emit(args: argparse.Namespace, data: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False, default=str))
    else:
        human()


def _retried(pacs: Any, args: argparse.Namespace, retried: list[int], asked: int | None, *, action: str,
             item: str, done: str, many: str, state_of: Callable[[int], str | None], due: str, listing: str) -> int:
    """Report a retry of queued rows (`pacs outbox retry`, `pacs prefetch
    retry`): each row made due again audited (*action*: "*item* N *done*"),
    the list printed (``--json``: ``{"retried": [...]}``); exit 1 when the
    one row *asked* for was not retried, saying whether it is in another
    state than *due* or does not exist (see *listing*)."""
    from .cli import audit_command

    for pk in retried:
        audit_command(pacs, action, f"{item} {pk} {done}")
    pacs.audit.flush()
    _emit(args, {"retried": retried}, lambda: out.print(f"{len(retried)} {many} {done}: "
                                                        f"{', '.join(map(str, retried)) or '-'}"))
    if asked is not None and not retried:
        state = state_of(asked)
        err.print(f"[red]{item.rsplit(' ', 1)[-1]} {asked} "
                  f"{f'is {state}, not {due}' if state else 'does not exist'} (see {listing})[/red]")
        return 1
    return 0


def _list(title: str, capped: dict[str, Any], columns: tuple[str, ...] = ("key", "detail")) -> None:
    if not capped["count"]:
        return
    table = TextTable(title=f"{title} ({capped['count']:,}{', first shown' if capped['truncated'] else ''})")
    for col in columns:
        table.add_column(col, overflow="fold")
    for item in capped["items"][:20]:
        table.add_row(*(str(item.get(c, "")) for c in columns))
    out.print(table)


def _counts(title: str, rows: list[tuple[str, Any]]) -> None:
    table = TextTable(title=title)
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in rows:
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)


def _run(args: argparse.Namespace, work: Callable[[Any, _Bar], Any], *, lease: str | None = None) -> Any:
    """Open the appliance, run ``work(pacs, bar)`` with a progress bar (and the
    cluster lease *lease*, when the job needs one), close the appliance.

    Returns the job's report, or None when another node holds the lease
    (already said on the console: the command exits 1).
    """
    from pacs.leases import LeaseHeld

    pacs = _open(args)
    try:
        with _exclusive(args, pacs, lease), _Bar(args.json) as bar:
            return work(pacs, bar)
    except LeaseHeld as exc:
        _held(args, exc)
        return None
    finally:
        pacs.close()


# -- commands -------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    """pacs verify: 0 all consistent, 1 problems found (or left after repair)."""
    from pacs.maintenance import verify

    if args.drop_missing and not args.repair:
        return _usage("--drop-missing only works with --repair")
    from pacs.cli import open_existing

    if (refused := open_existing(args, index=True, store=True)) is not None:
        return refused
    # Only a repair changes anything; a read-only check may run anywhere, any time.
    report = _run(args, lambda pacs, bar: verify(pacs, repair=args.repair, drop_missing=args.drop_missing,
                                                 quick=args.quick, workers=args.workers, progress=bar),
                  lease="verify-repair" if args.repair else None)
    if report is None:
        return 1
    data = report.as_dict()

    def human() -> None:
        _counts("verify", [
            ("indexed objects checked", report.checked), ("bytes checked", _size(report.checked_bytes)),
            ("objects in storage", report.stored), ("missing", report.missing.count),
            ("corrupt", report.corrupt.count), ("unreadable", report.unreadable.count),
            ("orphans", report.orphans.count), ("invalid orphans", report.invalid_orphans.count),
            ("adopted", report.adopted.count), ("not adopted (retry)", report.not_adopted.count),
            ("duplicate orphans", report.duplicate_orphans.count),
            ("superseded copies removed (compress's originals, copies a later resend replaced)",
             report.superseded_removed.count),
            ("copies of rejected instances removed (pacs rejections)", report.rejected_removed.count),
            ("rejection notes adopted that withdrew their instances again", report.withdrawn_again.count),
            ("rows dropped", report.dropped.get("instances", 0)),
            ("purge leftovers deleted", report.purged_leftovers),
        ])
        _list("missing objects", data["missing"], ("key", "sop_uid"))
        _list("corrupt objects", data["corrupt"], ("key", "detail"))
        _list("unreadable objects", data["unreadable"], ("key", "detail"))
        _list("orphans", data["orphans"], ("key", "valid", "detail"))
        _list("duplicate orphans", data["duplicate_orphans"], ("key", "indexed_key"))
        _list("superseded originals removed", data["superseded_removed"], ("key", "indexed_key"))
        _list("copies of rejected instances removed", data["rejected_removed"], ("key", "detail"))
        _list("rejection notes that withdrew again", data["withdrawn_again"], ("note_uid", "instances", "not_stored"))
        _list("orphans not adopted", data["not_adopted"])
        if report.problems:
            err.print(f"[red]{report.problems} problem(s)[/red]"
                      + ("" if args.repair else "; pacs verify --repair adopts valid orphans"))
        else:
            out.print("[green]index and storage agree[/green]")

    _emit(args, data, human)
    return 1 if report.problems else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """pacs reindex: 0 every object indexed, 1 some could not be, or a rejection note not applied (listed)."""
    from pacs.maintenance import reindex

    from pacs.cli import open_existing

    # The index may be gone (that is what reindex is for); the objects may not.
    if (refused := open_existing(args, index=False, store=True)) is not None:
        return refused
    report = _run(args, lambda pacs, bar: reindex(pacs, workers=args.workers, progress=bar), lease="reindex")
    if report is None:
        return 1
    data = report.as_dict()

    def human() -> None:
        _counts("reindex", [
            ("objects in storage", report.listed), ("already indexed", report.already_indexed),
            ("indexed now", report.indexed), ("bytes indexed", _size(report.indexed_bytes)),
            ("duplicates (instance already indexed elsewhere)", report.duplicates.count),
            ("superseded (compress's originals, copies a later resend replaced)", report.superseded.count),
            ("not indexable", report.failed.count),
            ("rejection notes applied again (instances refused when sent again)", report.rejections.count),
            ("rejection notes not applied", report.rejections_failed.count),
        ])
        _list("duplicates", data["duplicates"], ("key", "indexed_key"))
        _list("not indexable", data["failed"])
        _list("rejection notes not applied (run pacs reindex again)", data["rejections_failed"])
        if report.superseded.count:
            out.print(f"{report.superseded.count:,} superseded copies were not indexed (an original left by pacs "
                      "compress, whose verified copy was; a copy a later resend replaced, which was): pacs verify "
                      "--repair removes them")
        for warning in report.warnings:
            err.print(f"[yellow]warning: {warning}[/yellow]")

    _emit(args, data, human)
    return 1 if report.failed.count or report.duplicates.count or report.rejections_failed.count else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """pacs migrate: 0 done (or stopped at --limit), 1 failures or switch refused, 2 bad target."""
    from pacs.cli import audit_command
    from pacs.maintenance import migrate
    from pacs.maintenance.migrate import redacted_url

    if args.limit is not None and args.limit < 1:
        return _usage("--limit must be at least 1")
    from storage import url_problem

    if (problem := url_problem(args.target)) is not None:
        # file://srv/new (two slashes) copied every object to /new.
        return _usage(f"--to: {problem}")

    def work(pacs: Any, bar: _Bar) -> Any:
        # Every object copied to another store: one event per run, with its scope.
        try:
            report = migrate(pacs, args.target, switch=args.switch, limit=args.limit, workers=args.workers,
                             progress=bar)
        except ValueError as exc:
            audit_command(pacs, "migrate", f"pacs migrate to {redacted_url(args.target)}: refused: {exc}", "failure")
            raise
        audit_command(pacs, "migrate", f"pacs migrate to {report.target}: {report.copied} objects copied "
                      f"({report.copied_bytes} bytes), {report.already_present} already there, {report.failed.count} "
                      f"failed, of {report.total}" + (", stopped at --limit" if report.stopped_at_limit else "")
                      + (", the archive now uses it" if report.switched else ""),
                      "failure" if report.failed.count else "success")
        return report

    try:
        report = _run(args, work, lease="migrate")
    except ValueError as exc:
        return _usage(str(exc))
    if report is None:
        return 1
    if report.switched:
        from pacs.archive_record import follow_switch
        from pacs.cli import settings_from

        follow_switch(settings_from(args), storage_url=args.target)
    if report.switched and args.storage_url:
        report.warnings.append("--storage-url on the command line overrides the config file: drop it from now on")
    data = report.as_dict()

    def human() -> None:
        _counts(f"migrate to {report.target}", [
            ("indexed objects", report.total), ("copied and verified", report.copied),
            ("bytes copied", _size(report.copied_bytes)), ("already in the target", report.already_present),
            ("failed", report.failed.count), ("complete", "yes" if report.complete else "no"),
            ("unreferenced objects removed from the target", report.removed_unreferenced),
        ])
        _list("failed copies", data["failed"])
        if report.stopped_at_limit:
            err.print(f"stopped after {args.limit} copies: run the same command again to continue")
        if report.stopped:
            err.print(f"[red]{report.stopped}[/red]")
        if report.switched:
            out.print(f"[green]storage_url set in {report.config_file}[/green]: restart pacs serve to use it")
        for warning in report.warnings:
            err.print(f"[yellow]{warning}[/yellow]")

    _emit(args, data, human)
    return 1 if report.failed.count or (args.switch and not report.switched) else 0


def cmd_db_copy(args: argparse.Namespace) -> int:
    """pacs db copy: 0 copied (and switched), 1 refused or failed."""
    from pacs.cli import settings_from, setup_logging
    from pacs.index import create_index_engine
    from pacs.maintenance import config_path, set_config_value
    from pacs.maintenance.copy_index import COPY_ROLE, CopyRefused, copy_index, redacted
    from pacs.running import no_server_running

    settings = settings_from(args)
    setup_logging(settings.log_level if not args.json else "WARNING")
    with no_server_running(settings.data_dir) as alone:
        if not alone:
            err.print(f"[red]pacs serve runs on {settings.data_dir}[/red]: the index would change during the "
                      "copy; stop it (every node of a shared index) first")
            return 1
        source = create_index_engine(settings.resolved_index_url, role=COPY_ROLE)
        try:
            with _Bar(args.json) as bar:
                report = copy_index(source, args.target, bar, record=_copy_event)
            if args.switch:
                path = config_path(settings)
                set_config_value(path, "index_url", args.target)
                report.switched, report.config_file = True, str(path)
                from pacs.archive_record import follow_switch

                follow_switch(settings, index_url=args.target)
            # Also in the index copied from: the whole index, users and trail
            # included, went to another database.
            _record_in_index(source, _copy_event(report))
        except CopyRefused as exc:
            _record_in_index(source, _copy_event(None, target=redacted(args.target), refused=str(exc)))
            err.print(f"[red]not copied:[/red] {exc}")
            return 1
        finally:
            source.dispose()
    data = report.as_dict()

    def human() -> None:
        _counts(f"index copied to {report.target} in {report.seconds:.1f} s", list(report.rows.items()))
        if report.switched:
            out.print(f"[green]index_url set in {report.config_file}[/green]: start pacs serve to use it")
        else:
            out.print("the current index is unchanged; use the copy with --index-url (or run again with --switch)")
        if os.environ.get("PACS_INDEX_URL"):
            err.print("[yellow]PACS_INDEX_URL is set and overrides the config file[/yellow]")

    _emit(args, data, human)
    return 0


def _copy_event(report: Any, *, target: str = "", refused: str = "") -> Any:
    """The audit event of `pacs db copy` (*report*: done; else *refused*)."""
    from pacs.audit import Event
    from pacs.maintenance.common import os_user

    if report is None:
        return Event(action="index-copy", user=os_user(), protocol="cli", outcome="failure",
                     detail=f"pacs db copy to {target}: refused: {refused}"[:500])
    counted = ", ".join(f"{report.rows.get(table, 0)} {name}" for table, name in (
        ("patients", "patients"), ("studies", "studies"), ("instances", "instances"), ("users", "users"),
        ("audit_events", "audit events")))
    return Event(action="index-copy", user=os_user(), protocol="cli",
                 detail=(f"pacs db copy from {report.source} to {report.target}: the whole index ({counted})"
                         + (", the archive now uses it" if report.switched else ""))[:500])


def _record_in_index(engine: Any, event: Any) -> None:
    """Write *event* into the index of *engine* (no appliance is open), or
    say on the console that it could not be."""
    from sqlalchemy.exc import SQLAlchemyError

    from pacs.audit import record_in
    from pacs.index.db import write_transaction

    try:
        with write_transaction(engine) as conn:
            record_in(conn, event)
    except SQLAlchemyError as exc:
        err.print(f"[yellow]not audited:[/yellow] {str(exc).splitlines()[0][:200]}")


def cmd_purge(args: argparse.Namespace) -> int:
    """pacs purge: 0 done (or dry run), 1 some objects could not be deleted, 2 no rule."""
    from pacs.maintenance import PurgeRules, purge

    try:
        rules = PurgeRules(
            older_than_days=args.older_than,
            modalities=tuple(m.upper() for m in args.modality or ()),
            statuses=tuple(args.status or ()),
        )
    except ValueError as exc:
        return _usage(str(exc))
    # A dry run only reads; deleting takes the lease.
    report = _run(args, lambda pacs, bar: purge(pacs, rules, execute=args.yes, progress=bar),
                  lease="purge" if args.yes else None)
    if report is None:
        return 1
    data = report.as_dict()

    def human() -> None:
        if report.dry_run:
            _counts("purge (dry run): would delete", [
                ("studies", report.studies), ("instances", report.instances), ("bytes", _size(report.bytes)),
            ])
            table = TextTable(title="studies selected" + (" (first shown)" if data["studies"]["truncated"] else ""))
            for col in ("study", "date", "modalities", "patient ID", "instances", "size"):
                table.add_column(col, overflow="fold")
            for s in data["studies"]["items"][:50]:
                table.add_row(s["study_uid"], s["study_date"], s["modalities"], s["patient_id"],
                              str(s["instances"]), _size(s["bytes"]))
            out.print(table)
            err.print("nothing deleted: add --yes to delete")
        else:
            _counts("purge", [
                ("studies deleted", report.deleted_studies), ("instances deleted", report.deleted_instances),
                ("bytes freed", _size(report.deleted_bytes)), ("patients deleted", report.deleted_patients),
                ("objects deleted", report.objects_deleted), ("objects not deleted", report.object_failures.count),
            ])
            _list("objects not deleted (pacs verify --repair retries)", data["object_failures"])

    _emit(args, data, human)
    return 1 if report.object_failures.count else 0


def cmd_delete(args: argparse.Namespace) -> int:
    """pacs delete: 0 deleted (or would be), 1 refused or objects left, 2 bad usage."""
    from pacs.maintenance.common import os_user
    from pacs.maintenance.delete import DeleteRefused, Target, delete_target

    try:
        target = Target(args.study, args.series, args.instance)
    except ValueError as exc:
        return _usage(str(exc))
    try:
        report = _run(args, lambda pacs, bar: delete_target(pacs, target, reason=args.reason, user=os_user(),
                                                             force=args.force, dry_run=not args.yes))
    except DeleteRefused as exc:
        err.print(f"[red]not deleted: {exc}[/red]")
        return 2 if exc.http_status == 400 else 1
    data = report.as_dict()

    def human() -> None:
        verb = "would delete" if report.dry_run else "deleted"
        _counts(f"delete {report.level} ({verb})", [
            ("instances", report.instances), ("bytes", _size(report.bytes)), ("reports", report.reports_deleted),
            ("objects deleted", report.objects_deleted), ("objects not deleted", len(report.object_failures)),
        ])
        if report.dry_run:
            err.print("nothing deleted: add --yes to delete")

    _emit(args, data, human)
    return 1 if report.object_failures else 0


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def cmd_audit_archive(args: argparse.Namespace) -> int:
    """pacs audit-archive: 0 archived (or nothing to archive) / every file
    and the chain check, 1 a check failed (a file, or a link of the chain
    missing) or the archive could not be made, 2 bad usage."""
    from pacs.maintenance.audit_archive import ArchiveError, archive_audit, verify_archives

    if args.verify:
        if args.before or args.folder:
            return _usage("--verify takes only archive files")
        checked = _run(args, lambda pacs, bar: verify_archives(args.verify, pacs))
        if checked is None:
            return 1
        data = checked.as_dict()

        def human_checks() -> None:
            for c in checked.files:
                verdict = "[green]ok[/green]" if c.ok else "[red]FAILED[/red]: " + "; ".join(c.problems)
                out.print(f"{c.file}: {c.events:,} events, sha256 {c.sha256}: {verdict}")
            for problem in checked.chain:
                out.print(f"[red]chain broken[/red]: {problem}")
            if not checked.chain:
                out.print(f"[green]chain ok[/green]: {checked.linked} archives linked from the trail's newest "
                          "archive back to the first")

        _emit(args, data, human_checks)
        return 0 if data["ok"] else 1
    if args.before is None or args.folder is None:
        return _usage("give --before YYYY-MM-DD and --to DIR (or --verify FILE...)")

    try:
        # A date too recent is refused (ValueError) before anything is read.
        report = _run(args, lambda pacs, bar: archive_audit(pacs, args.before, args.folder, progress=bar),
                      lease="audit-archive")
    except ValueError as exc:
        return _usage(str(exc))
    except (ArchiveError, OSError) as exc:
        err.print(f"[red]audit archive failed: {exc}[/red]")
        return 1
    if report is None:
        return 1

    def human() -> None:
        if not report.events:
            out.print(f"no audit events before {report.before}: nothing to archive")
            return
        if report.replaced:
            err.print(f"[yellow]replaced {report.replaced}: an earlier run wrote it and stopped before the trail "
                      "recorded it (its events stayed in the index)[/yellow]")
        _counts("audit archive", [("events archived and removed from the index", report.deleted),
                                  ("first event", report.first_at), ("last event", report.last_at),
                                  ("file", report.file), ("sha256", report.sha256)])

    _emit(args, report.as_dict(), human)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """pacs compress: 0 done, 1 failures or pixels that did not verify."""
    from pacs.maintenance import compress
    from pacs.maintenance.compress import READERS_GRACE

    report = _run(args, lambda pacs, bar: compress(pacs, codec=args.codec, study_uids=args.study, progress=bar),
                  lease="compress")
    if report is None:
        return 1
    data = report.as_dict()

    def human() -> None:
        rows: list[tuple[str, Any]] = [
            ("uncompressed images", report.candidates), ("compressed", report.compressed),
            ("bytes before", _size(report.bytes_before)), ("bytes after", _size(report.bytes_after)),
            ("bytes saved", _size(report.saved)), ("re-indexed", report.reindexed),
        ]
        rows += [(f"skipped: {reason}", c["count"]) for reason, c in data["skipped"].items()]
        rows.append(("failed", report.failed.count))
        rows.append(("old copies deleted", report.old_deleted))
        rows.append(("old copies kept for readers", report.old_pending))
        _counts(f"compress ({args.codec})", rows)
        if report.old_pending:
            err.print(f"{report.old_pending} replaced objects stay {int(READERS_GRACE // 60)} minutes "
                      "for readers that opened them; the next pacs compress, pacs purge --yes or pacs verify "
                      "--repair deletes them")
        _list("failed", data["failed"], ("sop_uid", "detail"))
        if "verification failed" in data["skipped"]:
            _list("pixels did not verify (left as they were)", data["skipped"]["verification failed"],
                  ("sop_uid", "detail"))
        if report.stopped:
            err.print(f"[red]stopped: {report.stopped}[/red]")

    _emit(args, data, human)
    unverified = report.skipped.get("verification failed")
    return 1 if report.failed.count or (unverified and unverified.count) else 0


def cmd_export(args: argparse.Namespace) -> int:
    """pacs export: 0 every study written, 1 unknown studies, failed objects or
    objects left out of a de-identified export for burned-in annotation."""
    from pacs.maintenance import export_studies

    if args.salt and not args.deidentify:
        return _usage("--salt only makes sense with --deidentify")
    if args.include_burned_in and not args.deidentify:
        return _usage("--include-burned-in only makes sense with --deidentify")
    if args.uncompressed and not args.media:
        return _usage("--uncompressed only makes sense with --media")
    if args.out.exists() and args.out.suffix.lower() == ".zip":
        return _usage(f"{args.out} exists: choose another name")
    from pacs.header import valid_uid

    for uid in args.studies:
        if not valid_uid(uid):
            return _usage(f"{uid!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    from pacs.maintenance.export import ExportConflict
    from pacs.maintenance.media import MediaConflict

    try:
        report = _run(args, lambda pacs, bar: export_studies(
            pacs, args.studies, args.out, deidentify=args.deidentify, salt=args.salt,
            include_burned_in=args.include_burned_in, progress=bar, media=args.media,
            uncompressed=args.uncompressed))
    except (MediaConflict, ExportConflict) as exc:
        return _usage(str(exc))
    data = report.as_dict()

    def human() -> None:
        _counts(f"export to {args.out}", [
            ("studies", report.studies), ("instances written", report.instances),
            ("bytes", _size(report.bytes)), ("already there", report.kept),
            ("failed", report.failed.count),
            ("left out: burned-in annotation", report.not_exported_burned_in.count),
        ])
        for uid in report.missing_studies:
            err.print(f"[red]no such study:[/red] {uid}")
        if report.missing_studies:
            err.print(f"[red]nothing written to {args.out}: correct the study UID(s) and run the export again[/red]")
        for original, new in report.study_map.items():
            out.print(f"study {original} exported as {new}")
        _list("failed", data["failed"], ("sop_uid", "detail"))
        _list("not exported: burned-in annotation", data["not_exported_burned_in"], ("sop_uid", "detail"))
        if report.not_exported_burned_in.count:
            err.print(f"[red]{report.not_exported_burned_in.count} object(s) not exported: their pixels show "
                      "identifying text that de-identification cannot remove (--include-burned-in to write them "
                      "anyway)[/red]")
        _list("written with burned-in annotation (pixels not de-identified)", data["burned_in_included"],
              ("sop_uid", "detail"))
        _list("warnings", data["warnings"], ("sop_uid", "detail"))
        if args.media and report.studies:
            out.print(f"DICOM media in {args.out}: DICOMDIR, README.TXT and DICOM/ (copy them to the disc's root)")

    _emit(args, data, human)
    if report.not_exported_burned_in.count and args.json:
        # The JSON goes to stdout; the operator still hears why the exit code is 1.
        err.print(f"{report.not_exported_burned_in.count} object(s) not exported: burned-in annotation")
    return 1 if report.missing_studies or report.failed.count or report.not_exported_burned_in.count else 0


def cmd_outbox(args: argparse.Namespace) -> int:
    """pacs outbox list|retry: 0 done, 1 when retry --id names no dead message."""
    from pacs import outbox

    pacs = _open(args)
    try:
        if args.outbox_command == "list":
            counts = outbox.depth(pacs.engine)
            messages = outbox.list_messages(pacs.engine, args.state or "", args.limit)

            def human() -> None:
                from pacs.timezones import shown  # the hospital's time with its offset, not bare UTC

                _counts("outbox (HL7 to the HIS, storage commitment reports)", sorted(counts.items()))
                table = TextTable(title=f"messages{' ' + args.state if args.state else ''} (newest first)")
                for col in ("id", "to", "kind", "key", "accession", "status", "state", "tries", "next / sent",
                            "error"):
                    table.add_column(col, overflow="fold")
                for m in messages:
                    when = m["sent_at"] if m["state"] == "sent" else m["next_attempt_at"]
                    table.add_row(str(m["id"]), m["destination"], m["kind"], m["key"], m["accession"], m["status"],
                                  m["state"],
                                  str(m["attempts"]), shown(when, pacs.settings), m["last_error"][:60])
                out.print(table)

            _emit(args, {"counts": counts, "messages": messages}, human)
            return 0
        retried = outbox.retry(pacs.engine, pk=args.message_id if not args.all_dead else None)
        return _retried(pacs, args, retried, args.message_id, action="outbox-retry", item="outbox message",
                        done="queued again", many="dead message(s)",
                        state_of=lambda pk: outbox.state_of(pacs.engine, pk), due="dead", listing="pacs outbox list")
    finally:
        pacs.close()
