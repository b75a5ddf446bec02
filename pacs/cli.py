"""The ``pacs`` command line: what one IT person runs the appliance with.

Every command takes ``--data-dir``, ``--index-url``, ``--storage-url`` and
``--config`` (each also a ``PACS_*`` variable) and reporting commands take
``--json``. Exit codes: 0 success, 1 the job found problems, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.markup import escape
from rich.text import Text
from sqlalchemy.engine import make_url

from storage import file_store_path

from . import logtext
from .settings import Settings, invalid_settings, load_env_file, load_settings

from .console import TextTable, err, fail, out
from .roles import ROLES


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = False) -> None:
    g = parser.add_argument_group("appliance")
    g.add_argument("--data-dir", type=Path, help="data directory (PACS_DATA_DIR, default ./data)")
    g.add_argument("--index-url", help="SQLAlchemy URL of the index (PACS_INDEX_URL)")
    g.add_argument("--storage-url", help="file:///path or s3://BUCKET?endpoint=H:P (PACS_STORAGE_URL)")
    g.add_argument("--config", dest="config_file", type=Path, help="TOML config file (PACS_CONFIG)")
    g.add_argument("--log-level", help="DEBUG, INFO, WARNING (PACS_LOG_LEVEL)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON object")


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    names = ("data_dir", "index_url", "storage_url", "config_file", "log_level")
    return load_settings(**{n: getattr(args, n, None) for n in names}, **extra)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # What DICOM peers send reaches the log through pynetdicom's messages
    # and ours: one printable, bounded line each (pacs.logtext).
    logtext.install()
    # pynetdicom narrates every PDU, alembic every migration step and
    # fontTools (report PDFs) every glyph subset at INFO.
    for chatty in ("pynetdicom", "alembic", "fontTools"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pydicom warns (to stderr and its logger) about every quirk of a received
    # file; the ingest path reports what matters as a status instead.
    warnings.filterwarnings("ignore", module="pydicom")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def missing_archive(settings: Settings, *, index: bool = True, store: bool = False) -> str | None:
    """Why a command that reads an existing archive has none to read, or None.

    Opening an archive creates it; a mistyped --data-dir or an unmounted disk
    would then give an empty archive that a cron job's `pacs verify` reports
    as healthy. The embedded default (SQLite file, filesystem store with
    *store*) is checked on disk; an S3 store's bucket is asked for (a
    mistyped bucket was created empty, and `pacs reindex` from it reported
    success). A server database answers for itself.
    """
    url = make_url(settings.resolved_index_url)
    if index and url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        if not Path(url.database).exists():
            return f"no archive index at {url.database}"
    folder = file_store_path(settings.resolved_storage_url)
    if folder is None:
        return _missing_bucket(settings)
    if store and not Path(folder).is_dir():
        return f"no object store at {folder}"
    return None


def _missing_bucket(settings: Settings) -> str | None:
    """"no bucket ..." when S3 says the store's bucket does not exist; None
    when it does, or when S3 does not answer (the command says so itself
    where it needs the store)."""
    import os

    from storage import StorageError, open_store

    store = open_store(settings.resolved_storage_url,
                       access_key=settings.s3_access_key or os.environ.get("PACS_S3_ACCESS_KEY"),
                       secret_key=settings.s3_secret_key or os.environ.get("PACS_S3_SECRET_KEY"), create=False)
    try:
        exists = store.bucket_exists()  # type: ignore[attr-defined]
    except StorageError:
        return None
    finally:
        store.close()
    return None if exists else f"no bucket {store.bucket} at {settings.resolved_storage_url}"  # type: ignore[attr-defined]


def open_existing(args: argparse.Namespace, *, index: bool = True, store: bool = False) -> int | None:
    """Exit status 1 with a message when the archive a command reads is not
    there (see :func:`missing_archive`); None when it is."""
    problem = missing_archive(settings_from(args), index=index, store=store)
    if problem is None:
        return None
    where = "--storage-url / PACS_STORAGE_URL" if problem.startswith("no bucket") else "--data-dir / PACS_DATA_DIR"
    err.print(f"[red]{problem}[/red]: check {where} (`pacs serve` or `pacs import` create an archive)")
    return 1


# Commands that store objects into the archive (and so may begin a new one):
# only they create a missing S3 bucket.
CREATES_STORE = {"serve", "import", "samples", "remote get", "remote pull", "prefetch run"}


def creates_store(args: argparse.Namespace) -> bool:
    """Whether the command may create its S3 bucket (see CREATES_STORE)."""
    return args.command in CREATES_STORE or _command_name(args) in CREATES_STORE


def _open(args: argparse.Namespace, **extra: Any):  # type: ignore[no-untyped-def]
    from .app import Pacs

    settings = settings_from(args, **extra)
    setup_logging(settings.log_level if not getattr(args, "json", False) else "WARNING")
    return Pacs.open(settings, create_store=creates_store(args))


# -- serve --------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    settings = settings_from(
        args,
        host=args.host,
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        hl7_port=args.hl7_port,
        ae_title=args.ae_title,
        dicom_tls_port=args.dicom_tls_port, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        tls_require_client_cert=args.tls_require_client_cert, http_tls=args.http_tls,
        dicom_workers=args.dicom_workers,
    )
    setup_logging(settings.log_level)
    from .archive_record import record_archive, served_elsewhere

    if not args.new_archive and (problem := served_elsewhere(settings)) is not None:
        err.print(f"[red]refused:[/red] {escape(problem)}", soft_wrap=True)
        return 1
    # What commands run on this data dir must open too (pacs.archive_record).
    record_archive(settings)
    return serve(settings, with_samples=args.with_samples)


# -- health -------------------------------------------------------------------
def cmd_health(args: argparse.Namespace) -> int:
    """0 when this machine's `pacs serve` answers /health with 200, else 1.

    The container's HEALTHCHECK: it asked http://127.0.0.1:8042 whatever
    PACS_HTTP_PORT or PACS_HTTP_TLS said, so such a node stayed unhealthy
    for good (and compose's pacs-b never started)."""
    import ssl

    import httpx

    settings = settings_from(args, host=args.host, http_port=args.http_port)
    # A server listening on every interface answers on loopback too.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    verify: ssl.SSLContext | bool = False
    if settings.http_tls:
        # Our own server on this machine: its liveness is asked, not its name.
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if settings.tls_require_client_cert and settings.tls_cert and settings.tls_key:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        verify = context
    url = f"{'https' if settings.http_tls else 'http'}://{f'[{host}]' if ':' in host else host}:{settings.http_port}/health"
    try:
        response = httpx.get(url, timeout=args.timeout, verify=verify)
    except (httpx.HTTPError, OSError) as exc:
        err.print(f"[red]unhealthy:[/red] {url}: {exc.__class__.__name__}: {exc}", soft_wrap=True)
        return 1
    if response.status_code != 200:
        err.print(f"[red]unhealthy:[/red] {url}: HTTP {response.status_code} {response.text[:300]}", soft_wrap=True)
        return 1
    if not args.quiet:
        out.print(f"healthy: {url}", soft_wrap=True)
    return 0


# -- import -------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from .importer import import_paths
    from .maintenance.common import os_user

    pacs = _open(args)
    try:
        missing = [p for p in args.paths if not p.exists()]
        if missing:
            err.print(f"[red]no such file or folder:[/red] {escape(', '.join(map(str, missing)))}")
            return 2
        with _progress(args.json) as progress:
            task = progress.add_task("importing", total=None)
            summary = import_paths(
                pacs, args.paths, workers=args.workers, on_file=lambda _p, _o: progress.advance(task), routed=args.route,
                rejecting_user=os_user(),
            )
        _audit_import(pacs, args.paths, summary)
    finally:
        pacs.close()
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        out.print(
            f"{summary.files} files: {summary.stored} stored, {summary.duplicates} already stored, "
            f"{summary.not_dicom} not DICOM (skipped), "
            + (f"{summary.skipped} DICOMDIR (skipped), " if summary.skipped else "")
            + (f"{summary.rejected} refused as rejected (pacs rejections list), " if summary.rejected else "")
            + (f"{summary.withdrawn} withdrawn by the rejection notes imported, " if summary.withdrawn else "")
            + f"{summary.failed} failed; "
            f"{summary.bytes / 1e6:.1f} MB"
        )
        for e in summary.errors[:20]:
            # File names are the hospital's (a "[/...]" in one was taken for rich markup and the listing failed).
            err.print(f"  [red]failed[/red] {escape(str(e['path']))}: {escape(str(e['error']))}")
    return 1 if summary.failed else 0


def _audit_import(pacs: Any, paths: list[Path], summary: Any) -> None:
    """Audit an import (PS3.15 "Data Import"): a ``store`` event per study
    that received objects, as a C-STORE or STOW-RS of it has (``pacs audit
    --study`` finds it, the patient filled in from the study), and one for
    the run when nothing was stored or files failed."""
    source = _paths_text(paths)
    for study_uid, stored in summary.studies.items():
        audit_command(pacs, "store", f"pacs import from {source}: {stored} instances stored", study_uid=study_uid)
    if summary.failed or not summary.studies:
        audit_command(pacs, "store", f"pacs import from {source}: {summary.files} files, {summary.stored} stored, "
                      f"{summary.duplicates} already stored, {summary.failed} failed",
                      "failure" if summary.failed else "success")


def _paths_text(paths: list[Path], shown: int = 3) -> str:
    """The files or folders a command read, absolute, for its audit event
    (the first few: a shell glob gives thousands)."""
    text = ", ".join(str(p.absolute()) for p in paths[:shown])
    return text + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


class _NullProgress:
    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *_a: Any, **_k: Any) -> int:
        return 0

    def advance(self, *_a: Any, **_k: Any) -> None:
        return None


