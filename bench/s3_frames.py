"""bench/s3_frames: WADO-RS frames of a large multi-frame object on PostgreSQL + S3, S3 cache off vs on.

A viewer pages through a cine clip one frame per request. Each request needs
a local file of the object (random access to frame N): without the S3
object cache (``PACS_S3_CACHE_BYTES=0``) every request downloaded the whole
object from S3; with it (the default) the first request downloads it and the
next ones only ask S3 for its ETag (one HEAD).

Builds (once, in $PACS_BENCH_CACHE) an uncompressed US Multi-frame object of
--frames RGB frames of 800x600 (200: 288 MB), imports it into a fresh
PostgreSQL database and SeaweedFS bucket, then starts `pacs serve` with the
cache off and then on, and asks frames 37, 38, ... (--requests of them, one
at a time, as a viewer scrolling) as application/octet-stream. Prints per
configuration the first request's time, the p50/min/max of the requests,
and per request the bytes SeaweedFS read from its volume files and the
bytes the server wrote to files (the downloads; /proc/PID/io).

Run: .venv/bin/python -m bench.s3_frames [--frames 200] [--requests 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from .common import CACHE, ROOT  # noqa: F401  (puts the repo on sys.path)

from tests.dicomfiles import frame_pixels, multiframe_rgb  # noqa: E402
from tests.peers import (  # noqa: E402
    PG_ADMIN,
    S3_ACCESS,
    S3_SECRET,
    Backend,
    PacsServer,
    create_database,
    drop_database,
    start_s3,
)

ROWS, COLUMNS = 600, 800
FIRST_FRAME = 37
ACCEPT = 'multipart/related; type="application/octet-stream"'


def clip(frames: int) -> tuple[Path, tuple[str, str, str]]:
    """The multi-frame object, generated once and cached (with its UIDs)."""
    folder = CACHE / f"us-clip-{frames}x{COLUMNS}x{ROWS}"
    path, uids = folder / "clip.dcm", folder / "uids.txt"
    if not (path.exists() and uids.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        study, series, sop = multiframe_rgb(path, frames, ROWS, COLUMNS)
        uids.write_text(f"{study}\n{series}\n{sop}\n")
    study, series, sop = uids.read_text().split()
    return path, (study, series, sop)


def io_bytes(pid: int, field: str) -> int:
    """/proc/PID/io's *field* (rchar: bytes read with read()/pread(), so
    files, not sockets; wchar: bytes written likewise)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def frame_requests(server: PacsServer, s3_pid: int, uids: tuple[str, str, str], requests: int
                   ) -> tuple[list[float], int, int]:
    """Ask frames FIRST_FRAME.. one at a time; (seconds per request, bytes
    SeaweedFS read from its volumes, bytes the server wrote to files: the
    objects downloaded to a temporary or cache file). Each answer is checked
    against the frame built."""
    study, series, sop = uids
    assert server.proc is not None
    url = f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/"
    times = []
    s3_read, written = io_bytes(s3_pid, "rchar"), io_bytes(server.proc.pid, "wchar")
    with httpx.Client(timeout=600, headers={**server.auth_headers, "Accept": ACCEPT}) as http:
        for number in range(FIRST_FRAME, FIRST_FRAME + requests):
            start = time.perf_counter()
            response = http.get(url + str(number))
            times.append(time.perf_counter() - start)
            response.raise_for_status()
            if frame_pixels(number, ROWS, COLUMNS) not in response.content:
                raise AssertionError(f"frame {number}: not the frame stored")
    return times, io_bytes(s3_pid, "rchar") - s3_read, io_bytes(server.proc.pid, "wchar") - written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    if FIRST_FRAME + args.requests - 1 > args.frames:
        parser.error(f"--frames must be at least {FIRST_FRAME + args.requests - 1}")
    path, uids = clip(args.frames)
    size = path.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench-s3-frames-"))
    s3 = start_s3(work / "seaweedfs")
    index_url = create_database(PG_ADMIN)
    backend = Backend("pg-s3", index_url, s3.url("bench-frames"),
                      {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
    results = []
    try:
        PacsServer(work / "data", backend).cli("import", str(path))
        for label, budget in (("cache off (PACS_S3_CACHE_BYTES=0)", "0"), ("cache on (default 2 GiB)", None)):
            shutil.rmtree(work / "data" / "cache", ignore_errors=True)
            env = {"PACS_S3_CACHE_BYTES": budget} if budget is not None else {}
            server = PacsServer(work / "data", backend, extra_env=env)
            try:
                server.start()
                assert s3.proc is not None
                times, s3_read, written = frame_requests(server, s3.proc.pid, uids, args.requests)
            finally:
                server.stop()
            results.append((label, times, s3_read, written))
    finally:
        drop_database(index_url, PG_ADMIN)
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## WADO-RS /frames/N of a {args.frames}-frame {COLUMNS}x{ROWS} RGB object ({size / 1e6:.0f} MB), "
          f"pacs serve PostgreSQL+S3 (SeaweedFS on loopback)")
    print(f"{args.requests} requests, frames {FIRST_FRAME}-{FIRST_FRAME + args.requests - 1}, one at a time\n")
    print("| configuration | first request ms | p50 ms | min ms | max ms | SeaweedFS MB read/request "
          "| server MB written to files/request |")
    print("|---|---|---|---|---|---|---|")
    for label, times, s3_read, written in results:
        ms = [t * 1000 for t in times]
        print(f"| {label} | {ms[0]:.0f} | {statistics.median(ms):.0f} | {min(ms):.0f} | {max(ms):.0f} "
              f"| {s3_read / len(ms) / 1e6:.1f} | {written / len(ms) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
