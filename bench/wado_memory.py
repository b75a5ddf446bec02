"""bench/wado_memory: peak memory of `pacs serve` while serving a 1 GB study.

Generates a ~1 GB CT study (--slices x 512 KB), imports it, then retrieves it
whole through WADO-RS (multipart/related, as stored and as Explicit VR LE)
while sampling the server's resident memory. Prints the peak RSS (VmHWM)
and the throughput. Target (issue 4): peak below 300 MB.

Run: .venv/bin/python -m bench.wado_memory [--slices 2000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .common import CACHE, ROOT  # noqa: F401  (puts the repo on sys.path)

from pydicom import dcmread  # noqa: E402

from tests.peers import Backend, PacsServer  # noqa: E402


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def big_study(slices: int) -> Path:
    """A ~slices x 512 KB CT study, generated once and cached."""
    from sample_studies.generate import make_ct_series

    folder = CACHE / f"ct{slices}-big"
    if len(list(folder.glob("*.dcm"))) != slices:
        folder.mkdir(parents=True, exist_ok=True)
        make_ct_series(folder, slices=slices, study_key=f"big{slices}")
    return folder


ACCEPTS = (
    ("as stored (transfer-syntax=*)", 'multipart/related; type="application/dicom"; transfer-syntax=*'),
    ("default (Explicit VR LE)", 'multipart/related; type="application/dicom"'),
)


def retrieve(url: str, accept: str, pid: int, headers: dict[str, str] | None = None,
             rss: Callable[[int], int] | None = None) -> tuple[int, float, int]:
    """GET *url* (a whole study over WADO-RS) while sampling *pid*'s memory every
    20 ms; returns (bytes received, seconds, peak RSS in kB)."""
    rss = rss or rss_kb
    peak = [rss(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    received = 0
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=600, headers=headers or {}) as http:
            with http.stream("GET", url, headers={"Accept": accept}) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    received += len(chunk)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return received, seconds, max(peak[0], rss(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=2000)
    args = parser.parse_args()
    folder = big_study(args.slices)
    size = sum(f.stat().st_size for f in folder.glob("*.dcm"))
    first = dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    work = Path(tempfile.mkdtemp(prefix="bench-wado-mem-"))
    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    try:
        server.cli("import", str(folder))
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        idle = rss_kb(pid)
        results = []
        for label, accept in ACCEPTS:
            url = f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{first.StudyInstanceUID}"
            received, seconds, peak = retrieve(url, accept, pid, server.auth_headers)
            results.append((label, received, seconds, peak))
        hwm = rss_kb(pid, "VmHWM")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## WADO-RS retrieve of a {size / 1e9:.2f} GB study ({args.slices} instances), pacs serve SQLite+fs")
    print(f"server RSS idle: {idle / 1024:.0f} MB; peak over the whole run (VmHWM): {hwm / 1024:.0f} MB")
    print("| accept | bytes received | seconds | MB/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for label, received, seconds, peak in results:
        print(f"| {label} | {received:,} | {seconds:.1f} | {received / seconds / 1e6:.0f} | {peak / 1024:.0f} |")
    print("target (issue 4): peak RSS < 300 MB")


if __name__ == "__main__":
    main()
