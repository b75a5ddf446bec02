"""Any-word patient name search at archive size: the radiologist's study list
(pacs.studylist.study_list, the fuzzy matching QIDO-RS fuzzymatching=true
uses too) on the synthetic archive (bench/synthetic.py), timed in-process.

    .venv/bin/python -m bench.name_search                      # SQLite, 100,000 studies
    .venv/bin/python -m bench.name_search --dbs sqlite,pg --calls 20

Prints per term: the median and p95 milliseconds of --calls calls (after
two warm-up calls) and the number of studies matched. The archive is
loaded with one instance per study (instances do not take part in a
study-level name search) and cached as the other benchmarks' are
(bench/archive.py, $PACS_BENCH_CACHE).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .archive import PgArchive, install_sqlite, sqlite_archive
from .query import percentile

# What a radiologist types: a given name (the word people are called by), a
# one-letter start, family + middle, a whole name, a name with its diacritics,
# a name nobody has.
TERMS = ["AN", "T", "NGUYEN", "NGUYEN VAN", "NGUYEN VAN AN", "Hương", "ZZZ"]


def time_terms(url: str, calls: int) -> list[list[str]]:
    from pacs.index import create_index_engine
    from pacs.studylist import study_list

    engine = create_index_engine(url)
    rows = []
    try:
        for term in TERMS:
            for _ in range(2):
                total = study_list(engine, name=term)["total"]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                study_list(engine, name=term)
                times.append((time.perf_counter() - start) * 1000)
            rows.append([term, f"{statistics.median(times):.1f}", f"{percentile(times, 0.95):.1f}", str(total)])
    finally:
        engine.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--dbs", default="sqlite")
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results: list[list[str]] = []
    for db in args.dbs.split(","):
        if db == "sqlite":
            work = Path(tempfile.mkdtemp(prefix="bench-names-"))
            try:
                install_sqlite(sqlite_archive(args.studies, 1, log), work)
                results += [[db, *row] for row in time_terms(f"sqlite:///{work}/index.sqlite", args.calls)]
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            with PgArchive(args.studies, 1, log) as archive:
                results += [[db, *row] for row in time_terms(archive.copy(), args.calls)]
    print(f"\n## Study list by patient name (any word), {args.studies:,} studies, median of {args.calls} calls")
    print("| db | name= | p50 ms | p95 ms | studies matched |")
    print("|---|---|---|---|---|")
    for row in results:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
