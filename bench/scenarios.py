"""The eight scenarios of issue 9, each filling a Report (tables + targets).

Every scenario interleaves its configurations run by run (run 1 of every
config, then run 2, ...) so that the machine's noise hits them alike, and
prints the median/min/max over runs plus ratios ours/peer computed per run.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from . import corpus as corpora
from .archive import PgArchive, install_sqlite, settle, sqlite_archive
from .common import CACHE, ct_series
from .harness import (
    BACKENDS,
    Ctx,
    Report,
    bare_receiver,
    count_study_instances,
    files_and_bytes,
    fmt,
    log,
    median,
    orthanc,
    ours,
    percentile,
    run_ratios,
    send,
    spread,
    start_ours,
    stat,
    stop_ours,
    storescp,
    study_uid_of,
)
from .peers import NODELAY_NOTE, Orthanc, dcmtk_env, tree_rss_kb

from tests.peers import Backend, PacsServer, dcmtk  # noqa: E402

LABELS = {
    "bare": "bare pynetdicom receiver (no index, no fsync)",
    "bare-ed": "bare pynetdicom receiver + our reactor (no index, no fsync)",
    "storescp": "DCMTK storescp",
    "orthanc": "Orthanc (SQLite + fs)",
    "sqlite-fs": "ours SQLite + fs",
    "pg-s3": "ours PostgreSQL + S3",
}


# -- ingest (scenarios 1-4) ---------------------------------------------------------
def _count_instances(server: PacsServer) -> int:
    from sqlalchemy import func, select

    from pacs.index import create_index_engine
    from pacs.index.models import Instance

    url = server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite"
    engine = create_index_engine(url, pool_size=0)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Instance)).scalar_one()
    finally:
        engine.dispose()


def ingest_once(ctx: Ctx, config: str, folders: Sequence[Path], *, archive: Any = None,
                sample: bool = False, nagle: bool = False) -> tuple[float, int, int]:
    """Send *folders* (one association each, concurrently) to a fresh *config*.

    *config*: bare, storescp, orthanc, sqlite-fs or pg-s3; *archive*: for ours, a
    cached SQLite archive file or a PgArchive to start from. Returns (seconds,
    peak RSS kB of the receiver during the send if *sample*, idle RSS kB)."""
    expected, _ = files_and_bytes(folders)
    if config in ("bare", "bare-ed"):
        with bare_receiver(ctx, event_driven=config == "bare-ed") as port:
            settle()
            seconds, _ = send(port, "BARE", folders, nagle=nagle)
        return seconds, 0, 0
    if config == "storescp":
        with storescp(ctx) as scp:
            settle()
            seconds, peak = send(scp.port, scp.ae_title, folders, sample_pid=scp.proc.pid if sample else None,
                                 nagle=nagle)
            if scp.count() != expected:
                raise RuntimeError(f"storescp wrote {scp.count()} of {expected}")
        return seconds, peak, 0
    if config == "orthanc":
        with orthanc(ctx) as peer:
            assert peer.proc is not None
            idle = tree_rss_kb(peer.proc.pid)
            settle()
            seconds, peak = send(peer.dicom_port, peer.ae_title, folders,
                                 sample_pid=peer.proc.pid if sample else None, nagle=nagle)
            got = peer.statistics()["CountInstances"]
            if got != expected:
                raise RuntimeError(f"Orthanc stored {got} of {expected}")
        return seconds, peak, idle
    backend = config.split()[0]
    kwargs: dict[str, Any] = {}
    if config.endswith(" workers"):  # e.g. "sqlite-fs workers": one DICOM worker process per core
        kwargs["env"] = {"PACS_DICOM_WORKERS": "0"}
    base = 0
    if archive is not None and backend == "sqlite-fs":
        data = ctx.dir("pacs-archive") / "data"
        install_sqlite(archive, data)
        kwargs["data_dir"] = data
    elif archive is not None:
        kwargs["index_url"] = archive.copy()
    with ours(ctx, backend, **kwargs) as server:
        if archive is not None:
            base = _count_instances(server)
        assert server.proc is not None
        idle = tree_rss_kb(server.proc.pid)
        settle()
        try:
            seconds, peak = send(server.dicom_port, server.ae_title, folders,
                                 sample_pid=server.proc.pid if sample else None, nagle=nagle)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n-- pacs serve log (tail):\n{server.log_text()[-3000:]}") from None
        got = _count_instances(server) - base
        if got != expected:
            raise RuntimeError(f"{config}: {got} of {expected} indexed")
    if archive is not None and backend == "pg-s3":
        archive.drop(kwargs["index_url"])
    if archive is not None and backend == "sqlite-fs":
        shutil.rmtree(kwargs["data_dir"].parent, ignore_errors=True)
    return seconds, peak, idle


def ingest_runs(ctx: Ctx, configs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every config once per run, interleaved; seconds per run."""
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for run in range(ctx.runs):
        for name, once in configs.items():
            value = once()
            seconds[name].append(value)
            log(f"  run {run + 1} {name}: {value:.2f} s")
    return seconds


def ingest_table(report: Report, seconds: dict[str, list[float]], count: int, nbytes: int,
                 refs: Sequence[str], labels: dict[str, str] | None = None) -> dict[str, list[float]]:
    """instances/s (median/min/max), MB/s and per-run ratios to *refs*; returns rates."""
    rates = {name: [count / s for s in values] for name, values in seconds.items()}
    header = ["config", "runs", "inst/s median", "min", "max", "MB/s"] + [f"x {r}" for r in refs]
    rows = []
    for name, values in rates.items():
        med, lo, hi = stat(values)
        cells = [(labels or {}).get(name, LABELS.get(name, name)), str(len(values)), med, lo, hi,
                 fmt(median(values) * nbytes / count / 1e6, 1)]
        for ref in refs:
            cells.append(fmt(median(run_ratios(values, rates[ref])), 2) if ref in rates and ref != name else "-")
        rows.append(cells)
    report.table(header, rows)
    return rates


