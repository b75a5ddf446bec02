"""Load: 8 concurrent DCMTK storescu associations plus concurrent C-FIND and
QIDO-RS queries against one `pacs serve`, for a bounded time. Prints
instances/s, query latency under load, the server's memory over the run, and
every failure status or logged error (there must be none).

    .venv/bin/python -m bench.load --minutes 3 --senders 8 --backend sqlite-fs

Each sender loops: copy its template study, give the copy fresh Study, Series
and SOP Instance UIDs with DCMTK dcmodify (so every store is a new instance,
as from a busy modality), send it over one association, delete the copy.
dcmodify runs on the same machine and takes some of its CPU; the figures are
for client and server sharing the box.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.peers import PacsServer, dcmtk

from .common import CACHE, backend

_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")
UID_ROOT = "1.2.826.0.1.3680043.9.7136.99"


@dataclass
class LoadReport:
    """What one load run measured."""

    seconds: float = 0.0
    stored: int = 0
    stored_bytes: int = 0
    store_failures: list[str] = field(default_factory=list)
    find_ms: list[float] = field(default_factory=list)
    qido_ms: list[float] = field(default_factory=list)
    query_failures: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.store_failures + self.query_failures + self.log_errors

    def lines(self, senders: int) -> list[str]:
        """The figures, one per line, for the bench output."""
        def pct(values: list[float], q: float) -> str:
            if not values:
                return "-"
            ordered = sorted(values)
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"

        rss = self.rss_mb or [0.0]
        third = max(1, len(rss) // 3)
        return [
            f"load: {senders} storescu associations + C-FIND + QIDO-RS for {self.seconds:.0f} s",
            f"  stored {self.stored} instances ({self.stored_bytes / 1e6:.0f} MB): "
            f"{self.stored / self.seconds:.1f} inst/s, {self.stored_bytes / 1e6 / self.seconds:.1f} MB/s",
            f"  C-FIND  {len(self.find_ms)} queries: p50 {pct(self.find_ms, 0.5)} ms, "
            f"p95 {pct(self.find_ms, 0.95)} ms, max {pct(self.find_ms, 1.0)} ms",
            f"  QIDO-RS {len(self.qido_ms)} queries: p50 {pct(self.qido_ms, 0.5)} ms, "
            f"p95 {pct(self.qido_ms, 0.95)} ms, max {pct(self.qido_ms, 1.0)} ms",
            f"  server RSS: first third mean {statistics.mean(rss[:third]):.0f} MB, "
            f"last third mean {statistics.mean(rss[-third:]):.0f} MB, peak {max(rss):.0f} MB",
            f"  failures: {len(self.store_failures)} store, {len(self.query_failures)} query, "
            f"{len(self.log_errors)} logged errors",
        ]


def template_studies(count: int, slices: int, size: int) -> list[Path]:
    """One small CT study per sender, generated once and cached."""
    from sample_studies.generate import get_patients, make_ct_series

    patients = get_patients()
    out = []
    for i in range(count):
        folder = CACHE / f"load-{size}-{slices}" / f"study{i}"
        if len(list(folder.glob("*.dcm"))) != slices:
            folder.mkdir(parents=True, exist_ok=True)
            make_ct_series(folder, slices=slices, patient=patients[i % len(patients)], size=size,
                           study_key=f"load-{i}")
        out.append(folder)
    return out


class _Sender(threading.Thread):
    def __init__(self, index: int, template: Path, work: Path, server: PacsServer,
                 stop: threading.Event, report: LoadReport, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.index, self.template, self.work = index, template, work
        self.server, self.stop, self.report, self.lock = server, stop, report, lock

    def run(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            round_ += 1
            copy = self.work / f"s{self.index}-{round_}"
            shutil.copytree(self.template, copy)
            files = sorted(copy.glob("*.dcm"))
            stamp = f"{UID_ROOT}.{os.getpid()}.{self.index}.{round_}.{time.time_ns() % 10**9}"
            subprocess.run(
                [dcmtk("dcmodify"), "-nb", "-gin", "-m", f"(0020,000d)={stamp}", "-m", f"(0020,000e)={stamp}.1",
                 *map(str, files)],
                check=True, capture_output=True,
            )
            nbytes = sum(f.stat().st_size for f in files)
            result = subprocess.run(
                [dcmtk("storescu"), "-v", "-aet", f"LOAD{self.index}", "-aec", self.server.ae_title,
                 "127.0.0.1", str(self.server.dicom_port), *map(str, files)],
                capture_output=True, text=True, check=False, env={**os.environ, "TCP_NODELAY": "1"},
            )
            statuses = _RESPONSE.findall(result.stdout + result.stderr)
            ok = sum(1 for s in statuses if s == "Success")
            with self.lock:
                self.report.stored += ok
                self.report.stored_bytes += nbytes * ok // len(files)
                if result.returncode != 0 or ok != len(files):
                    bad = [s for s in statuses if s != "Success"]
                    self.report.store_failures.append(
                        f"sender {self.index} round {round_}: rc={result.returncode}, {ok}/{len(files)} ok, {bad[:3]}"
                        f" {result.stderr[-300:]}")
            shutil.rmtree(copy, ignore_errors=True)


def _finder(server: PacsServer, stop: threading.Event, report: LoadReport) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="LOADFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    if not assoc.is_established:
        report.query_failures.append("C-FIND association rejected")
        return
    queries = [{"PatientName": "NGUYEN*"}, {"ModalitiesInStudy": "CT"}, {"PatientID": "0*"}]
    i = 0
    try:
        while not stop.is_set():
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "NumberOfStudyRelatedInstances"):
                setattr(ds, keyword, "")
            for keyword, value in queries[i % len(queries)].items():
                setattr(ds, keyword, value)
            i += 1
            start = time.perf_counter()
            final = None
            for status, _ in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
                final = status
            report.find_ms.append((time.perf_counter() - start) * 1000)
            if final is None or final.Status != 0x0000:
                report.query_failures.append(f"C-FIND ended with {final.Status if final else 'no response'}")
            time.sleep(0.2)
    finally:
        assoc.release()


def _qido(server: PacsServer, stop: threading.Event, report: LoadReport) -> None:
    queries = ["PatientName=NGUYEN*&fuzzymatching=true", "ModalitiesInStudy=CT&limit=50",
               "StudyDate=20000101-20991231&includefield=NumberOfStudyRelatedInstances"]
    i = 0
    with server.http() as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = client.get(f"/dicom-web/studies?{queries[i % len(queries)]}")
                if response.status_code not in (200, 204):
                    report.query_failures.append(f"QIDO {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                report.query_failures.append(f"QIDO {exc!r}")
            report.qido_ms.append((time.perf_counter() - start) * 1000)
            i += 1
            time.sleep(0.2)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_load(server: PacsServer, templates: list[Path], seconds: float, work: Path) -> LoadReport:
    """Drive *server* (already started) for *seconds*; returns the figures."""
    report, stop, lock = LoadReport(), threading.Event(), threading.Lock()
    work.mkdir(parents=True, exist_ok=True)
    log_start = len(server.log_text())
    threads: list[threading.Thread] = [
        _Sender(i, template, work, server, stop, report, lock) for i, template in enumerate(templates)
    ]
    threads += [threading.Thread(target=_finder, args=(server, stop, report), daemon=True),
                threading.Thread(target=_qido, args=(server, stop, report), daemon=True)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    assert server.proc is not None
    while time.perf_counter() - start < seconds:
        report.rss_mb.append(_rss_mb(server.proc.pid))
        time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    report.seconds = time.perf_counter() - start
    log = server.log_text()[log_start:]
    report.log_errors = [line for line in log.splitlines()
                         if " ERROR " in line or "Traceback" in line or " CRITICAL " in line][:20]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--slices", type=int, default=40, help="images per study sent per association")
    parser.add_argument("--size", type=int, default=512, help="CT matrix (512 -> 512 KiB per image)")
    parser.add_argument("--backend", default="sqlite-fs", help="sqlite-fs or pg-s3")
    args = parser.parse_args()

    templates = template_studies(args.senders, args.slices, args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        with backend(args.backend, work) as chosen:
            server = PacsServer(work / "data", chosen).start()
            try:
                report = run_load(server, templates, args.minutes * 60, work / "senders")
            finally:
                server.stop()
            stats = server.stats()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n## load ({args.backend}, {args.slices} x {args.size}x{args.size} CT per association)")
    for line in report.lines(args.senders):
        print(line)
    print(f"  index after the run: {stats['instances']} instances, {stats['studies']} studies")
    for failure in report.failures[:20]:
        print(f"  FAILURE: {failure}")
    if stats["instances"] != report.stored:
        print(f"  FAILURE: {report.stored} acknowledged but {stats['instances']} indexed")
        raise SystemExit(1)
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    sys.exit(main())
