"""``pacs critical list``: the critical results (kết quả nguy kịch,
pacs.critical_results) for the hospital's IT person and its quality office,
as ``GET /api/critical`` lists them (the same query). Registered by
:func:`register` from pacs.cli.

    pacs critical list                          # open ones, the longest waiting first
    pacs critical list --state acknowledged     # who was told, how and when; newest first
    pacs critical list --state all --json

Audited as a ``query`` by the operating system account that ran it, one
event per study shown (with its patient), as the HTTP listing is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Results listed when --limit is not given: GET /api/critical's default.
DEFAULT_LIMIT = 100


def cmd_critical(args: argparse.Namespace) -> int:
    """Run ``pacs critical list``: 0 (argparse refuses a bad state or limit with 2)."""
    from .cli import _open, audit_command
    from .critical_results import listing
    from .timezones import shown

    pacs = _open(args)
    try:
        found, total = listing(pacs.engine, args.state, args.limit)
        detail = f"pacs critical list --state {args.state}: {total} critical results"
        # One event per study shown, so that `pacs audit --study UID` finds it (its patient filled in).
        for study in dict.fromkeys(c.study_uid for c in found) or [""]:
            audit_command(pacs, "query", detail, study_uid=study)
        now = datetime.now(UTC)
        if args.json:
            print(json.dumps({"state": args.state, "total": total,
                              "critical": [c.listed(now) for c in found]},
                             ensure_ascii=False))
            return 0
        # Plain lines, not a table: a table folds UIDs and notes at the terminal's width.
        what = "" if args.state == "all" else f"{args.state} "
        if not found:
            print(f"no {what}critical results")
            return 0
        order = "oldest first" if args.state == "open" else "newest first"
        more = f", the first {len(found)} shown (--limit)" if total > len(found) else ""
        print(f"{total} {what}critical results ({order}{more})")
        for c in found:
            minutes = c.minutes_open(now)
            since = (f"acknowledged after {minutes} min" if c.acknowledged_at is not None
                     else f"{minutes} min open")
            print()
            print("  ".join([c.accession or "(no accession)", c.patient_id, c.patient_name, c.modality, since]))
            print(f"  study {c.study_uid}, report version {c.version}")
            print(f"  signed by {c.flagged_by} at {shown(c.flagged_at, pacs.settings)}")
            if c.note:
                print(f"  note: {c.note}")
            if c.acknowledged_at is not None:
                print(f"  acknowledged by {c.acknowledged_by} at {shown(c.acknowledged_at, pacs.settings)}: "
                      f"{c.acknowledgement}")
        return 0
    finally:
        pacs.close()


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs critical`` to the `pacs` parser."""
    from .cli import _at_least
    from .critical_results import STATES

    p = sub.add_parser("critical", help="critical results (kết quả nguy kịch): open ones, who was told and how")
    s = p.add_subparsers(dest="critical_command", required=True)
    q = s.add_parser("list", help="open critical results, the longest waiting first (or the acknowledged ones, "
                                  "with who was told, how and when)")
    common(q, json_flag=True)
    q.add_argument("--state", choices=STATES, default="open",
                   help="open (default: not acknowledged yet, oldest first), acknowledged or all (newest first)")
    q.add_argument("--limit", type=_at_least(1), default=DEFAULT_LIMIT, metavar="N",
                   help=f"results listed (default {DEFAULT_LIMIT}); the total is always counted")
    p.set_defaults(func=cmd_critical)
