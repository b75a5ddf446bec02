"""``pacs activity``: the department's activity over a period (pacs.activity),
for the monthly report to the hospital. Registered by :func:`register` from
pacs.cli.

    pacs activity                                   # this month so far
    pacs activity --from 2026-11-01 --to 2026-11-30 --csv /srv/reports/2026-11
    pacs activity --from 2026-01-01 --to 2026-12-31 --json

``--csv DIR`` writes one file per table (exams, days, procedures, reads,
turnaround, waiting), UTF-8 with a byte order mark so that Excel keeps the
radiologists' Vietnamese names. Audited as a ``query`` by the operating
system account that ran it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cmd_activity(args: argparse.Namespace) -> int:
    """Run ``pacs activity``: 0 done, 2 a bad period or an unwritable folder."""
    from .activity import TABLES, Period, PeriodError, activity
    from .cli import _open, audit_command
    from .console import TextTable, fail, out
    from .timezones import hospital_now, hospital_zone

    pacs = _open(args)
    try:
        try:
            period = Period.parse(args.first or "", args.last or "", hospital_now(pacs.settings).date())
        except PeriodError as exc:
            fail(str(exc))
            return 2
        found = activity(pacs.engine, period, hospital_zone(pacs.settings))
        audit_command(pacs, "query", f"pacs activity {period.first} to {period.last}")
        if args.csv is not None:
            try:
                args.csv.mkdir(parents=True, exist_ok=True)
                for name in TABLES:
                    # newline="": the CSV's own CRLF line ends, untranslated.
                    (args.csv / f"{name}.csv").write_text(found.csv(name), encoding="utf-8", newline="")
            except OSError as exc:
                fail(f"cannot write the tables to {args.csv}: {exc}")
                return 2
        if args.json:
            print(json.dumps(found.as_dict(), ensure_ascii=False))
            return 0
        totals = found.totals
        out.print(f"{period.first} .. {period.last}: {totals['studies']} examinations "
                  f"({totals['instances']} instances, {totals['bytes'] / 1e9:.2f} GB), {totals['reads']} reads, "
                  f"{totals['amendments']} amendments, {totals['waiting']} waiting, "
                  f"{totals['critical']} critical results ({totals['critical_open']} not acknowledged)")
        for name, title in (("exams", "examinations (ca chụp) per modality and machine"),
                            ("procedures", "examinations per ordered procedure (dịch vụ kỹ thuật; empty: no order)"),
                            ("reads", "reads (ca đọc) per radiologist"),
                            ("turnaround", "turnaround, minutes from arrival to first signature"),
                            ("waiting", "examinations not signed yet")):
            header, rows = found.table(name)
            if not rows:
                continue
            table = TextTable(title=title)
            for column in header:
                table.add_column(column)
            for row in rows:
                table.add_row(*(str(v) for v in row))
            out.print(table)
        if args.csv is not None:
            out.print(f"tables written to {args.csv}: " + ", ".join(f"{n}.csv" for n in TABLES))
        return 0
    finally:
        pacs.close()


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add ``pacs activity`` to the `pacs` parser."""
    p = sub.add_parser("activity", help="the department's activity over a period: examinations per modality and "
                                        "machine, reads per radiologist, turnaround, waiting (thống kê)")
    common(p, json_flag=True)
    p.add_argument("--from", dest="first", metavar="YYYY-MM-DD", help="first day (default: the 1st of this month)")
    p.add_argument("--to", dest="last", metavar="YYYY-MM-DD", help="last day, included (default: today)")
    p.add_argument("--csv", type=Path, metavar="DIR", help="also write each table as DIR/NAME.csv (for Excel)")
    p.set_defaults(func=cmd_activity)
