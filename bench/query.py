"""bench/query: C-FIND latency of typical reader queries on a large archive.

Bulk-loads a synthetic archive (default 100,000 studies, ~1,000,000
instances) straight into the index of SQLite and of PostgreSQL, starts
`pacs serve` on it, and measures C-FIND round trips on an open association
(pynetdicom SCU) for: patient name prefix without diacritics, patient ID
(citizen ID), one-day date range, accession number, modality + one-week
range. Also the whole `findscu` process for the name query, the figure to
compare with other servers. Prints p50/p95 per query.

Run: .venv/bin/python -m bench.query [--studies 100000] [--repeat 30] [--dbs sqlite,pg]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from .common import ROOT  # noqa: F401  (puts the repo on sys.path)
from .synthetic import FAMILY, GIVEN, MIDDLE, LoadSpec, load

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from pacs.index import create_index_engine, upgrade_schema  # noqa: E402
from pacs.index.models import Patient, Study  # noqa: E402
from pacs.names import fold  # noqa: E402
from tests.peers import Backend, PacsServer, create_database, dcmtk, drop_database  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def identifiers(engine: Any, rng: random.Random, repeat: int) -> dict[str, list[dict[str, str]]]:
    """Query parameters drawn from the loaded data, so each query has matches."""
    with engine.connect() as conn:
        pids = [r[0] for r in conn.execute(select(Patient.patient_id).order_by(func.random()).limit(repeat))]
        accs = [r[0] for r in conn.execute(select(Study.accession_number).order_by(func.random()).limit(repeat))]
    start = date(2021, 1, 1)
    names = [
        fold(f"{rng.choice([f for f, _ in FAMILY[:6]])} {rng.choice(MIDDLE)} {rng.choice(GIVEN)[:2]}") + "*"
        for _ in range(repeat)
    ]
    days = [start + timedelta(days=rng.randrange(5 * 365 - 7)) for _ in range(repeat)]
    return {
        "patient name prefix (no diacritics)": [{"PatientName": n} for n in names],
        "patient ID (citizen ID)": [{"PatientID": p} for p in pids],
        "study date (one day)": [{"StudyDate": d.strftime("%Y%m%d")} for d in days],
        "accession number": [{"AccessionNumber": a} for a in accs],
        "modality + date (one week)": [
            {"ModalitiesInStudy": "CT", "StudyDate": f"{d:%Y%m%d}-{d + timedelta(days=6):%Y%m%d}"} for d in days
        ],
    }


def study_identifier(keys: dict[str, str]) -> Dataset:
    """A study-level identifier in UTF-8 (ISO_IR 192) with the usual return keys."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    for k in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
        setattr(ds, k, "")
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def cfind_latencies(port: int, queries: list[dict[str, str]], called: str = "FILMLESS") -> tuple[list[float], list[int]]:
    """C-FIND round trips on one open association (pynetdicom SCU, TCP_NODELAY):
    milliseconds and matches per query. The SCU decodes every answer, which
    is part of the time (see :func:`wire_latencies`)."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association to {called} refused")
    # Our client too must not wait on Nagle's algorithm.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times, counts = [], []
    try:
        for keys in queries:
            ds = study_identifier(keys)
            start = time.perf_counter()
            n = sum(1 for status, _ in assoc.send_c_find(ds, FIND) if status and status.Status in (0xFF00, 0xFF01))
            times.append((time.perf_counter() - start) * 1000)
            counts.append(n)
    finally:
        assoc.release()
    return times, counts


def wire_latencies(port: int, queries: list[dict[str, str]], called: str = "FILMLESS") -> tuple[list[float], list[int]]:
    """The same round trips timed by a client that does not decode the
    answers (bench/dimse_wire.py): the server's time."""
    from .dimse_wire import timed_finds

    return timed_finds("127.0.0.1", port, called, FIND, [study_identifier(keys) for keys in queries])


def findscu_process(port: int, keys: dict[str, str], repeat: int) -> list[float]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    times = []
    for _ in range(repeat):
        args = [dcmtk("findscu"), "-S", "-aec", "FILMLESS", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}"]
        start = time.perf_counter()
        subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, env=env, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def run_db(name: str, args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> list[list[str]]:
    pg = create_database() if name == "pg" else None
    data = work / name
    server = PacsServer(data, Backend(name, pg, None, {}))
    try:
        engine = create_index_engine(pg or f"sqlite:///{data}/index.sqlite")
        data.mkdir(parents=True, exist_ok=True)
        upgrade_schema(engine)
        start = time.perf_counter()
        counts = load(engine, LoadSpec(studies=args.studies, instances_per_study=args.instances_per_study))
        log(f"{name}: loaded {counts} in {time.perf_counter() - start:.0f} s")
        if name == "pg":
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        rng = random.Random(11)
        plans = identifiers(engine, rng, args.repeat)
        engine.dispose()
        server.start()
        rows = []
        for label, queries in plans.items():
            cfind_latencies(server.dicom_port, queries[:3])  # warm up
            times, matches = cfind_latencies(server.dicom_port, queries)
            rows.append([name, label, f"{statistics.median(times):.1f}", f"{percentile(times, 0.95):.1f}",
                         f"{statistics.mean(matches):.0f}"])
        whole = findscu_process(server.dicom_port, plans["patient name prefix (no diacritics)"][0], 10)
        rows.append([name, "findscu process, name prefix", f"{statistics.median(whole):.1f}",
                     f"{percentile(whole, 0.95):.1f}", "-"])
        return rows
    finally:
        server.stop()
        if pg:
            drop_database(pg)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances-per-study", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--dbs", default="sqlite,pg")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    rows: list[list[str]] = []
    try:
        for db in args.dbs.split(","):
            rows += run_db(db, args, work, lambda m: print(m, file=sys.stderr))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## C-FIND latency, {args.studies:,} studies (~{args.studies * args.instances_per_study:,} instances)")
    print("round trip on an open association (pynetdicom SCU); TCP_NODELAY=1 for findscu")
    print("| db | query | p50 ms | p95 ms | matches (mean) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
