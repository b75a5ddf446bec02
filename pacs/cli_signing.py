"""``pacs user certificate`` and ``pacs report verify``: the digital signature
of reports (chữ ký số). Registered from pacs.cli.

    pacs user certificate import USER FILE.p12     (asks the PKCS#12 password, then the signing PIN)
    pacs user certificate show USER [--json]
    pacs user certificate remove USER
    pacs report verify STUDY_UID [--version N] [--json]

Without a terminal, the secrets are read from standard input, one a line:
the PKCS#12 password, then the PIN (no second line: the PKCS#12 password is
the PIN). They are never taken from the command line, where ``ps`` and the
shell's history would show them. Imports and removals are audited
(certificate-import, certificate-remove); a verification is a read of the
report (view).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .console import fail


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _secrets(ask_pin: bool) -> tuple[str, str | None]:
    """The PKCS#12 password and the PIN chosen (None: the password)."""
    if sys.stdin.isatty():
        password = getpass.getpass("PKCS#12 password: ")
        if not ask_pin:
            return password, None
        pin = getpass.getpass("PIN for signing reports (at least 6 characters; Enter: the PKCS#12 password): ")
        # Compared as signing compares them: NFC (a Vietnamese PIN typed precomposed or not).
        if pin and _nfc(getpass.getpass("The PIN again: ")) != _nfc(pin):
            raise ValueError("the two PINs differ")
        return password, pin or None
    lines = sys.stdin.read().splitlines()
    password = lines[0] if lines else ""
    pin = lines[1] if ask_pin and len(lines) > 1 and lines[1] else None
    return password, pin


