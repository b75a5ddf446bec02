"""Review of the patient corrections over JSON and from the command line
(`PUT /api/patients/{id}`, `POST /api/patients/merge`, `pacs patient`):
each test is a bug found, against a real `pacs serve` on SQLite and
PostgreSQL, checked with DCMTK findscu, WADO-RS and QIDO-RS."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_merge_review import _metadata, _qido, _store
from .test_patient_corrections import _found, archive  # noqa: F401 (a fixture)


def _his(server: PacsServer) -> object:
    return server.http(token=server.tokens["his"])  # type: ignore[attr-defined]


def test_cli_refuses_a_birth_date_that_is_not_yyyymmdd(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs patient update --birth-date 1985-03-14` (or "1985") deleted the
    stored birth date and exited 0: a date not of 8 digits went to the HL7
    rule for partial dates, which empties a date it does not agree with."""
    _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-BD", PatientName="PHAM^VAN C",
                            PatientBirthDate="19850314", PatientSex="M"))
    for bad in ("1985-03-14", "1985", "abcdefgh"):
        refused = archive.cli("patient", "update", "RV-BD", "--birth-date", bad, "--reason", "x", check=False)
        assert refused.returncode == 2 and "YYYYMMDD" in refused.stderr, (bad, refused.returncode, refused.stderr)
    shown = json.loads(archive.cli("patient", "show", "RV-BD", "--json").stdout)
    assert shown["birth_date"] == "19850314"