def _progress(quiet: bool) -> Any:
    if quiet or not err.is_terminal:
        return _NullProgress()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )


# -- stats --------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    from .maintenance import storage_report

    if (refused := open_existing(args)) is not None:
        return refused
    pacs = _open(args)
    try:
        stats = pacs.reader.stats()
        storage = storage_report(pacs)
    finally:
        pacs.close()
    data = {
        "patients": stats.patients,
        "studies": stats.studies,
        "series": stats.series,
        "instances": stats.instances,
        "bytes": stats.bytes,
    }
    if args.json:
        print(json.dumps({**data, **storage}))
        return 0
    table = TextTable(title="filmless-pacs")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in data.items():
        table.add_row(key, f"{value:,}")
    free = storage["free_bytes"]
    table.add_row("storage free", "unknown" if free is None else f"{free / 1e9:,.1f} GB")
    queues = storage["queues"]
    for queue in ("outbox", "routing"):
        for state, count in sorted(queues[queue].items()):
            table.add_row(f"{queue} {state}", f"{count:,}")
    out.print(table)
    for title, rows, unit in (("bytes per modality", storage["bytes_per_modality"], "series"),
                              ("bytes per month (study date)", storage["bytes_per_month"], "studies")):
        breakdown = TextTable(title=title)
        for column in ("", unit, "MB"):
            breakdown.add_column(column, justify="right" if column else "left")
        for key, entry in rows.items():
            breakdown.add_row(key, f"{entry[unit]:,}", f"{entry['bytes'] / 1e6:,.1f}")
        out.print(breakdown)
    return 0


# -- ae -----------------------------------------------------------------------
def cmd_ae(args: argparse.Namespace) -> int:
    from .aes import parse_services, services_text
    from .tls import certificate_pin

    if args.ae_command == "add":
        try:
            services = parse_services(args.services) if args.services is not None else None
            forget_cert = (args.client_cert or "").strip().lower() == "none"
            cert = None if forget_cert or args.client_cert is None else certificate_pin(args.client_cert)
        except ValueError as exc:
            fail(exc)
            return 2
    pacs = _open(args)
    try:
        if args.ae_command == "add":
            before = pacs.aes.lookup(args.name)
            try:
                ae = pacs.aes.add(args.name, args.host, args.port, args.description or "", tls=args.tls,
                                  services=services, cert_sha256=cert, forget_cert=forget_cert,
                                  charset=args.charset)
            except ValueError as exc:
                audit_command(pacs, "ae-add", f"AE {args.name} at {args.host}:{args.port}: refused: {exc}", "failure")
                fail(exc)
                return 2
            # Who may connect and what they may ask: a security setting (PS3.15 "Security Alert").
            audit_command(pacs, "ae-add", _ae_text(ae) + (f" (was: {_ae_text(before)})" if before else " (new)"))
            result: dict[str, Any] = {"added": ae.title, "host": ae.host, "port": ae.port, "tls": ae.tls,
                                      "services": services_text(ae.services), "cert_sha256": ae.cert_sha256,
                                      "charset": ae.charset or "utf-8"}
            if before is not None:
                # Re-adding a title changes its address: say what it was.
                result["replaced"] = f"{before.host}:{before.port}"
            if ae.cert_sha256 and not (pacs.settings.dicom_tls_port and pacs.settings.tls_require_client_cert):
                # Without mutual TLS no client presents a certificate: the pin would refuse every call.
                err.print(f"[yellow]warning: {ae.title} can only call over DICOM TLS with its certificate, and this "
                          "configuration does not ask clients for one: set dicom_tls_port and "
                          "tls_require_client_cert (PACS_DICOM_TLS_PORT, PACS_TLS_REQUIRE_CLIENT_CERT)[/yellow]")
            _print_result(args, result)
        elif args.ae_command == "remove":
            if (refused := _in_config_file(pacs.settings, "ae", args.name)) is not None:
                audit_command(pacs, "ae-remove", f"AE {args.name}: refused: defined in the config file", "failure")
                return refused
            before = pacs.aes.lookup(args.name)
            removed = pacs.aes.remove(args.name)
            audit_command(pacs, "ae-remove", f"{_ae_text(before)} removed" if removed and before
                          else f"no AE {args.name} registered", "success" if removed else "failure")
            if not removed and not args.json:
                err.print(f"[red]no AE {args.name!r} is registered[/red] (pacs ae list)")
                return 1
            _print_result(args, {"removed": args.name if removed else None})
            return 0 if removed else 1
        else:
            aes = pacs.aes.list()
            if args.json:
                print(json.dumps([ae.as_json() for ae in aes]))
            else:
                table = TextTable(title="known AEs")
                for col in ("AE title", "host", "port", "TLS", "services", "client certificate", "charset",
                            "description"):
                    table.add_column(col)
                for ae in aes:
                    table.add_row(ae.title, ae.host, str(ae.port), "yes" if ae.tls else "", services_text(ae.services),
                                  (ae.cert_sha256 or "")[:16], ae.charset or "utf-8", ae.description)
                out.print(table)
    finally:
        pacs.close()
    return 0


