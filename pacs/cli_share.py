"""``pacs share``: patient share links from the command line (pacs.shares).
Registered by :func:`register` from pacs.cli.

    pacs share create 1.2.840.113619.2.55.3.1 --days 30 --qr receipt.png
    pacs share list --study 1.2.840.113619.2.55.3.1
    pacs share revoke 12

The link's URL is public_url (PACS_PUBLIC_URL) + /share/TOKEN; without
public_url only the path is known here, and the command says so. Every
creation, listing and revocation is audited as the operating system
account that ran it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

QR_KINDS = (".svg", ".png")


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value is not None else ""


def cmd_share(args: argparse.Namespace) -> int:
    """Run ``pacs share create|list|revoke``: 0 done, 1 no such study or
    link, 2 bad input (nothing made)."""
    from . import shares
    from .cli import _open, audit_command
    from .console import fail

    if args.share_command == "create" and args.qr is not None:
        problem = _qr_path_problem(args.qr)
        if problem:
            fail(f"--qr {args.qr}: {problem}")
            return 2
    pacs = _open(args)
    try:
        if args.share_command == "create":
            return _create(pacs, args)
        if args.share_command == "list":
            return _list(pacs, args)
        try:
            found, done = shares.revoke(pacs.engine, args.link_id, _os_user())
        except shares.ShareError as exc:
            audit_command(pacs, "share-revoke", f"share link {args.link_id}: {exc}", "failure")
            fail(exc)
            return 1
        detail = (f"share link {found.id} revoked" if done else
                  f"share link {found.id} was revoked already (by {found.revoked_by}, {_when(found.revoked_at)} UTC)")
        audit_command(pacs, "share-revoke", detail, study_uid=found.study_uid)
        if args.json:
            print(json.dumps({**found.as_dict(), "revoked_now": done}))
        else:
            print(detail)
        return 0
    finally:
        pacs.close()


def _qr_path_problem(path: Path) -> str:
    """Why the QR code cannot be written to *path* ("" when it can):
    checked before the link is made, since its URL is shown only once and
    a link whose QR code failed would stay active with no one to hand it."""
    if path.suffix.lower() not in QR_KINDS:
        return "the file must end in .svg or .png"
    if path.is_dir():
        return "is a folder: give the file's name (e.g. receipt.png)"
    folder = path.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "cannot be written here (permissions)"
    return ""


def _os_user() -> str:
    from .maintenance.common import os_user

    return os_user()


def _create(pacs: Any, args: argparse.Namespace) -> int:
    from . import shares
    from .cli import audit_command
    from .console import err, fail

    settings = pacs.settings
    base = (settings.public_url or "").rstrip("/")
    if args.qr is not None and not base:
        # A QR code of a path alone opens nothing on a phone.
        fail("--qr needs the address patients reach the server at: set public_url (PACS_PUBLIC_URL, "
             "e.g. https://pacs.benhvien.vn)")
        return 2
    try:
        days = shares.days_asked(args.days, settings.share_days, settings.share_days_max)
    except shares.ShareError as exc:
        fail(exc)
        return 2
    try:
        new = shares.create(pacs.engine, args.study, _os_user(), days=days)
    except shares.ShareError as exc:
        audit_command(pacs, "share-create", f"pacs share create, {days} days: {exc}", "failure",
                      study_uid=args.study)
        fail(exc)
        return 1
    url = new.url(base)
    audit_command(pacs, "share-create", f"share link {new.link.id} made, {days} days, until "
                  f"{_when(new.link.expires_at)} UTC (pacs share create)", study_uid=args.study)
    if args.qr is not None:
        try:
            shares.write_qr(url, str(args.qr))
        except OSError as exc:
            # Checked before, yet failed (the disk full): the link, never shown, must not stay active.
            shares.revoke(pacs.engine, new.link.id, _os_user())
            audit_command(pacs, "share-revoke", f"share link {new.link.id} revoked: its QR code could not be "
                          f"written ({exc.strerror or exc})", study_uid=args.study)
            fail(f"--qr {args.qr}: {exc.strerror or exc}; the link made is revoked")
            return 1
    if args.json:
        print(json.dumps({"id": new.link.id, "study_uid": args.study, "url": url, "path": new.path,
                          "absolute": bool(base), "expires_at": new.link.expires_at.isoformat(),
                          "qr": str(args.qr) if args.qr is not None else None}))
        return 0
    # Plain print: the URL must stay one whole line to copy (rich would wrap it).
    print(url)
    if not base:
        err.print("note: public_url (PACS_PUBLIC_URL) is not set, so this is the link's path only: put the "
                  "address patients reach the server at in front of it (e.g. https://pacs.benhvien.vn" + new.path
                  + "), or set public_url", soft_wrap=True, markup=False)
    if args.qr is not None:
        print(f"QR code written to {args.qr}")
    print(f"expires {_when(new.link.expires_at)} UTC; link id {new.link.id} (pacs share revoke {new.link.id})")
    return 0


def _list(pacs: Any, args: argparse.Namespace) -> int:
    from . import shares
    from .cli import audit_command
    from .console import TextTable, out

    found = shares.links(pacs.engine, args.study)
    audit_command(pacs, "query", f"pacs share list{' --study ' + args.study if args.study else ''}: "
                  f"{len(found)} links", study_uid=args.study or "")
    if args.json:
        print(json.dumps([f.as_dict() for f in found]))
        return 0
    table = TextTable(title=f"share links ({len(found)}, newest first)")
    for column in ("id", "study", "state", "created by", "created (UTC)", "expires (UTC)", "uses", "last used"):
        table.add_column(column)
    for f in found:
        table.add_row(str(f.id), f.study_uid, f.state(), f.created_by, _when(f.created_at), _when(f.expires_at),
                      str(f.uses), _when(f.last_used_at))
    out.print(table)
    return 0


def _link_id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share link id (pacs share list)")
    return int(text)


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs share`` to the `pacs` parser."""
    p = sub.add_parser("share", help="links that show a study to its patient without an account (QR code)")
    s_sub = p.add_subparsers(dest="share_command", required=True)

    q = s_sub.add_parser("create", help="make a link to a study; prints its URL (the token is not kept: "
                                        "this is the only time it is shown)")
    common(q, json_flag=True)
    # A UID pasted from a report or a viewer often carries a space or a newline.
    q.add_argument("study", type=str.strip, metavar="STUDY_UID", help="the study's Study Instance UID")
    q.add_argument("--days", type=int, help="days the link lasts (default share_days, at most share_days_max)")
    q.add_argument("--qr", type=Path, metavar="FILE", help="write the link's QR code to FILE (.svg or .png)")

    q = s_sub.add_parser("list", help="share links, newest first (never their tokens)")
    common(q, json_flag=True)
    q.add_argument("--study", type=str.strip, metavar="STUDY_UID", help="only the links of this study")

    q = s_sub.add_parser("revoke", help="revoke a link: it answers 410 from now on")
    common(q, json_flag=True)
    q.add_argument("link_id", type=_link_id, metavar="ID", help="the link's id (pacs share list)")
    p.set_defaults(func=cmd_share)
