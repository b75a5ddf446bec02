"""The SQLite index's -wal file under sustained ingest with concurrent queries
(bench/load.py's storescu senders, C-FIND and QIDO-RS loops): its size, the
frames in use and already checkpointed, and QIDO-RS latency, every 5 s.

    .venv/bin/python -m bench.sqlite_wal --seconds 150 --hold 30:90
    .venv/bin/python -m bench.sqlite_wal --seconds 80 --hold 20:90 --idle 45 --sweep 15

--hold A:B has another process (the sqlite3 shell) hold one read transaction
from second A to second B, as a backup or a long report does: SQLite's
automatic checkpoint cannot go past the pages its snapshot needs. --idle N
watches N more seconds once the load (queries too) has stopped; --sweep sets
PACS_TOMBSTONE_SWEEP_INTERVAL, the round that also checkpoints a grown WAL.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.peers import Backend, PacsServer

from .load import run_load, template_studies

# The -shm file is read by another process: closing any descriptor of it drops
# every POSIX lock this process holds on the file, SQLite's read marks too.
_SHM_READER = ("import struct, sys; h = open(sys.argv[1], 'rb').read(136); "
               "print(struct.unpack_from('<I', h, 16)[0], struct.unpack_from('<I', h, 96)[0])")


def wal_frames(shm: Path) -> tuple[int, int]:
    """(frames in the WAL, frames already copied to the database), from the wal-index header."""
    out = subprocess.run([sys.executable, "-c", _SHM_READER, str(shm)], capture_output=True, text=True).stdout.split()
    return (int(out[0]), int(out[1])) if len(out) == 2 else (-1, -1)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hold", default="", help="A:B, seconds of the run a reader holds one snapshot")
    parser.add_argument("--idle", type=float, default=0, help="seconds watched after the load, server idle")
    parser.add_argument("--sweep", default="", help="PACS_TOMBSTONE_SWEEP_INTERVAL for the server")
    args = parser.parse_args()

    templates = template_studies(args.senders, args.slices, args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-wal-"))
    extra = {"PACS_TOMBSTONE_SWEEP_INTERVAL": args.sweep} if args.sweep else {}
    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}), extra_env=extra).start()
    db = work / "data" / "index.sqlite"
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    samples: list[tuple[float, int, int, int, int]] = []
    latencies: list[tuple[float, float]] = []
    stop, load_over = threading.Event(), threading.Event()
    hold = tuple(float(x) for x in args.hold.split(":")) if args.hold else None
    t0 = time.perf_counter()

    def probe() -> None:
        with server.http() as client:
            while not load_over.is_set():
                start = time.perf_counter()
                client.get("/dicom-web/studies?PatientName=NGUYEN*&limit=20").raise_for_status()
                latencies.append((start - t0, (time.perf_counter() - start) * 1000))
                time.sleep(0.5)

    def holder() -> None:
        assert hold
        while time.perf_counter() - t0 < hold[0]:
            time.sleep(0.2)
        shell = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert shell.stdin and shell.stdout
        shell.stdin.write("BEGIN; SELECT count(*) FROM instances;\n")
        shell.stdin.flush()
        print(f"  [{time.perf_counter() - t0:.0f} s] a reader holds a snapshot of "
              f"{shell.stdout.readline().strip()} instances", flush=True)
        while time.perf_counter() - t0 < hold[1]:
            time.sleep(0.2)
        shell.stdin.write("COMMIT;\n")
        shell.stdin.close()
        shell.wait()
        print(f"  [{time.perf_counter() - t0:.0f} s] the reader is gone", flush=True)

    def monitor() -> None:
        while not stop.is_set():
            frames, copied = wal_frames(shm)
            samples.append((time.perf_counter() - t0, _size(wal), _size(db), frames, copied))
            stop.wait(5)

    threads = [threading.Thread(target=monitor, daemon=True), threading.Thread(target=probe, daemon=True)]
    if hold:
        threads.append(threading.Thread(target=holder, daemon=True))
    for thread in threads:
        thread.start()
    try:
        report = run_load(server, templates, args.seconds, work / "senders")
        load_over.set()
        if args.idle:
            print(f"  [{time.perf_counter() - t0:.0f} s] load over, server idle", flush=True)
            time.sleep(args.idle)
        stop.set()
        for thread in threads:
            thread.join(60)
        log = [line for line in server.log_text().splitlines() if "WAL" in line]
    finally:
        server.stop()
    print(f"\n## SQLite WAL: {args.senders} senders x {args.slices} x {args.size}^2 CT, {args.seconds:.0f} s, "
          f"reader held {args.hold or '-'}, idle {args.idle:.0f} s, sweep {args.sweep or 'default'}")
    for line in report.lines(args.senders):
        print(line)
    print("  t (s)  wal MB  db MB  frames  copied  QIDO p50 / max ms (since the last line)")
    previous = 0.0
    for at, wal_bytes, db_bytes, frames, copied in samples:
        window = [ms for when, ms in latencies if previous <= when < at]
        previous = at
        qido = f"{statistics.median(window):.0f} / {max(window):.0f}" if window else "-"
        print(f"  {at:5.0f}  {wal_bytes / 1e6:6.1f}  {db_bytes / 1e6:5.1f}  {frames:6d}  {copied:6d}  {qido}")
    print(f"  largest -wal file {max(s[1] for s in samples) / 1e6:.1f} MB; server log: {log or 'no WAL line'}")
    shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
