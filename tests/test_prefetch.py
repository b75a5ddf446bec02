"""Prefetch of prior studies (pacs.prefetch): a new HIS order (HL7 ORM^O01
over MLLP to a real `pacs serve`) queues a job that fetches the patient's
priors from the old PACS -- DCMTK's dcmqrscp, a real Q/R SCP over sockets
with its own database, as in tests/test_remote_pull.py -- before the exam.

Checked: the right priors come and are indexed (the date window, the
modality filter, the limit, newest first; found under the patient ID and
under its citizen ID), nothing is routed, a second order for the patient
fetches nothing again, an order update or cancel queues nothing; an old PACS
that is down leaves the job waiting (its retry driven through `pacs prefetch
retry`, never by waiting), dead after its tries, a study the old PACS could
not send whole is fetched alone on the next try; `pacs prefetch run`; two
nodes on one PostgreSQL database and one store never run a job twice."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs.index import create_index_engine
from pacs.prefetch import jobs

from .conftest import Backend, PacsServer, make_backend
from .dicomfiles import image_dataset
from .peers import create_database, dcmtk, drop_database, free_port, run_dcmtk, wait_port, wait_until
from .test_worklist_ris import msa, send

ROOT = "1.2.826.0.1.3680043.8.498.7733."
HOSPITAL_ID, CITIZEN_ID = "BN0042", "079185000042"
NAME = "Nguyễn^Thị Hương"
TODAY = date.today()


@dataclass(frozen=True)
class Prior:
    key: str
    days_ago: int
    patient_id: str
    modality: str
    series: int = 1
    per_series: int = 2
    # The patient's name as the old PACS holds it.
    name: str = NAME

    @property
    def uid(self) -> str:
        return f"{ROOT}{self.key}"

    @property
    def instances(self) -> int:
        return self.series * self.per_series


# The old PACS filed the patient under the hospital number and, for some
# visits, under the citizen ID (CCCD).
P_CT_RECENT = Prior("1", 40, HOSPITAL_ID, "CT", series=2)
P_MR = Prior("2", 400, CITIZEN_ID, "MR")
P_CT_OLDER = Prior("3", 900, CITIZEN_ID, "CT")
P_CR = Prior("4", 1300, HOSPITAL_ID, "CR", per_series=1)
P_CT_TOO_OLD = Prior("5", 7 * 366, HOSPITAL_ID, "CT")  # beyond the 5 years
P_OTHER = Prior("6", 10, "BN0099", "CT")  # another patient
PRIORS = [P_CT_RECENT, P_MR, P_CT_OLDER, P_CR, P_CT_TOO_OLD, P_OTHER]


def _instance(prior: Prior, series: int, number: int) -> Dataset:
    day = (TODAY - timedelta(days=prior.days_ago)).strftime("%Y%m%d")
    return image_dataset(sop_uid=f"{prior.uid}.{series}.{number}", SpecificCharacterSet="ISO_IR 192",
                         StudyInstanceUID=prior.uid, SeriesInstanceUID=f"{prior.uid}.{series}",
                         PatientID=prior.patient_id, PatientName=prior.name, StudyDate=day, StudyTime="101500",
                         Modality=prior.modality, AccessionNumber=f"OLD{prior.key}", SeriesNumber=series,
                         InstanceNumber=number, Rows=8, Columns=8,
                         PixelData=(np.arange(64, dtype=np.uint16) * number).tobytes())


def _corpus(folder: Path, priors: list[Prior]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for prior in priors:
        for series in range(1, prior.series + 1):
            for number in range(1, prior.per_series + 1):
                ds = _instance(prior, series, number)
                files[str(ds.SOPInstanceUID)] = folder / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(files[str(ds.SOPInstanceUID)], enforce_file_format=True)
    return files


class OldPacs:
    """dcmqrscp as the hospital's old PACS (title LEGACY), moving to *ours*;
    its port is chosen (and registered with us) before it is started, so a
    test can have it down first."""

    def __init__(self, tmp: Path, ours: PacsServer, priors: list[Prior] = PRIORS) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.files = _corpus(tmp / "old-src", priors)
        db = tmp / "old-db"
        db.mkdir()
        self.config = tmp / "dcmqrscp.cfg"
        self.config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            f"HostTable BEGIN\nfilmless = ({ours.ae_title}, 127.0.0.1, {ours.dicom_port})\nHostTable END\n"
            "VendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nLEGACY {db} RW (200, 1024mb) ANY\nAETable END\n")
        indexed = run_dcmtk("dcmqridx", str(db), *map(str, self.files.values()))
        assert indexed.returncode == 0, indexed.stderr
        self.log = tmp / "dcmqrscp.log"
        self.proc: subprocess.Popen[bytes] | None = None
        ours.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(self.port))

    def start(self) -> OldPacs:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([dcmtk("dcmqrscp"), "-d", "-c", str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(self.port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def moves(self) -> int:
        """C-MOVE requests it has served."""
        return self.log.read_text(errors="replace").count("Move Destination") if self.log.exists() else 0


@contextmanager
def old_pacs(tmp: Path, ours: PacsServer, *, up: bool = True) -> Iterator[OldPacs]:
    legacy = OldPacs(tmp, ours)
    if up:
        legacy.start()
    try:
        yield legacy
    finally:
        legacy.stop()


def orm(control: str, accession: str, *, order_control: str = "NW", modality: str = "CT",
        pid3: str = f"{HOSPITAL_ID}^^^BVDK^PI~{CITIZEN_ID}^^^CCCD^NI", name: str = NAME) -> str:
    """An ORM^O01 for the patient: the hospital number (PI) is its ID, the citizen ID (NI) another."""
    return (
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ORM^O01|{control}|P|2.5|||||VN|UNICODE UTF-8\n"
        f"PID|1||{pid3}||{name}||19850101|F\n"
        f"PV1|1|O||||||BS001^Đỗ^Thanh Tùng\n"
        f"ORC|{order_control}|P{accession}|F{accession}||SC\n"
        f"OBR|1|P{accession}|F{accession}|CT-NGUC^CT ngực^L|||20241121090000|||||||||||"
        f"{accession}|RP{accession}|SPS{accession}||||{modality}|||^^^20241121090000^^R"
    )


def _order(server: PacsServer, control: str, accession: str, **kwargs: str) -> None:
    code, _ = msa(send(server, orm(control, accession, **kwargs)))
    assert code == "AA", (control, accession)


def _jobs(server: PacsServer) -> list[dict]:  # type: ignore[type-arg]
    """Every prefetch job, oldest first (read straight from the index)."""
    engine = create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite",
                                 pool_size=0)
    try:
        return list(reversed(jobs.list_jobs(engine, limit=1000)))
    finally:
        engine.dispose()


def _job_of(server: PacsServer, accession: str) -> dict | None:  # type: ignore[type-arg]
    return next((j for j in _jobs(server) if j["accession"] == accession), None)


def _settled(server: PacsServer, accession: str, state: str = "done", attempts: int | None = None,
             timeout: float = 180) -> dict:  # type: ignore[type-arg]
    """The order's job once it reached *state* (after try *attempts*, when given)."""
    def reached() -> bool:
        job = _job_of(server, accession) or {}
        return job.get("state") == state and attempts in (None, job.get("attempts"))

    assert wait_until(reached, timeout=timeout), (_job_of(server, accession), server.log_text()[-3000:])
    job = _job_of(server, accession)
    assert job is not None
    return job


