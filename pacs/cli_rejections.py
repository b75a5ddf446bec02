"""``pacs rejections``: the instances rejection notes withdrew, which the
ingest refuses when they come again (pacs.rejections). Registered by
:func:`register` from pacs.cli.

    pacs rejections list --study 1.2.840.113619.2.55.3.1
    pacs rejections lift --study 1.2.840.113619.2.55.3.1 --reason "resent corrected, same UIDs" --yes
    pacs rejections lift 1.2.3.4.5 1.2.3.4.6 --reason "rejected by mistake" --yes
    pacs rejections reject --study 1.2.840.113619.2.55.3.1 --code 113038 --reason "sent under BN1023" --yes

``reject`` withdraws images with a rejection note made here
(pacs.rejection_notes), for a modality that cannot send one. ``lift`` and
``reject`` without ``--yes`` only show what they would do. Listing and
lifting are audited as the operating system account that ran them, in the
trail of each study named; a rejection's deletions likewise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

LIST_LIMIT = 1000


def cmd_rejections(args: argparse.Namespace) -> int:
    """Run ``pacs rejections list|lift``: 0 done (or a dry run), 2 bad usage."""
    from . import rejections
    from .cli import _open, audit_command
    from .console import TextTable, err, fail, out

    if args.rejections_command == "lift":
        if not args.study and not args.sop_uids:
            fail("name the study (--study UID) or the instances (SOP Instance UIDs) whose rejection to lift")
            return 2
        if not " ".join(args.reason.split()):
            fail("--reason must say why (it goes to the audit trail)")
            return 2
    pacs = _open(args)
    try:
        if args.rejections_command == "reject":
            return _reject(pacs, args, err)
        if args.rejections_command == "list":
            found, total = rejections.rejected(pacs.engine, args.study, LIST_LIMIT)
            audit_command(pacs, "query", f"pacs rejections list{' --study ' + args.study if args.study else ''}: "
                          f"{total} rejected instances", study_uid=args.study)
            if args.json:
                print(json.dumps({"total": total, "rejected": [f.as_dict() for f in found]}))
                return 0
            shown = f", newest {len(found)}" if total > len(found) else ""
            table = TextTable(title=f"rejected instances ({total}{shown})")
            for column in ("SOP Instance UID", "study", "reason", "by", "rejected (UTC)", "note"):
                table.add_column(column)
            for f in found:
                table.add_row(f.sop_uid, f.study_uid, f"{f.reason} ({f.code})", f.rejected_by,
                              f"{f.rejected_at:%Y-%m-%d %H:%M}", f.note_uid)
            out.print(table)
            return 0
        return _lift(pacs, args, audit_command, err)
    finally:
        pacs.close()


def _lift(pacs: Any, args: argparse.Namespace, audit_command: Callable[..., None], err: Any) -> int:
    from . import rejections

    from .maintenance.common import os_user

    lifted = rejections.lift(pacs.engine, by=os_user(), study_uid=args.study, sop_uids=args.sop_uids,
                             dry_run=not args.yes)
    if not args.yes:
        _show(args, lifted, dry_run=True)
        err.print("nothing lifted: add --yes to lift")
        return 0
    reason = " ".join(args.reason.split())
    by_study: dict[str, list[str]] = {}
    for entry in lifted:
        by_study.setdefault(entry.study_uid, []).append(entry.sop_uid)
    for study, sops in sorted(by_study.items()):
        audit_command(pacs, "rejection-lift", f"{len(sops)} rejected instances may be received again "
                      f"({sops[0]}{' and more' if len(sops) > 1 else ''}); reason: {reason}", study_uid=study)
    if not lifted:
        audit_command(pacs, "rejection-lift", f"nothing to lift (no rejected instance named); reason: {reason}",
                      study_uid=args.study)
    _show(args, lifted, dry_run=False)
    return 0


def _reject(pacs: Any, args: argparse.Namespace, err: Any) -> int:
    """``pacs rejections reject``: 0 done (or a dry run), 1 some instances kept, 2 refused."""
    from .cli import audit_command
    from .errors import RefusedRequest
    from .header import valid_uid
    from .key_images import Author
    from .maintenance.common import os_user
    from .rejection_notes import reject

    try:
        selection, done = reject(pacs, Author(os_user(), role="admin", protocol="cli"), study_uid=args.study,
                                 series_uid=args.series, sop_uids=args.sop_uids, code=args.code,
                                 reason=args.reason, dry_run=not args.yes)
    except RefusedRequest as exc:
        err.print(f"[red]not rejected: {exc}[/red]")
        if args.yes:  # as the JSON API's refusals are
            audit_command(pacs, "reject", f"refused ({exc.http_status}): {exc}", outcome="failure",
                          study_uid=args.study if valid_uid(args.study) else "")
        return 2
    data = selection.answer(done)
    if args.json:
        print(json.dumps(data))
    else:
        verb = "would reject" if done is None else "rejected"
        print(f"{verb} {selection.instances} instances of study {selection.study_uid} "
              f"(patient {selection.patient_id}): {data['reason']} ({selection.code})")
        for series in data["series"]:
            print(f"  series {series['series_uid']}: {series['instances']} instances")
        if done is None:
            err.print("nothing rejected: add --yes to reject")
        else:
            print(f"rejection note {done.note_uid}: {done.deleted} instances withdrawn"
                  + "".join(f"; kept: {why}" for why in done.refused))
    if done is not None:
        audit_command(pacs, "reject", done.summary, study_uid=selection.study_uid)
        # No patient_id: the audit names the study's patient with their issuer (patient_cx), as the deletions.
    return 1 if done is not None and done.refused else 0


def _show(args: argparse.Namespace, entries: list[Any], *, dry_run: bool) -> None:
    if args.json:
        print(json.dumps({"dry_run": dry_run, "lifted": [e.as_dict() for e in entries]}))
        return
    verb = "would lift" if dry_run else "lifted"
    print(f"{verb} the rejection of {len(entries)} instances")
    for e in entries:
        print(f"  {e.sop_uid} (study {e.study_uid}; {e.reason}, by {e.rejected_by})")


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs rejections`` to the `pacs` parser."""
    p = sub.add_parser("rejections", help="instances withdrawn by rejection notes, refused when sent again")
    r_sub = p.add_subparsers(dest="rejections_command", required=True)
    q = r_sub.add_parser("list", help=f"rejected instances, newest first (at most {LIST_LIMIT})")
    common(q, json_flag=True)
    q.add_argument("--study", type=str.strip, default="", metavar="STUDY_UID", help="only this study's")
    q = r_sub.add_parser("lift", help="let rejected instances be received again (a dry run unless --yes)")
    common(q, json_flag=True)
    q.add_argument("sop_uids", nargs="*", type=str.strip, metavar="SOP_UID", help="the instances' SOP Instance UIDs")
    q.add_argument("--study", type=str.strip, default="", metavar="STUDY_UID", help="every rejected instance of it")
    q.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    q.add_argument("--yes", action="store_true", help="really lift")
    q = r_sub.add_parser("reject", help="withdraw images with a rejection note made here (a dry run unless --yes)")
    common(q, json_flag=True)
    q.add_argument("sop_uids", nargs="*", type=str.strip, metavar="SOP_UID", help="only these instances")
    q.add_argument("--study", type=str.strip, required=True, metavar="STUDY_UID", help="the study")
    q.add_argument("--series", type=str.strip, default="", metavar="SERIES_UID", help="only this series")
    q.add_argument("--code", default="", help="113001 Rejected for Quality Reasons (default), 113037 Rejected for "
                   "Patient Safety Reasons, 113038 Incorrect Modality Worklist Entry, 113039 Data Retention "
                   "Policy Expired (the code or its meaning)")
    q.add_argument("--reason", required=True, help="what happened (kept in the note and the audit trail)")
    q.add_argument("--yes", action="store_true", help="really reject")
    p.set_defaults(func=cmd_rejections)
