"""A prior the old PACS filed under the patient's citizen ID alone (Patient
ID 079185000042, no issuer) was indexed as a patient of its own: the
radiologist reading the ordered examination did not see it among its priors
(/api/studies/{uid}/priors goes by the index's patient), the very point of
the prefetch. Once complete here, such a prior -- found at the old PACS only
by an identifier ``prefetch_other_ids`` trusts -- is now filed under the
order's patient, as the HIS reconciliation files a study (pacs.prefetch.filing).

A real `pacs serve` (HL7 ORM^O01 over MLLP), DCMTK's dcmqrscp as the old PACS
(tests/test_prefetch.py), DICOM C-FIND and DICOMweb against this archive;
the claim and a race with an ingest on a real PostgreSQL database."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs.index import create_index_engine
from pacs.index.models import Patient, PatientIdentifier
from pacs.prefetch import jobs

from .conftest import PacsServer, make_backend
from .dicomfiles import make_ct
from .peers import wait_until
from .test_merge_review import _corrections, _metadata
from .test_prefetch import CITIZEN_ID, HOSPITAL_ID, NAME, OldPacs, Prior, _held, _order, _settled
from .test_worklist_ris import _cfind_names

INSURANCE = "DN4797912345678"
OLD_NAME = "NGUYEN^THI HUONG"  # as the old PACS's desk typed it, without diacritics
PID3 = f"{HOSPITAL_ID}^^^BVDK^PI~{CITIZEN_ID}^^^CCCD^NI~{INSURANCE}^^^BHYT^HC"
HIS_PATIENT = {"PatientName": NAME, "PatientID": HOSPITAL_ID, "IssuerOfPatientID": "BVDK",
               "PatientBirthDate": "19850101", "PatientSex": "F"}

# At the old PACS: one visit under the hospital number, two under the citizen
# ID alone, one under the insurance number (shared within a family).
F_OWN = Prior("31", 30, HOSPITAL_ID, "CT")
F_CITIZEN_CT = Prior("32", 200, CITIZEN_ID, "CT", name=OLD_NAME)
F_CITIZEN_MR = Prior("33", 600, CITIZEN_ID, "MR", name=OLD_NAME)
F_INSURANCE = Prior("34", 100, INSURANCE, "CR", name=OLD_NAME)


def _engine(server: PacsServer) -> Any:
    return create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite",
                               pool_size=0)


def _patients(server: PacsServer, patient_id: str) -> list[tuple[str, str]]:
    """(ID, issuer) of the patient records keyed by *patient_id*."""
    engine = _engine(server)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(Patient.patient_id, Patient.issuer)
                                                   .where(Patient.patient_id == patient_id))]  # type: ignore[misc]
    finally:
        engine.dispose()


def _identifiers(server: PacsServer, patient_id: str, issuer: str) -> set[tuple[str, str, str]]:
    """(value, issuer, type) of the other identifiers of the patient (*patient_id*, *issuer*)."""
    engine = _engine(server)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(PatientIdentifier.value, PatientIdentifier.issuer, PatientIdentifier.id_type)
                .join(Patient, Patient.pk == PatientIdentifier.patient_pk)
                .where(Patient.patient_id == patient_id, Patient.issuer == issuer)).all()
        return {tuple(r) for r in rows}  # type: ignore[misc]
    finally:
        engine.dispose()


def _priors_of_exam(server: PacsServer, tmp_path: Path, accession: str) -> dict[str, str]:
    """The ordered examination arrives (reconciled with its order by the
    accession); its priors as the viewer lists them: study UID -> patient ID."""
    exam = make_ct(tmp_path / f"{accession}.dcm", AccessionNumber=accession, PatientID=HOSPITAL_ID,
                   PatientName="NGUYEN^THI HUONG")
    assert server.storescu(str(exam)).returncode == 0
    uid = str(dcmread(exam, stop_before_pixels=True).StudyInstanceUID)
    with server.http() as http:
        reply = http.get(f"/api/studies/{uid}/priors")
    assert reply.status_code == 200, reply.text
    return {item["study_uid"]: item["patient_id"] for item in reply.json()["items"]}


def _filing_events(server: PacsServer) -> list[dict[str, Any]]:
    listed = json.loads(server.cli("audit", "--format", "json", "--limit", "100000").stdout)
    return [e for e in listed if e["action"] == "order" and e["detail"].startswith("prefetch:")]


@pytest.mark.parametrize("backend_name", ["sqlite-fs", "pg-fs"])
def test_priors_under_the_citizen_id_are_filed_under_the_ordered_patient(
        tmp_path: Path, request: pytest.FixtureRequest, backend_name: str) -> None:
    server = PacsServer(tmp_path / "data", make_backend(backend_name, request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY"}).start()
    legacy = OldPacs(tmp_path, server, [F_OWN, F_CITIZEN_CT, F_CITIZEN_MR, F_INSURANCE])
    try:
        # The insurance-number study came here earlier (a migration): a record of its own.
        for sop, path in legacy.files.items():
            if sop.startswith(F_INSURANCE.uid):
                assert server.storescu(str(path)).returncode == 0
        legacy.start()
        _order(server, "FL1", "FLACC1", pid3=PID3)
        job = _settled(server, "FLACC1")
        assert job["last_error"] == "", job
        # The insurance number is not searched (default prefetch_other_ids): not fetched, not filed.
        assert [s["study_uid"] for s in job["studies"]] == [F_OWN.uid, F_CITIZEN_CT.uid, F_CITIZEN_MR.uid]
        assert [s["filing"] for s in job["studies"]] == [None, "filed", "filed"], job
        assert (job["retrieved"], job["filed"]) == (3, 2)
        assert legacy.moves() == 3

        # The radiologist sees them among the examination's priors, under the HIS patient.
        priors = _priors_of_exam(server, tmp_path, "FLACC1")
        assert priors == {F_OWN.uid: HOSPITAL_ID, F_CITIZEN_CT.uid: HOSPITAL_ID, F_CITIZEN_MR.uid: HOSPITAL_ID}
        # C-FIND at our AE by the hospital number finds them, with the HIS's name.
        found = {uid: (name, pid) for name, pid, uid in _cfind_names(server, PatientID=HOSPITAL_ID)}
        for prior in (F_OWN, F_CITIZEN_CT, F_CITIZEN_MR):
            assert found[prior.uid] == (NAME, HOSPITAL_ID), found
        assert F_INSURANCE.uid not in found
        # WADO-RS presents the HIS patient in every instance; the corrections say why.
        assert _metadata(server, F_CITIZEN_CT.uid) == [HIS_PATIENT] * F_CITIZEN_CT.instances
        assert _corrections(server, F_CITIZEN_MR.uid) == HIS_PATIENT
        with server.http() as http:
            reasons = {c["reason"] for c in http.get(f"/api/studies/{F_CITIZEN_MR.uid}/corrections").json()}
        assert reasons == {"prior fetched from LEGACY by the patient's citizen ID (prefetch job "
                           f"{job['id']}, order FLACC1)"}, reasons
        # The stored objects are as the old PACS sent them.
        core = server.core()
        try:
            stored = list(core.reader.iter_stored(F_CITIZEN_CT.uid))
            assert len(stored) == F_CITIZEN_CT.instances
            for item in stored:
                data = core.store.read_bytes(item.storage_key)
                assert hashlib.sha256(data).hexdigest() == item.sha256
                ds = dcmread(BytesIO(data))
                source = dcmread(legacy.files[item.sop_uid])
                assert (ds.PatientID, str(ds.PatientName), "IssuerOfPatientID" in ds) == (CITIZEN_ID, OLD_NAME, False)
                assert ds.PixelData == source.PixelData
        finally:
            core.close()
        # The citizen-ID record went, as a merged-away patient goes; the citizen ID is still the patient's.
        assert _patients(server, CITIZEN_ID) == []
        assert {(CITIZEN_ID, "CCCD", "NI"), (CITIZEN_ID, "", "MERGED")} <= _identifiers(server, HOSPITAL_ID, "BVDK")
        # The insurance-number record is left alone.
        assert _cfind_names(server, StudyInstanceUID=F_INSURANCE.uid) == [(OLD_NAME, INSURANCE, F_INSURANCE.uid)]

        # Audited as a reconciliation is: the patient it is filed under, and the record it left.
        assert wait_until(lambda: len(_filing_events(server)) == 4, timeout=30), _filing_events(server)
        events = _filing_events(server)
        assert {(e["study_uid"], e["patient_id"]) for e in events} == {
            (uid, patient) for uid in (F_CITIZEN_CT.uid, F_CITIZEN_MR.uid)
            for patient in (f"{HOSPITAL_ID}^^^BVDK", CITIZEN_ID)}
        assert all(e["detail"].startswith(f"prefetch: filed under {HOSPITAL_ID}^^^BVDK, found at LEGACY by "
                                          f"citizen ID {CITIZEN_ID}") and e["user"] == "prefetch" for e in events)

        # Another order: the priors are here and filed already; nothing is moved, filed or corrected twice.
        _order(server, "FL2", "FLACC2", pid3=PID3, modality="MR")
        second = _settled(server, "FLACC2")
        assert (second["retrieved"], second["already_here"], second["filed"]) == (0, 3, 0), second
        assert [s["filing"] for s in second["studies"]] == [None, "here", "here"]
        assert legacy.moves() == 3
        assert len(_filing_events(server)) == 4
        with server.http() as http:
            assert len(http.get(f"/api/studies/{F_CITIZEN_MR.uid}/corrections").json()) == len(HIS_PATIENT)
        assert _held(server)[F_CITIZEN_CT.uid] == F_CITIZEN_CT.instances
    finally:
        legacy.stop()
        server.stop()


def test_a_citizen_id_record_with_an_order_of_its_own_is_left_alone(tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """The emergency desk registered the patient under the citizen ID alone
    and ordered an exam for it: that record is the HIS's, and only a merge
    (ADT^A40) may join it to the hospital-number record. The prior stays
    under it; the job says why."""
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY"}).start()
    legacy = OldPacs(tmp_path, server, [F_CITIZEN_CT]).start()
    try:
        _order(server, "FO1", "FOACC1", pid3=CITIZEN_ID, name=OLD_NAME)
        first = _settled(server, "FOACC1")
        assert (first["retrieved"], first["patient_id"], first["issuer"]) == (1, CITIZEN_ID, ""), first
        _order(server, "FO2", "FOACC2", pid3=PID3)
        job = _settled(server, "FOACC2")
        (entry,) = job["studies"]
        assert (entry["study_uid"], entry["state"], entry["filing"]) == (F_CITIZEN_CT.uid, "complete", "left"), job
        assert "orders of its own" in entry["filing_detail"]
        assert job["filed"] == 0 and job["last_error"] == ""
        assert any(F_CITIZEN_CT.uid in note and "orders of its own" in note for note in job["notes"]), job
        assert _patients(server, CITIZEN_ID) == [(CITIZEN_ID, "")]
        assert _cfind_names(server, StudyInstanceUID=F_CITIZEN_CT.uid) == [(OLD_NAME, CITIZEN_ID, F_CITIZEN_CT.uid)]
        assert _priors_of_exam(server, tmp_path, "FOACC2") == {}
        assert _filing_events(server) == []
        with server.http() as http:
            corrections = http.get(f"/api/studies/{F_CITIZEN_CT.uid}/corrections").json()
        # No filing's: only what the prior lacked, from the record the HIS registered (migration 0034).
        assert {(c["keyword"], c["received"], c["corrected"]) for c in corrections} == {
            ("PatientBirthDate", "", "19850101"), ("PatientSex", "", "F")}, corrections
        assert all("as registered" in c["reason"] for c in corrections), corrections
    finally:
        legacy.stop()
        server.stop()


def test_the_filing_writes_only_under_the_jobs_claim_and_keeps_a_record_an_ingest_fills(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL, without the old PACS (the priors are here): a node whose
    claim passed to another files nothing; a study of the citizen-ID record
    being ingested while its last prior is filed keeps that record (the
    filing waits for the ingest, then counts its study; removing the record
    would have failed, or left the study without a patient); a rerun files
    nothing again."""
    from pacs.app import Pacs
    from pacs.index.writer import IndexWriter
    from pacs.ingest import Origin
    from pacs.orders import OrderService
    from pacs.prefetch.filing import Filing, file_prior
    from pacs.settings import load_settings
    from ris_bridge.hl7v2 import handle

    from .test_order_edges import Background, Paused
    from .test_pg_concurrency import until, waiting
    from .test_prefetch import orm
    from .test_worklist_ris import msa

    core = Pacs.open(load_settings(data_dir=tmp_path / "data", index_url=pg_url))
    try:
        def store(name: str) -> str:
            path = make_ct(tmp_path / f"{name}.dcm", PatientID=CITIZEN_ID, PatientName=OLD_NAME)
            result = core.ingest_file(path, Origin("dimse", "OLDPACS"))
            assert result.status == 0
            return str(result.header.study_uid)

        first = store("first")
        # The order, as the MLLP server of a node with prefetch_sources set places it: its job is queued.
        ack = handle(OrderService(core.engine, prefetch=True), orm("FC1", "FCACC1", pid3=PID3).replace("\n", "\r")
                     .encode()).decode()
        assert msa(ack)[0] == "AA", ack
        lease = timedelta(minutes=5)
        held = jobs.claim_next(core.engine, "node-a", lease)
        assert held is not None and held.accession == "FCACC1"
        citizen = (CITIZEN_ID, "CCCD", "NI")
        engine = core.engine

        def file(job: jobs.Job, uid: str) -> Any:
            return file_prior(core, job, uid, citizen, "LEGACY", user="prefetch", role="system")

        def patient_of(uid: str) -> str:
            with engine.connect() as conn:
                return str(conn.exec_driver_sql(
                    "SELECT p.patient_id FROM studies s JOIN patients p ON p.pk = s.patient_pk "
                    "WHERE s.study_uid = %(uid)s", {"uid": uid}).scalar())

        # Node A's lease ran out and node B took the job over: A writes nothing.
        assert jobs.release(core.engine, held)
        taken = jobs.claim(core.engine, held.pk, "node-b", lease)
        assert taken is not None
        assert file(held, first).state == "lost"
        assert patient_of(first) == CITIZEN_ID

        # A second study of the record is being ingested (paused in its transaction) while B files the
        # first, the record's only committed study: the filing waits, then keeps the record.
        path = make_ct(tmp_path / "second.dcm", PatientID=CITIZEN_ID, PatientName=OLD_NAME)
        second = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        pause = Paused(monkeypatch, "_study_pk", IndexWriter)
        stored = Background(lambda: core.ingest_file(path, Origin("dimse", "OLDPACS")))
        try:
            assert pause.reached.wait(60)
            filing = Background(lambda: file(taken, first))
            until(lambda: waiting(core) >= 1)
            assert filing.is_alive()
            pause.release()
            assert stored.outcome().status == 0
            filed = filing.outcome()
        finally:
            pause.release()
        assert (filed.state, filed.detail, filed.previous) == ("filed", "", CITIZEN_ID)
        assert (patient_of(first), patient_of(second)) == (HOSPITAL_ID, CITIZEN_ID)
        # Its last study filed, the record goes.
        assert file(taken, second) == Filing("filed", f"record {CITIZEN_ID} removed", CITIZEN_ID)
        assert patient_of(second) == HOSPITAL_ID
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM patients WHERE patient_id = %(pid)s",
                                        {"pid": CITIZEN_ID}).scalar() == 0
        # Run again (a retry, or another node taking the job over): nothing more happens.
        assert file(taken, first).state == "here"
        with engine.connect() as conn:
            corrections = conn.exec_driver_sql(
                "SELECT count(*) FROM corrections c JOIN studies s ON s.pk = c.study_pk "
                "WHERE s.study_uid = %(uid)s", {"uid": first}).scalar()
        assert corrections == len(HIS_PATIENT)
    finally:
        core.close()