def ratio_detail(num: list[float], den: list[float]) -> str:
    ratios = run_ratios(num, den)
    if len(ratios) < 2:
        return ""
    return f"per run {min(ratios):.2f}-{max(ratios):.2f}"


def _target_ratio(report: Report, text: str, rates: dict[str, list[float]], num: str, den: str,
                  threshold: float) -> None:
    if num in rates and den in rates:
        ratios = run_ratios(rates[num], rates[den])
        report.target(text, median(ratios), threshold, detail=ratio_detail(rates[num], rates[den]))


def ceiling_note(report: Report, rates: dict[str, list[float]]) -> None:
    """How far plain pynetdicom (the bare receivers) gets on one association,
    next to the peers: the ceiling any handler of ours works under."""
    bares = [b for b in ("bare", "bare-ed") if b in rates]
    if not bares:
        return
    lines = []
    for bare in bares:
        parts = [f"{median(run_ratios(rates[bare], rates[peer])):.2f}x {LABELS[peer]}"
                 for peer in ("orthanc", "storescp") if peer in rates]
        lines.append(f"{LABELS[bare]}: {', '.join(parts)}")
    best = max(bares, key=lambda b: median(rates[b]))
    ours_part = ", ".join(f"{LABELS[b]} {median(run_ratios(rates[b], rates[best])):.2f}x"
                          for b in ("sqlite-fs", "pg-s3") if b in rates)
    report.note("Ceiling (same runs): " + "; ".join(lines) + f". Ours relative to the faster bare receiver: "
                f"{ours_part}. The bare receivers (bench/bare_receiver.py) are stock pynetdicom writing the "
                "received bytes to files (no header parse, no fsync, no index, max PDU 256 KiB): what one "
                "Python thread decoding one association reaches on this machine with no work per object.")


def scenario_ingest(ctx: Ctx, report: Report) -> None:
    slices = 30 if ctx.quick else 300
    folder = ct_series(slices)
    count, nbytes = files_and_bytes([folder])
    configs = {name: (lambda name=name: ingest_once(ctx, name, [folder])[0])
               for name in ("storescp", "bare", "bare-ed", "orthanc", "sqlite-fs", "pg-s3")}
    rates = ingest_table(report, ingest_runs(ctx, configs), count, nbytes, ["orthanc", "storescp", "bare"])
    report.note(f"{count} x 512x512 CT ({nbytes / 1e6:.0f} MB), one DCMTK storescu association per run, "
                "a fresh server each run. " + NODELAY_NOTE + ".")
    ceiling_note(report, rates)
    _target_ratio(report, "ours SQLite+fs >= 1.0x Orthanc", rates, "sqlite-fs", "orthanc", 1.0)
    _target_ratio(report, "ours SQLite+fs >= 0.3x storescp", rates, "sqlite-fs", "storescp", 0.3)
    _target_ratio(report, "ours PostgreSQL+S3 >= 0.7x Orthanc", rates, "pg-s3", "orthanc", 0.7)


def scenario_concurrent(ctx: Ctx, report: Report) -> None:
    slices = 32 if ctx.quick else 300
    folder = ct_series(slices)
    parts = corpora.split(folder, 4)
    count, nbytes = files_and_bytes([folder])
    configs: dict[str, Callable[[], float]] = {
        name: (lambda name=name: ingest_once(ctx, name, parts)[0])
        for name in ("storescp", "orthanc", "sqlite-fs", "pg-s3", "sqlite-fs workers", "pg-s3 workers")
    }
    configs["sqlite-fs x1"] = lambda: ingest_once(ctx, "sqlite-fs", [folder])[0]
    configs["pg-s3 x1"] = lambda: ingest_once(ctx, "pg-s3", [folder])[0]
    labels = {
        "storescp": "DCMTK storescp, 4 assoc", "orthanc": "Orthanc, 4 assoc", "sqlite-fs": "ours SQLite + fs, 4 assoc",
        "pg-s3": "ours PostgreSQL + S3, 4 assoc", "sqlite-fs x1": "ours SQLite + fs, 1 assoc (same run)",
        "pg-s3 x1": "ours PostgreSQL + S3, 1 assoc (same run)",
        "sqlite-fs workers": "ours SQLite + fs, 4 assoc, --dicom-workers 0 (one per core)",
        "pg-s3 workers": "ours PostgreSQL + S3, 4 assoc, --dicom-workers 0 (one per core)",
    }
    rates = ingest_table(report, ingest_runs(ctx, configs), count, nbytes, ["orthanc", "storescp"], labels)
    rows = []
    for backend in ("sqlite-fs", "pg-s3"):
        for variant, label in ((backend, "default (1 DICOM process)"), (f"{backend} workers", "--dicom-workers 0")):
            ratios = run_ratios(rates[variant], rates[f"{backend} x1"])
            rows.append([BACKENDS[backend], label, fmt(median(ratios), 2),
                         ratio_detail(rates[variant], rates[f"{backend} x1"])])
    report.table(["ours", "4 assoc with", "4 assoc / 1 assoc (median of per-run ratios)", "range"], rows)
    report.note(f"{count} x 512x512 CT split in 4 folders sent by 4 concurrent storescu processes "
                f"(calling AEs MODALITY1-4); time from the first start to the last end. `pacs serve` runs with its "
                "defaults (one DICOM process) and with PACS_DICOM_WORKERS=0 (one DICOM worker process per core "
                "on a shared socket, dicom_scp/workers.py). " + NODELAY_NOTE + ".")
    for backend in ("sqlite-fs", "pg-s3"):
        _target_ratio(report, f"{BACKENDS[backend]} 4 assoc >= 1.0x Orthanc 4 assoc", rates, backend, "orthanc", 1.0)
    for backend in ("sqlite-fs", "pg-s3"):
        _target_ratio(report, f"{BACKENDS[backend]} 4 assoc >= 1.6x its own 1 assoc", rates, backend,
                      f"{backend} x1", 1.6)
    for backend in ("sqlite-fs", "pg-s3"):
        _target_ratio(report, f"{BACKENDS[backend]} --dicom-workers 0, 4 assoc >= 1.0x Orthanc 4 assoc", rates,
                      f"{backend} workers", "orthanc", 1.0)
        _target_ratio(report, f"{BACKENDS[backend]} --dicom-workers 0, 4 assoc >= 1.6x its own 1 assoc", rates,
                      f"{backend} workers", f"{backend} x1", 1.6)


