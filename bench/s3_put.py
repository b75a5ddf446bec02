"""The S3 store's own ceiling: sequential PUTs to SeaweedFS, nothing else running.

One association acknowledges an object only after its PUT has finished
(non-negotiable 2), so a sequential PUT's time bounds what PostgreSQL+S3
ingest can reach with one modality. This starts SeaweedFS as the tests do
(``tests/peers.py``), PUTs objects of each size one after another with the
minio client our S3 store uses, and prints the wall time per PUT and the CPU
time SeaweedFS and this client spent per PUT (from ``/proc``).

Run: .venv/bin/python -m bench.s3_put [--count 300] [--sizes 10240,524288]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from minio import Minio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.peers import start_s3  # noqa: E402


def _process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of *pid* and its children."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--sizes", default="10240,524288", help="object sizes in bytes, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="filmless-s3put-") as work:
        server = start_s3(Path(work))
        try:
            assert server.proc is not None
            client = Minio(server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1")
            client.make_bucket("bench-s3-put")
            print(f"SeaweedFS ({server.endpoint}), {args.count} sequential PUTs per size, minio client\n")
            print("| size | PUTs/s | wall ms/PUT p50 | SeaweedFS CPU ms/PUT | client CPU ms/PUT |")
            print("|---|---|---|---|---|")
            for size in (int(s) for s in args.sizes.split(",")):
                data = os.urandom(size)
                for n in range(20):  # warm-up: volumes allocated, connections open
                    client.put_object("bench-s3-put", f"warm/{size}/{n}", io.BytesIO(data), size)
                server_cpu, client_cpu, start = _process_tree_cpu(server.proc.pid), time.process_time(), time.perf_counter()
                times = []
                for n in range(args.count):
                    t = time.perf_counter()
                    client.put_object("bench-s3-put", f"timed/{size}/{n}", io.BytesIO(data), size,
                                      content_type="application/dicom")
                    times.append(time.perf_counter() - t)
                wall = time.perf_counter() - start
                per_server = (_process_tree_cpu(server.proc.pid) - server_cpu) / args.count * 1000
                per_client = (time.process_time() - client_cpu) / args.count * 1000
                print(f"| {size:,} B | {args.count / wall:.0f} | {statistics.median(times) * 1000:.1f} "
                      f"| {per_server:.1f} | {per_client:.1f} |")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
