"""Storage review fixes: retrieves while the index is unavailable, a damaged
(truncated) stored file in a C-GET / C-MOVE / WADO answer, a store folder
removed while serving, an indexed object missing from the store.

Real peers only: DCMTK getscu / movescu / storescp / storescu, a PostgreSQL
database of our own, `pacs serve` over HTTP.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import pydicom_file
from .peers import PG_ADMIN, Backend, PacsServer, dcmtk, free_port, run_dcmtk, wait_port

CUT = 5000  # bytes cut off the end of a stored file (disk damage)


def make_series(out: Path, count: int, patient: str = "SR001") -> tuple[str, str, list[Path]]:
    """*count* instances of one new series (InstanceNumber 1..count, the
    order retrieves send them in): study UID, series UID, files."""
    base = dcmread(pydicom_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for number in range(1, count + 1):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.InstanceNumber = patient, number
        path = out / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, series, files


def store(server: PacsServer, files: list[Path]) -> subprocess.CompletedProcess[str]:
    result = server.storescu("-v", *map(str, files))
    assert result.returncode == 0, result.stderr
    return result


def stored_path(server: PacsServer, sop_uid: str) -> Path:
    return next((server.data_dir / "objects").rglob(f"{sop_uid}.dcm"))


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def retrieve_args(server: PacsServer, study: str, verbosity: str = "-v") -> list[str]:
    return ["-S", verbosity, "-aec", server.ae_title, "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.dicom_port)]


def released(output: str) -> bool:
    """The tool ended its association with a release (not an abort)."""
    return "Releasing Association" in output and not re.search(r"Abort|Release Failed", output)


class StoreSCP:
    """DCMTK storescp as a C-MOVE destination."""

    def __init__(self, out: Path, title: str) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-od", str(out), "-aet", title, str(self.port)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def received(self) -> set[str]:
        return {sop_of(f) for f in self.out.iterdir()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture(scope="module")
def fs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """SQLite + filesystem: stored files we can damage."""
    server = PacsServer(tmp_path_factory.mktemp("storage-review") / "data",
                        Backend("sqlite-fs", None, None, {})).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def truncated(fs_server: PacsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A 4-instance series whose 2nd stored file lost its last bytes."""
    study, series, files = make_series(tmp_path_factory.mktemp("truncated"), 4, "SRTRUNC")
    store(fs_server, files)
    sops = [sop_of(f) for f in files]
    path = stored_path(fs_server, sops[1])
    data = path.read_bytes()
    path.write_bytes(data[:-CUT])
    return {"study": study, "series": series, "sops": sops, "victim": sops[1], "size": len(data)}


# -- 1. the index unavailable: C-MOVE / C-GET refused at once ----------------------------
def _allow_connections(database: str, allow: bool) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))


def test_retrieves_refused_promptly_while_the_index_is_unavailable(pg_url: str, tmp_path: Path) -> None:
    """PS3.4 C.4.2.1.5 / C.4.3.1.3: with its (own) database refusing
    connections, a C-MOVE and a C-GET get 0xA701 with an Error Comment and
    are released; once the index is back the same C-GET gets the study."""
    database = pg_url.rsplit("/", 1)[1]
    server = PacsServer(tmp_path / "data", Backend("pg-fs", pg_url, None, {})).start()
    try:
        study, _, files = make_series(tmp_path / "in", 2, "SRPGDOWN")
        store(server, files)
        server.cli("ae", "add", "SRDEST", "--host", "127.0.0.1", "--port", str(free_port()))
        _allow_connections(database, False)
        try:
            # Bounded only against a hang (the failure this test is about).
            # -d: the responses' Error Comment.
            move = run_dcmtk("movescu", "-aem", "SRDEST", *retrieve_args(server, study, "-d"), timeout=45)
            get = run_dcmtk("getscu", "-od", str(tmp_path), *retrieve_args(server, study, "-d"), timeout=45)
        finally:
            _allow_connections(database, True)
        for tool, result in (("movescu", move), ("getscu", get)):
            out = result.stdout + result.stderr
            assert "Refused: OutOfResourcesNumberOfMatches" in out or "0xa701" in out.lower(), f"{tool}: {out}"
            assert "index is unavailable" in out, f"{tool}: {out}"
            assert released(out), f"{tool}: {out}"
        got = tmp_path / "got"
        got.mkdir()
        again = run_dcmtk("getscu", "-od", str(got), *retrieve_args(server, study), timeout=45)
        assert {sop_of(f) for f in got.iterdir()} == {sop_of(f) for f in files}, again.stderr
        assert server.alive()
        assert "Exception in thread" not in server.log_text()
    finally:
        server.stop()