def _held(server: PacsServer) -> dict[str, int]:
    """Instances indexed here per study."""
    core = server.core()
    try:
        counts: dict[str, int] = {}
        for item in core.reader.iter_stored():
            counts[item.study_uid] = counts.get(item.study_uid, 0) + 1
        return counts
    finally:
        core.close()


def _audit(server: PacsServer, retrieved: int = 0) -> list[dict]:  # type: ignore[type-arg]
    """The audit trail, once it holds *retrieved* retrieve events (the
    server writes its events a moment after they happen)."""
    events: list[dict] = []  # type: ignore[type-arg]

    def read() -> bool:
        events[:] = json.loads(server.cli("audit", "--format", "json", "--limit", "100000").stdout)
        return sum(e["action"] == "retrieve" for e in events) >= retrieved

    assert wait_until(read, timeout=30, interval=0.3), events
    return events


def _prefetch_cli(server: PacsServer, *args: str, check: bool = True) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = server.cli("prefetch", *args, "--json", check=check)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}


@pytest.fixture
def ours(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY", "PACS_PREFETCH_MAX_STUDIES": "3"})
    server.start()
    yield server
    server.stop()


def test_a_new_order_brings_the_newest_priors_once_and_routes_nothing(tmp_path: Path, ours: PacsServer) -> None:
    # A rule every received object takes: the priors must not take it.
    ours.cli("ae", "add", "AI_NODE", "--host", "127.0.0.1", "--port", str(free_port()))
    ours.cli("route", "add", "everything", "--if", "SOPClassUID~*", "--to-ae", "AI_NODE")
    with old_pacs(tmp_path, ours) as legacy:
        _order(ours, "PF1", "PFACC1")
        job = _settled(ours, "PFACC1")
        # The three newest of the five years (limit 3), found under either ID:
        # not the CR (fourth), not the one of seven years ago, not another patient's.
        assert [s["study_uid"] for s in job["studies"]] == [P_CT_RECENT.uid, P_MR.uid, P_CT_OLDER.uid]
        assert (job["found"], job["chosen"], job["retrieved"], job["missing"]) == (4, 3, 3, 0)
        assert job["attempts"] == 1 and job["last_error"] == "" and job["modality"] == "CT"
        assert job["patient_id"] == HOSPITAL_ID and job["issuer"] == "BVDK"
        assert _held(ours) == {p.uid: p.instances for p in (P_CT_RECENT, P_MR, P_CT_OLDER)}
        assert legacy.moves() == 3  # one C-MOVE per study, newest first (below)
        # Indexed: the citizen ID finds every prior (the HIS's patient holds it
        # as another ID), the Vietnamese name intact.
        with ours.http() as http:
            found = http.get("/dicom-web/studies", params={"PatientID": CITIZEN_ID})
        assert found.status_code == 200 and {s["0020000D"]["Value"][0] for s in found.json()} == {
            P_CT_RECENT.uid, P_MR.uid, P_CT_OLDER.uid}
        assert found.json()[0]["00100010"]["Value"][0]["Alphabetic"] == NAME
        routed = json.loads(ours.cli("route", "list", "--json", "--limit", "1000").stdout)["jobs"]
        assert routed == []

        events = _audit(ours, retrieved=4)
        retrieved = [e for e in events if e["action"] == "retrieve" and e.get("study_uid")]
        assert [e["study_uid"] for e in sorted(retrieved, key=lambda e: e["at"])] == [
            P_CT_RECENT.uid, P_MR.uid, P_CT_OLDER.uid]
        assert all(e["client"] == "LEGACY" and "order PFACC1" in e["detail"] and e["user"] == "prefetch"
                   for e in retrieved)
        (summary,) = [e for e in events if e["action"] == "retrieve" and not e.get("study_uid")]
        assert "3 from LEGACY" in summary["detail"] and summary["outcome"] == "success"
        assert HOSPITAL_ID in summary["patient_id"]

        # A second order for the patient: its priors are here, nothing is retrieved again.
        _order(ours, "PF2", "PFACC2", modality="MR")
        second = _settled(ours, "PFACC2")
        assert (second["retrieved"], second["already_here"], second["missing"]) == (0, 3, 0), second
        assert legacy.moves() == 3
        # An update (XO) or a cancel (CA) of an order queues nothing.
        _order(ours, "PF3", "PFACC1", order_control="XO", modality="MR")
        _order(ours, "PF4", "PFACC2", order_control="CA", modality="MR")
        assert [j["accession"] for j in _jobs(ours)] == ["PFACC1", "PFACC2"]
        # A new order over the JSON API queues one too.
        with ours.http() as http:
            placed = http.post("/api/orders", json={
                "accession_number": "PFACC3", "modality": "CR",
                "patient": {"id": HOSPITAL_ID, "issuer": "BVDK", "name": NAME}})
        assert placed.status_code == 201, placed.text
        third = _settled(ours, "PFACC3")
        assert (third["modality"], third["retrieved"], third["already_here"]) == ("CR", 0, 3)
        assert legacy.moves() == 3

        code, listed = _prefetch_cli(ours, "list", "--state", "done")
        assert code == 0 and listed["counts"] == {"done": 3}
        assert [j["accession"] for j in listed["jobs"]] == ["PFACC3", "PFACC2", "PFACC1"]


def test_same_modality_by_c_get_and_a_run_by_hand(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """prefetch_modality = same: only priors of the ordered modality (the old
    PACS does not return Modalities in Study: asked per series); C-GET needs
    no registration of ours at the old PACS. `pacs prefetch run` then takes
    a patient's newest priors of any modality."""
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request), extra_env={
        "PACS_PREFETCH_SOURCES": "LEGACY:get", "PACS_PREFETCH_MAX_STUDIES": "2", "PACS_PREFETCH_MODALITY": "same"})
    server.start()
    try:
        with old_pacs(tmp_path, server) as legacy:
            _order(server, "PG1", "PGACC1", modality="CT")
            job = _settled(server, "PGACC1")
            assert [s["study_uid"] for s in job["studies"]] == [P_CT_RECENT.uid, P_CT_OLDER.uid]
            assert all(s["modalities"] == ["CT"] for s in job["studies"])
            assert _held(server) == {P_CT_RECENT.uid: 4, P_CT_OLDER.uid: 2}
            assert legacy.moves() == 0  # C-GET

            code, run = _prefetch_cli(server, "run", "--patient", HOSPITAL_ID)
            assert code == 0, run
            assert (run["state"], run["accession"], run["retrieved"], run["already_here"]) == ("done", "", 1, 1)
            assert [s["study_uid"] for s in run["studies"]] == [P_CT_RECENT.uid, P_MR.uid]
            assert _held(server) == {P_CT_RECENT.uid: 4, P_CT_OLDER.uid: 2, P_MR.uid: 2}
            retrieved = [e for e in _audit(server, retrieved=5) if e["action"] == "retrieve"
                         and e.get("study_uid") == P_MR.uid]
            assert len(retrieved) == 1 and "C-GET" in retrieved[0]["detail"] and retrieved[0]["user"] != "prefetch"

            bad = server.cli("prefetch", "retry", "--id", str(run["id"]), check=False)
            assert bad.returncode == 1 and "is done, not pending or dead" in bad.stderr
    finally:
        server.stop()


