"""Shared bench plumbing: data sets, timing, the result table."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import (  # noqa: E402
    S3_ACCESS,
    S3_SECRET,
    Backend,
    create_database,
    dcmtk,
    drop_database,
    start_s3,
)

CACHE = Path(os.environ.get("PACS_BENCH_CACHE", "/tmp/filmless-bench"))


def ct_series(slices: int) -> Path:
    """A synthetic 512x512 int16 CT series, generated once and cached."""
    from sample_studies.generate import make_ct_series

    out = CACHE / f"ct{slices}"
    if len(list(out.glob("*.dcm"))) != slices:
        out.mkdir(parents=True, exist_ok=True)
        make_ct_series(out, slices=slices)
    return out


def storescu_timed(port: int, called: str, folder: Path, *extra: str) -> float:
    """Send a folder over ONE association with DCMTK storescu; seconds taken."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [dcmtk("storescu"), "-aec", called, *extra, "127.0.0.1", str(port), "+sd", str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)

    def rate(self, count: int) -> list[float]:
        return [count / s for s in self.seconds]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(title: str, rows: list[Series], count: int, nbytes: int, refs: list[str]) -> None:
    """One table: instances/s and MB/s (median, min, max) and ratios to *refs*."""
    print(f"\n## {title}")
    print(f"{count} instances, {nbytes / 1e6:.1f} MB per run; TCP_NODELAY=1 set for every DCMTK process")
    header = ["config", "runs", "inst/s median", "min", "max", "MB/s median"] + [f"x {r}" for r in refs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    medians = {r.name: median(r.rate(count)) for r in rows}
    for row in rows:
        rates = row.rate(count)
        cells = [
            row.name,
            str(len(rates)),
            f"{median(rates):.0f}",
            f"{min(rates):.0f}" if rates else "-",
            f"{max(rates):.0f}" if rates else "-",
            f"{median(rates) * nbytes / count / 1e6:.1f}",
        ] + [f"{medians[row.name] / medians[r]:.2f}" if medians.get(r) else "-" for r in refs]
        print("| " + " | ".join(cells) + " |")


def repeat(runs: int, once: Callable[[], float]) -> list[float]:
    return [once() for _ in range(runs)]


@contextmanager
def backend(name: str, work: Path, bucket: str = "bench") -> Iterator[Backend]:
    """A fresh index + store: "sqlite-fs" (embedded) or "pg-s3" (a new PostgreSQL
    database and a SeaweedFS bucket), torn down afterwards."""
    if name == "sqlite-fs":
        yield Backend(name, None, None, {})
        return
    if name != "pg-s3":
        raise SystemExit(f"unknown backend {name}")
    s3 = start_s3(work / "seaweedfs")
    pg = create_database()
    try:
        yield Backend(name, pg, s3.url(bucket), {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
    finally:
        drop_database(pg)
        s3.stop()
