"""Review of registered patients (migration 0034, patients.registered):
what registers a patient, and what a new study of a registered patient is
retrieved with, against a real `pacs serve` on SQLite and PostgreSQL and a
real PostgreSQL index for the race of an HIS update with an ingest."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pacs.index import create_index_engine, upgrade_schema

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_merge_review import _c_get, _corrections, _store
from .test_patient_corrections import archive  # noqa: F401 (a fixture)


def test_a_merge_keeps_the_registration_of_the_patient_merged_away(archive: PacsServer, tmp_path: Path) -> None:
    """The HIS registered the patient (its order, its name) under one ID; the
    administrator merged that registration into the record a modality made
    under another. The surviving patient took the HIS's orders and stood
    for its studies, yet was not registered: a later study under its ID with
    a name typed otherwise was retrieved with that name, unlike after the
    upgrade (migration 0034 registers every patient holding an order)."""
    order = {"patient": {"id": "RR-HIS", "name": "Đỗ^Văn Hùng", "birth_date": "19700101", "sex": "M"},
             "accession_number": "RR0001", "modality": "CT"}
    with archive.http(token=archive.tokens["his"]) as http:  # type: ignore[attr-defined]
        assert http.post("/api/orders", json=order).status_code == 201
    _store(archive, make_ct(tmp_path / "walk-in.dcm", PatientID="RR-MOD", PatientName="Đỗ^Văn Hùng",
                            PatientBirthDate="19700101", PatientSex="M", SpecificCharacterSet="ISO_IR 192"))
    merged = archive.cli("patient", "merge", "RR-MOD", "--from", "RR-HIS", "--reason", "trùng", "--yes")
    assert merged.returncode == 0, merged.stderr
    later = _store(archive, make_ct(tmp_path / "later.dcm", PatientID="RR-MOD", PatientName="DO^VAN HUNG",
                                    PatientBirthDate="19700101", PatientSex="M"))
    assert _c_get(archive, later, tmp_path / "got")[0]["PatientName"] == "Đỗ^Văn Hùng"
    assert _corrections(archive, later) == {"PatientName": "Đỗ^Văn Hùng"}



def test_the_first_named_study_keeps_the_birth_date_and_sex_the_his_registered(archive: PacsServer,
                                                                               tmp_path: Path) -> None:
    """The HIS registered the patient with a birth date and sex but no name
    (ADT^A04 with PID-5 empty; PUT /api/patients/{id}). The first study with a name filled the
    blank name, and with it overwrote the registered birth date and sex with
    the modality's: C-FIND showed the modality's values, the study was not
    corrected, and a later study sent with the HIS's values was "corrected"
    to the modality's. A registered value is kept; only blanks are filled."""
    with archive.http(token=archive.tokens["his"]) as http:  # type: ignore[attr-defined]
        made = http.put("/api/patients/RR-NONAME", json={"birth_date": "19800101", "sex": "F"})
        assert made.status_code == 200, made.text
    first = _store(archive, make_ct(tmp_path / "first.dcm", PatientID="RR-NONAME", PatientName="NGO^THI HA",
                                    PatientBirthDate="19790101", PatientSex="M"))
    with archive.http() as http:
        patient = http.get("/api/patients/RR-NONAME").json()
    assert (patient["name"], patient["birth_date"], patient["sex"]) == ("NGO^THI HA", "19800101", "F")
    got = _c_get(archive, first, tmp_path / "got")[0]
    assert (got["PatientBirthDate"], got["PatientSex"]) == ("19800101", "F")
    assert _corrections(archive, first) == {"PatientBirthDate": "19800101", "PatientSex": "F"}

# -- an HIS update committing while a new study of the patient is being indexed (PostgreSQL) ----------------------
@pytest.fixture
def pg_index(pg_url: str) -> Iterator[Any]:
    engine = create_index_engine(str(pg_url))
    upgrade_schema(engine)
    yield engine
    engine.dispose()


def _record(tmp: Path, n: int, **values: str) -> Any:
    from pacs.header import parse_header
    from pacs.index.writer import IndexRecord

    path = make_ct(tmp / f"{n}.dcm", StudyInstanceUID=f"1.2.826.0.1.3680043.9.81.{n}",
                   SeriesInstanceUID=f"1.2.826.0.1.3680043.9.82.{n}", SOPInstanceUID=f"1.2.826.0.1.3680043.9.83.{n}",
                   **values)
    with path.open("rb") as stream:
        header = parse_header(stream, path.stat().st_size)
    return IndexRecord(header, path.stat().st_size, "0" * 64, f"k/{n}", datetime.now(UTC))