def _ae_text(ae: Any) -> str:
    """A registered AE as its audit events describe it: address, TLS, services, pin."""
    from .aes import services_text

    # "*" is the stored form of "all" ("*,reject": all and reject), not what --services takes.
    services = services_text(ae.services).replace("*", "all")
    return (f"AE {ae.title} at {ae.host}:{ae.port}{' over TLS' if ae.tls else ''}"
            f"{', answers in ASCII' if ae.ascii_only else ''}, services "
            f"{services or 'none'}"
            + (f", client certificate {ae.cert_sha256[:16]}..." if ae.cert_sha256 else ""))


def _in_config_file(settings: Settings, table: str, name: str) -> int | None:
    """Exit status 1, saying so, when *name* is an ``[[ae]]`` / ``[[route]]``
    entry of the config file: removed from the index only, it came back at
    the next command or start."""
    from .maintenance import config_path

    entries = settings.ae if table == "ae" else settings.route
    names = [e.title.strip() for e in settings.ae] if table == "ae" else [e.name for e in settings.route]
    if not entries or name.strip() not in names:
        return None
    where = escape(f"{config_path(settings)} ([[{table}]])")
    err.print(f"[red]{escape(name)} is defined in the config file {where}: remove it there[/red] (removed here "
              "only, it would come back at the next start)", soft_wrap=True)
    return 1


def _print_result(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data))
    else:
        out.print(" ".join(f"{k}={v}" for k, v in data.items()))


# -- samples ------------------------------------------------------------------
def cmd_samples(args: argparse.Namespace) -> int:
    from .samples import load_samples

    pacs = _open(args)
    try:
        summary = load_samples(pacs, quick=args.quick, ct_slices=args.ct_slices)
    finally:
        pacs.close()
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        out.print(f"sample studies: {summary.stored} instances stored, {summary.duplicates} already there")
    return 1 if summary.failed else 0


# -- remote -------------------------------------------------------------------
def _keys(args: argparse.Namespace) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in args.key or []:
        name, _, value = item.partition("=")
        keys[name.strip()] = value
    if getattr(args, "study", None):
        keys["StudyInstanceUID"] = args.study
    if getattr(args, "series", None):
        keys["SeriesInstanceUID"] = args.series
    return keys


def cmd_remote(args: argparse.Namespace) -> int:
    from . import remote

    if getattr(args, "since", None) and getattr(args, "until", None) and args.since > args.until:
        # Queried as given, the range found nothing and the pull said "0 studies", exit 0.
        err.print(f"[red]--since {args.since} is after --until {args.until}[/red]")
        return 2
    pacs = _open(args)
    try:
        if args.remote_command == "echo":
            status = remote.echo(pacs, args.ae)
            _print_result(args, {"ae": args.ae, "status": f"0x{status:04X}"})
            return 0 if status == 0 else 1
        if args.remote_command == "pull":
            return _remote_pull(pacs, args)
        keys = _keys(args)
        remote.identifier(args.level, keys)  # a mistyped keyword is refused before calling the remote
        if args.remote_command == "find":
            results = []
            truncated = ""
            try:
                for match in remote.find(pacs, args.ae, args.level, keys, args.model):
                    results.append({e.keyword: _json_value(e.value) for e in match if e.keyword})
            except remote.Truncated as exc:
                truncated = str(exc)  # what came is shown, and said to be partial
            if args.json:
                print(json.dumps(results, ensure_ascii=False))
            else:
                for r in results:
                    out.print("  ".join(f"{k}={v}" for k, v in r.items() if k != "QueryRetrieveLevel"))
                out.print(f"{len(results)} matches")
            if truncated:
                err.print(f"[yellow]{truncated}[/yellow]")
            return 1 if truncated else 0
        # Who had the remote send which studies where: one event per run.
        what = (f"C-MOVE from {args.ae} to {args.destination or pacs.settings.ae_title}"
                if args.remote_command == "move" else f"C-GET from {args.ae}")
        what += f" ({args.level} " + " ".join(f"{k}={v}" for k, v in keys.items()) + ")"
        named = {"study_uid": _single(keys.get("StudyInstanceUID", "")),
                 "patient_id": _single(keys.get("PatientID", ""))}
        try:
            if args.remote_command == "move":
                summary = remote.move(pacs, args.ae, args.level, keys, args.destination, args.model)
            else:
                summary = remote.get(pacs, args.ae, args.level, keys, args.model)
        except remote.RemoteError as exc:
            audit_command(pacs, "retrieve", f"pacs remote {args.remote_command}: {what}: {exc}", "failure",
                          client=args.ae, **named)
            raise
        audit_command(pacs, "retrieve", f"pacs remote {args.remote_command}: {what}: status 0x{summary.status:04X}, "
                      f"{summary.completed} completed, {summary.failed} failed, {summary.warning} warning",
                      "success" if summary.status == 0 else "failure", client=args.ae, **named)
        _print_result(args, summary.as_dict())
        return 0 if summary.status == 0 else 1
    except remote.RemoteError as exc:
        fail(exc)
        return 1
    finally:
        pacs.close()


