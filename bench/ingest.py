"""bench/ingest: one-association C-STORE ingest of a 300-slice 512x512 CT.

Sends the same series with DCMTK storescu (one association, TCP_NODELAY=1)
to, in the same run:
- a bare pynetdicom receiver that only writes the received bytes to files
  (the ceiling of any pynetdicom-based server),
- DCMTK's storescp,
- our `pacs serve` on SQLite + filesystem and on PostgreSQL + S3 (SeaweedFS).
Prints instances/s and MB/s (median/min/max over --runs) and the ratios.

Run: .venv/bin/python -m bench.ingest [--slices 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT, Series, ct_series, print_table, storescu_timed
from tests.peers import (  # noqa: E402
    Backend,
    PacsServer,
    S3_ACCESS,
    S3_SECRET,
    create_database,
    dcmtk,
    drop_database,
    free_port,
    start_s3,
    wait_port,
)


def run_bare(folder: Path, work: Path) -> float:
    port = free_port()
    out = work / "bare"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bare_receiver.py"), str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc=proc)
        return storescu_timed(port, "BARE", folder)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_storescp(folder: Path, work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True, exist_ok=True)
    import os

    proc = subprocess.Popen(
        [dcmtk("storescp"), "-od", str(out), "-aet", "STORESCP", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc=proc)
        return storescu_timed(port, "STORESCP", folder)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_pacs(folder: Path, work: Path, backend: Backend) -> float:
    data = work / f"pacs-{backend.name}"
    server = PacsServer(data, backend).start()
    try:
        seconds = storescu_timed(server.dicom_port, server.ae_title, folder)
        stats = server.stats()
        expected = len(list(folder.glob("*.dcm")))
        if stats["instances"] != expected:
            raise RuntimeError(f"only {stats['instances']} of {expected} indexed")
        return seconds
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", default="bare,storescp,sqlite-fs,pg-s3")
    args = parser.parse_args()
    configs = args.configs.split(",")

    folder = ct_series(args.slices)
    files = sorted(folder.glob("*.dcm"))
    nbytes = sum(f.stat().st_size for f in files)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    s3 = start_s3(work / "seaweedfs") if "pg-s3" in configs else None
    rows = {name: Series(name) for name in configs}
    try:
        # Interleave configurations run by run so machine noise hits all alike.
        for run in range(args.runs):
            for name in configs:
                if name == "bare":
                    seconds = run_bare(folder, work)
                elif name == "storescp":
                    seconds = run_storescp(folder, work)
                elif name == "sqlite-fs":
                    seconds = run_pacs(folder, work, Backend("sqlite-fs", None, None, {}))
                elif name == "pg-s3":
                    assert s3 is not None
                    pg = create_database()
                    try:
                        backend = Backend(
                            "pg-s3",
                            pg,
                            s3.url(f"bench-{run}"),
                            {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET},
                        )
                        seconds = run_pacs(folder, work, backend)
                    finally:
                        drop_database(pg)
                else:
                    raise SystemExit(f"unknown config {name}")
                rows[name].seconds.append(seconds)
                print(f"run {run + 1} {name}: {len(files) / seconds:.0f} inst/s", file=sys.stderr)
    finally:
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    refs = [r for r in ("bare", "storescp") if r in rows]
    print_table(
        f"ingest, one association, {args.slices} x 512x512 CT (DCMTK storescu)",
        list(rows.values()),
        len(files),
        nbytes,
        refs,
    )
    print("\ntargets (issue 2): sqlite-fs >= 0.80 x bare; pg-s3 >= 0.50 x bare")


if __name__ == "__main__":
    main()
