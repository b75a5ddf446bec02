"""Review of the prefetch filing (pacs.prefetch.filing): a prior the old PACS
filed under the citizen ID alone, filed under the ordering patient.

A real `pacs serve` (HL7 ORM^O01 over MLLP, the JSON orders API), DCMTK's
dcmqrscp as the old PACS (tests/test_prefetch.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select

from pacs.index.models import Order, Patient

from . import test_prefetch
from .conftest import PacsServer, make_backend
from .test_prefetch import CITIZEN_ID, HOSPITAL_ID, NAME, OldPacs, _order, _settled
from .test_prefetch_filing import F_CITIZEN_CT, PID3, _engine, _patients, _priors_of_exam

# Another patient of the hospital, whose hospital number the old PACS's
# objects of F_CITIZEN_CT carry as an Other Patient ID: the desk typed the
# citizen ID of BN0042 into BN0077's visit.
STRANGER = "BN0077"


def _order_patient(server: PacsServer, accession: str) -> str:
    """The Patient ID of the patient the order *accession* is filed under."""
    engine = _engine(server)
    try:
        with engine.connect() as conn:
            return str(conn.execute(select(Patient.patient_id).join(Order, Order.patient_pk == Patient.pk)
                                    .where(Order.accession_number == accession)).scalar())
    finally:
        engine.dispose()


def test_a_record_holding_another_patients_identifier_is_not_filed(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The citizen-ID record's objects named another patient of the hospital
    (Other Patient IDs: BN0077^^^BVDK): the record was not "nothing but that
    identifier", yet its prior was filed under BN0042 and, as its last study,
    the record was removed into BN0042 with BN0077^^^BVDK as another ID of
    BN0042. The HIS's next order for BN0077 then went to BN0042 (the HL7
    lookup by another identifier), its worklist item showing BN0042's name,
    and a C-FIND by BN0077 answered BN0042's studies. Now the prior is left
    under its record and the job says why."""
    made = test_prefetch._instance

    def with_other_id(prior: Any, series: int, number: int) -> Dataset:
        ds = made(prior, series, number)
        if prior.key == F_CITIZEN_CT.key:
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID, item.TypeOfPatientID = STRANGER, "BVDK", "TEXT"
            ds.OtherPatientIDsSequence = Sequence([item])
        return ds

    monkeypatch.setattr(test_prefetch, "_instance", with_other_id)
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY"}).start()
    legacy = OldPacs(tmp_path, server, [F_CITIZEN_CT]).start()
    try:
        _order(server, "FX1", "FXACC1", pid3=PID3)
        job = _settled(server, "FXACC1")
        (entry,) = job["studies"]
        assert (entry["study_uid"], entry["state"], entry["filing"]) == (F_CITIZEN_CT.uid, "pulled", "left"), job
        assert f"{STRANGER}^^^BVDK" in entry["filing_detail"], entry
        assert _patients(server, CITIZEN_ID) == [(CITIZEN_ID, "")]
        # The HIS orders an exam for BN0077: never BN0042's.
        _order(server, "FX2", "FXACC2", pid3=f"{STRANGER}^^^BVDK^PI", name="TRAN^VAN BAY")
        assert _order_patient(server, "FXACC2") != HOSPITAL_ID
    finally:
        legacy.stop()
        server.stop()


def test_a_citizen_id_sent_with_trailing_spaces_still_files_the_prior(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A HIS whose database pads its columns (CHAR(15)) sent the citizen ID
    over the JSON orders API as "079185000042   ". The old PACS was searched
    by the trimmed value and the prior came, but the filing compared the
    record's Patient ID with the untrimmed one: left, "filed here under
    patient 079185000042, not a record of 079185000042    alone", missing
    from the exam's priors. Now it is filed."""
    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY"}).start()
    legacy = OldPacs(tmp_path, server, [F_CITIZEN_CT]).start()
    try:
        with server.http() as http:
            placed = http.post("/api/orders", json={
                "accession_number": "FTACC1", "modality": "CT",
                "patient": {"id": HOSPITAL_ID, "issuer": "BVDK", "name": NAME, "birth_date": "19850101", "sex": "F",
                            "other_ids": [{"value": f"{CITIZEN_ID}   ", "issuer": "CCCD", "type": "NI"}]}})
        assert placed.status_code == 201, placed.text
        job = _settled(server, "FTACC1")
        (entry,) = job["studies"]
        assert (entry["study_uid"], entry["filing"]) == (F_CITIZEN_CT.uid, "filed"), job
        assert _patients(server, CITIZEN_ID) == []
        assert _priors_of_exam(server, tmp_path, "FTACC1") == {F_CITIZEN_CT.uid: HOSPITAL_ID}
    finally:
        legacy.stop()
        server.stop()


def test_an_his_update_racing_the_filing_corrects_the_filed_prior(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL: the HIS corrected the patient's sex (ADT^A08) while the
    prior was being filed. The filing had compared the record with the sex
    about to change (both F: no correction), and the update corrected the
    studies the patient had before the filing committed: the prior, under
    the patient of sex M now, was sent out (C-MOVE, WADO, export) with F.
    Now the filing holds the patient row (FOR SHARE): the update waits for
    it, then corrects the prior too."""
    from pacs.app import Pacs
    from pacs.ingest import Origin
    from pacs.orders import OrderService
    from pacs.prefetch import filing as filing_module
    from pacs.prefetch import jobs
    from pacs.prefetch.filing import file_prior
    from pacs.query import Level
    from pacs.retrieve import resolve
    from pacs.settings import load_settings
    from ris_bridge.hl7v2 import handle

    from .dicomfiles import make_ct
    from .test_order_edges import Background, Paused
    from .test_pg_concurrency import a08, hl7, until, waiting
    from .test_prefetch import orm
    from .test_prefetch_filing import OLD_NAME
    from .test_worklist_ris import msa

    core = Pacs.open(load_settings(data_dir=tmp_path / "data", index_url=pg_url))
    try:
        path = make_ct(tmp_path / "prior.dcm", PatientID=CITIZEN_ID, PatientName=OLD_NAME, PatientSex="F",
                       PatientBirthDate="19850101")
        result = core.ingest_file(path, Origin("dimse", "OLDPACS"))
        assert result.status == 0
        uid = str(result.header.study_uid)
        ack = handle(OrderService(core.engine, prefetch=True), orm("FR1", "FRACC1", pid3=PID3).replace("\n", "\r")
                     .encode()).decode()
        assert msa(ack)[0] == "AA", ack
        held = jobs.claim_next(core.engine, "node-a", timedelta(minutes=5))
        assert held is not None

        pause = Paused(monkeypatch, "file_under_patient", filing_module)
        filing = Background(lambda: file_prior(core, held, uid, (CITIZEN_ID, "CCCD", "NI"), "LEGACY",
                                               user="prefetch", role="system"))
        try:
            assert pause.reached.wait(60)
            update = Background(lambda: hl7(core, a08(HOSPITAL_ID, NAME)))  # sex M
            until(lambda: not update.is_alive() or waiting(core) >= 1)
            pause.release()
            assert filing.outcome().state == "filed"
            assert msa(update.outcome())[0] == "AA"
        finally:
            pause.release()
        (item, *_rest) = resolve(core, Level.STUDY, {"StudyInstanceUID": uid})
        assert dict(item.overrides)["PatientSex"] == "M", item.overrides
    finally:
        core.close()
