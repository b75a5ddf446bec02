"""Patients, orders and studies as a hospital's data steward sees them
(a review of reconciliation, merges and patient identity), against a real
`pacs serve` per index backend, over real MLLP (python-hl7), DICOM (DCMTK
storescu) and HTTP (WADO-RS, FHIR):

1. a study reconciled with an order (or merged into a registration) whose
   HIS patient has no birth date or sex was retrieved with the modality's
   birth date and sex blanked: the reconciliation recorded "" as their
   correction. What the HIS does not know is kept as the modality recorded
   it, as a study's later series keep theirs;
2. a study received under an ID with its issuer that a patient holds as
   another identifier -- the citizen ID that was the patient's key until the
   HIS gave its hospital number (ADT^A08 with a PI), kept by the modality's
   patient list -- made a second patient under the former key: later studies
   under that ID joined it, and the FHIR id the EMR kept (which read as
   replaced by the hospital number) became that stranger. It is filed under
   the patient, as an HL7 message naming that ID is;
3. an order (or patient update) still naming a registration the HIS merged
   away (ADT^A40) -- queued before the merge -- is filed under the surviving
   patient, but its PID, the discarded duplicate's (a misspelt name, another
   birth date), overwrote the surviving patient's demographics, and every
   study of the patient was retrieved with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_merge_review import _aa, _adt, _corrections, _metadata, _msh, _store, _worklist
from .test_worklist_ris import _cfind_names


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    pacs = PacsServer(tmp_path_factory.mktemp(f"steward-{request.param}") / "data",
                      Backend(request.param, pg, None, {}))
    pacs.start()
    yield pacs
    pacs.stop()
    if pg:
        drop_database(pg)


def _orm(pid: str, accession: str, study_uid: str) -> str:
    """An ORM^O01 NW scheduled now whose PID gives the ID and name only (no PID-7, PID-8)."""
    when = datetime.now().strftime("%Y%m%d%H%M%S")
    return (_msh("ORM^O01") + f"PID|1||{pid}||Lê^Văn Cường\n"
            f"ORC|NW|P{accession}|{accession}\n"
            f"OBR|1|P{accession}|{accession}|CT01^CT ngực^L|||{when}|||||||||||{accession}|RP{accession}|||||CT\n"
            f"ZDS|{study_uid}^100^Application^DICOM\n")


# -- 1. what the HIS does not know is not blanked -----------------------------------------------
def test_a_demographic_the_his_lacks_keeps_the_modalitys(server: PacsServer, tmp_path: Path) -> None:
    study = generate_uid()
    _aa(server, _orm("BN3001^^^BVDK^PI", "ACC3001", study))
    _store(server, make_ct(tmp_path / "ct.dcm", StudyInstanceUID=study, AccessionNumber="ACC3001", PatientID="BN3001",
                           PatientName="LE^VAN CUONG", PatientBirthDate="19600101", PatientSex="M"))
    assert _metadata(server, study) == [{"PatientName": "Lê^Văn Cường", "PatientID": "BN3001",
                                         "IssuerOfPatientID": "BVDK", "PatientBirthDate": "19600101",
                                         "PatientSex": "M"}]
    assert _corrections(server, study) == {"PatientName": "Lê^Văn Cường", "IssuerOfPatientID": "BVDK"}
    # The HIS tells the birth date later: every study of the patient takes it.
    _aa(server, _adt("A08", "BN3001^^^BVDK^PI", "Lê^Văn Cường", "19600110"))
    assert [m["PatientBirthDate"] for m in _metadata(server, study)] == ["19600110"]


def test_a_merge_into_a_registration_without_birth_date_keeps_the_studys(server: PacsServer,
                                                                         tmp_path: Path) -> None:
    study = _store(server, make_ct(tmp_path / "old.dcm", PatientID="TMP3002", PatientName="VO^THI E",
                                   PatientBirthDate="19750505", PatientSex="F"))
    _aa(server, _adt("A04", "BN3002^^^BVDK^PI", "Võ^Thị E"))
    _aa(server, _adt("A40", "BN3002^^^BVDK^PI", "Võ^Thị E", mrg="TMP3002"))
    assert _metadata(server, study) == [{"PatientName": "Võ^Thị E", "PatientID": "BN3002",
                                         "IssuerOfPatientID": "BVDK", "PatientBirthDate": "19750505",
                                         "PatientSex": "F"}]


# -- 2. a former key with its issuer is still the patient ------------------------------------------
def test_a_study_under_the_former_key_after_the_hospital_number_came_is_the_patients(server: PacsServer,
                                                                                     tmp_path: Path) -> None:
    citizen = "079300002222"
    _aa(server, _adt("A04", f"{citizen}^^^CCCD^NI", "Đặng^Thu Trang", "19950505", "F"))
    first = _store(server, make_ct(tmp_path / "a.dcm", PatientID=citizen, IssuerOfPatientID="CCCD",
                                   PatientName="Đặng^Thu Trang", SpecificCharacterSet="ISO_IR 192"))
    _aa(server, _adt("A08", f"BN3003^^^BVDK^PI~{citizen}^^^CCCD^NI", "Đặng^Thu Trang", "19950505", "F"))
    patients = server.stats()["patients"]
    # The modality still knows her by the citizen ID it was given with its issuer.
    later = _store(server, make_ct(tmp_path / "b.dcm", PatientID=citizen, IssuerOfPatientID="CCCD",
                                   PatientName="DANG^THU TRANG", PatientBirthDate="19950505", PatientSex="F"))
    assert server.stats()["patients"] == patients
    assert _cfind_names(server, StudyInstanceUID=later) == [("Đặng^Thu Trang", "BN3003", later)]
    assert _metadata(server, later) == [{"PatientName": "Đặng^Thu Trang", "PatientID": "BN3003",
                                         "IssuerOfPatientID": "BVDK", "PatientBirthDate": "19950505",
                                         "PatientSex": "F"}]
    with server.http() as http:
        former = http.get(f"/fhir/Patient/CCCD.{citizen}").json()
        assert (former["active"], former["link"]) == (False, [{"other": {"reference": "Patient/BVDK.BN3003"},
                                                               "type": "replaced-by"}])
        found = http.get("/fhir/ImagingStudy", params={"patient": "Patient/BVDK.BN3003"}).json()
        assert sorted(e["resource"]["identifier"][0]["value"] for e in found["entry"]) == sorted(
            f"urn:oid:{uid}" for uid in (first, later))


# -- 3. a message about the merged-away registration does not rewrite the survivor ---------------
def test_an_order_under_a_merged_away_id_keeps_the_surviving_demographics(server: PacsServer,
                                                                          tmp_path: Path) -> None:
    _aa(server, _adt("A04", "BN3004^^^BVDK^PI", "Lê^Văn A", "19900101", "F"))  # the duplicate, misspelt
    _aa(server, _adt("A04", "BN3005^^^BVDK^PI", "Lê^Thị Anh", "19800808", "F"))
    study = _store(server, make_ct(tmp_path / "b.dcm", PatientID="BN3005", PatientName="Lê^Thị Anh",
                                   PatientBirthDate="19800808", PatientSex="F", SpecificCharacterSet="ISO_IR 192"))
    _aa(server, _adt("A40", "BN3005^^^BVDK^PI", "Lê^Thị Anh", "19800808", "F", mrg="BN3004^^^BVDK^PI"))
    # An order the HIS queued for the duplicate before the merge.
    _aa(server, _orm("BN3004^^^BVDK^PI", "ACC3004", generate_uid()).replace(
        "||Lê^Văn Cường\n", "||Lê^Văn A||19900101|F\n"))
    items = _worklist(server, tmp_path, "ACC3004", "PatientID", "PatientName", "PatientBirthDate")
    assert [(i.PatientID, str(i.PatientName), i.PatientBirthDate) for i in items] == [
        ("BN3005", "Lê^Thị Anh", "19800808")]
    assert [(m["PatientName"], m["PatientBirthDate"]) for m in _metadata(server, study)] == [
        ("Lê^Thị Anh", "19800808")]
    with server.http() as http:
        patient = http.get("/fhir/Patient/BVDK.BN3005").json()
    assert (patient["name"][0]["text"], patient["birthDate"]) == ("Lê Thị Anh", "1980-08-08")
