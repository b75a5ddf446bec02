"""`pacs serve --dicom-workers N` (dicom_scp.workers): several processes accept
on one DICOM port; associations are spread over them, every object is stored
once and byte-identical, queries and retrieves work from any worker, a
crashed worker is replaced, and no worker outlives its supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import PacsServer, run_dcmtk
from .dicomfiles import make_ct
from .peers import Backend, wait_until
from .test_dimse_ingest import assert_stored_as_sent
from .test_query_retrieve import StoreSCP, findscu

WORKERS = 2


def _workers(server: PacsServer) -> list[int]:
    """PIDs of the worker processes of *server*."""
    assert server.proc is not None
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(server.proc.pid)],
                         capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "dicom_scp.workers" in line]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet) no longer runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _studies(folder: Path, studies: int, per_study: int) -> list[Path]:
    files = []
    for s in range(studies):
        sub = folder / f"m{s}"
        sub.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for i in range(per_study):
            files.append(make_ct(sub / f"{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                                 PatientID=f"W{s}", PatientName="Nguyễn^Văn An", SpecificCharacterSet="ISO_IR 192",
                                 InstanceNumber=i + 1, AccessionNumber=f"ACC{s}"))
    return files


@pytest.fixture
def server(tmp_path: Path, backend: Backend) -> PacsServer:
    srv = PacsServer(tmp_path / "data", backend, extra_env={"PACS_DICOM_WORKERS": str(WORKERS)}).start()
    yield srv
    srv.stop()


def test_concurrent_modalities_through_workers(server: PacsServer, tmp_path: Path) -> None:
    assert len(_workers(server)) == WORKERS
    files = _studies(tmp_path / "in", studies=4, per_study=15)
    results: list[subprocess.CompletedProcess[str]] = []

    def send(folder: Path) -> None:
        results.append(server.storescu("+sd", str(folder)))

    threads = [threading.Thread(target=send, args=(tmp_path / "in" / f"m{s}",)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert server.stats()["instances"] == len(files) and server.stats()["studies"] == 4
    # Each object once, byte-identical, whichever worker took it.
    assert_stored_as_sent(server, files, tmp_path)
    assert "Traceback" not in server.log_text()
    # Queries and retrieves are served by any worker.
    for _ in range(4):
        found = findscu(server, tmp_path, "STUDY", {"PatientName": "NGUYEN*", "StudyInstanceUID": ""})
        assert len(found) == 4
    dest = StoreSCP(tmp_path / "moved", accept_all=True)
    try:
        server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(dest.port))
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        moved = run_dcmtk("movescu", "-S", "-aem", "MOVEDEST", "-aec", server.ae_title,
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                          "127.0.0.1", str(server.dicom_port))
        assert moved.returncode == 0, moved.stderr
        assert len(dest.received()) == 15
    finally:
        dest.stop()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_ports_open_only_once_every_worker_accepts(server: PacsServer) -> None:
    # The HTTP port (what operators and the bench wait for) opens after the
    # pool reported every worker ready: a modality sending at once is not held
    # in the backlog while a worker still imports.
    log = server.log_text()
    for number in range(WORKERS):
        assert f"DICOM worker {number} ready" in log, log[-2000:]


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_crashed_worker_is_replaced_and_the_port_keeps_answering(server: PacsServer, tmp_path: Path) -> None:
    first = _workers(server)
    os.kill(first[0], signal.SIGKILL)
    # The other worker answers meanwhile.
    assert run_dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port)).returncode == 0
    assert wait_until(lambda: len(_workers(server)) == WORKERS and first[0] not in _workers(server),
                      timeout=30, interval=0.2)
    assert "exited with -9; restarting it" in server.log_text()
    files = _studies(tmp_path / "in", studies=1, per_study=5)
    assert server.storescu("+sd", str(files[0].parent)).returncode == 0
    assert server.stats()["instances"] == 5


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_workers_stop_with_their_supervisor(server: PacsServer, tmp_path: Path) -> None:
    # SIGTERM: a clean stop, workers included.
    pids = _workers(server)
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=10, interval=0.2)
    # SIGKILL of the supervisor: the kernel kills the workers (PR_SET_PDEATHSIG),
    # nothing is left answering on the port, and a restart serves again.
    server.start()
    pids = _workers(server)
    assert len(pids) == WORKERS
    server.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=10, interval=0.2)
    assert run_dcmtk("echoscu", "-to", "3", "-aec", server.ae_title, "127.0.0.1",
                     str(server.dicom_port)).returncode != 0
    server.start()
    assert run_dcmtk("echoscu", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port)).returncode == 0