def _single(value: str) -> str:
    """A key's value when it names one thing (no list, no wildcard), else ''."""
    return value if value and not any(c in value for c in "\\*?") else ""


def _remote_pull(pacs: Any, args: argparse.Namespace) -> int:
    from .pull import PullOptions, Puller, StudyResult

    options = PullOptions(
        since=args.since, until=args.until, patient_id=args.patient or "", method=args.method,
        find_limit=args.find_limit, max_studies=args.max_studies, stop_at=args.stop_at, pause=args.pause,
        dry_run=args.dry_run,
    )

    def shown(result: StudyResult) -> None:
        if not args.json and result.state != "complete":
            colour = {"pulled": "green", "missing": "yellow"}.get(result.state, "red")
            out.print(f"[{colour}]{result.state:10}[/{colour}] {result.study_date or '--------'} "
                      f"{result.patient_id} {result.study_uid} {result.after - result.before:+d} {result.detail}")

    report = Puller(pacs, args.ae, options, on_study=shown).run()
    if args.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        out.print(f"{report.studies} studies at {report.remote} ({report.since}-{report.until}): "
                  f"{report.complete} already complete, {report.pulled} pulled ({report.instances} instances), "
                  f"{report.missing} to pull, {report.incomplete} incomplete, {report.failed} failed; "
                  f"{report.queries} C-FINDs")
        for window in report.capped:
            detail = report.capped_detail.get(window) or f"the remote answered {options.find_limit} or more studies"
            err.print(f"[yellow]{window}: {detail} (pull them with --patient, or raise the remote's "
                      "limit)[/yellow]")
        if report.stopped:
            err.print(f"[yellow]stopped: {report.stopped}; run the same command again to go on[/yellow]")
    return 0 if report.ok else 1


def _day(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y%m%d").date() if "-" not in text else date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYYMMDD or YYYY-MM-DD)") from None


def _clock(text: str) -> time:
    try:
        return datetime.strptime(text, "%H:%M").time()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time of day (HH:MM)") from None


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value
    return parse


def _json_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
        return [str(v) for v in value]
    if value.__class__.__name__ == "Sequence":
        return [{e.keyword: _json_value(e.value) for e in item} for item in value]
    return str(value)


# -- orders -------------------------------------------------------------------
def cmd_orders(args: argparse.Namespace) -> int:
    from .audit import patient_chunks, patient_cx
    from .orders import OrderError, OrderService, order_subject

    pacs = _open(args)
    try:
        service = OrderService(pacs.engine, order_status=pacs.settings.his_order_status)
        if args.orders_command == "unmatched":
            rows = service.unmatched_studies(args.limit)
            # The patients listed, as GET /api/studies/unmatched names them.
            detail = f"pacs orders unmatched: {len(rows)} studies listed"
            for chunk in patient_chunks(patient_cx(r["patient_id"], r["issuer"]) for r in rows) or [""]:
                audit_command(pacs, "query", detail, patient_id=chunk)
            if args.json:
                print(json.dumps(rows, ensure_ascii=False, default=str))
            else:
                table = TextTable(title="studies without an order")
                for col in ("study", "accession", "date", "modalities", "patient ID", "name", "why not matched"):
                    table.add_column(col)
                for r in rows:
                    table.add_row(r["study_uid"], r["accession_number"], r["study_date"], r["modalities"],
                                  r["patient_id"], r["name"], r["reason"])
                out.print(table)
            return 0
        previous = service.study_patient(args.study)
        detail = f"pacs orders match: study linked to order {args.accession}"
        try:
            order = service.match(args.study, args.accession)
        except OrderError as exc:
            audit_command(pacs, "order", f"{detail}: refused: {exc}", "failure", study_uid=args.study,
                          patient_id=previous)
            fail(exc)
            return 1
        # The study under its order's patient now, and the patient it left (as the HTTP route names them).
        for patient in dict.fromkeys((order_subject(order)[1], previous)):
            audit_command(pacs, "order", detail, study_uid=args.study, patient_id=patient)
        _print_result(args, {"study": args.study, "accession": order["accession_number"], "patient": order["name"]})
        return 0
    finally:
        pacs.close()


# -- users, tokens, audit ---------------------------------------------------------
def audit_command(pacs: Any, action: str, detail: str, outcome: str = "success", *, study_uid: str = "",
                  patient_id: str = "", client: str = "") -> None:
    """Audit a command, by the operating system account that ran it (the
    person under sudo: :func:`pacs.maintenance.common.os_user`; the HTTP
    routes audit the same actions by the user who called them): one event
    per run saying its scope, or per study or patient it names."""
    from .audit import Event
    from .maintenance.common import os_user

    pacs.audit.record(Event(action=action, user=os_user(), protocol="cli", outcome=outcome, study_uid=study_uid,
                            patient_id=patient_id, client=client[:200], detail=detail[:500]))


def cmd_user(args: argparse.Namespace) -> int:
    from .auth import AuthError

    pacs = _open(args)
    try:
        if args.user_command == "list":
            users = pacs.auth.list_users()
            if args.json:
                print(json.dumps(users))
            else:
                table = TextTable(title="users")
                for col in ("username", "display name", "role", "active"):
                    table.add_column(col)
                for u in users:
                    table.add_row(str(u["username"]), str(u["display_name"]), str(u["role"]), str(u["active"]))
                out.print(table)
            return 0
        if args.user_command == "disable":
            role = pacs.auth.role_of(args.username)
            done = pacs.auth.disable_user(args.username)
            audit_command(pacs, "user-disable", f"user {args.username} (role {role}) disabled, sessions ended"
                          if done else f"no user {args.username}", "success" if done else "failure")
            _print_result(args, {"disabled": args.username if done else None})
            return 0 if done else 1
        before = pacs.auth.role_of(args.username)
        change = pacs.auth.describe_user_change(args.username, args.role, before, keep_tokens=args.keep_tokens)
        try:
            password = pacs.auth.add_user(args.username, args.role, args.password, args.display_name or "",
                                          revoke_tokens=not args.keep_tokens)
        except AuthError as exc:
            audit_command(pacs, "user-add", f"{change}: refused: {exc}", "failure")
            fail(exc)
            return 2
        audit_command(pacs, "user-add", change)
        result: dict[str, Any] = {"username": args.username, "role": args.role}
        if not args.password:
            result["password"] = password  # generated: shown once
        if before is not None:
            # A reset: say what happened to the ways in the user had.
            result["sessions_ended"] = True
            result["tokens_revoked"] = not args.keep_tokens
        _print_result(args, result)
        return 0
    finally:
        pacs.close()


