"""Long-run review fixes: the audit trail is written while requests keep
coming; restarted DICOM workers stop gracefully; /health applies the store's
low-water mark ingest applies; SIGHUP stops `pacs serve` gracefully."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs.audit import AuditTrail, Event, events_t
from pacs.index import create_index_engine, upgrade_schema

from .dicomfiles import make_ct
from .peers import Backend, PacsServer, wait_until
from .test_dimse_failures import scu_store_file
from .test_disk_full import MB, OUT_OF_RESOURCES, fill, serving, tmpfs

SQLITE_FS = Backend("sqlite-fs", None, None, {})


def audit_rows(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events_t)).scalar_one())


# -- 1: the audit trail under a steady stream --------------------------------------------
def test_audit_events_are_written_while_events_keep_coming(pg_url: str) -> None:
    """A batch waited for a 0.2 s gap between events: a viewer scrolling
    without pause had nothing written (a crash lost it all)."""
    engine = create_index_engine(pg_url, pool_size=2)
    upgrade_schema(engine)
    trail = AuditTrail(engine, flush_seconds=0.2)
    try:
        recorded = 0
        # An event every 20 ms (pacing the stream, not waiting for a result).
        while audit_rows(engine) == 0 and recorded < 600:
            trail.record(Event(action="view", user="scroller", detail=str(recorded)))
            recorded += 1
            time.sleep(0.02)
        assert audit_rows(engine) > 0, f"{recorded} events recorded without a pause, none written"
    finally:
        trail.close()
        engine.dispose()


def test_a_burst_of_audit_events_is_written_in_batches_before_its_deadline(pg_url: str) -> None:
    """A full batch is written at once, whatever the flush delay: a burst
    is not held back (and is not one huge INSERT)."""
    engine = create_index_engine(pg_url, pool_size=2)
    upgrade_schema(engine)
    trail = AuditTrail(engine, flush_seconds=3600)
    try:
        for n in range(5000):
            trail.record(Event(action="view", user="burst", detail=str(n)))
        assert wait_until(lambda: audit_rows(engine) > 0, timeout=60), "a burst of 5000 events waited for its deadline"
        trail.flush()
        assert audit_rows(engine) == 5000
    finally:
        trail.close()
        engine.dispose()


# -- 2 and 4: worker processes -------------------------------------------------------------
def worker_pids(server: PacsServer) -> set[int]:
    """The DICOM worker processes of *server*, whichever of its threads forked them."""
    assert server.proc is not None
    pids: set[int] = set()
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"dicom_scp.workers" in Path(f"/proc/{child}/cmdline").read_bytes():
                    pids.add(int(child))
            except OSError:
                continue
    return pids


def spares_of(data_dir: Path, pid: int) -> list[str]:
    """Staging files a worker made ahead of need (named for its pid)."""
    return [p.name for p in (data_dir / "objects" / ".tmp").glob(f"{pid}.*.tmp")]


def test_restarted_workers_stop_gracefully(tmp_path: Path) -> None:
    """Workers restarted by the watcher thread were SIGKILLed at a normal
    stop (PR_SET_PDEATHSIG fired when that thread ended, before the SIGTERM):
    their staging files, audit events and in-flight C-STOREs were lost."""
    data = tmp_path / "data"
    server = PacsServer(data, SQLITE_FS, extra_env={"PACS_DICOM_WORKERS": "2"}).start()
    try:
        first = worker_pids(server)
        assert len(first) == 2, first
        for pid in first:
            os.kill(pid, signal.SIGKILL)

        def restarted() -> set[int]:
            pids = worker_pids(server) - first
            return pids if len(pids) == 2 and all(f"ready (pid {p})" in server.log_text() for p in pids) else set()

        assert wait_until(lambda: bool(restarted()), timeout=120), server.log_text()[-2000:]
        again = restarted()
        sent = [0]

        def both_have_stored() -> bool:
            # The idle worker takes the next association: send until each has
            # stored (its spare staging files exist).
            sent[0] += 1
            assert scu_store_file(server, make_ct(tmp_path / f"ct{sent[0]}.dcm")) == 0
            return all(spares_of(data, pid) for pid in again)

        assert wait_until(both_have_stored, timeout=120, interval=0), sent
        server.stop()
        assert server.proc is not None and server.proc.returncode == 0, server.log_text()[-2000:]
        left = {pid: spares_of(data, pid) for pid in again}
        assert not any(left.values()), f"restarted workers killed, staging files left: {left}"
        log = server.log_text()
        for number in (0, 1):
            assert f"DICOM worker {number} stopping on SIGTERM" in log, log[-2000:]
    finally:
        server.stop()


def test_sighup_stops_the_server_and_its_workers_gracefully(tmp_path: Path) -> None:
    """SIGHUP (a closing terminal signals the whole process group) killed
    the supervisor and the workers at once, unlogged, nothing closed."""
    server = PacsServer(tmp_path / "data", SQLITE_FS, extra_env={"PACS_DICOM_WORKERS": "2"}).start()
    try:
        workers = worker_pids(server)
        assert len(workers) == 2, workers
        assert server.proc is not None
        for pid in workers:
            os.kill(pid, signal.SIGHUP)
        os.kill(server.proc.pid, signal.SIGHUP)
        server.proc.wait(timeout=120)
        log = server.log_text()
        assert server.proc.returncode == 0, (server.proc.returncode, log[-2000:])
        assert "stopping on SIGHUP" in log, log[-2000:]
        for number in (0, 1):
            assert f"DICOM worker {number} stopping on SIGHUP" in log, log[-2000:]
    finally:
        server.stop()


# -- 3: /health and the low-water mark -------------------------------------------------------
pytest_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest_root
def test_health_is_degraded_while_the_store_is_below_its_low_water_mark(tmp_path: Path) -> None:
    """Default mark (512 MB) on a 100 MB disk: every C-STORE refused 0xA700
    while /health said "ok"."""
    with tmpfs(tmp_path / "data", 100) as data, serving(data) as server:
        assert scu_store_file(server, make_ct(tmp_path / "ct.dcm")) == OUT_OF_RESOURCES
        with server.http() as http:
            health = http.get("/health")
        assert health.status_code == 503, health.text
        body = health.json()
        assert body["status"] == "degraded" and body["index"] == "ok", body
        assert body["storage"].startswith("error") and "low-water mark" in body["storage"], body
        assert "0xA700" in body["storage"], body


@pytest_root
def test_health_follows_a_lowered_low_water_mark(tmp_path: Path) -> None:
    """PACS_MIN_FREE_BYTES of 8 MB on a 40 MB disk: stores succeed, and
    /health said 503 "index disk full" (its own fixed 64 MB); it says ok,
    and degraded once the store is below the mark it was given."""
    with tmpfs(tmp_path / "data", 40) as data, serving(data, PACS_MIN_FREE_BYTES=str(8 * MB)) as server:
        assert scu_store_file(server, make_ct(tmp_path / "ct.dcm")) == 0
        with server.http() as http:
            ok = http.get("/health")
            assert ok.status_code == 200, ok.text
            filler = fill(data, 4 * MB)
            # The index beside the store is below the same mark; the store's
            # figure is up to a second old (as for ingest).
            assert wait_until(lambda: "low-water mark" in http.get("/health").json()["storage"], timeout=30)
            assert http.get("/health").status_code == 503
            assert scu_store_file(server, make_ct(tmp_path / "ct2.dcm")) == OUT_OF_RESOURCES
            filler.unlink()
            assert wait_until(lambda: http.get("/health").status_code == 200, timeout=30)