def _retrieved_with(engine: Any, study_uid: str) -> dict[str, str]:
    """The values retrieval (C-GET, C-MOVE, WADO-RS) sets on the study's objects."""
    from pacs.retrieve import corrected_values

    with engine.connect() as conn:
        pk = conn.execute(text("SELECT pk FROM studies WHERE study_uid = :uid"), {"uid": study_uid}).scalar_one()
        return dict(corrected_values(conn, {pk}).get(pk, ()))


def _waiting_on_a_lock(engine: Any, done: threading.Event) -> None:
    """Until the HIS update is done or waits for a lock (no clock: polled)."""
    with engine.connect() as conn:
        while not done.is_set():
            waiting = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                        "AND wait_event_type = 'Lock'")).scalar_one()
            if waiting:
                return
            conn.commit()


def test_an_his_update_during_the_ingest_of_a_new_study_corrects_it(pg_index: Any, tmp_path: Path) -> None:
    """PostgreSQL: the HIS corrected a registered patient's name while a new
    study of that patient, sent with the name as registered, was being
    indexed. The ingest read the patient before the update committed (no
    correction: the names were equal), the update recorded corrections for
    the studies it saw (not the new one): the study was retrieved with the
    old name while C-FIND showed the new one. The ingest now holds the
    patient row (FOR SHARE) from reading it until commit: the update waits,
    then corrects the new study too."""
    from pacs.index.db import write_transaction
    from pacs.index.writer import IndexWriter
    from pacs.orders import OrderService, PatientInfo

    service = OrderService(pg_index)
    service.update_patient(PatientInfo("RACE-1", name="Bùi^Thị Lan", birth_date="19800202", sex="F"))
    writer = IndexWriter()
    with write_transaction(pg_index) as conn:
        writer.add(conn, _record(tmp_path, 1, PatientID="RACE-1", PatientName="Bùi^Thị Lan",
                                 PatientBirthDate="19800202", PatientSex="F", SpecificCharacterSet="ISO_IR 192"))
        done = threading.Event()
        errors: list[BaseException] = []

        def his_update() -> None:
            try:
                service.update_patient(PatientInfo("RACE-1", name="Bùi^Thị Lan Anh", reason="ADT^A08"))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
            finally:
                done.set()

        update = threading.Thread(target=his_update)
        update.start()
        _waiting_on_a_lock(pg_index, done)
    update.join()
    assert errors == []
    assert _retrieved_with(pg_index, "1.2.826.0.1.3680043.9.81.1") == {"PatientName": "Bùi^Thị Lan Anh"}


def test_the_prefetch_leaves_a_citizen_id_record_the_his_registered(tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    """The HIS registered the patient under the citizen ID alone (ADT^A04, or
    `PUT /api/patients/{id}`: no order). The prefetch for the patient's
    hospital-number order filed the prior found under that ID under the
    order's patient and deleted the record: a registration the HIS made,
    which only a merge (ADT^A40) may join, as one holding an order is left."""
    from .conftest import make_backend
    from .test_prefetch import CITIZEN_ID, OldPacs, _order, _settled
    from .test_prefetch_filing import F_CITIZEN_CT, OLD_NAME, PID3, _patients

    server = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request),
                        extra_env={"PACS_PREFETCH_SOURCES": "LEGACY"}).start()
    legacy = OldPacs(tmp_path, server, [F_CITIZEN_CT]).start()
    try:
        with server.http(token=server.make_token("u-his", "his")) as http:
            made = http.put(f"/api/patients/{CITIZEN_ID}", json={"name": OLD_NAME, "birth_date": "19850101"})
            assert made.status_code == 200, made.text
        _order(server, "FR1", "FRACC1", pid3=PID3)
        job = _settled(server, "FRACC1")
        (entry,) = job["studies"]
        assert (entry["study_uid"], entry["filing"]) == (F_CITIZEN_CT.uid, "left"), job
        assert "registered" in entry["filing_detail"], entry
        assert _patients(server, CITIZEN_ID) == [(CITIZEN_ID, "")]
    finally:
        legacy.stop()
        server.stop()