def cmd_token(args: argparse.Namespace) -> int:
    from .auth import AuthError

    pacs = _open(args)
    try:
        role = pacs.auth.role_of(args.username)
        if args.token_command == "create":
            detail = (f"token {args.name!r} for user {args.username} (role {role}), "
                      + (f"expires in {args.days} days" if args.days else "no expiry"))
            try:
                token = pacs.auth.create_token(args.username, args.name, args.days)
            except AuthError as exc:
                audit_command(pacs, "token-create", f"{detail}: refused: {exc}", "failure")
                fail(exc)
                return 2
            audit_command(pacs, "token-create", detail)
            _print_result(args, {"username": args.username, "name": args.name, "token": token})
            return 0
        revoked = pacs.auth.revoke(username=args.username, name=args.name)
        audit_command(pacs, "token-revoke", f"tokens {args.name!r} of user {args.username} (role {role}): "
                      f"{revoked} revoked", "success" if revoked else "failure")
        _print_result(args, {"revoked": revoked})
        return 0 if revoked else 1
    finally:
        pacs.close()


def cmd_audit(args: argparse.Namespace) -> int:
    from . import audit

    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    pacs = _open(args)
    try:
        events = audit.query(pacs.engine, study_uid=args.study or "", user=args.user or "",
                             patient_id=args.patient or "", limit=args.limit)
        # The audit source, as GET /api/audit names it: one archive's lines
        # read the same whichever way they were exported.
        source = pacs.settings.ae_title
        # Reading the trail is itself an access to be kept (PS3.15 A.5.3 "Audit
        # Log Used"), as GET /api/audit is; recorded after the read, so it is
        # in the next export, not this one.
        asked = " ".join(f"--{name} {value}" for name, value in (("study", args.study), ("user", args.user),
                                                                 ("patient", args.patient)) if value)
        audit_command(pacs, "query", f"pacs audit {asked + ' ' if asked else ''}--format {fmt}: "
                      f"{len(events)} events read", study_uid=args.study or "", patient_id=args.patient or "")
    finally:
        pacs.close()
    if fmt == "table":
        # One line per event at any width: columns are cut (…), never wrapped;
        # --format json has every value whole.
        wide = out.width >= 120  # the client address only where there is room for it
        columns = [("time (UTC)", 14), ("user", 10), ("action", 11), ("outcome", 7), ("patient", 12)]
        columns += [("client", 15)] if wide else []
        table = TextTable(title=f"audit trail ({len(events)} events, newest first)")
        for column, width in columns:
            table.add_column(column, no_wrap=True, overflow="ellipsis", width=width)
        # What is left of the line goes to the study and the detail.
        table.add_column("study, detail", no_wrap=True, overflow="ellipsis",
                         width=max(12, out.width - sum(w + 3 for _, w in columns) - 4))
        for e in events:
            study = e["study_uid"]
            what = " ".join(v for v in (f"…{study[-12:]}" if len(study) > 13 else study, e["detail"][:120]) if v)
            row = [e["at"].strftime("%m-%d %H:%M:%S"), e["user"], e["action"], e["outcome"], e["patient_id"]]
            # Text, not markup: a value from a client (a failed login's
            # username "[/x]") would be styled, hide what follows or stop
            # the command with a MarkupError.
            table.add_row(*(Text(audit.one_line(v)) for v in (*row, *([e["client"]] if wide else []), what)))
        out.print(table)
    elif fmt == "syslog":
        for e in events:
            print(audit.to_syslog(e, source))
    elif fmt == "atna":
        print(json.dumps([audit.to_atna(e, source) for e in events], ensure_ascii=False))
    else:
        print(json.dumps([{**e, "at": e["at"].isoformat()} for e in events], ensure_ascii=False))
    return 0


# -- routing --------------------------------------------------------------------
def cmd_route(args: argparse.Namespace) -> int:
    from . import routing

    pacs = _open(args)
    try:
        rules = routing.RoutingRules(pacs.engine)
        command = args.route_command
        if command == "add":
            if bool(args.to_ae) == bool(args.to_url):
                err.print("[red]give exactly one of --to-ae or --to-url[/red]")
                return 2
            before = next((r for r in rules.list() if r.name == args.name), None)
            try:
                morph = dict(item.split("=", 1) for item in (args.set or []))
                rule = rules.add(
                    args.name, [routing.parse_condition(c) for c in (args.if_ or [])],
                    "dicom" if args.to_ae else "dicomweb", args.to_ae or args.to_url,
                    destination_auth=args.auth or "", transcode=args.transcode or "",
                    deidentify=args.deidentify, morph=morph, stable_seconds=args.stable,
                )
            except (routing.RoutingError, ValueError) as exc:
                destination = routing.without_userinfo(args.to_ae or args.to_url)
                audit_command(pacs, "route-add", f"rule {args.name} to {destination}: refused: {exc}", "failure")
                fail(exc)
                return 2
            # Where patient data will be sent from now on.
            audit_command(pacs, "route-add",
                          _rule_text(rule) + (f" (was: {_rule_text(before)})" if before else " (new)"))
            _print_result(args, rule.as_dict() if args.json else {"rule": rule.name, "to": rule.destination})
        elif command == "rules":
            listed = [r.as_dict() for r in rules.list()]
            if args.json:
                print(json.dumps(listed))
            else:
                table = TextTable(title="routing rules")
                for col in ("name", "if", "to", "transcode", "deid", "stable s"):
                    table.add_column(col)
                for r in listed:
                    table.add_row(r["name"], " ".join(f"{c['attribute']}{'=' if c['op'] == 'eq' else '~'}{c['value']}"
                                                      for c in r["conditions"]),
                                  r["destination"], r["transcode"], str(r["deidentify"]), str(r["stable_seconds"]))
                out.print(table)
        elif command == "remove":
            if (refused := _in_config_file(pacs.settings, "route", args.name)) is not None:
                audit_command(pacs, "route-remove", f"rule {args.name}: refused: defined in the config file", "failure")
                return refused
            before = next((r for r in rules.list() if r.name == args.name), None)
            try:
                discarded = rules.remove(args.name, force=args.force)
            except routing.RoutingError as exc:  # unfinished jobs, no --force
                audit_command(pacs, "route-remove", f"rule {args.name}: refused: {exc}", "failure")
                fail(exc)
                return 2
            if discarded is None or before is None:
                audit_command(pacs, "route-remove", f"no rule named {args.name}", "failure")
                err.print(f"[red]no rule named {args.name}[/red]")
                return 1
            audit_command(pacs, "route-remove", f"{_rule_text(before)} removed"
                          + (f", {discarded} unfinished jobs discarded" if discarded else ""))
            _print_result(args, {"removed": args.name, "discarded": discarded})
        elif command == "list":
            jobs = routing.list_jobs(pacs.engine, args.state or "", args.limit)
            if args.json:
                print(json.dumps({"counts": routing.counts(pacs.engine), "jobs": jobs}, default=str))
            else:
                out.print(routing.counts(pacs.engine))
                from .timezones import shown

                table = TextTable(title="routing jobs")
                for col in ("job", "rule", "instance", "state", "tries", "next", "error"):
                    table.add_column(col)
                for j in jobs:
                    # The hospital's wall time with its offset: the index's UTC
                    # printed bare read as local time, 7 hours off in Vietnam.
                    table.add_row(str(j["pk"]), j["rule"], j["sop_uid"][-20:], j["state"], str(j["attempts"]),
                                  shown(j["next_attempt_at"], pacs.settings), _reason(j["last_error"]))
                out.print(table)
        elif command == "retry":
            retried = routing.retry(pacs.engine, pk=args.job, state=args.state)
            if args.job is not None and not retried:
                err.print(f"[red]no routing job {args.job}, or a node is sending it now[/red] (pacs route list)")
                return 1
            _print_result(args, {"retried": retried})
        elif command == "prune":
            days = args.older_than_days if args.older_than_days is not None else pacs.settings.route_keep_days
            if not days or days < 0:
                # route_keep_days = 0 means "keep them": pruning needs an explicit age then.
                err.print("[red]route_keep_days is 0 (finished jobs are kept): give --older-than-days N (N > 0)[/red]")
                return 2
            _print_result(args, {"pruned": routing.prune(pacs.engine, timedelta(days=days))})
        elif command == "cancel":
            if args.job is None and not args.rule:
                err.print("[red]give --job or --rule[/red]")
                return 2
            _print_result(args, {"cancelled": routing.cancel(pacs.engine, pk=args.job, rule=args.rule or "")})
        return 0
    finally:
        pacs.close()