def small_series(count: int) -> Path:
    """*count* tiny 64x64 CT images (8 KB each), one series, cached."""
    from sample_studies.generate import make_ct_series

    out = CACHE / f"small-ct{count}x64"
    if len(list(out.glob("*.dcm"))) != count:
        out.mkdir(parents=True, exist_ok=True)
        make_ct_series(out, slices=count, size=64, study_key=f"small-{count}")
    return out


def scenario_small(ctx: Ctx, report: Report) -> None:
    n = 200 if ctx.quick else 2000
    folder = small_series(n)
    count, nbytes = files_and_bytes([folder])
    configs = {name: (lambda name=name: ingest_once(ctx, name, [folder])[0])
               for name in ("storescp", "bare", "bare-ed", "orthanc", "sqlite-fs", "pg-s3")}
    rates = ingest_table(report, ingest_runs(ctx, configs), count, nbytes, ["orthanc", "storescp", "bare"])
    report.note(f"{count} x 64x64 CT ({nbytes / count / 1e3:.1f} kB each), one storescu association. " + NODELAY_NOTE + ".")
    ceiling_note(report, rates)
    _target_ratio(report, "ours SQLite+fs >= 1.0x Orthanc", rates, "sqlite-fs", "orthanc", 1.0)
    _target_ratio(report, "ours PostgreSQL+S3 >= 1.0x Orthanc", rates, "pg-s3", "orthanc", 1.0)


def scenario_defaults(ctx: Ctx, report: Report) -> None:
    """Scenario 3's small objects from a storescu as installed: Nagle's
    algorithm on, as in most DCMTK-based modalities (no TCP_NODELAY=1)."""
    n = 100 if ctx.quick else 500
    folder = small_series(n)
    count, nbytes = files_and_bytes([folder])
    configs = {name: (lambda name=name: ingest_once(ctx, name, [folder], nagle=True)[0])
               for name in ("storescp", "orthanc", "sqlite-fs", "pg-s3")}
    rates = ingest_table(report, ingest_runs(ctx, configs), count, nbytes, ["orthanc", "storescp"])
    report.note(f"{count} x 64x64 CT, one storescu association WITHOUT TCP_NODELAY=1 (DCMTK's default: Nagle "
                "on in the sender); receivers as in the other scenarios (storescp and Orthanc with TCP_NODELAY=1). "
                "A sender with Nagle waits for the ACK of a PDU's first segment; receivers that delay ACKs "
                "(~40 ms) are held to ~20 objects/s, ours acknowledges at once (TCP_QUICKACK).")
    _target_ratio(report, "ours SQLite+fs >= 1.0x Orthanc", rates, "sqlite-fs", "orthanc", 1.0)


def archive_size(quick: bool) -> tuple[int, int]:
    """(studies, instances per study) of the bulk-loaded archive: ~1.12 M instances."""
    return (2_000, 11) if quick else (100_000, 11)


def scenario_flat(ctx: Ctx, report: Report) -> None:
    slices = 30 if ctx.quick else 300
    folder = ct_series(slices)
    count, nbytes = files_and_bytes([folder])
    studies, per = archive_size(ctx.quick)
    sqlite = sqlite_archive(studies, per, log)
    with PgArchive(studies, per, log) as pg:
        from .archive import counts

        held = counts(pg.template or "")
        configs = {
            "sqlite-fs": lambda: ingest_once(ctx, "sqlite-fs", [folder])[0],
            "sqlite-fs full": lambda: ingest_once(ctx, "sqlite-fs", [folder], archive=sqlite)[0],
            "pg-s3": lambda: ingest_once(ctx, "pg-s3", [folder])[0],
            "pg-s3 full": lambda: ingest_once(ctx, "pg-s3", [folder], archive=pg)[0],
        }
        label = f"{held['instances']:,} instances"
        labels = {"sqlite-fs": "ours SQLite + fs, empty index", "sqlite-fs full": f"ours SQLite + fs, {label}",
                  "pg-s3": "ours PostgreSQL + S3, empty index", "pg-s3 full": f"ours PostgreSQL + S3, {label}"}
        rates = ingest_table(report, ingest_runs(ctx, configs), count, nbytes, ["sqlite-fs", "pg-s3"], labels)
    report.note(f"{count} x 512x512 CT over one association into an index already holding {held['studies']:,} "
                f"studies / {held['instances']:,} instances (bench/synthetic.py bulk load; SQLite file cached in "
                f"{CACHE}, PostgreSQL restored from a pg_dump cache and copied per run with CREATE DATABASE "
                "... TEMPLATE) vs an empty index, same run. " + NODELAY_NOTE + ".")
    _target_ratio(report, "SQLite: full index / empty index >= 0.9", rates, "sqlite-fs full", "sqlite-fs", 0.9)
    _target_ratio(report, "PostgreSQL: full index / empty index >= 0.9", rates, "pg-s3 full", "pg-s3", 0.9)


# -- queries (scenario 5) -----------------------------------------------------------
def _cfind(port: int, called: str, queries: list[dict[str, str]]) -> tuple[list[float], list[int]]:
    """C-FIND round trips on one open association, timed by a client that does
    not decode the answers (bench/dimse_wire.py): the server's latency."""
    from .query import wire_latencies

    return wire_latencies(port, queries, called)


def _cfind_pynetdicom(port: int, called: str, queries: list[dict[str, str]]) -> tuple[list[float], list[int]]:
    """The same through pynetdicom's SCU, which decodes every answer (client time included)."""
    from .query import cfind_latencies

    return cfind_latencies(port, queries, called)


