"""Review of the prefetch of prior studies (pacs.prefetch): what went wrong
with a real `pacs serve`, a real old PACS (DCMTK's dcmqrscp, or pynetdicom
over real sockets where the old PACS must misbehave) and HL7 over MLLP."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs.index import create_index_engine
from pacs.prefetch import jobs

from .conftest import PacsServer, make_backend
from .dicomfiles import image_dataset, make_ct
from .peers import free_port, wait_until
from .test_merge_review import _aa, _adt, _orm, _store
from .test_prefetch import (
    CITIZEN_ID,
    HOSPITAL_ID,
    NAME,
    P_CT_OLDER,
    P_CT_RECENT,
    P_MR,
    _held,
    _order,
    _prefetch_cli,
    _settled,
    old_pacs,
)

ROOT = "1.2.826.0.1.3680043.8.498.7734."


def _server(tmp_path: Path, request: pytest.FixtureRequest, **env: str) -> PacsServer:
    """`pacs serve` asking the old PACS (LEGACY) for 3 priors per order; a try
    that did not finish waits an hour (nothing is retried by itself during a
    test: `pacs prefetch retry` drives it)."""
    return PacsServer(tmp_path / "data", make_backend("sqlite-fs", request), extra_env={
        "PACS_PREFETCH_SOURCES": "LEGACY", "PACS_PREFETCH_MAX_STUDIES": "3", "PACS_PREFETCH_RETRY_SECONDS": "3600",
        **env})


def test_an_order_cancelled_before_its_job_ran_fetches_nothing(tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """The old PACS was down when the order came; the HIS cancelled the
    order (ORC CA) before it was back. The job still fetched the patient's
    priors for an examination that will not happen (the old PACS loaded, the
    archive filled, a patient's records copied for nothing). It now ends done,
    nothing asked or retrieved, saying the order was cancelled."""
    server = _server(tmp_path, request).start()
    try:
        with old_pacs(tmp_path, server, up=False) as legacy:
            _order(server, "RVC1", "RVCACC1")
            job = _settled(server, "RVCACC1", "pending", attempts=1)
            _order(server, "RVC2", "RVCACC1", order_control="CA")
            legacy.start()
            _prefetch_cli(server, "retry", "--id", str(job["id"]))
            job = _settled(server, "RVCACC1", "done")
            assert (job["found"], job["retrieved"]) == (0, 0), job
            assert "cancelled" in job["last_error"], job
            assert legacy.moves() == 0 and _held(server) == {}
    finally:
        server.stop()


def test_a_patient_merged_before_the_job_ran_gets_the_surviving_patients_priors(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The desk registered a duplicate (a temporary number) and the order was
    placed for it while the old PACS was down; the HIS then merged it into
    the patient's real record (ADT^A40), which moved the order. The job
    still searched the old PACS by the duplicate's identifiers alone (as they
    were at queueing), found nothing and was done: the new examination came
    without the priors the old PACS holds under the hospital number and the
    citizen ID. It now searches by the identifiers of the order's patient as
    they are when it runs, and the priors are the examination's."""
    server = _server(tmp_path, request).start()
    try:
        with old_pacs(tmp_path, server, up=False) as legacy:
            _aa(server, _adt("A04", f"{HOSPITAL_ID}^^^BVDK^PI~{CITIZEN_ID}^^^CCCD^NI", NAME, "19850101", "F"))
            exam = generate_uid()
            _aa(server, _orm("TMP0042^^^BVDK^PI", "RVMACC1", NAME, exam))
            job = _settled(server, "RVMACC1", "pending", attempts=1)
            assert job["patient_id"] == "TMP0042"
            _aa(server, _adt("A40", f"{HOSPITAL_ID}^^^BVDK^PI", NAME, mrg="TMP0042^^^BVDK^PI"))
            legacy.start()
            _prefetch_cli(server, "retry", "--id", str(job["id"]))
            job = _settled(server, "RVMACC1")
            assert [s["study_uid"] for s in job["studies"]] == [P_CT_RECENT.uid, P_MR.uid, P_CT_OLDER.uid], job
            assert (job["patient_id"], job["issuer"], job["retrieved"]) == (HOSPITAL_ID, "BVDK", 3)
            # The examination arrives: the prior under the hospital number is one of its priors.
            _store(server, make_ct(tmp_path / "exam.dcm", StudyInstanceUID=exam, AccessionNumber="RVMACC1",
                                   PatientID=HOSPITAL_ID, PatientName="NGUYEN^THI HUONG"))
            with server.http() as http:
                priors = http.get(f"/api/studies/{exam}/priors")
            assert priors.status_code == 200, priors.text
            assert P_CT_RECENT.uid in [p["study_uid"] for p in priors.json()["items"]], priors.json()
    finally:
        server.stop()


@contextmanager
def _frozen_old_pacs(patient_id: str, study_uid: str) -> Iterator[tuple[int, threading.Event]]:
    """An old PACS (pynetdicom, real associations) that answers C-FIND for one
    study of *patient_id* (two instances) and, asked to move it, says nothing
    more until the test ends (a large study over a slow link, a frozen
    archive). Yields its port and an event set once a C-MOVE is under way."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    )

    series_uid = f"{study_uid}.1"
    instances = [f"{series_uid}.{n}" for n in (1, 2)]
    moving, done = threading.Event(), threading.Event()

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        answer = Dataset()
        answer.QueryRetrieveLevel = level = query.QueryRetrieveLevel
        if level == "STUDY":
            if query.get("PatientID") != patient_id:
                yield 0x0000, None
                return
            answer.PatientID, answer.StudyInstanceUID = patient_id, study_uid
            answer.StudyDate, answer.StudyTime, answer.NumberOfStudyRelatedInstances = "20250102", "080000", "2"
            yield 0xFF00, answer
        elif level == "SERIES":
            answer.StudyInstanceUID, answer.SeriesInstanceUID = study_uid, series_uid
            answer.NumberOfSeriesRelatedInstances = "2"
            answer.Modality = "CT"
            yield 0xFF00, answer
        else:
            for sop_uid in instances:
                item = Dataset()
                item.QueryRetrieveLevel = "IMAGE"
                item.StudyInstanceUID, item.SeriesInstanceUID, item.SOPInstanceUID = study_uid, series_uid, sop_uid
                yield 0xFF00, item

    def on_move(event: evt.Event) -> Iterator[object]:
        moving.set()
        done.wait(300)
        yield "127.0.0.1", free_port()
        yield 0

    ae = AE(ae_title="LEGACY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move)])
    try:
        yield port, moving
    finally:
        done.set()
        scp.shutdown()


def _job_rows(server: PacsServer) -> list[dict]:  # type: ignore[type-arg]
    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    try:
        return jobs.list_jobs(engine)
    finally:
        engine.dispose()


def test_pacs_serve_stops_while_a_retrieve_runs_and_gives_the_job_back(tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    """`pacs serve` stopped (systemctl stop, a Docker restart) while the old
    PACS was still moving a prior: the prefetch worker was only asked to stop
    between two studies, and after the worker's 30-second grace pynetdicom's
    reactor thread of the C-MOVE kept the process alive until the old PACS
    answered (here: never; systemd or Docker killed it), the job left
    `running` under its lease, its try counted. The retrieve's association is
    now aborted at once and the job given back (pending, the try not
    counted) before the server exits."""
    server = _server(tmp_path, request, PACS_DICOM_TIMEOUT="600").start()
    try:
        with _frozen_old_pacs(HOSPITAL_ID, f"{ROOT}1") as (port, moving):
            server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
            _order(server, "RVS1", "RVSACC1")
            assert moving.wait(120), server.log_text()[-3000:]
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=120) == 0
            (job,) = _job_rows(server)
            assert (job["state"], job["attempts"]) == ("pending", 0), (job, server.log_text()[-3000:])
            assert "released" in server.log_text()
    finally:
        server.stop()


def test_a_prefetch_source_not_in_the_ae_registry_is_said_at_start(tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """PACS_PREFETCH_SOURCES with a typo (`OLDPAC`, a JSON list `["OLDPACS"]`,
    `OLDPACS/get`) passed the setting's check (any 1-16 characters are an AE
    title) and nothing was said at start: each order's job then failed
    `... is not in the AE registry` ten times over some hours before anyone
    saw it. `pacs serve` now names each source the registry does not know
    when it starts, with the command that registers it."""
    server = _server(tmp_path, request, PACS_PREFETCH_SOURCES='LEGACY,["OLDPACS"]')
    server.dicom_port = free_port()
    server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(free_port()))
    server.start()
    try:
        # Said before HTTP serves (its port is bound, and answers, earlier).
        assert wait_until(lambda: "HTTP listening" in server.log_text(), timeout=60)
        log = server.log_text()
        assert '["OLDPACS"] is not in the AE registry' in log and "pacs ae add" in log, log[-3000:]
        assert "LEGACY is not in the AE registry" not in log
    finally:
        server.stop()


def _in_range(value: str, wanted: str) -> bool:
    """DICOM range matching of a DA value (``A``, ``A-B``, ``A-``, ``-B``, or empty: any)."""
    if not wanted:
        return True
    if "-" not in wanted:
        return value == wanted
    low, high = wanted.split("-", 1)
    return bool(value) and (not low or value >= low) and (not high or value <= high)


@contextmanager
def _capping_old_pacs(patient_id: str, days: list[str], cap: int) -> Iterator[int]:
    """An old PACS (pynetdicom, real associations) holding one study of
    *patient_id* on each of *days* that answers a C-FIND with at most *cap*
    matches, in the order it stored them (oldest first), then ends the
    answer with 0xFE00 as Orthanc does at its LimitFindResults. It lists no
    series (nothing to retrieve: the test is about what is chosen). Yields
    its port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if query.QueryRetrieveLevel != "STUDY" or query.get("PatientID") != patient_id:
            yield 0x0000, None
            return
        matches = [day for day in sorted(days) if _in_range(day, str(query.get("StudyDate", "") or ""))]
        for day in matches[:cap]:
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.PatientID, answer.StudyInstanceUID = patient_id, f"{ROOT}9.{day}"
            answer.StudyDate, answer.StudyTime = day, "090000"
            yield 0xFF00, answer
        if len(matches) > cap:
            yield 0xFE00, None

    ae = AE(ae_title="LEGACY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port
    finally:
        scp.shutdown()


def test_an_old_pacs_that_cuts_its_answer_still_gives_the_newest_priors(tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """The old PACS answers at most a few matches per C-FIND and ends with
    0xFE00 (Orthanc's LimitFindResults; a patient with years of daily chest
    films): its first matches are the oldest it holds. The job took the
    newest of those, the newest priors beyond the cut never came, and the
    note it kept was shown nowhere (the job `done`). The patient's window is
    now asked again date range by date range, as `pacs remote pull` does,
    and the newest priors are chosen."""
    from datetime import date, timedelta

    today = date.today()
    days = [(today - timedelta(days=n)).strftime("%Y%m%d") for n in (20, 90, 200, 400, 700, 1000, 1300)]
    server = _server(tmp_path, request).start()
    try:
        with _capping_old_pacs(HOSPITAL_ID, days, cap=2) as port:
            server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
            _order(server, "RVT1", "RVTACC1")
            job = _settled(server, "RVTACC1", "pending", attempts=1)
            assert job["found"] == len(days), job
            assert [s["date"] for s in job["studies"]] == days[:3], job
    finally:
        server.stop()


def test_the_audit_trail_of_a_patient_shows_the_priors_retrieved_for_it(tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """Each prior's `retrieve` event named the patient as the old PACS sent
    the ID (`BN0042`, no issuer), not as this archive files the study
    (`BN0042^^^BVDK`, the HIS's patient): `pacs audit --patient
    BN0042^^^BVDK` (that hospital's patient only) showed the run's summary
    but none of the studies brought in for it. The event now names the
    patient the study is filed under here."""
    server = _server(tmp_path, request).start()
    try:
        with old_pacs(tmp_path, server):
            _order(server, "RVA1", "RVAACC1")
            job = _settled(server, "RVAACC1")
            assert job["retrieved"] == 3

            def events() -> list[dict]:  # type: ignore[type-arg]
                listed = json.loads(server.cli("audit", "--format", "json", "--patient",
                                               f"{HOSPITAL_ID}^^^BVDK").stdout)
                return [e for e in listed if e["action"] == "retrieve" and e.get("study_uid")]

            assert wait_until(lambda: len(events()) >= 1, timeout=30), events()
            assert [e["study_uid"] for e in events()] == [P_CT_RECENT.uid]
            assert events()[0]["patient_id"] == f"{HOSPITAL_ID}^^^BVDK"
    finally:
        server.stop()


def test_prefetch_run_refuses_a_patient_id_pattern(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`pacs prefetch run --patient 'BN00*'` (an operator hoping for every
    patient of a ward) asked the old PACS nothing -- an ID with a wildcard
    would match other patients, so it is never searched -- and still said
    "0 prior(s) found at LEGACY" and exited 0: the operator believed the old
    PACS held nothing. It is now refused (exit 2) with the reason, and no job
    is queued."""
    server = _server(tmp_path, request).start()
    try:
        server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(free_port()))
        for pattern in ("BN00*", "BN004?", "BN1\\BN2", " "):
            result = server.cli("prefetch", "run", "--patient", pattern, check=False)
            assert result.returncode == 2 and "not a pattern" in result.stderr, (pattern, result.stdout, result.stderr)
        assert _job_rows(server) == []
    finally:
        server.stop()


def test_the_old_pacs_is_not_searched_by_an_insurance_number(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other identifier of the patient was searched at the old PACS, the
    insurance number (BHYT) too: shared within a family and often mistyped, it
    brought another person's studies into the archive. By default only the
    national IDs and the IDs the HIS merged away are searched; "*" asks all."""
    from pacs.prefetch.jobs import Job
    from pacs.settings import Settings

    job = Job(pk=1, patient_id="BN0042", issuer="BVDK", modalities=["CT"], accession="A1", attempts=0, claim="c",
              other_ids=[("079185000042", "CCCD", "NI"), ("DN4797912345678", "BHYT", "HC"),
                         ("BN0007", "BVDK", "MERGED"), ("001085012345", "", "NN")])
    assert job.identifiers(Settings(data_dir=tmp_path).prefetch_other_ids) == [
        "BN0042", "079185000042", "BN0007", "001085012345"]
    monkeypatch.setenv("PACS_PREFETCH_OTHER_IDS", "*")
    assert "DN4797912345678" in job.identifiers(Settings(data_dir=tmp_path).prefetch_other_ids)
    monkeypatch.setenv("PACS_PREFETCH_OTHER_IDS", "CCCD, bhyt")
    assert job.identifiers(Settings(data_dir=tmp_path).prefetch_other_ids) == [
        "BN0042", "079185000042", "DN4797912345678"]