def _reason(error: str, width: int = 80) -> str:
    """A routing job's error for the table: its end, where the reason is
    ("...failed: could not connect: [Errno 111] Connection refused"); the
    start names the destination, which the rule column shows."""
    return error if len(error) <= width else "..." + error[-(width - 3):]


def _rule_text(rule: Any) -> str:
    """A routing rule as its audit events describe it: what it sends where, how
    (never its Authorization header)."""
    from .routing import without_userinfo

    ops = {"eq": "=", "wildcard": "~"}
    conditions = " ".join(f"{c.attribute}{ops[c.op]}{c.value}" if c.op in ops else f"{c.attribute}=/{c.value}/"
                          for c in rule.conditions)
    text = (f"rule {rule.name}: {conditions or 'every object'} to {rule.destination_kind} "
            f"{without_userinfo(rule.destination)}")
    extras = [f"transcode {rule.transcode}" if rule.transcode else "", "de-identified" if rule.deidentify else "",
              f"set {', '.join(k for k, _ in rule.morph)}" if rule.morph else "",
              f"once stable {rule.stable_seconds} s" if rule.stable_seconds else ""]
    return text + "".join(f", {e}" for e in extras if e)


# -- db -----------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    from .index import create_index_engine, current_revision
    from .index.schema import prepare_schema

    from .running import no_server_running

    if args.db_command == "copy":
        from .cli_maintenance import cmd_db_copy

        return cmd_db_copy(args)
    settings = settings_from(args)
    engine = create_index_engine(settings.resolved_index_url)
    try:
        if args.db_command == "upgrade":
            with no_server_running(settings.data_dir) as alone:
                others = "" if alone else f"a pacs serve runs on {settings.data_dir}"
                before = current_revision(engine)
                prepare_schema(engine, upgrade=True, others=others)
            if before not in (None, current_revision(engine)):
                out.print(f"index schema upgraded from revision {before}")
        _print_result(args, {"revision": current_revision(engine)})
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs", description="filmless-pacs appliance")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run DICOM, HTTP and HL7 listeners")
    _common(p)
    p.add_argument("--host", help="address to bind (PACS_HOST, default 127.0.0.1)")
    p.add_argument("--dicom-port", type=int, help="DICOM port (PACS_DICOM_PORT, default 11112)")
    p.add_argument("--http-port", type=int, help="HTTP port (PACS_HTTP_PORT, default 8042)")
    p.add_argument("--hl7-port", type=int, help="HL7 MLLP port (PACS_HL7_PORT, default 2575)")
    p.add_argument("--ae-title", help="our AE title (PACS_AE_TITLE, default FILMLESS)")
    p.add_argument("--with-samples", action="store_true", help="load synthetic sample studies into an empty archive")
    p.add_argument("--new-archive", action="store_true",
                   help="serve another index or store than the one this data dir's archive.json records")
    p.add_argument("--dicom-tls-port", type=int, help="DICOM over TLS port, e.g. 2762 (PACS_DICOM_TLS_PORT)")
    p.add_argument("--tls-cert", type=Path, help="certificate, PEM (PACS_TLS_CERT; pacs certs issue)")
    p.add_argument("--tls-key", type=Path, help="private key, PEM (PACS_TLS_KEY)")
    p.add_argument("--tls-ca", type=Path, help="CA bundle verifying peers and clients (PACS_TLS_CA)")
    p.add_argument("--tls-require-client-cert", action="store_true", default=None,
                   help="mutual TLS: clients need a certificate from --tls-ca (PACS_TLS_REQUIRE_CLIENT_CERT)")
    p.add_argument("--http-tls", action="store_true", default=None, help="serve HTTPS (PACS_HTTP_TLS)")
    p.add_argument("--dicom-workers", type=int, metavar="N",
                   help="DICOM worker processes sharing the port; 0 = one per core (PACS_DICOM_WORKERS, default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="exit 0 when this machine's pacs serve answers /health with 200 "
                                      "(a container's HEALTHCHECK)")
    _common(p)
    p.add_argument("--host", help="address pacs serve binds (PACS_HOST; 0.0.0.0 is asked on 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (PACS_HTTP_PORT, default 8042)")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    p.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("import", help="import DICOM files and folders (recursive)")
    _common(p, json_flag=True)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--route", action="store_true",
                   help="the routing rules apply to the imported objects (off: old data brought in is not "
                        "sent to the destinations of new examinations)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("stats", help="counts of patients, studies, series, instances, bytes")
    _common(p, json_flag=True)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("ae", help="the known-AE registry")
    ae_sub = p.add_subparsers(dest="ae_command", required=True)
    q = ae_sub.add_parser("list")
    _common(q, json_flag=True)
    q = ae_sub.add_parser("add")
    _common(q, json_flag=True)
    q.add_argument("name")
    q.add_argument("--host", required=True)
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--description")
    q.add_argument("--tls", action="store_true",
                   help="reach it over DICOM TLS (C-MOVE, routing, remote Q/R): its certificate is checked "
                        "against tls_ca, ours (tls_cert) presented for mutual TLS")
    q.add_argument("--services", metavar="LIST",
                   help="what it may ask of us: 'all' (a new AE's default) or a comma list of "
                        "store, query, retrieve, worklist, mpps, commitment, reject (its rejection notes "
                        "delete the images they list; never implied by 'all': 'all,reject'); others get 0x0124 "
                        "(refused: not authorized). Unchanged when re-adding without it")
    q.add_argument("--client-cert", metavar="PEM|SHA256|none",
                   help="pin its TLS client certificate (a PEM file, or its SHA-256 fingerprint): calls under "
                        "this title must then come over DICOM TLS with that certificate; 'none' removes the pin")
    q.add_argument("--charset", choices=("utf-8", "ascii"),
                   help="what its C-FIND and worklist answers are written in: utf-8 (a new AE's default: ISO_IR "
                        "192, every Vietnamese letter) or ascii (names and texts without diacritics, no Specific "
                        "Character Set: a modality that reads no UTF-8). Unchanged when re-adding without it")
    q = ae_sub.add_parser("remove")
    _common(q, json_flag=True)
    q.add_argument("name")
    p.set_defaults(func=cmd_ae)

    p = sub.add_parser("samples", help="generate and import synthetic sample studies")
    _common(p, json_flag=True)
    p.add_argument("--quick", action="store_true", help="small variant (a few slices)")
    p.add_argument("--ct-slices", type=int, help="CT slices (default 120, 8 with --quick)")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("remote", help="echo/find/move/get against a remote PACS in the AE registry")
    r_sub = p.add_subparsers(dest="remote_command", required=True)
    for name, helptext in (
        ("echo", "C-ECHO"),
        ("find", "C-FIND; -k Keyword=Value (empty value: return key)"),
        ("move", "C-MOVE to our AE (or --destination)"),
        ("get", "C-GET, objects ingested here"),
    ):
        q = r_sub.add_parser(name, help=helptext)
        _common(q, json_flag=True)
        q.add_argument("ae", help="remote AE title (must be registered with pacs ae add)")
        if name != "echo":
            q.add_argument("-k", "--key", action="append", help="Keyword=Value, repeatable")
            q.add_argument("--level", default="STUDY", choices=["PATIENT", "STUDY", "SERIES", "IMAGE"])
            q.add_argument("--model", default="study", choices=["study", "patient"])
            q.add_argument("--study", help="StudyInstanceUID shortcut")
            q.add_argument("--series", help="SeriesInstanceUID shortcut")
        if name == "move":
            q.add_argument("--destination", help="move destination AE (default: ours)")
    q = r_sub.add_parser(
        "pull", help="copy a remote archive (an old PACS) here: newest first, resumable, verified",
        description="Retrieve every study of the remote AE between --since and --until that is not complete "
        "here, newest first, and check that each instance the remote lists is indexed. Running it again "
        "goes on where it stopped. C-MOVE (default) needs this node registered at the remote and pacs serve "
        "running; --method get needs neither.")
    _common(q, json_flag=True)
    q.add_argument("ae", help="remote AE title (must be registered with pacs ae add)")
    q.add_argument("--since", type=_day, help="first study date (YYYYMMDD; default: the earliest)")
    q.add_argument("--until", type=_day, help="last study date (YYYYMMDD; default: today)")
    q.add_argument("--patient", help="only this Patient ID")
    q.add_argument("--method", choices=["move", "get"], default="move")
    q.add_argument("--find-limit", type=_at_least(2), default=500,
                   help="the most C-FIND matches the remote answers: a date window with that many is split (500)")
    q.add_argument("--max-studies", type=_at_least(0), default=0, help="stop after retrieving this many studies")
    q.add_argument("--stop-at", type=_clock, help="stop at this time of day (HH:MM), e.g. when the day shift starts")
    q.add_argument("--pause", type=float, default=0.0, help="seconds to wait between studies (spare the remote)")
    q.add_argument("--dry-run", action="store_true", help="only say what would be pulled")
    p.set_defaults(func=cmd_remote)

    p = sub.add_parser("orders", help="reconcile studies with HIS orders")
    o_sub = p.add_subparsers(dest="orders_command", required=True)
    q = o_sub.add_parser("unmatched", help="studies no order explains")
    _common(q, json_flag=True)
    q.add_argument("--limit", type=int, default=100)
    q = o_sub.add_parser("match", help="link a study to an order by hand")
    _common(q, json_flag=True)
    q.add_argument("study", help="Study Instance UID")
    q.add_argument("accession", help="the order's accession number")
    p.set_defaults(func=cmd_orders)

    p = sub.add_parser("user", help="users of the HTTP API and their roles")
    u_sub = p.add_subparsers(dest="user_command", required=True)
    q = u_sub.add_parser("add", help="create or update a user (prints a generated password once); updating an "
                         "existing user resets the password, ends their sessions and revokes their API tokens")
    _common(q, json_flag=True)
    q.add_argument("username")
    q.add_argument("--role", required=True, choices=list(ROLES))
    q.add_argument("--password")
    q.add_argument("--display-name")
    q.add_argument("--keep-tokens", action="store_true",
                   help="on a reset, keep the user's API tokens (a system account whose tokens are not compromised); "
                        "sessions end anyway")
    q = u_sub.add_parser("list")
    _common(q, json_flag=True)
    q = u_sub.add_parser("disable")
    _common(q, json_flag=True)
    q.add_argument("username")
    p.set_defaults(func=cmd_user)
    from .cli_signing import register_user_certificate

    register_user_certificate(u_sub, _common)

    p = sub.add_parser("token", help="API tokens for systems (modality, HIS, EMR)")
    t_sub = p.add_subparsers(dest="token_command", required=True)
    q = t_sub.add_parser("create")
    _common(q, json_flag=True)
    q.add_argument("username")
    q.add_argument("--name", required=True)
    q.add_argument("--days", type=int)
    q = t_sub.add_parser("revoke")
    _common(q, json_flag=True)
    q.add_argument("username")
    q.add_argument("--name", required=True)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("audit", help="export the audit trail")
    _common(p)
    p.add_argument("--study")
    p.add_argument("--user")
    p.add_argument("--patient", help="events naming this patient ID (alone or among a search's patients)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--format", choices=["table", "json", "atna", "syslog"],
                   help="default: a table on a terminal, JSON when piped or redirected")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("route", help="routing rules and the forwarding queue")
    r_sub = p.add_subparsers(dest="route_command", required=True)
    q = r_sub.add_parser("add", help="add or replace a rule")
    _common(q, json_flag=True)
    q.add_argument("name")
    q.add_argument("--if", dest="if_", action="append",
                   help="Keyword=value, Keyword~wild*card or Keyword=/regex/ (repeatable; CallingAE too)")
    q.add_argument("--to-ae", help="a registered AE title (C-STORE)")
    q.add_argument("--to-url", help="a DICOMweb base URL (STOW-RS)")
    q.add_argument("--auth", help='Authorization header for --to-url, e.g. "Bearer TOKEN"')
    q.add_argument("--transcode", help="uncompressed, j2k-lossless, jpegls-lossless, rle or a transfer syntax UID")
    q.add_argument("--deidentify", action="store_true", help="PS3.15 Basic Profile, consistent UIDs")
    q.add_argument("--set", action="append", help="Keyword=value set on the copy (repeatable)")
    q.add_argument("--stable", type=int, default=0, help="route a study once no instance arrived for N s")
    q = r_sub.add_parser("rules", help="list the rules")
    _common(q, json_flag=True)
    q = r_sub.add_parser("remove", help="remove a rule (refused while it has pending, sending or dead jobs)")
    _common(q, json_flag=True)
    q.add_argument("name")
    q.add_argument("--force", action="store_true", help="remove it with its unfinished jobs (they are discarded)")
    q = r_sub.add_parser("list", help="jobs and counts per state")
    _common(q, json_flag=True)
    q.add_argument("--state", choices=["pending", "sending", "done", "dead", "cancelled"])
    q.add_argument("--limit", type=int, default=100)
    q = r_sub.add_parser("retry", help="retry dead jobs (or one job)")
    _common(q, json_flag=True)
    q.add_argument("--job", type=int)
    q.add_argument("--state", default="dead", choices=["dead", "cancelled"])
    q = r_sub.add_parser("prune", help="delete done and cancelled jobs (pacs serve does it hourly, after route_keep_days)")
    _common(q, json_flag=True)
    q.add_argument("--older-than-days", type=float, help="default: route_keep_days (30); needed when that is 0")
    q = r_sub.add_parser("cancel", help="cancel pending/dead jobs of a rule (or one job), and jobs whose sender "
                                        "stopped (sending, lease expired)")
    _common(q, json_flag=True)
    q.add_argument("--job", type=int)
    q.add_argument("--rule")
    p.set_defaults(func=cmd_route)

    from .cli_maintenance import register as register_maintenance

    register_maintenance(sub, _common)
    from .cli_certs import register as register_certs

    register_certs(sub, _common)
    from .cli_backup import register as register_backup

    register_backup(sub, _common)
    from .cli_prefetch import register as register_prefetch

    register_prefetch(sub, _common)
    from .cli_share import register as register_share

    register_share(sub, _common)
    from .cli_templates import register as register_templates

    register_templates(sub, _common)
    from .cli_patients import register as register_patients

    register_patients(sub, _common)
    from .cli_signing import register as register_signing

    register_signing(sub, _common)
    from .cli_rejections import register as register_rejections

    register_rejections(sub, _common)
    from .cli_activity import register as register_activity

    register_activity(sub, _common)
    from .cli_critical import register as register_critical

    register_critical(sub, _common)

    p = sub.add_parser("db", help="index schema migrations; copy the index into another database")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    for name in ("upgrade", "current"):
        q = db_sub.add_parser(name)
        _common(q, json_flag=True)
    q = db_sub.add_parser("copy", help="copy the whole index (orders, reports, users, audit...) into an empty "
                                       "database, e.g. from SQLite to PostgreSQL; stop pacs serve first")
    _common(q, json_flag=True)
    q.add_argument("--to", required=True, dest="target", metavar="INDEX_URL", help="SQLAlchemy URL of the new database")
    q.add_argument("--switch", action="store_true", help="then set index_url in the config file")
    p.set_defaults(func=cmd_db)
    return parser