def _findscu(port: int, called: str, queries: list[dict[str, str]]) -> list[float]:
    """The whole DCMTK findscu process per query (what a modality or script sees)."""
    times = []
    for keys in queries:
        args = [dcmtk("findscu"), "-S", "-aet", "BENCH", "-aec", called, "-k", "QueryRetrieveLevel=STUDY",
                "-k", "StudyInstanceUID", "-k", "SpecificCharacterSet=ISO_IR 192"]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}"]
        start = time.perf_counter()
        subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, env=dcmtk_env(), check=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _qido(base: str, headers: dict[str, str], queries: list[dict[str, str]]) -> tuple[list[float], list[int]]:
    times, counts = [], []
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        for q in queries:
            start = time.perf_counter()
            response = http.get("/dicom-web/studies", params={**q, "limit": "100"})
            times.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            counts.append(len(response.json()) if response.status_code == 200 and response.content else 0)
    return times, counts


def _vn_find(port: int, called: str, keys: dict[str, str]) -> list[tuple[str, str, str]]:
    """(charset, PatientName as decoded, PatientID) of each C-FIND answer."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = ""
    ds.PatientID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    out = []
    try:
        for status, ident in assoc.send_c_find(ds, FIND):
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                charset = ident.get("SpecificCharacterSet", "")
                out.append((str(charset) if isinstance(charset, str) else "\\".join(charset),
                            str(ident.get("PatientName", "")), str(ident.get("PatientID", ""))))
    finally:
        assoc.release()
    return out


def _fold_query(keys: dict[str, str]) -> dict[str, str]:
    from pacs.names import fold

    return {k: (fold(v) if k == "PatientName" else v) for k, v in keys.items()}


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


def corpus_plans(corpus: Path, repeat: int) -> dict[str, list[dict[str, str]]]:
    """Reader queries drawn from the DICOM-loaded corpus (Orthanc and ours on it).

    The name query is "Family^Middle*" with the diacritics Orthanc needs, among
    families and middle names Orthanc can represent in Latin-1 (it drops other
    Vietnamese letters and then cannot match them): e.g. "Lê^Thanh*"."""
    plans = corpora.query_plans(corpus, random.Random(5), repeat)
    manifest = json.loads((corpus / "manifest.json").read_text())["studies"]
    rng = random.Random(6)
    names = sorted({f"{s['patient_name'].split('^')[0]}^{s['patient_name'].split('^')[1].split()[0]}*"
                    for s in manifest if s["patient_id"] != corpora.VN_CHECK_ID})
    names = [n for n in names if _latin1(n)]
    plans["patient name prefix"] = [{"PatientName": rng.choice(names)} for _ in range(repeat)]
    return plans


def scenario_query(ctx: Ctx, report: Report) -> None:
    from .query import identifiers

    studies, per = archive_size(ctx.quick)
    peer_studies = 200 if ctx.quick else 2000
    corpus = corpora.query_corpus(peer_studies, 2)
    corpus_count, _ = files_and_bytes([corpus])
    sqlite = sqlite_archive(studies, per, log)
    repeat = ctx.repeat
    findscu_repeat = max(3, repeat // 3)
    results: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    servers: list[dict[str, Any]] = []
    vn_rows: list[list[str]] = []
    with PgArchive(studies, per, log) as pg, ExitStack() as stack:
        from .archive import counts

        held = counts(pg.template or "")
        # ours on the bulk-loaded archive, both databases
        data = ctx.dir("q-sqlite") / "data"
        install_sqlite(sqlite, data)
        for backend, kwargs in (("sqlite-fs", {"data_dir": data}), ("pg-s3", {"index_url": pg.copy()})):
            server = stack.enter_context(ours(ctx, backend, **kwargs))
            from pacs.index import create_index_engine

            engine = create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite")
            plans = identifiers(engine, random.Random(11), repeat)
            engine.dispose()
            plans = {("patient name prefix" if k.startswith("patient name") else k): v for k, v in plans.items()}
            send(server.dicom_port, server.ae_title, [corpora.vn_check_file(corpus)])
            servers.append({"name": f"{BACKENDS[backend]}, {held['instances']:,} inst", "port": server.dicom_port,
                            "ae": server.ae_title, "http": f"http://127.0.0.1:{server.http_port}",
                            "headers": server.auth_headers, "plans": plans, "kind": "ours-full"})
        # Orthanc and ours loaded over DICOM with the same small corpus
        log(f"  loading {corpus_count} instances into Orthanc and ours over DICOM...")
        peer = stack.enter_context(orthanc(ctx))
        seconds, _ = send(peer.dicom_port, peer.ae_title, [corpus])
        log(f"  Orthanc loaded in {seconds:.1f} s")
        small = stack.enter_context(ours(ctx, "sqlite-fs"))
        seconds, _ = send(small.dicom_port, small.ae_title, [corpus])
        log(f"  ours loaded in {seconds:.1f} s")
        plans = corpus_plans(corpus, repeat)
        servers.append({"name": f"Orthanc, {corpus_count:,} inst", "port": peer.dicom_port, "ae": peer.ae_title,
                        "http": f"http://127.0.0.1:{peer.http_port}", "headers": {}, "plans": plans,
                        "kind": "orthanc"})
        servers.append({"name": f"ours SQLite+fs, {corpus_count:,} inst", "port": small.dicom_port,
                        "ae": small.ae_title, "http": f"http://127.0.0.1:{small.http_port}",
                        "headers": small.auth_headers,
                        "plans": {k: [_fold_query(q) for q in v] for k, v in plans.items()}, "kind": "ours-small"})
        for run in range(ctx.runs):
            for s in servers:
                for label, queries in s["plans"].items():
                    _cfind(s["port"], s["ae"], queries[:3])  # warm up
                    times, matches = _cfind(s["port"], s["ae"], queries)
                    results.setdefault((s["name"], label, "cfind"), []).append(
                        (median(times), percentile(times, 0.95), sum(matches) / len(matches)))
                    p_times, _ = _cfind_pynetdicom(s["port"], s["ae"], queries[:findscu_repeat])
                    results.setdefault((s["name"], label, "pynetdicom"), []).append(
                        (median(p_times), percentile(p_times, 0.95), 0))
                    f_times = _findscu(s["port"], s["ae"], queries[:findscu_repeat])
                    results.setdefault((s["name"], label, "findscu"), []).append(
                        (median(f_times), percentile(f_times, 0.95), 0))
                    _qido(s["http"], s["headers"], queries[:2])
                    q_times, q_matches = _qido(s["http"], s["headers"], queries)
                    results.setdefault((s["name"], label, "qido"), []).append(
                        (median(q_times), percentile(q_times, 0.95), sum(q_matches) / len(q_matches)))
                log(f"  run {run + 1} {s['name']}: done")
        # The Vietnamese-name check
        for s in servers:
            answers = _vn_find(s["port"], s["ae"], {"PatientID": corpora.VN_CHECK_ID})
            charset, name = (answers[0][0], answers[0][1]) if answers else ("-", "(not found)")
            ascii_hit = bool(_vn_find(s["port"], s["ae"], {"PatientID": corpora.VN_CHECK_ID, "PatientName": "NGUYEN*"}))
            vn_hit = bool(_vn_find(s["port"], s["ae"], {"PatientID": corpora.VN_CHECK_ID, "PatientName": "Nguyễn*"}))
            whole = "-"
            if s["kind"] != "ours-full":
                a = {r[2] + r[1] for r in _vn_find(s["port"], s["ae"], {"PatientName": "NGUYEN*"})}
                b = {r[2] + r[1] for r in _vn_find(s["port"], s["ae"], {"PatientName": "Nguyễn*"})}
                whole = f"{len(a)} / {len(b)} / {len(a & b)}"
            vn_rows.append([s["name"], f"{name} ({charset})", "yes" if name == corpora.VN_CHECK_NAME else "NO",
                            "yes" if ascii_hit else "no", "yes" if vn_hit else "no", whole])
    header = ["query", "server", "C-FIND p50 ms", "C-FIND p95", "pynetdicom SCU p50 ms", "findscu process p50 ms",
              "QIDO-RS p50 ms", "QIDO-RS p95", "matches C-FIND / QIDO", "p50 x Orthanc (C-FIND / findscu / QIDO)"]
    rows = []
    orthanc_name = next(s["name"] for s in servers if s["kind"] == "orthanc")
    worst: dict[str, dict[str, float]] = {}
    for label in servers[0]["plans"]:
        for s in servers:
            cf, fs, qd, pn = (results[(s["name"], label, m)] for m in ("cfind", "findscu", "qido", "pynetdicom"))
            ratios = []
            for method, values in (("cfind", cf), ("findscu", fs), ("qido", qd)):
                peer_values = results[(orthanc_name, label, method)]
                r = median(run_ratios([v[0] for v in values], [v[0] for v in peer_values]))
                ratios.append(r)
                if s["kind"] == "ours-full":
                    w = worst.setdefault(s["name"], {})
                    w[f"p50x {method}"] = max(w.get(f"p50x {method}", 0.0), r)
                    if method != "findscu":
                        w[f"p95 {method}"] = max(w.get(f"p95 {method}", 0.0), median([v[1] for v in values]))
            rows.append([
                label, s["name"], spread([v[0] for v in cf]), fmt(median([v[1] for v in cf]), 1),
                spread([v[0] for v in pn]), spread([v[0] for v in fs]), spread([v[0] for v in qd]), fmt(median([v[1] for v in qd]), 1),
                f"{median([v[2] for v in cf]):.0f} / {median([v[2] for v in qd]):.0f}",
                "-" if s["kind"] == "orthanc" else " / ".join(fmt(r, 2) for r in ratios),
            ])
    report.table(header, rows)
    report.note(
        f"Ours on a bulk-loaded index of {held['studies']:,} studies / {held['instances']:,} instances "
        f"(bench/synthetic.py) on both databases; Orthanc loaded with fewer: {peer_studies:,} studies of "
        f"{corpus_count // peer_studies} tiny instances sent by storescu (bench/corpus.py, same kind of names, IDs, "
        "dates, accessions, modalities), and ours loaded the same way for comparison. "
        f"{repeat} queries per kind and run (findscu and pynetdicom SCU: {findscu_repeat}), p50/p95 per run, "
        "median (min-max) over runs; QIDO with limit=100. The name query on the archive is "
        "'FAMILY MIDDLE GI*' without diacritics (bench/query.py); on the small corpus 'Family^Middle*' "
        "with diacritics for Orthanc (it cannot match Vietnamese names without them) and folded for ours. "
        "Orthanc keeps its default StorageAccessOnFind=Always. C-FIND: request to final response on one open "
        "association, timed by a client that reads only PDU headers and statuses (bench/dimse_wire.py), "
        "the server's latency; the pynetdicom SCU column is the same on pynetdicom's SCU, which decodes "
        "each answer into a Dataset (~0.5 ms per match on the client). " + NODELAY_NOTE + ".")
    report.table(["server", "C-FIND answer for VNCHECK0001 (charset)", "every letter kept",
                  "NGUYEN* finds it", "Nguyễn* finds it", "whole archive: NGUYEN* / Nguyễn* / both"], vn_rows,
                 caption=f"Vietnamese-name check: the study of '{corpora.VN_CHECK_NAME}' (ISO_IR 192) sent to "
                         "every server; C-FIND with PatientID=VNCHECK0001 plus the name key")
    for name, w in worst.items():
        report.target(f"{name}: worst C-FIND p95 < 50 ms", w["p95 cfind"], 50.0, higher_is_better=False)
        report.target(f"{name}: worst QIDO-RS p95 < 50 ms", w["p95 qido"], 50.0, higher_is_better=False)
        for method in ("cfind", "findscu", "qido"):
            report.target(f"{name}: worst p50 ratio to Orthanc ({method}) <= 1.0", w[f"p50x {method}"], 1.0,
                          higher_is_better=False)
    for row in vn_rows:
        if row[0].startswith("ours"):
            ok = row[2] == "yes" and row[3] == "yes" and row[4] == "yes"
            report.target(f"{row[0]}: every letter kept, NGUYEN* and Nguyễn* both find the study",
                          1.0 if ok else 0.0, 1.0)


# -- rendering (scenario 6) ---------------------------------------------------------
def render_samples(quick: bool) -> tuple[Path, dict[str, Any]]:
    """Sample CT and DX studies plus a 512x512 JPEG 2000 slice (cached)."""
    from pydicom import dcmread
    from pydicom.uid import JPEG2000Lossless

    from sample_studies.generate import generate_all

    out = CACHE / f"render-samples-{'quick' if quick else 'full'}"
    manifest = out / "render.json"
    if manifest.exists():
        return out, json.loads(manifest.read_text())
    shutil.rmtree(out, ignore_errors=True)
    generate_all(out / "samples", ct_slices=8 if quick else 40, quick=quick)
    studies = {s["name"]: s for s in json.loads((out / "samples" / "manifest.json").read_text())["studies"]}
    (out / "j2k").mkdir()
    ds = dcmread(out / "samples" / studies["ct"]["series"][0]["files"][0])
    ds.compress(JPEG2000Lossless)  # a new SOP Instance UID: a separate object
    ds.save_as(out / "j2k" / "ct_j2k.dcm", enforce_file_format=True)
    objects: dict[str, list[str]] = {
        "ct": [str(out / "samples" / f) for f in studies["ct"]["series"][0]["files"]],
        "dx": [str(out / "samples" / studies["dx"]["series"][0]["files"][0])],
        "j2k": [str(out / "j2k" / "ct_j2k.dcm")],
    }
    manifest.write_text(json.dumps(objects))
    return out, objects


def _get_ms(http: httpx.Client, url: str, params: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> float:
    if params:
        # Literal commas: Orthanc's DICOMweb plugin (1.7) does not percent-decode
        # "%2C" in `window`/`viewport` and answers 400; both servers get the same URL.
        from urllib.parse import quote

        url += "?" + "&".join(f"{quote(k)}={quote(v, safe=',')}" for k, v in params.items())
    start = time.perf_counter()
    response = http.get(url, headers=headers)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {response.request.url}: {response.status_code} {response.text[:500]}")
    return elapsed


def scenario_render(ctx: Ctx, report: Report) -> None:
    from pydicom import dcmread

    folder, objects = render_samples(ctx.quick)
    info: dict[str, list[dict[str, str]]] = {}
    for kind, files in objects.items():
        info[kind] = []
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            info[kind].append({"file": f, "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
                               "sop": str(ds.SOPInstanceUID), "size": f"{ds.Columns}x{ds.Rows}"})
    names = {"ct": f"CT {info['ct'][0]['size']}", "dx": f"DX {info['dx'][0]['size']}",
             "j2k": f"JPEG 2000 {info['j2k'][0]['size']}"}
    repeat = ctx.repeat
    # (object, endpoint) -> {"cold": [p50 per run], "cold95": [...], "cached": [...], "cached95": [...]}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    unsupported: dict[tuple[str, str], str] = {}

    def record(key: tuple[str, str], cold: list[float], cached: list[float]) -> None:
        entry = results.setdefault(key, {"cold": [], "cold95": [], "cached": [], "cached95": []})
        entry["cold"].append(median(cold))
        entry["cold95"].append(percentile(cold, 0.95))
        entry["cached"].append(median(cached))
        entry["cached95"].append(percentile(cached, 0.95))

    work = ctx.dir("render")
    ours_server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    (work / "data").mkdir(parents=True)
    ours_server.cli("import", str(folder / "samples" / "ct"), str(folder / "samples" / "dx"), str(folder / "j2k"))
    peer = Orthanc(work / "orthanc")
    orthanc_ids: dict[str, list[str]] = {}
    try:
        peer.start()
        with peer.http() as http:
            for kind, items in info.items():
                orthanc_ids[kind] = [http.post("/instances", content=Path(i["file"]).read_bytes()).json()["ID"]
                                     for i in items]
        peer.stop()
        for run in range(ctx.runs):
            start_ours(ours_server)
            peer.start()
            try:
                base = f"http://127.0.0.1:{ours_server.http_port}"
                with httpx.Client(base_url=base, headers=ours_server.auth_headers, timeout=120) as http:
                    for kind, items in info.items():
                        urls = [f"/dicom-web/studies/{i['study']}/series/{i['series']}/instances/{i['sop']}"
                                for i in items]
                        cold, cached = [], []
                        for i in range(repeat):
                            params = {"window": f"{40 + i + 1000 * run},{400 + 7 * i},linear"}
                            url = urls[i % len(urls)] + "/frames/1/rendered"
                            cold.append(_get_ms(http, url, params, {"Accept": "image/jpeg"}))
                            cached.append(_get_ms(http, url, params, {"Accept": "image/jpeg"}))
                        record((kind, "ours /frames/1/rendered (JPEG)"), cold, cached)
                        cold, cached = [], []
                        for i in range(repeat):
                            params = {"viewport": f"{96 + i + 50 * run},{96 + i + 50 * run}"}
                            url = urls[i % len(urls)] + "/thumbnail"
                            cold.append(_get_ms(http, url, params, {"Accept": "image/jpeg"}))
                            cached.append(_get_ms(http, url, params, {"Accept": "image/jpeg"}))
                        record((kind, "ours /thumbnail (JPEG)"), cold, cached)
                with peer.http() as http:
                    for kind, items in info.items():
                        ids = orthanc_ids[kind]

                        def measure(endpoint: str, request: Callable[[int], tuple[str, Any, Any]]) -> None:
                            """Orthanc cannot render some objects (e.g. JPEG 2000 without its GDCM
                            plugin): note the HTTP error instead of failing the scenario."""
                            cold, cached = [], []
                            try:
                                for i in range(repeat):
                                    url, params, headers = request(i)
                                    cold.append(_get_ms(http, url, params, headers))
                                    cached.append(_get_ms(http, url, params, headers))
                            except RuntimeError as exc:
                                import re

                                text = str(exc).split(": ", 1)[1]
                                details = re.search(r'"Details" : "([^"]*)', text)
                                unsupported[(kind, endpoint)] = text[:3] + (f" ({details.group(1)})" if details
                                                                            else "")
                                return
                            record((kind, endpoint), cold, cached)

                        measure("Orthanc /instances/{id}/preview (PNG)",
                                lambda i: (f"/instances/{ids[i % len(ids)]}/preview", None, None))
                        measure("Orthanc /instances/{id}/frames/0/rendered (JPEG)",
                                lambda i: (f"/instances/{ids[i % len(ids)]}/frames/0/rendered",
                                           {"window-center": str(40 + i + 1000 * run),
                                            "window-width": str(400 + 7 * i)},
                                           {"Accept": "image/jpeg"}))

                        def dicomweb(i: int) -> tuple[str, Any, Any]:
                            it = items[i % len(items)]
                            return (f"/dicom-web/studies/{it['study']}/series/{it['series']}/instances/{it['sop']}"
                                    "/frames/1/rendered",
                                    {"window": f"{40 + i + 1000 * run},{400 + 7 * i},linear"},
                                    {"Accept": "image/jpeg"})

                        measure("Orthanc DICOMweb /frames/1/rendered (JPEG)", dicomweb)
            finally:
                stop_ours(ours_server)
                peer.stop()
            log(f"  run {run + 1} done")
    finally:
        stop_ours(ours_server)
        peer.stop()
    rows = []
    for (kind, endpoint), entry in results.items():
        rows.append([names[kind], endpoint, spread(entry["cold"]), fmt(median(entry["cold95"]), 1),
                     spread(entry["cached"]), fmt(median(entry["cached95"]), 1)])
    for (kind, endpoint), error in unsupported.items():
        if (kind, endpoint) not in results:
            rows.append([names[kind], endpoint, f"fails: HTTP {error}", "-", "-", "-"])
    report.table(["object", "endpoint", "cold p50 ms", "cold p95", "cached p50 ms", "cached p95"], rows)
    if unsupported:
        report.note("Orthanc (Debian's build, no GDCM plugin) cannot decode some objects; those rows show its "
                    "HTTP answer instead of a latency.")
    report.note(
        f"{repeat} requests per row and run; a fresh server start per run; median (min-max) over runs. "
        "Cold: ours gets a window (rendered) or viewport (thumbnail) never asked before, so its render cache "
        "misses; Orthanc has no render cache, so every request renders (its 'cached' column is the same "
        "request repeated, the file then in its storage cache; /preview takes no window, its cold column "
        "is the first request after start for each instance then repeats). Objects: sample_studies CT and "
        "DX (generate_all), JPEG 2000 lossless made from a CT slice (as bench/render.py).")

    def p50(kind: str, endpoint: str, column: str = "cold") -> list[float]:
        return results.get((kind, endpoint), {}).get(column, [])

    report.target("cold rendered CT frame p50 / Orthanc DICOMweb rendered JPEG p50 <= 2.0",
                  median(run_ratios(p50("ct", "ours /frames/1/rendered (JPEG)"),
                                    p50("ct", "Orthanc DICOMweb /frames/1/rendered (JPEG)"))), 2.0,
                  higher_is_better=False)
    report.target(f"cold rendered {names['dx']} p50 / Orthanc /preview p50 <= 0.5",
                  median(run_ratios(p50("dx", "ours /frames/1/rendered (JPEG)"),
                                    p50("dx", "Orthanc /instances/{id}/preview (PNG)"))), 0.5,
                  higher_is_better=False)
    report.target("cached thumbnail p50 (CT) < 5 ms", median(p50("ct", "ours /thumbnail (JPEG)", "cached")), 5.0,
                  higher_is_better=False)


# -- C-MOVE (scenario 7) ------------------------------------------------------------
def _movescu(port: int, called: str, dest: str, study_uid: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [dcmtk("movescu"), "-S", "-aet", "BENCH", "-aec", called, "-aem", dest, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(),
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"movescu failed: {result.stderr[-1500:]}")
    return elapsed


def scenario_move(ctx: Ctx, report: Report) -> None:
    slices = 30 if ctx.quick else 300
    folder = ct_series(slices)
    count, nbytes = files_and_bytes([folder])
    study = study_uid_of(folder)
    seconds: dict[str, list[float]] = {}
    with ExitStack() as stack:
        dest = stack.enter_context(storescp(ctx, "DEST"))
        sources: dict[str, tuple[int, str]] = {}
        logs: dict[str, Callable[[], str]] = {}
        for backend in ("sqlite-fs", "pg-s3"):
            server = stack.enter_context(ours(ctx, backend))
            send(server.dicom_port, server.ae_title, [folder])
            server.cli("ae", "add", "DEST", "--host", "127.0.0.1", "--port", str(dest.port))
            sources[backend] = (server.dicom_port, server.ae_title)
            logs[backend] = server.log_text
        peer = stack.enter_context(orthanc(ctx, modalities={"dest": ("DEST", "127.0.0.1", dest.port)}))
        send(peer.dicom_port, peer.ae_title, [folder])
        sources["orthanc"] = (peer.dicom_port, peer.ae_title)
        for run in range(ctx.runs):
            for name, (port, ae) in sources.items():
                dest.clear()
                try:
                    value = _movescu(port, ae, "DEST", study)
                except RuntimeError as exc:
                    tail = logs[name]()[-3000:] if name in logs else ""
                    raise RuntimeError(f"{name}, run {run + 1}: {exc}" + (f"\n-- pacs serve log (tail):\n{tail}"
                                                                           if tail else "")) from None
                if dest.count() != count:
                    raise RuntimeError(f"{name}: storescp received {dest.count()} of {count}")
                seconds.setdefault(name, []).append(value)
                log(f"  run {run + 1} {name}: {value:.2f} s")
    rates = ingest_table(report, seconds, count, nbytes, ["orthanc"])
    report.note(f"C-MOVE of a {count}-slice 512x512 CT study ({nbytes / 1e6:.0f} MB, stored Explicit VR LE) to a "
                "DCMTK storescp (registered with `pacs ae add` on ours, in DicomModalities on Orthanc), timed as "
                "the whole DCMTK movescu process. " + NODELAY_NOTE + ".")
    _target_ratio(report, "ours SQLite+fs >= 0.5x Orthanc", rates, "sqlite-fs", "orthanc", 0.5)
    _target_ratio(report, "ours PostgreSQL+S3 >= 0.5x Orthanc", rates, "pg-s3", "orthanc", 0.5)


# -- memory (scenario 8) ------------------------------------------------------------
def scenario_memory(ctx: Ctx, report: Report) -> None:
    from .wado_memory import ACCEPTS, big_study, retrieve

    slices = 30 if ctx.quick else 300
    folder = ct_series(slices)
    ingest: dict[str, list[tuple[int, int]]] = {}
    for run in range(ctx.runs):
        for config in ("sqlite-fs", "pg-s3", "orthanc"):
            _, peak, idle = ingest_once(ctx, config, [folder], sample=True)
            ingest.setdefault(config, []).append((idle, peak))
            log(f"  run {run + 1} ingest {config}: peak {peak / 1024:.0f} MB")
    big_slices = 100 if ctx.quick else 2000
    big = big_study(big_slices)
    _, big_bytes = files_and_bytes([big])
    study = study_uid_of(big)
    wado: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    idles: dict[str, int] = {}
    with ExitStack() as stack:
        targets: list[tuple[str, str, dict[str, str], int, list[tuple[str, str]]]] = []
        for backend in ("sqlite-fs", "pg-s3"):
            server = stack.enter_context(ours(ctx, backend, start=False))
            start = time.perf_counter()
            server.data_dir.mkdir(parents=True, exist_ok=True)
            server.cli("import", str(big))
            log(f"  imported {big_bytes / 1e9:.2f} GB into {backend} in {time.perf_counter() - start:.0f} s")
            start_ours(server)
            assert server.proc is not None
            idles[backend] = tree_rss_kb(server.proc.pid)
            targets.append((backend, f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{study}",
                            server.auth_headers, server.proc.pid, list(ACCEPTS)))
        peer = stack.enter_context(orthanc(ctx))
        start = time.perf_counter()
        send(peer.dicom_port, peer.ae_title, [big])
        log(f"  loaded Orthanc in {time.perf_counter() - start:.0f} s")
        assert peer.proc is not None
        idles["orthanc"] = tree_rss_kb(peer.proc.pid)
        targets.append(("orthanc", f"http://127.0.0.1:{peer.http_port}/dicom-web/studies/{study}", {},
                        peer.proc.pid, [ACCEPTS[1]]))
        for run in range(ctx.runs):
            for name, url, headers, pid, accepts in targets:
                for label, accept in accepts:
                    received, secs, peak = retrieve(url, accept, pid, headers, rss=tree_rss_kb)
                    if received < big_bytes * 0.95:
                        raise RuntimeError(f"{name}: only {received} bytes of {big_bytes}")
                    wado.setdefault((name, label), []).append((received, secs, peak))
                    log(f"  run {run + 1} WADO {name} {label}: {received / secs / 1e6:.0f} MB/s, "
                        f"peak {peak / 1024:.0f} MB")
    rows = []
    for config, values in ingest.items():
        peaks = [p / 1024 for _, p in values]
        med, lo, hi = stat(peaks)
        rows.append([LABELS[config], f"ingest {slices} x 512 KB CT (one association)",
                     fmt(median([i / 1024 for i, _ in values])), med, lo, hi, "-"])
    for (name, label), values in wado.items():
        peaks = [p / 1024 for _, _, p in values]
        med, lo, hi = stat(peaks)
        rows.append([LABELS[name], f"WADO-RS study {big_bytes / 1e9:.2f} GB, {label}", fmt(idles[name] / 1024), med,
                     lo, hi, fmt(median([r / s / 1e6 for r, s, _ in values]))])
    report.table(["server", "while", "idle RSS MB", "peak RSS MB median", "min", "max", "MB/s"], rows)
    report.note("Resident memory of the server's whole process tree (VmRSS summed over the process and its "
                "children), sampled every 20 ms during the transfer. Orthanc's figures for information. "
                + NODELAY_NOTE + ".")
    for config in ("sqlite-fs", "pg-s3"):
        worst = max(p for _, p in ingest[config]) / 1024
        report.target(f"{BACKENDS[config]}: peak RSS while ingesting < 300 MB", worst, 300.0, higher_is_better=False)
        worst = max(p for (n, _), values in wado.items() if n == config for _, _, p in values) / 1024
        report.target(f"{BACKENDS[config]}: peak RSS while serving a {big_bytes / 1e9:.2f} GB study < 300 MB",
                      worst, 300.0, higher_is_better=False)


SCENARIOS: dict[str, tuple[int, str, Callable[[Ctx, Report], None]]] = {
    "ingest": (1, "Ingest, one association, 512x512 CT", scenario_ingest),
    "concurrent": (2, "Ingest, 4 concurrent associations, the same CT split in 4", scenario_concurrent),
    "small": (3, "Ingest of many small instances (64x64 CT), one association", scenario_small),
    "flat": (4, "Flat ingest: the CT ingest into an index holding ~1,000,000 instances", scenario_flat),
    "query": (5, "C-FIND and QIDO-RS latency on a 100,000-study archive", scenario_query),
    "render": (6, "Rendered frame and thumbnail latency", scenario_render),
    "move": (7, "C-MOVE of a CT study to DCMTK storescp", scenario_move),
    "memory": (8, "Peak RSS while ingesting and while serving a 1 GB study", scenario_memory),
    "defaults": (9, "Ingest from a storescu with DCMTK's defaults (Nagle on), small instances", scenario_defaults),
}
