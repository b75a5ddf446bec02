"""Where one association's time goes: a sampling profile of `pacs serve`.

Starts `pacs serve` (SQLite + filesystem, or PostgreSQL + S3 on SeaweedFS),
records it with py-spy (wall-clock samples, idle included) while DCMTK
storescu sends a data set over one association, and prints the share of the
association thread spent in each step of the ingest path, in ms per object:
waiting for the next request (storescu's own work, the network, the DIMSE
receive), the header scan, the duplicate lookup, the storage write (file and
syncs, or the S3 PUT), the index commit, and the rest. The figures quoted in
bench/README.md ("where the time goes") come from this.

Run: .venv/bin/python -m bench.profile_ingest [--config sqlite-fs|pg-s3] [--data ct|small]
(installs py-spy into the venv if it is missing).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import S3_ACCESS, S3_SECRET, Backend, create_database, ct_series, drop_database, start_s3, storescu_timed

from tests.peers import PacsServer  # noqa: E402  (bench.common put the repository on sys.path)

# Ingest steps, by a function on the stack (first match wins), in print order.
STEPS = [
    ("header scan", ("parse_header",)),
    ("duplicate lookup (index)", ("IndexReader.instance_key",)),
    ("storage write (file + syncs / S3 PUT)", ("FileStore.stage", "_FileStaged.commit", "_DeferredPut.commit")),
    ("index commit", ("GroupCommitter.submit",)),
]


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("py-spy could not be installed")
    return found


def breakdown(raw: Path, objects: int, seconds: float) -> list[tuple[str, float]]:
    """(step, ms per object) for the association thread of a py-spy raw profile."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "AcceptorThread" not in frames[0]:
            continue
        total += int(n)
        names = [f.split(" (")[0] for f in frames]
        step = "rest of the ingest" if "Ingestor.ingest" in names else "waiting for the next request"
        for label, functions in STEPS:
            if any(name in functions for name in names):
                step = label
                break
        counts[step] += int(n)
    if not total:
        raise SystemExit("no samples of an association thread: did storescu reach the server?")
    per_object = seconds * 1000 / objects
    order = ["waiting for the next request", *(s for s, _ in STEPS), "rest of the ingest"]
    return [(step, per_object * counts[step] / total) for step in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("sqlite-fs", "pg-s3"), default="sqlite-fs")
    parser.add_argument("--data", choices=("ct", "small"), default="ct")
    args = parser.parse_args()
    if args.data == "ct":
        folder = ct_series(300)
    else:
        from .scenarios import small_series

        folder = small_series(2000)
    objects = len(list(folder.glob("*.dcm")))
    spy = _py_spy()
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    s3 = pg = None
    try:
        backend = Backend("sqlite-fs", None, None, {})
        if args.config == "pg-s3":
            s3 = start_s3(work / "seaweedfs")
            pg = create_database()
            backend = Backend("pg-s3", pg, s3.url("profile"),
                              {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
        server = PacsServer(work / "data", backend).start()
        try:
            assert server.proc is not None
            raw = work / "profile.txt"
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(server.proc.pid), "--idle", "--nonblocking", "--threads",
                 "--rate", "200", "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.5)  # py-spy attaches
            seconds = storescu_timed(server.dicom_port, server.ae_title, folder)
            recorder.send_signal(2)  # py-spy writes its output on SIGINT
            recorder.wait(timeout=60)
        finally:
            server.stop()
        print(f"{objects} objects over one association to {args.config}: {objects / seconds:.0f} objects/s, "
              f"{seconds * 1000 / objects:.2f} ms per object (while py-spy samples it: its CPU slows the server, so read the shares rather than the times)\n")
        print("| step | ms per object | share |")
        print("|---|---|---|")
        rows = breakdown(raw, objects, seconds)
        whole = sum(ms for _, ms in rows)
        for step, ms in rows:
            print(f"| {step} | {ms:.2f} | {100 * ms / whole:.0f}% |")
    finally:
        if pg:
            drop_database(pg)
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