# Commands that may make a new archive (set one up, fill it, rebuild its
# index from the store, restore it); every other command reads an existing
# one, and opening would create an empty archive where --data-dir was
# mistyped (`pacs route list` then shows "no rules" for a busy hospital).
MAY_CREATE = {"serve", "import", "samples", "ae add", "user add", "token create", "route add", "db upgrade", "restore",
              "reindex", "certs", "health", "template import"}


def _configured(args: argparse.Namespace) -> bool:
    """A data dir set up with a config file before its first start (where an
    operator checks `pacs ae list` or `pacs route rules`): not a typo."""
    return (settings_from(args).data_dir / "pacs.toml").is_file()


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def _other_archive(args: argparse.Namespace) -> int | None:
    """Exit status 1 with a message when the command would open another
    index or store than the data dir's server uses (pacs.archive_record)."""
    from .archive_record import other_archive

    # serve checks and records its archive itself; certs and health open none; db copy reads the index
    # it is told to copy (an old one after a --switch, say) into another.
    if args.command in ("serve", "certs", "health") or _command_name(args) == "db copy":
        return None
    problem = other_archive(settings_from(args))
    if problem is None:
        return None
    err.print(f"[red]refused:[/red] {problem}", soft_wrap=True)
    return 1


def _root_in_service_dir(args: argparse.Namespace) -> int | None:
    """Exit status 1 when root runs a command on a data dir another user
    (the service's) owns: every file it wrote there (objects, shard
    folders, SQLite's -wal/-shm even on a read) would be root's, and the
    service could not read or write them."""
    if os.geteuid() != 0 or args.command == "health":  # health writes nothing
        return None
    data_dir = settings_from(args).data_dir
    try:
        owner = data_dir.stat().st_uid
    except OSError:
        return None
    if owner == 0:
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    err.print(f"[red]refused:[/red] running as root on {data_dir}, which belongs to {name}: what root writes "
              f"there the service could not read; run it as that user: sudo -u {name} {Path(sys.argv[0]).name} ...",
              soft_wrap=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        # The service's settings (systemd EnvironmentFile): a command run
        # beside the service opens the same archive as the service.
        load_env_file()
        if (refused := _root_in_service_dir(args)) is not None:
            return refused
        if (refused := _other_archive(args)) is not None:
            return refused
        if args.command not in MAY_CREATE and _command_name(args) not in MAY_CREATE and not _configured(args):
            if (refused := open_existing(args)) is not None:
                return refused
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an operator wants one clear line, not a trace
        if getattr(args, "log_level", None) == "DEBUG":
            raise
        from pydantic import ValidationError

        if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
            for line in invalid_settings(exc):
                fail(f"error: {line}")
            return 1
        # As text: a message may hold "[...]" (a path, a peer's answer), which rich took for markup.
        fail(f"error: {exc.__class__.__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