def test_old_pacs_down_then_back_and_a_study_it_could_not_send(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The job waits its backoff (an hour here: nothing happens by itself
    during the test), is dead after its two tries, and comes back with
    `pacs prefetch retry`; a study one object of which the old PACS lost is
    the one fetched by the next try, alone."""
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request), extra_env={
        "PACS_PREFETCH_SOURCES": "LEGACY", "PACS_PREFETCH_MAX_STUDIES": "3", "PACS_PREFETCH_MAX_ATTEMPTS": "2",
        "PACS_PREFETCH_RETRY_SECONDS": "3600"})
    server.start()
    try:
        with old_pacs(tmp_path, server, up=False) as legacy:
            _order(server, "PD1", "PDACC1")
            job = _settled(server, "PDACC1", "pending", attempts=1)
            assert "association with LEGACY" in job["last_error"], job
            assert job["next_attempt_at"] > datetime.now(UTC) + timedelta(minutes=30)  # backoff, no busy loop
            code, retried = _prefetch_cli(server, "retry", "--id", str(job["id"]))
            assert code == 0 and retried == {"retried": [job["id"]]}
            job = _settled(server, "PDACC1", "dead")
            assert job["attempts"] == 2
            code, dead = _prefetch_cli(server, "list", "--state", "dead")
            assert [j["id"] for j in dead["jobs"]] == [job["id"]] and "LEGACY" in dead["jobs"][0]["last_error"]

            # Back up, but one object of the newest prior is lost on its disk.
            lost = legacy.files[f"{P_CT_RECENT.uid}.2.1"]
            lost.rename(tmp_path / "lost.dcm")
            legacy.start()
            code, retried = _prefetch_cli(server, "retry", "--all-dead")
            assert retried == {"retried": [job["id"]]}
            job = _settled(server, "PDACC1", "pending", attempts=1)
            assert (job["retrieved"], job["missing"]) == (2, 1), job
            assert P_CT_RECENT.uid in job["last_error"] and "1 of 4 instances missing" in job["last_error"]
            assert _held(server) == {P_CT_RECENT.uid: 3, P_MR.uid: 2, P_CT_OLDER.uid: 2}

            (tmp_path / "lost.dcm").rename(lost)  # found again
            moves = legacy.moves()
            _prefetch_cli(server, "retry", "--id", str(job["id"]))
            job = _settled(server, "PDACC1")
            assert job["attempts"] == 2 and (job["retrieved"], job["missing"]) == (3, 0) and job["last_error"] == ""
            assert legacy.moves() == moves + 1  # the missing object only: no other study asked again
            assert _held(server) == {p.uid: p.instances for p in (P_CT_RECENT, P_MR, P_CT_OLDER)}
    finally:
        server.stop()


def test_two_nodes_never_run_one_job_twice(tmp_path: Path, postgres: str) -> None:
    """Two `pacs serve` on one PostgreSQL database and one store, both
    running prefetch jobs: orders sent to either node are each fetched by
    one node, once (one try, one C-MOVE per prior)."""
    pg = create_database(postgres)
    backend = Backend("pg-fs", pg, f"file://{tmp_path / 'objects'}", {})
    env = {"PACS_PREFETCH_SOURCES": "LEGACY", "PACS_PREFETCH_MAX_STUDIES": "10"}
    a = PacsServer(tmp_path / "node-a", backend, extra_env={**env, "PACS_NODE_ID": "node-a"})
    b = PacsServer(tmp_path / "node-b", backend, extra_env={**env, "PACS_NODE_ID": "node-b"})
    try:
        a.start()
        b.start()
        # Three patients, each with two priors at the old PACS (which moves to node A).
        patients = [(f"BN77{n}", f"0791850077{n}") for n in range(3)]
        priors = [Prior(f"{10 + 2 * n + k}", 30 + 100 * k, pid if k else cccd, "CT")
                  for n, (pid, cccd) in enumerate(patients) for k in range(2)]
        legacy = OldPacs(tmp_path, a, priors).start()
        try:
            for n, (pid, cccd) in enumerate(patients):
                node = (a, b)[n % 2]
                _order(node, f"PC{n}", f"PCACC{n}", pid3=f"{pid}^^^BVDK^PI~{cccd}^^^CCCD^NI", name="Trần^Văn Bảo")
            done = [_settled(a, f"PCACC{n}") for n in range(3)]
            assert all(j["attempts"] == 1 and j["retrieved"] == 2 for j in done), done
            assert {j["node"] for j in done} <= {"node-a", "node-b"}
            assert legacy.moves() == len(priors)
            assert _held(b) == {p.uid: p.instances for p in priors}
            retrieved = [e["study_uid"] for e in _audit(a, retrieved=len(priors) + 3)
                         if e["action"] == "retrieve" and e.get("study_uid")]
            assert sorted(retrieved) == sorted(p.uid for p in priors)
        finally:
            legacy.stop()
    finally:
        a.stop()
        b.stop()
        drop_database(pg, postgres)


def test_claims_race_on_postgresql(pg_url: str) -> None:
    """Eight claimers at once on one PostgreSQL queue: each job is claimed
    once, and of one patient's two jobs only one runs at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from pacs.index import upgrade_schema
    from pacs.index.db import write_transaction

    engine = create_index_engine(pg_url)
    try:
        upgrade_schema(engine)
        with write_transaction(engine) as conn:
            first = jobs.enqueue(conn, patient_id="BN1", accession="R1")
            jobs.enqueue(conn, patient_id="BN1", accession="R2")
            other = jobs.enqueue(conn, patient_id="BN2", accession="R3")
        lease = timedelta(minutes=5)
        with ThreadPoolExecutor(8) as pool:
            claimed = [job for job in pool.map(lambda n: jobs.claim_next(engine, f"node-{n}", lease), range(8)) if job]
        assert sorted(job.patient_id for job in claimed) == ["BN1", "BN2"]
        assert {job.pk for job in claimed} <= {first, first + 1, other}
        held = next(job for job in claimed if job.patient_id == "BN1")
        assert jobs.claim_next(engine, "late", lease) is None  # BN1's other job waits for this one
        assert jobs.finish(engine, held, {}, complete=True, error="", max_attempts=3, retry_seconds=1) == "done"
        follower = jobs.claim_next(engine, "late", lease)
        assert follower is not None and follower.patient_id == "BN1" and follower.pk != held.pk
        # The first holder's claim is spent: it can change nothing any more.
        assert not jobs.save_progress(engine, held, {"x": 1}) and not jobs.renew(engine, held, lease)
    finally:
        engine.dispose()


def test_prefetch_settings_are_checked(tmp_path: Path) -> None:
    from pacs.settings import load_settings

    settings = load_settings(data_dir=tmp_path, prefetch_sources="OLDPACS, RIS2:get")
    assert settings.prefetch_source_methods == [("OLDPACS", "move"), ("RIS2", "get")]
    assert (settings.prefetch_years, settings.prefetch_max_studies, settings.prefetch_modality) == (5, 10, "all")
    for bad, said in (("OLDPACS:put", "move or get"), ("A,A:get", "listed twice"),
                      ("WAYTOOLONGAETITLE1", "not an AE title")):
        with pytest.raises(ValueError, match=said):
            load_settings(data_dir=tmp_path, prefetch_sources=bad)
