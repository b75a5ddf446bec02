"""The harness plumbing: run context, our servers and peers as context
managers, DICOM senders, statistics, markdown tables and issue-9 targets."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT  # noqa: F401  (puts the repo on sys.path)
from .peers import Orthanc, RssSampler, Storescp, dcmtk_env, spawn, terminate, track, untrack

from tests.peers import (  # noqa: E402
    S3_ACCESS,
    S3_SECRET,
    Backend,
    PacsServer,
    S3Server,
    create_database,
    dcmtk,
    drop_database,
    free_port,
    start_s3,
    wait_port,
)

BACKENDS = {"sqlite-fs": "ours SQLite+fs", "pg-s3": "ours PostgreSQL+S3"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- statistics and tables ----------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:,.{digits}f}"


def stat(values: Sequence[float], digits: int = 0) -> tuple[str, str, str]:
    """(median, min, max) formatted."""
    if not values:
        return "-", "-", "-"
    return fmt(median(values), digits), fmt(min(values), digits), fmt(max(values), digits)


def spread(values: Sequence[float], digits: int = 1) -> str:
    """"median (min-max)" of per-run values."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def run_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-run ratios num[i]/den[i] (runs are interleaved, so run i shares the machine's state)."""
    return [a / b for a, b in zip(num, den, strict=False) if b]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Target:
    scenario: str
    text: str
    value: float
    threshold: float
    higher_is_better: bool = True
    detail: str = ""

    @property
    def met(self) -> bool:
        if self.value != self.value:
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def line(self) -> str:
        verdict = "met" if self.met else "NOT met"
        value = fmt(self.value, 2)
        extra = f"; {self.detail}" if self.detail else ""
        return f"- {self.text}: {value}{extra} -> **{verdict}**"


@dataclass
class Report:
    """What a scenario prints: its markdown tables, notes and target verdicts."""

    scenario: str
    title: str
    blocks: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append((caption + "\n" if caption else "") + markdown(header, rows))

    def note(self, text: str) -> None:
        self.blocks.append(text)

    def target(self, text: str, value: float, threshold: float, higher_is_better: bool = True,
               detail: str = "") -> None:
        self.targets.append(Target(self.scenario, text, value, threshold, higher_is_better, detail))

    def render(self) -> str:
        out = [f"\n## {self.scenario}. {self.title}", ""]
        for block in self.blocks:
            out += [block, ""]
        if self.targets:
            out.append("Targets (issue 9), ratios are medians of per-run ratios:")
            out += [t.line() for t in self.targets]
            out.append("")
        out.append(f"_scenario time: {self.seconds:.0f} s_")
        return "\n".join(out)


# -- the run context ----------------------------------------------------------------
@dataclass
class Ctx:
    runs: int
    quick: bool
    work: Path
    repeat: int = 30
    _s3: S3Server | None = None

    @classmethod
    def create(cls, runs: int, quick: bool) -> Ctx:
        work = Path(tempfile.mkdtemp(prefix="filmless-bench-"))
        return cls(runs=runs, quick=quick, work=work, repeat=5 if quick else 30)

    def dir(self, name: str) -> Path:
        path = self.work / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    @property
    def s3(self) -> S3Server:
        """One SeaweedFS for the whole invocation; each server gets its own bucket."""
        # The harness stops every peer between scenarios (stop_all): start a
        # new SeaweedFS when the previous one is gone.
        if self._s3 is not None and self._s3.proc.poll() is not None:
            self._s3.stop()
            untrack(self._s3.proc)
            self._s3 = None
        if self._s3 is None:
            self._s3 = start_s3(self.dir("seaweedfs"))
            track(self._s3.proc)
        return self._s3

    def close(self) -> None:
        if self._s3 is not None:
            self._s3.stop()
            untrack(self._s3.proc)
            self._s3 = None
        shutil.rmtree(self.work, ignore_errors=True)


