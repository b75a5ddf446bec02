"""GET /metrics at archive size: a `pacs serve` on the bulk-loaded archive
(bench/archive.py: 100,000 studies / 1.12 M instances, cached in
$PACS_BENCH_CACHE) with a routing backlog (a destination down: pending and
dead jobs) and a delivered outbox, on SQLite and PostgreSQL.

Prints per database the wall time of a scrape that reads the index
(metrics_cache_seconds 0: every scrape reads it), the server's own
pacs_metrics_index_read_seconds, and a scrape answered from the cache (the
default 10 s); then the time a storescu of --objects small CTs takes alone
and during a storm: --storm scrapers each scraping every --every seconds
(cache on; --every 0 floods the HTTP port as fast as it answers, which
slows ingest as any HTTP flood would: the CPU is shared).

    .venv/bin/python -m bench.metrics_scrape                     # SQLite
    .venv/bin/python -m bench.metrics_scrape --dbs sqlite,pg --scrapes 30
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from .archive import PgArchive, install_sqlite, settle, sqlite_archive
from .query import percentile

from tests.dicomfiles import make_ct  # noqa: E402
from tests.peers import Backend, PacsServer  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_backlog(url: str, jobs: int, messages: int) -> None:
    """*jobs* routing jobs to an unreachable AE (9 in 10 pending, the rest
    dead) and *messages* outbox messages, all but 50 delivered."""
    from pacs.index import create_index_engine
    from pacs.index.models import OutboundMessage, RouteJob, RoutingRule

    engine = create_index_engine(url)
    now = datetime.now(UTC)
    rng = random.Random(3)
    try:
        with engine.begin() as conn:
            rule = conn.execute(insert(RoutingRule.__table__).values(
                name="bench-ai", conditions="[]", destination_kind="dicom", destination="AI_NODE", created_at=now)
            ).inserted_primary_key[0]
            for start in range(0, jobs, 20_000):
                conn.execute(insert(RouteJob.__table__), [{
                    "rule_pk": rule, "sop_uid": f"1.2.826.0.1.3680043.9.7135.9.{i}", "study_uid": "1.2.3",
                    "destination_key": "dicom:AI_NODE", "state": "dead" if i % 10 == 0 else "pending",
                    "attempts": 0, "next_attempt_at": now, "claimed_by": "", "last_error": "",
                    "created_at": now - timedelta(seconds=rng.randint(0, 7200)), "updated_at": now,
                } for i in range(start, min(jobs, start + 20_000))])
            conn.execute(insert(OutboundMessage.__table__), [{
                "destination": "his", "kind": "order_status", "payload": "{}",
                "state": "pending" if i < 50 else "sent", "attempts": 1, "next_attempt_at": now,
                "last_error": "", "created_at": now, "sent_at": None if i < 50 else now,
            } for i in range(messages)])
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    finally:
        engine.dispose()


def _scrape(client: httpx.Client) -> tuple[float, float]:
    """(wall ms, the server's index read ms) of one scrape."""
    start = time.perf_counter()
    answer = client.get("/metrics")
    wall = (time.perf_counter() - start) * 1000
    answer.raise_for_status()
    read = next(s.value for f in text_string_to_metric_families(answer.text) for s in f.samples
                if s.name == "pacs_metrics_index_read_seconds")
    return wall, read * 1000


def _serve(data: Path, backend: Backend, cache: str) -> tuple[PacsServer, httpx.Client]:
    server = PacsServer(data, backend, extra_env={"PACS_METRICS_CACHE_SECONDS": cache}, forked=False).start()
    token = server.make_token("prometheus", "monitor")
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60,
                          headers={"Authorization": f"Bearer {token}"})
    return server, client


def _send(server: PacsServer, folder: Path) -> float:
    start = time.perf_counter()
    assert server.storescu("+sd", str(folder), calling="BENCH_CT").returncode == 0
    return time.perf_counter() - start


def _storm(client: httpx.Client, threads: int, every: float, stop: threading.Event) -> list[int]:
    """*threads* scrapers, each scraping every *every* seconds (0: without pause)."""
    done = [0]

    def loop() -> None:
        while not stop.is_set():
            client.get("/metrics").raise_for_status()
            done[0] += 1
            stop.wait(every)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return done


def _folders(work: Path, objects: int) -> list[Path]:
    """Three folders of *objects* new CTs each (one study per folder): every send stores new objects."""
    folders = []
    for n in range(3):
        folder = work / f"ct{n}"
        folder.mkdir(parents=True)
        study, series = f"1.2.826.0.1.3680043.9.7135.8.{n}.1", f"1.2.826.0.1.3680043.9.7135.8.{n}.2"
        for i in range(objects):
            make_ct(folder / f"{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="BENCH-1")
        folders.append(folder)
    return folders


def measure(db: str, url: str | None, data: Path, args: argparse.Namespace, work: Path) -> list[str]:
    backend = Backend(db, url, None, {})
    server, client = _serve(data, backend, "0")
    try:
        first = _scrape(client)  # also where the counters start
        timings = [_scrape(client) for _ in range(args.scrapes)]
    finally:
        client.close()
        server.stop()
    walls, reads = [t[0] for t in timings], [t[1] for t in timings]
    server, client = _serve(data, backend, "10")
    try:
        _scrape(client)
        cached = [_scrape(client)[0] for _ in range(args.scrapes)]
        first_folder, storm_folder, last_folder = _folders(work / db, args.objects)
        settle()
        alone = _send(server, first_folder)
        stop = threading.Event()
        done = _storm(client, args.storm, args.every, stop)
        try:
            stormed = _send(server, storm_folder)
        finally:
            stop.set()
        settle()
        alone_again = _send(server, last_folder)
    finally:
        client.close()
        server.stop()
    return [db, f"{first[0]:.0f}", f"{statistics.median(walls):.0f}", f"{percentile(walls, 0.95):.0f}",
            f"{statistics.median(reads):.0f}", f"{statistics.median(cached):.1f}",
            f"{min(alone, alone_again):.2f}", f"{stormed:.2f} ({done[0]} scrapes)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dbs", default="sqlite")
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=50_000, help="routing jobs in the backlog")
    parser.add_argument("--messages", type=int, default=100_000, help="outbox messages (all but 50 sent)")
    parser.add_argument("--objects", type=int, default=300, help="CT objects sent with and without the storm")
    parser.add_argument("--storm", type=int, default=20, help="scrapers at once during the storm")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between a scraper's scrapes (0: no pause)")
    args = parser.parse_args()
    studies, per = 100_000, 11
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    try:
        for db in args.dbs.split(","):
            data = work / f"data-{db}"
            if db == "sqlite":
                install_sqlite(sqlite_archive(studies, per, log), data)
                add_backlog(f"sqlite:///{data}/index.sqlite", args.jobs, args.messages)
                rows.append(measure(db, None, data, args, work))
            else:
                with PgArchive(studies, per, log) as archive:
                    url = archive.copy()
                    add_backlog(url, args.jobs, args.messages)
                    rows.append(measure(db, url, data, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## GET /metrics on 1.12 M instances, {args.jobs:,} routing jobs, {args.messages:,} outbox messages")
    print(f"scrape ms: first (starts the counters), then {args.scrapes} reading the index (p50, p95, and the "
          f"server's own index read p50), and answered from the cache (p50); storescu of {args.objects} "
          f"objects in s, alone (best of before and after) and while {args.storm} scrapers scrape every "
          f"{args.every:g} s (cache 10 s)\n")
    print("| db | first | p50 | p95 | index read p50 | cached p50 | storescu alone | storescu + storm |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
