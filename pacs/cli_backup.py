"""`pacs backup` and `pacs restore`: the index's backups (see pacs.backup)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


from .console import err, out


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add the backup subcommands to the `pacs` parser."""
    p = sub.add_parser("backup", help="write a consistent backup of the index (safe while serving)")
    common(p, json_flag=True)
    p.add_argument("--out", type=Path, required=True, help="backup file to write")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="replace the index with a backup (stop pacs serve first)")
    common(p, json_flag=True)
    p.add_argument("backup", type=Path, help="a file written by pacs backup")
    p.add_argument("--yes", action="store_true", help="really replace the current index")
    p.set_defaults(func=cmd_restore)


def _audit(args: argparse.Namespace, action: str, detail: str, *, restored: bool = False) -> int:
    """Record *action* in the audit trail; after a restore, also set the
    restored index's unfinished deletions aside (their number). A restored
    index older than the code is upgraded: the caller holds the data dir
    exclusively, so no server uses it."""
    from .app import Pacs
    from .audit import Event
    from .cli import creates_store, settings_from, setup_logging
    from .index import tombstones
    from .maintenance.common import os_user

    settings = settings_from(args)
    setup_logging(settings.log_level if not args.json else "WARNING")
    pacs = Pacs.open(settings, upgrade=restored, create_store=creates_store(args))
    try:
        set_aside = tombstones.set_aside_after_restore(pacs.engine) if restored else 0
        pacs.audit.record(Event(action=action, user=os_user(), protocol="cli", detail=detail))
        pacs.audit.flush()
        return set_aside
    finally:
        pacs.close()


def _signing_secret(settings: Any, *, problem: bool) -> str:
    """Where the signing secret is when the index holds sealed signing keys
    (backup), or why they cannot be opened with it (restore, *problem*); ""."""
    from sqlalchemy.exc import SQLAlchemyError

    from . import signing_keys
    from .index.db import create_index_engine

    engine = create_index_engine(settings.resolved_index_url, pool_size=0)
    try:
        if problem:
            return signing_keys.secret_problem(engine, settings) or ""
        return signing_keys.load_secret(settings).where if signing_keys.certificates_stored(engine) else ""
    except SQLAlchemyError:  # an index older than signing certificates: none to speak of
        return ""
    finally:
        engine.dispose()


def _report(args: argparse.Namespace, result: Any, verb: str) -> None:
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        out.print(f"{verb} {result.kind} index {result.path}: {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s")


def cmd_backup(args: argparse.Namespace) -> int:
    from .backup import BackupError, backup_index, backup_salt
    from .cli import settings_from

    settings = settings_from(args)
    try:
        result = backup_index(settings.resolved_index_url, args.out)
        result.salt = backup_salt(settings.data_dir, args.out)
        result.signing_secret = _signing_secret(settings, problem=False)
    except (BackupError, OSError) as exc:
        err.print(f"[red]backup failed:[/red] {exc}")
        return 1
    from .index.schema import SchemaError

    try:
        _audit(args, "backup", f"index backup to {result.path} ({result.bytes} bytes)"
               + (f", de-identification secret to {result.salt}" if result.salt else ""))
    except SchemaError as exc:
        # The backup is complete (the one to take before an upgrade, say); only
        # its audit event needs the current schema, which only `pacs db upgrade`
        # or `pacs serve` may bring: not a failed backup.
        err.print(f"[yellow]backup not audited:[/yellow] {exc}")
    _report(args, result, "backed up")
    if result.salt and not args.json:
        out.print(f"the de-identification secret is in {result.salt}: keep it with the backup (restore reads it "
                  "from there)")
    if result.signing_secret and not args.json:
        # Never beside the backup: with the index it seals, a PIN guessed offline opens every key.
        out.print(f"the signing secret ({result.signing_secret}) is NOT in the backup, on purpose: keep one copy "
                  "of it apart from the backups (a key escrow: the hospital's safe, not the backup disk); without "
                  "it, the radiologists import their certificates again after a restore on another machine")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import SALT_FILE, BackupError, restore_index, restore_salt
    from .cli import settings_from

    if not args.yes:
        err.print("restore replaces the whole index; stop `pacs serve`, then run again with --yes")
        return 2
    from .running import ServerRunning, hold_exclusively

    settings = settings_from(args)
    try:
        with hold_exclusively(settings.data_dir):
            result = restore_index(settings.resolved_index_url, args.backup, keep_dir=settings.data_dir)
            # The secret de-identified copies were made with, or the same
            # studies get other UIDs and the same patients other pseudonyms.
            result.salt, result.previous_salt = restore_salt(settings.data_dir, args.backup)
            # Still alone on the data dir: an older backup's schema is upgraded
            # here, or the restore would end in a SchemaError after its work.
            set_aside = _audit(args, "restore", f"index restored from {result.path}"
                               + (", with its de-identification secret" if result.salt else ""), restored=True)
            result.signing_secret_problem = _signing_secret(settings, problem=True)
    except (BackupError, ServerRunning, OSError) as exc:
        err.print(f"[red]restore failed:[/red] {exc}")
        return 1
    _report(args, result, "restored")
    if not args.json:
        if result.previous:
            out.print(f"the index it replaced is kept as {result.previous}")
        if result.salt:
            out.print(f"the de-identification secret is back in {result.salt}")
        if result.previous_salt:
            out.print(f"the data dir's other de-identification secret is kept as {result.previous_salt}")
        if not result.salt and not settings.deidentify_salt and not (Path(settings.data_dir) / SALT_FILE).exists():
            err.print("[yellow]the backup carries no de-identification secret[/yellow]: de-identified copies made "
                      "from now on get other UIDs and pseudonyms than before unless the old "
                      f"{SALT_FILE} is put in the data dir")
        if result.signing_secret_problem:
            from rich.markup import escape

            err.print(f"[yellow]signing certificates:[/yellow] {escape(result.signing_secret_problem)}")
        out.print("objects stored after the backup are now orphans: run `pacs verify --repair` to index them")
        if set_aside:
            out.print(f"{set_aside} objects of deletions under way at the backup's time are kept: `pacs verify "
                      "--repair` indexes them again (they may have been sent again since); delete them again if "
                      "they were not")
    return 0
