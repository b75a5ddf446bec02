"""``pacs share``: patient share links from the command line (pacs.shares).
Registered by :func:`register` from pacs.cli.

    pacs share create 1.2.840.113619.2.55.3.1 --days 30 --qr receipt.png
    pacs share create --accession CT2612070001 --qr receipt.png
    pacs share list --study 1.2.840.113619.2.55.3.1
    pacs share list --accession CT2612070001
    pacs share revoke 12

``--accession`` makes the link for an order before its images exist (the
receipt printed at registration): it shows the order's studies when they
come (pacs.shares.create_for_order).

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

    if args.share_command == "create" and (args.study is None) == (args.accession is None):
        fail("give the study's STUDY_UID or --accession ACCESSION (an order before its images), one of them")
        return 2
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
        audit_command(pacs, "share-revoke", detail, study_uid=found.audit_study,
                      patient_id=found.patient if found.accession else "")
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
    # What the events name: the study, or the order's study UID and patient (no study may exist yet).
    order = shares.find_order(pacs.engine, args.accession) if args.accession is not None else None
    named = {"study_uid": order.study_uid, "patient_id": order.patient} if order else {"study_uid": args.study or ""}
    what = f"pacs share create{' --accession ' + args.accession if args.accession is not None else ''}"
    try:
        if args.accession is not None:
            new = shares.create_for_order(pacs.engine, args.accession, _os_user(), days=days)
        else:
            new = shares.create(pacs.engine, args.study, _os_user(), days=days)
    except shares.ShareError as exc:
        audit_command(pacs, "share-create", f"{what}, {days} days: {exc}", "failure", **named)
        fail(exc)
        return 1
    url = new.url(base)
    target = f" for order {args.accession}" if args.accession is not None else ""
    audit_command(pacs, "share-create", f"share link {new.link.id} made{target}, {days} days, until "
                  f"{_when(new.link.expires_at)} UTC ({what})", **named)
    if args.qr is not None:
        try:
            shares.write_qr(url, str(args.qr))
        except OSError as exc:
            # Checked before, yet failed (the disk full): the link, never shown, must not stay active.
            shares.revoke(pacs.engine, new.link.id, _os_user())
            audit_command(pacs, "share-revoke", f"share link {new.link.id} revoked: its QR code could not be "
                          f"written ({exc.strerror or exc})", **named)
            fail(f"--qr {args.qr}: {exc.strerror or exc}; the link made is revoked")
            return 1
    if args.json:
        made: dict[str, Any] = {"id": new.link.id, "study_uid": args.study or new.link.order_study_uid}
        if args.accession is not None:
            made["accession"] = args.accession
        print(json.dumps({**made, "url": url, "path": new.path, "absolute": bool(base),
                          "expires_at": new.link.expires_at.isoformat(),
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
    from .share_orders import WITHDRAWN

    found = shares.links(pacs.engine, args.study, accession=args.accession)
    order = shares.find_order(pacs.engine, args.accession) if args.accession else None
    scope = (f" --study {args.study}" if args.study else "") + (f" --accession {args.accession}" if args.accession
                                                                 else "")
    audit_command(pacs, "query", f"pacs share list{scope}: {len(found)} links",
                  study_uid=args.study or (order.study_uid if order else ""),
                  patient_id=order.patient if order and not args.study else "")
    if args.json:
        print(json.dumps([f.as_dict() for f in found]))
        return 0
    table = TextTable(title=f"share links ({len(found)}, newest first)")
    for column in ("id", "study or order", "state", "created by", "created (UTC)", "expires (UTC)", "uses",
                   "last used"):
        table.add_column(column)
    for f in found:
        state = "order cancelled" if f.state() == "active" and f.order_status in WITHDRAWN else f.state()
        table.add_row(str(f.id), f.study_uid or f"order {f.accession}", state, f.created_by, _when(f.created_at),
                      _when(f.expires_at), str(f.uses), _when(f.last_used_at))
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

    q = s_sub.add_parser("create", help="make a link to a study, or to an order before its images; prints its URL "
                                        "(the token is not kept: this is the only time it is shown)")
    common(q, json_flag=True)
    # A UID pasted from a report or a viewer often carries a space or a newline.
    q.add_argument("study", type=str.strip, nargs="?", metavar="STUDY_UID", help="the study's Study Instance UID")
    q.add_argument("--accession", type=str.strip, metavar="ACCESSION",
                   help="instead of a study: the order's accession number (the receipt printed before the scan; "
                        "the link shows the order's studies when they come)")
    q.add_argument("--days", type=int, help="days the link lasts (default share_days, at most share_days_max)")
    q.add_argument("--qr", type=Path, metavar="FILE", help="write the link's QR code to FILE (.svg or .png)")

    q = s_sub.add_parser("list", help="share links, newest first (never their tokens)")
    common(q, json_flag=True)
    q.add_argument("--study", type=str.strip, metavar="STUDY_UID",
                   help="only the links that show this study (its own and its orders')")
    q.add_argument("--accession", type=str.strip, metavar="ACCESSION", help="only the links of this order")

    q = s_sub.add_parser("revoke", help="revoke a link: it answers 410 from now on")
    common(q, json_flag=True)
    q.add_argument("link_id", type=_link_id, metavar="ID", help="the link's id (pacs share list)")
    p.set_defaults(func=cmd_share)