def _print_info(info: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.as_dict(), ensure_ascii=False))
        return
    print(f"signing certificate of {info.username}")
    print(f"  subject  {info.subject}")
    print(f"  issuer   {info.issuer}")
    print(f"  serial   {info.serial}")
    print(f"  valid    {info.not_before:%Y-%m-%d %H:%M} to {info.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"  sha256   {info.sha256}")
    print(f"  imported {info.imported_at:%Y-%m-%d %H:%M} UTC by {info.imported_by}")
    if info.locked_until is not None:
        print(f"  signing locked by wrong PINs until {info.locked_until:%Y-%m-%d %H:%M} UTC")


def cmd_certificate(args: argparse.Namespace) -> int:
    """``pacs user certificate import|show|remove``: 0 done, 1 nothing to show
    or remove, 2 refused (nothing stored)."""
    from . import signing_keys
    from .cli import _open, audit_command
    from .maintenance.common import os_user

    command = args.certificate_command
    if command == "import":
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            fail(f"error: {args.file}: {exc.strerror}")
            return 2
        try:
            password, pin = _secrets(ask_pin=not args.pin_is_password)
        except ValueError as exc:
            fail(f"error: {exc}")
            return 2
    pacs = _open(args)
    try:
        if command == "import":
            secret_path = signing_keys.secret_file(pacs.settings)
            had_secret = pacs.settings.signing_secret or secret_path.exists()
            try:
                info = signing_keys.import_pkcs12(pacs.engine, args.username, data, password, pin, os_user(),
                                                  settings=pacs.settings, new_secret=args.new_secret)
            except signing_keys.SigningKeyError as exc:
                audit_command(pacs, "certificate-import", f"certificate of {args.username} from "
                              f"{args.file.resolve()} refused: {exc}", "failure")
                fail(f"refused: {exc}")
                return 2
            audit_command(pacs, "certificate-import", f"certificate {info.subject} (serial {info.serial}, issuer "
                          f"{info.issuer}, valid until {info.not_after:%Y-%m-%d}) for {args.username}")
            _print_info(info, args.json)
            if not had_secret and secret_path.exists():
                # Made now: the index's keys are useless without it, and backups leave it out.
                print(f"the signing secret was made in {secret_path} (mode 0600): keep a copy apart from the "
                      "backups (pacs backup leaves it out), and give every node of a scale-out the same file or "
                      "PACS_SIGNING_SECRET", file=sys.stderr)
            return 0
        if command == "show":
            found = signing_keys.show(pacs.engine, args.username)
            if found is None:
                fail(f"{args.username} has no signing certificate")
                return 1
            _print_info(found, args.json)
            return 0
        try:
            removed = signing_keys.remove(pacs.engine, args.username)
        except signing_keys.SigningKeyError as exc:
            fail(f"refused: {exc}")
            return 2
        audit_command(pacs, "certificate-remove", f"signing certificate of {args.username} removed" if removed
                      else f"{args.username} had no signing certificate", "success" if removed else "failure")
        print(json.dumps({"removed": removed}) if args.json else
              ("removed" if removed else f"{args.username} had no signing certificate"))
        return 0 if removed else 1
    finally:
        pacs.close()


def _verdict(found: dict[str, Any]) -> str:
    if not found["signed"]:
        return "NOT digitally signed" if found["signed"] is False else "BROKEN: " + found.get("problem", "")
    if not found["intact"]:
        return "BROKEN: " + found.get("problem", "the PDF was changed after it was signed")
    return "intact, trusted" if found["trusted"] else "intact, NOT trusted (no chain to report_trust_roots)"


def cmd_report(args: argparse.Namespace) -> int:
    """``pacs report verify``: 0 signed and intact, 1 not signed, broken or no signed report."""
    from .cli import _open, audit_command
    from .reports import ReportError, ReportService

    pacs = _open(args)
    try:
        try:
            found = ReportService(pacs).signature(args.study, args.version)
        except ReportError as exc:
            audit_command(pacs, "view", f"pacs report verify {args.study}: {exc}", "failure", study_uid=args.study)
            fail(f"{args.study}: {exc}")
            return 1
        audit_command(pacs, "view", f"pacs report verify {args.study}: report v{found['version']} {_verdict(found)}",
                      study_uid=args.study)
    finally:
        pacs.close()
    if args.json:
        print(json.dumps(found, ensure_ascii=False))
    else:
        print(f"report v{found['version']} of {args.study}, signed by {found['signed_by']}: {_verdict(found)}")
        for s in found["signatures"]:
            valid = {True: "valid", False: "NOT valid", None: "unknown"}[s.get("certificate_valid_at_signing")]
            print(f"  {s['kind']} signature {s['field']}: {s.get('signer', '?')} ({s.get('signer_subject', '')})")
            print(f"    issuer {s.get('issuer', '')}, serial {s.get('serial', '')}")
            print(f"    signed {s['signing_time']} ({s['time_source']}); certificate {valid} then")
            print(f"    {'intact' if s['intact'] else 'BROKEN'}, {'trusted' if s['trusted'] else 'not trusted'}"
                  + (f": {s['problem']}" if s.get("problem") else ""))
    return 0 if found["signed"] and found["intact"] else 1


def register_user_certificate(users: Any, common: Callable[..., None]) -> None:
    """Add ``pacs user certificate`` under the `user` command's subcommands."""
    p = users.add_parser("certificate", help="a radiologist's certificate for the digital signature of reports "
                                             "(PKCS#12; the key is kept encrypted under their PIN)")
    c_sub = p.add_subparsers(dest="certificate_command", required=True)
    q = c_sub.add_parser("import", help="import USER's PKCS#12 (.p12/.pfx): asks its password, then the PIN the "
                                        "radiologist will sign with (Enter: the PKCS#12 password)")
    common(q, json_flag=True)
    q.add_argument("username")
    q.add_argument("file", type=Path)
    q.add_argument("--pin-is-password", action="store_true",
                   help="the PKCS#12 password is the PIN (asks no PIN)")
    q.add_argument("--new-secret", action="store_true",
                   help="the signing secret other certificates were sealed with is lost (a restore on a new "
                        "machine): seal this one with this server's own; the others are imported again")
    for name in ("show", "remove"):
        q = c_sub.add_parser(name, help="the stored certificate (subject, issuer, serial, validity)"
                             if name == "show" else "forget USER's certificate and key")
        common(q, json_flag=True)
        q.add_argument("username")
    p.set_defaults(func=cmd_certificate)


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs report verify`` to the `pacs` parser."""
    p = sub.add_parser("report", help="signed reports: verify the digital signature of a report's PDF")
    r_sub = p.add_subparsers(dest="report_command", required=True)
    q = r_sub.add_parser("verify", help="the digital signature of the study's signed report PDF: signer, certificate "
                                        "validity at signing, integrity, trust (exit 1: unsigned or broken)")
    common(q, json_flag=True)
    q.add_argument("study", help="Study Instance UID")
    q.add_argument("--version", type=int, help="that report version (default: the latest signed)")
    p.set_defaults(func=cmd_report)
