"""bench/activity: how long `pacs activity` (pacs.activity) takes on a large
archive, the department's monthly and yearly figures.

Bulk-loads a synthetic archive (default 100,000 studies over five years)
into SQLite and PostgreSQL, signs a report for most studies (synthetic rows:
signed a few hours after arrival, one in twenty amended, one in fifty
flagged critical and most of those acknowledged), then times
:func:`pacs.activity.activity` for one month and for one year. Prints
p50/min/max over --repeat runs and what each period holds.

Run: .venv/bin/python -m bench.activity [--studies 100000] [--repeat 5] [--dbs sqlite,pg]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from .common import ROOT  # noqa: F401  (puts the repo on sys.path)
from .synthetic import LoadSpec, load

from sqlalchemy import insert, select  # noqa: E402

from pacs.activity import Period, activity  # noqa: E402
from pacs.index import create_index_engine, upgrade_schema  # noqa: E402
from pacs.index.models import CriticalResult, Report, Study  # noqa: E402
from tests.peers import create_database, drop_database  # noqa: E402

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
RADIOLOGISTS = ["Nguyễn^Văn An", "Trần^Thị Bình", "Lê^Văn Cường", "Phạm^Thị Dung", "Đỗ^Thanh Tùng"]


def sign_reports(engine: object, rng: random.Random, batch: int = 20_000) -> int:
    """Signed reports for 90% of the studies (synthetic rows); how many."""
    reports, critical = Report.__table__, CriticalResult.__table__
    with engine.connect() as conn:  # type: ignore[attr-defined]
        studies = conn.execute(select(Study.pk, Study.study_date).order_by(Study.pk)).all()
    rows, flags = [], []
    for pk, day in studies:
        if rng.random() > 0.9:
            continue  # waiting
        # Examined and arrived during the working day of its Study Date.
        arrived = datetime(int(day[:4]), int(day[4:6]), int(day[6:8]), 7, tzinfo=ZONE) + timedelta(
            minutes=rng.uniform(0, 600))
        signed = arrived + timedelta(minutes=rng.lognormvariate(5, 1))
        who = rng.choice(RADIOLOGISTS)
        rows.append({"study_pk": pk, "version": 1, "status": "signed", "findings": "Bình thường.",
                     "impression": "Không thấy bất thường.", "author": who, "created_at": arrived,
                     "updated_at": signed, "signed_by": who, "signed_at": signed, "pdf_sop_uid": "", "revision": 1})
        if rng.random() < 0.05:
            later = signed + timedelta(hours=rng.uniform(1, 48))
            rows.append({**rows[-1], "version": 2, "updated_at": later, "signed_at": later, "revision": 2})
        if rng.random() < 0.02:
            told = signed + timedelta(minutes=rng.uniform(2, 60)) if rng.random() < 0.9 else None
            flags.append({"study_pk": pk, "version": 1, "note": "Tràn khí màng phổi", "flagged_by": who,
                          "flagged_at": signed, "acknowledged_by": "bs.cc" if told else "", "acknowledged_at": told,
                          "acknowledgement": "qua điện thoại" if told else ""})
    with engine.begin() as conn:  # type: ignore[attr-defined]
        for start in range(0, len(rows), batch):
            conn.execute(insert(reports), rows[start:start + batch])
        for start in range(0, len(flags), batch):
            conn.execute(insert(critical), flags[start:start + batch])
    return len(rows)


def run(name: str, url: str, args: argparse.Namespace) -> None:
    engine = create_index_engine(url)
    try:
        upgrade_schema(engine)
        started = time.perf_counter()
        load(engine, LoadSpec(studies=args.studies, instances_per_study=args.instances_per_study))
        signed = sign_reports(engine, random.Random(7))
        with engine.begin() as conn:  # the statistics a served archive has (autovacuum, pacs serve's sweeper)
            conn.exec_driver_sql("ANALYZE")
        print(f"{name}: loaded {args.studies:,} studies, {signed:,} signed report versions in "
              f"{time.perf_counter() - started:.0f} s")
        # The synthetic studies span 2021-2025.
        for label, first, last in (("month", "2025-11-01", "2025-11-30"), ("year", "2025-01-01", "2025-12-31")):
            period = Period.parse(first, last, date(2026, 12, 7))
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                found = activity(engine, period, ZONE)
                times.append((time.perf_counter() - t) * 1000)
            totals = found.totals
            print(f"  {name:7} {label:5} p50 {statistics.median(times):7.0f} ms  min {min(times):7.0f}  "
                  f"max {max(times):7.0f}  ({totals['studies']:,} examinations, {totals['reads']:,} reads, "
                  f"{totals['critical']} critical)")
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances-per-study", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dbs", default="sqlite,pg")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-activity-") as work:
        if "sqlite" in args.dbs:
            run("SQLite", f"sqlite:///{Path(work) / 'index.sqlite'}", args)
        if "pg" in args.dbs:
            url = create_database()
            try:
                run("PostgreSQL", url, args)
            finally:
                drop_database(url)


if __name__ == "__main__":
    main()