# -- our server ---------------------------------------------------------------------
@contextmanager
def ours(ctx: Ctx, backend: str, *, index_url: str | None = None, data_dir: Path | None = None,
         drop_index: bool = True, start: bool = True, env: dict[str, str] | None = None) -> Iterator[PacsServer]:
    """`pacs serve` on a fresh index and store ("sqlite-fs" or "pg-s3"), removed afterwards.

    *index_url*: an existing PostgreSQL database to use (dropped afterwards unless
    *drop_index* is false); *data_dir*: a prepared data dir (e.g. holding a copied
    SQLite archive)."""
    data = data_dir or ctx.dir(f"pacs-{backend}") / "data"
    pg = None
    if backend == "sqlite-fs":
        chosen = Backend(backend, None, None, {})
    elif backend == "pg-s3":
        pg = index_url or create_database()
        bucket = f"b{uuid.uuid4().hex[:12]}"
        chosen = Backend(backend, pg, ctx.s3.url(bucket),
                         {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
    else:
        raise SystemExit(f"unknown backend {backend}")
    server = PacsServer(data, chosen, extra_env=dict(env or {}))
    try:
        if start:
            start_ours(server)
        yield server
    finally:
        stop_ours(server)
        if pg and (drop_index or index_url is None):
            drop_database(pg)
        shutil.rmtree(data.parent if data_dir is None else data, ignore_errors=True)


def start_ours(server: PacsServer) -> PacsServer:
    server.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    finally:
        track(server.proc)
    return server


def stop_ours(server: PacsServer) -> None:
    server.stop()
    untrack(server.proc)


def count_study_instances(server: PacsServer, study_uid: str) -> int:
    """Instances of one study in our index (cheap even on a million-row index)."""
    from sqlalchemy import func, select

    from pacs.index import create_index_engine
    from pacs.index.models import Instance, Series, Study

    url = server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite"
    engine = create_index_engine(url, pool_size=0)
    try:
        with engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(Instance).join(Series, Instance.series_pk == Series.pk)
                .join(Study, Series.study_pk == Study.pk).where(Study.study_uid == study_uid)
            ).scalar_one()
    finally:
        engine.dispose()


# -- peers as context managers ------------------------------------------------------
@contextmanager
def orthanc(ctx: Ctx, modalities: dict[str, tuple[str, str, int]] | None = None,
            workdir: Path | None = None, keep: bool = False) -> Iterator[Orthanc]:
    server = Orthanc(workdir or ctx.dir("orthanc"), modalities=modalities or {})
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(server.workdir, ignore_errors=True)


@contextmanager
def storescp(ctx: Ctx, ae_title: str = "STORESCP") -> Iterator[Storescp]:
    server = Storescp(ctx.dir("storescp") / "out", ae_title=ae_title)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.out.parent, ignore_errors=True)


@contextmanager
def bare_receiver(ctx: Ctx, event_driven: bool = False) -> Iterator[int]:
    """bench/bare_receiver.py: pynetdicom writing received bytes to files (the ceiling);
    *event_driven*: with bench.reactor's waiting (an experiment; `pacs serve` polls as pynetdicom does)."""
    port = free_port()
    out = ctx.dir("bare")
    proc = spawn([sys.executable, str(ROOT / "bench" / "bare_receiver.py"), str(out / "files"), str(port),
                  *(["--event-driven"] if event_driven else [])])
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        terminate(proc)
        shutil.rmtree(out, ignore_errors=True)


# -- senders ------------------------------------------------------------------------
def send(port: int, called: str, folders: Sequence[Path], *, calling: str = "MODALITY",
         sample_pid: int | None = None, nagle: bool = False) -> tuple[float, int]:
    """Send each folder over its own DCMTK storescu association, all at once.
    *nagle*: storescu as installed, without TCP_NODELAY=1 (what most
    DCMTK-based modalities do).

    Returns (wall seconds from the first start to the last end, peak RSS in kB
    of the *sample_pid* process tree during the send, 0 if not sampled)."""
    procs = []
    # Output to temporary files, not pipes: a pipe read one process at a time
    # could fill up and stall the other senders. -v: the log tells why a send failed.
    outs = [tempfile.TemporaryFile() for _ in folders]
    sampler = RssSampler(sample_pid) if sample_pid else None
    if sampler:
        sampler.__enter__()
    start = time.perf_counter()
    for i, folder in enumerate(folders):
        aet = calling if len(folders) == 1 else f"{calling}{i + 1}"
        procs.append(subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", aet, "-aec", called, "127.0.0.1", str(port), "+sd", str(folder),
             "--scan-pattern", "*.dcm"],
            env={k: v for k, v in dcmtk_env().items() if k != "TCP_NODELAY"} if nagle else dcmtk_env(),
            stdout=outs[i], stderr=subprocess.STDOUT,
        ))
    errors = []
    for proc, out_file in zip(procs, outs, strict=True):
        proc.wait()
        if proc.returncode != 0:
            out_file.seek(0)
            out = out_file.read().decode(errors="replace")
            errors.append(f"storescu -aet {proc.args[3]}: exit status {proc.returncode}: {out[-1500:]}")
        out_file.close()
    elapsed = time.perf_counter() - start
    peak = 0
    if sampler:
        sampler.__exit__(None, None, None)
        peak = sampler.peak_kb
    if errors:
        raise RuntimeError("storescu failed:\n" + "\n".join(errors))
    return elapsed, peak


def files_and_bytes(folders: Sequence[Path]) -> tuple[int, int]:
    files = [f for folder in folders for f in folder.glob("*.dcm")]
    return len(files), sum(f.stat().st_size for f in files)


def study_uid_of(folder: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(next(iter(sorted(folder.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)