# -- 2. a truncated stored file fails its own sub-operation only --------------------------
def test_get_skips_a_truncated_file_and_sends_the_rest(fs_server: PacsServer, truncated: dict, tmp_path: Path) -> None:
    """PS3.4 C.4.3.3.1: the damaged instance is a failed sub-operation, the
    three intact ones arrive and the final status is 0xB000.

    (getscu 3.6.7 then fails its release: DcmSCU never reads the data set of
    a C-GET response, here the Failed SOP Instance UID List PS3.4 C.4.3.1.3.1
    requires, and takes it for a stray P-DATA. The association is not
    aborted by us: getscu only got it all because it was not.)"""
    got = tmp_path / "got"
    got.mkdir()
    result = run_dcmtk("getscu", "-od", str(got), *retrieve_args(fs_server, str(truncated["study"])))
    out = result.stdout + result.stderr
    sops = list(truncated["sops"])  # type: ignore[call-overload]
    assert {sop_of(f) for f in got.iterdir()} == set(sops) - {truncated["victim"]}, out
    assert "SubOperationsCompleteOneOrMoreFailures" in out, out
    assert re.search(r"Number of Completed Suboperations\s*:\s*3", out), out
    assert re.search(r"Number of Failed Suboperations\s*:\s*1", out), out


def test_move_skips_a_truncated_file_and_sends_the_rest(fs_server: PacsServer, truncated: dict, tmp_path: Path) -> None:
    """PS3.4 C.4.2.3.1: over C-MOVE too, with the store association kept."""
    scp = StoreSCP(tmp_path / "dest", "SRMOVE")
    try:
        fs_server.cli("ae", "add", "SRMOVE", "--host", "127.0.0.1", "--port", str(scp.port))
        result = run_dcmtk("movescu", "-aem", "SRMOVE", *retrieve_args(fs_server, str(truncated["study"])))
    finally:
        scp.stop()
    out = result.stdout + result.stderr
    assert scp.received() == set(truncated["sops"]) - {truncated["victim"]}, out  # type: ignore[call-overload]
    assert "Warning" in out and released(out), out


# -- 3. WADO never serves a truncated file as complete ------------------------------------
def test_wado_answers_500_for_a_truncated_instance(fs_server: PacsServer, truncated: dict) -> None:
    study, series, victim = truncated["study"], truncated["series"], truncated["victim"]
    with fs_server.http() as client:
        rs = client.get(f"/dicom-web/studies/{study}/series/{series}/instances/{victim}")
        uri = client.get("/wado", params={"requestType": "WADO", "studyUID": study, "seriesUID": series,
                                          "objectUID": victim, "contentType": "application/dicom"})
    for response in (rs, uri):
        assert response.status_code == 500, response.content[:300]
        assert "damaged" in response.json()["error"] and "pacs verify" in response.json()["error"]


def test_wado_study_body_breaks_off_at_a_truncated_instance(fs_server: PacsServer, truncated: dict) -> None:
    """The damaged instance is the study's second: the 200 is out, so the
    chunked body must end without its terminating chunk (the client sees it
    incomplete), never with the closing boundary as if whole."""
    with fs_server.http() as client:
        with pytest.raises(httpx.TransportError):
            client.get(f"/dicom-web/studies/{truncated['study']}")
        # The server goes on serving.
        assert client.get("/health").status_code == 200


# -- 4. a store folder removed while serving ----------------------------------------------
def test_store_recreates_a_removed_folder(fs_server: PacsServer, tmp_path: Path) -> None:
    """The shard folder of a series removed by hand: the rest of the series
    is stored (the folders made again), not refused until a restart."""
    study, series, files = make_series(tmp_path / "in", 3, "SRSHARD")
    store(fs_server, files[:1])
    shard = stored_path(fs_server, sop_of(files[0])).parents[2]
    shutil.rmtree(shard)
    result = store(fs_server, files[1:])
    assert "Failed" not in result.stderr and "Refused" not in result.stderr, result.stderr
    with fs_server.http() as client:
        for path in files[1:]:
            response = client.get(f"/dicom-web/studies/{study}/series/{series}/instances/{sop_of(path)}")
            assert response.status_code == 200, response.content[:300]


# -- 5. an indexed object missing from the store ------------------------------------------
def test_wado_names_an_object_missing_from_the_store(fs_server: PacsServer, tmp_path: Path) -> None:
    study, series, files = make_series(tmp_path / "in", 1, "SRMISSING")
    store(fs_server, files)
    sop = sop_of(files[0])
    stored_path(fs_server, sop).unlink()
    with fs_server.http() as client:
        response = client.get(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}")
    assert response.status_code == 500
    assert "missing from the archive's store" in response.json()["error"]
    assert "pacs verify" in response.json()["error"]
