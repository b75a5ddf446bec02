"""The radiologist's worklist at archive size: pacs.studylist.study_list
(the /api/worklist call) by report status, on the synthetic archive
(bench/synthetic.py) given the reports of a hospital that reports here.

    .venv/bin/python -m bench.worklist                      # SQLite, 100,000 studies
    .venv/bin/python -m bench.worklist --dbs sqlite,pg --calls 20

The reports: the newest 300 studies unread, the next 200 with a first draft,
every other one signed, one in a hundred of those with an amendment in
draft. Priorities (pacs.priority): one study in 50 STAT, one in 20 of the
others HIGH (an emergency department's share), the rest none; the default
order lists the urgent studies not yet reported first. Prints per filter the median and p95 milliseconds of --calls calls
(after two warm-up calls) and the total the list shows ("+": counted only so
far, see pacs.studylist.COUNT_AHEAD). The archive is cached as the other
benchmarks' are (bench/archive.py, $PACS_BENCH_CACHE).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from .archive import PgArchive, install_sqlite, sqlite_archive
from .query import percentile

UNREAD, DRAFTS, AMENDED_EVERY = 300, 200, 100

FILTERS: list[dict[str, Any]] = [
    {}, {"status": "unread"}, {"status": "draft"}, {"status": "signed"},
    {"status": "unread", "signed_only": True}, {"status": "signed", "signed_only": True},
    {"status": "unread", "modality": "CT"}, {"status": "signed", "name": "NGUYEN VAN AN"},
    # The reading worklist's own (the radiologist's default counts the urgent ones too).
    {"count_urgent": True}, {"sort": "date"}, {"sort": "waiting"}, {"priority": "urgent"},
    {"priority": "stat", "status": "unread"}, {"priority": "routine"}, {"claimed_by": "bs.an"},
    {"offset": 1000},
]
STAT_EVERY, HIGH_EVERY = 50, 20

# Positions in the newest-first order; the reports' triggers set each study's state.
_REPORTS = f"""
WITH ordered AS (
    SELECT pk, row_number() OVER (ORDER BY study_date DESC, study_time DESC, pk DESC) AS i FROM studies)
INSERT INTO reports (study_pk, version, status, findings, impression, author, created_at, updated_at, signed_by,
                     pdf_sop_uid, revision)
SELECT pk, :version, CASE WHEN :version = 2 OR i <= {UNREAD + DRAFTS} THEN 'draft' ELSE 'signed' END,
       '', '', 'bench', :now, :now, '', '', 1
FROM ordered WHERE i > {UNREAD} AND (:version = 1 OR (i > {UNREAD + DRAFTS} AND i % {AMENDED_EVERY} = 7))
"""


def add_reports(url: str) -> None:
    """Reports as described above, and the planner's statistics after them."""
    from pacs.index import create_index_engine

    engine = create_index_engine(url)
    try:
        with engine.begin() as conn:
            for version in (1, 2):
                conn.execute(text(_REPORTS), {"version": version, "now": "2026-12-01 00:00:00"})
            conn.execute(text(f"UPDATE studies SET priority = CASE WHEN pk % {STAT_EVERY} = 0 THEN 'STAT' "
                              f"WHEN pk % {HIGH_EVERY} = 3 THEN 'HIGH' ELSE '' END"))
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
    finally:
        engine.dispose()


def time_calls(url: str, calls: int, filters: list[dict[str, Any]], show: Any = str) -> list[list[str]]:
    """Per filter: *show*(filter), p50 and p95 ms of *calls* study_list calls, the total shown."""
    from pacs.index import create_index_engine
    from pacs.studylist import study_list

    engine = create_index_engine(url)
    rows = []
    try:
        for found in filters:
            for _ in range(2):
                listed = study_list(engine, **found)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                study_list(engine, **found)
                times.append((time.perf_counter() - start) * 1000)
            total = f"{listed['total']:,}{'' if listed['total_exact'] else '+'}"
            rows.append([show(found), f"{statistics.median(times):.1f}", f"{percentile(times, 0.95):.1f}", total])
    finally:
        engine.dispose()
    return rows


def on_each_db(dbs: str, studies: int, work: Any, log: Any) -> list[list[str]]:
    """*work*(url) on a copy of the archive in each of *dbs* (sqlite, pg), its rows prefixed with the db."""
    results: list[list[str]] = []
    for db in dbs.split(","):
        if db == "sqlite":
            data = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
            try:
                install_sqlite(sqlite_archive(studies, 1, log), data)
                results += [[db, *row] for row in work(f"sqlite:///{data}/index.sqlite")]
            finally:
                shutil.rmtree(data, ignore_errors=True)
        else:
            with PgArchive(studies, 1, log) as archive:
                results += [[db, *row] for row in work(archive.copy())]
    return results


def run(doc: str, column: str, title: Any, work: Any) -> None:
    """The command line of a study-list benchmark: *work*(args, url) timed on
    each database asked, one table printed, headed *title*(args)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--dbs", default="sqlite")
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = on_each_db(args.dbs, args.studies, lambda url: work(args, url), log)
    print(f"\n## {title(args)}, median of {args.calls} calls")
    print(f"| db | {column} | p50 ms | p95 ms | total shown |")
    print("|---|---|---|---|---|")
    for row in results:
        print("| " + " | ".join(row) + " |")


def _work(args: argparse.Namespace, url: str) -> list[list[str]]:
    add_reports(url)
    return time_calls(url, args.calls, FILTERS, lambda f: " ".join(f"{k}={v}" for k, v in f.items()) or "(none)")


if __name__ == "__main__":
    run(__doc__, "filters", lambda a: f"Worklist by report status, {a.studies:,} studies ({UNREAD} unread, "
        f"{DRAFTS} first drafts, 1 in {AMENDED_EVERY} signed amended)", _work)