def test_an_update_of_a_merged_away_id_is_not_answered_as_done(archive: PacsServer, tmp_path: Path) -> None:
    """PUT /api/patients/{id} of an ID merged away answered 200 with `{}`
    and changed nothing (the HL7 rule for a lagging interface: a message
    naming a merged-away ID does not apply its demographics): the HIS
    believed the name corrected. It is refused, 409, naming the patient
    the ID was merged into."""
    _store(archive, make_ct(tmp_path / "real.dcm", PatientID="RV-REAL", PatientName="LE^VAN D"))
    _store(archive, make_ct(tmp_path / "tmp.dcm", PatientID="RV-TMP", PatientName="CAP CUU^NAM"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        merged = http.post("/api/patients/merge", json={"patient": {"id": "RV-REAL"}, "prior": [{"id": "RV-TMP"}]})
        assert merged.status_code == 200, merged.text
        answer = http.put("/api/patients/RV-TMP", json={"name": "Lê^Văn Đức"})
        assert answer.status_code == 409 and "RV-REAL" in answer.text, (answer.status_code, answer.text)
        assert http.get("/api/patients/RV-REAL").json()["name"] == "LE^VAN D"


def test_an_update_without_issuer_answers_the_patient_it_changed(archive: PacsServer, tmp_path: Path) -> None:
    """A PUT without issuer changes the one patient with that ID under an
    issuer (as HL7 PID-3 without assigning authority does), but answered
    `{}` (it looked the answer up without the issuer), and its audit event
    named the patient without the issuer; a merge's answer likewise."""
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-ISS", IssuerOfPatientID="BVDK",
                                    PatientName="HO^THI E"))
    _store(archive, make_ct(tmp_path / "b.dcm", PatientID="RV-ISS-DUP", PatientName="HO THI E"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        answer = http.put("/api/patients/RV-ISS", json={"name": "Hồ^Thị Én"})
        assert answer.status_code == 200, answer.text
        assert (answer.json().get("id"), answer.json().get("issuer"), answer.json().get("name")) == (
            "RV-ISS", "BVDK", "Hồ^Thị Én")
        merged = http.post("/api/patients/merge", json={"patient": {"id": "RV-ISS"}, "prior": [{"id": "RV-ISS-DUP"}]})
        assert merged.status_code == 200, merged.text
        assert (merged.json()["patient"].get("issuer"), merged.json()["patient"].get("studies")) == ("BVDK", 2)
    assert _qido(archive, study) == [("Hồ^Thị Én", "RV-ISS")]
    with archive.http() as http:
        events = http.get("/api/audit", params={"action": "patient-update", "user": "u-his"}).json()
    assert any("RV-ISS^^^BVDK" in e["patient_id"].split("\\") for e in events), events


def test_a_merge_into_a_patient_not_registered_is_refused(archive: PacsServer, tmp_path: Path) -> None:
    """POST /api/patients/merge into a Patient ID the archive has never
    seen made a patient without name, birth date or sex and moved the
    studies there: C-FIND and QIDO-RS by the patient's name no longer
    found them. The body carries no demographics (ADT^A40's PID does), so
    the surviving patient must exist (PUT it first), as the CLI requires."""
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-ER-1", PatientName="VU^THI G"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        answer = http.post("/api/patients/merge", json={"patient": {"id": "RV-NEW-1"}, "prior": [{"id": "RV-ER-1"}]})
        assert answer.status_code == 404 and "RV-NEW-1" in answer.text, (answer.status_code, answer.text)
        assert http.get("/api/patients/RV-NEW-1").status_code == 404
    assert _qido(archive, study) == [("VU^THI G", "RV-ER-1")]
    assert [s for _, s in _found(archive, tmp_path / "f", "VU^THI G")] == [study]
    assert _metadata(archive, study)[0]["PatientID"] == "RV-ER-1"


def test_a_name_that_is_no_dicom_pn_is_refused(archive: PacsServer, tmp_path: Path) -> None:
    """PUT /api/patients/{id} (and `pacs patient update --name`) stored any
    text as the name: "Nguyễn\\\\Văn An" (a backslash, DICOM's value
    separator) was retrieved by C-GET as two names and shown by WADO-RS and
    QIDO-RS as "Nguyễn"; a component group over 64 characters or a sixth
    component went out as an invalid PN. Refused (400, exit 2), nothing changed."""
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-PN", PatientName="DO^VAN H"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        for bad in ("Đỗ\\Văn Hải", "Đ" + "o" * 64 + "^Hải", "A^B^C^D^E^F", "A=B=C=D", "Đỗ^Văn\nHải"):
            answer = http.put("/api/patients/RV-PN", json={"name": bad})
            assert answer.status_code == 400 and "PatientName" in answer.text, (bad, answer.status_code, answer.text)
        fine = http.put("/api/patients/RV-PN", json={"name": "Đỗ^Văn Hải=DO^VAN HAI"})
        assert fine.status_code == 200, fine.text
    refused = archive.cli("patient", "update", "RV-PN", "--name", "Đỗ\\Hải", "--reason", "x", check=False)
    assert refused.returncode == 2 and "PatientName" in refused.stderr, refused.stderr
    assert _metadata(archive, study)[0]["PatientName"] == "Đỗ^Văn Hải"  # the alphabetic group
    with archive.http() as http:
        assert http.get("/api/patients/RV-PN").json()["name"] == "Đỗ^Văn Hải=DO^VAN HAI"


def test_a_merged_away_id_does_not_merge_the_patient_it_went_to(archive: PacsServer, tmp_path: Path) -> None:
    """The emergency ID RV-CC was merged into RV-P1; a second merge naming
    RV-CC as the prior of another patient (RV-P2: the desk picked the wrong
    record, a lagging interface) found RV-CC as RV-P1's alias and merged the
    whole of RV-P1 -- a real patient with studies of their own -- into
    RV-P2, which cannot be undone. Refused (409), nothing moved."""
    p1 = _store(archive, make_ct(tmp_path / "p1.dcm", PatientID="RV-P1", PatientName="BUI^VAN K"))
    _store(archive, make_ct(tmp_path / "cc.dcm", PatientID="RV-CC", PatientName="CAP CUU^NAM"))
    p2 = _store(archive, make_ct(tmp_path / "p2.dcm", PatientID="RV-P2", PatientName="MAI^THI L"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        first = http.post("/api/patients/merge", json={"patient": {"id": "RV-P1"}, "prior": [{"id": "RV-CC"}]})
        assert first.status_code == 200 and first.json()["moved_studies"] == 1, first.text
        wrong = http.post("/api/patients/merge", json={"patient": {"id": "RV-P2"}, "prior": [{"id": "RV-CC"}]})
        assert wrong.status_code == 409 and "RV-P1" in wrong.text, (wrong.status_code, wrong.text)
        assert http.get("/api/patients/RV-P1").json()["studies"] == 2
    assert _qido(archive, p1) == [("BUI^VAN K", "RV-P1")]
    assert _qido(archive, p2) == [("MAI^THI L", "RV-P2")]


def test_the_cli_says_where_a_patient_not_found_is(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs patient show|update|merge ID` without --issuer said "no patient
    ID" of a patient the modality sent with an issuer, and of an ID merged
    away, when the administrator typed the ID printed on the film: they
    concluded the patient was not in the archive. The message says the
    issuer to give, or the patient the ID was merged into (exit 1 still)."""
    _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-FILM", IssuerOfPatientID="BVDK", PatientName="TO^VAN M"))
    _store(archive, make_ct(tmp_path / "b.dcm", PatientID="RV-GONE", PatientName="TO VAN M"))
    for command in (("show", "RV-FILM"), ("update", "RV-FILM", "--name", "Tô^Văn Minh", "--reason", "x"),
                    ("merge", "RV-FILM", "--from", "RV-GONE", "--reason", "x")):
        missing = archive.cli("patient", *command, check=False)
        assert missing.returncode == 1 and "--issuer BVDK" in missing.stderr, (command, missing.stderr)
    merged = archive.cli("patient", "merge", "RV-FILM", "--issuer", "BVDK", "--from", "RV-GONE", "--reason", "x",
                         "--yes", check=False)
    assert merged.returncode == 0, merged.stderr
    gone = archive.cli("patient", "show", "RV-GONE", check=False)
    assert gone.returncode == 1 and "merged into RV-FILM^^^BVDK" in gone.stderr, gone.stderr


def test_get_without_issuer_finds_the_patient_put_without_issuer(archive: PacsServer, tmp_path: Path) -> None:
    """PUT /api/patients/{id} without issuer changes the one patient holding
    the ID under an issuer, but GET /api/patients/{id} without `?issuer=`
    answered 404 for that very patient: the HIS read back "no patient".
    Without `?issuer=` GET resolves as PUT does; `?issuer=` (even empty) is exact."""
    _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-GET", IssuerOfPatientID="BVDK", PatientName="LY^VAN N"))
    with _his(archive) as http:  # type: ignore[attr-defined]
        assert http.put("/api/patients/RV-GET", json={"sex": "M"}).status_code == 200
        found = http.get("/api/patients/RV-GET")
        assert found.status_code == 200 and (found.json()["issuer"], found.json()["sex"]) == ("BVDK", "M"), found.text
        assert http.get("/api/patients/RV-GET", params={"issuer": ""}).status_code == 404
        assert http.get("/api/patients/RV-GET", params={"issuer": "BVDK"}).status_code == 200


def test_a_patient_id_that_is_no_dicom_lo_is_refused(archive: PacsServer) -> None:
    """PUT /api/patients/{id} made a patient of any path: an ID the HIS
    sent in another encoding than UTF-8 (its bytes read as U+FFFD), "BN100 "
    (DICOM ignores the space: the ingest's patient is "BN100"), a blank or
    a backslash (a value separator): a junk patient was created, 200, and
    the real one was not corrected. Refused (400), nothing created."""
    with _his(archive) as http:  # type: ignore[attr-defined]
        for path in ("RV%FFID", "RV-SP%20", "%20RV-SP", "%20", "RV%5CID"):
            answer = http.put(f"/api/patients/{path}", json={"name": "A^B"})
            assert answer.status_code == 400 and "PatientID" in answer.text, (path, answer.status_code, answer.text)
        assert http.get("/api/patients/RV-SP ").status_code == 404
        assert http.put("/api/patients/RV%2FID", json={"name": "A^B"}).json()["id"] == "RV/ID"  # "/" is fine in LO
