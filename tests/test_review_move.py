"""Review of moving one study to its patient (`POST /api/studies/{uid}/patient`,
`pacs patient move-study`): what the first tests left out, against a real
`pacs serve` on SQLite and PostgreSQL (DCMTK getscu, QIDO-RS, WADO-RS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_merge_review import _c_get, _metadata, _qido, _store
from .test_patient_corrections import _as, archive  # noqa: F401 (a fixture)


def _events(server: PacsServer, study: str) -> list[dict[str, Any]]:
    with server.http() as http:
        return [e for e in http.get("/api/audit", params={"study": study}).json() if e["action"] == "study-move"]


def test_a_malformed_study_uid_is_a_bad_request(archive: PacsServer) -> None:
    """As every other /api/studies/{uid} route: 400 for what is no UID, not a 404 "no study"."""
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        for uid in ("1.2.abc", "1..2", "01.2.3", "1.2." + "3" * 70):
            answer = http.post(f"/api/studies/{uid}/patient", json={"patient": {"id": "MV-X"}, "reason": "x"})
            assert answer.status_code == 400, (uid, answer.status_code, answer.text)


def test_a_new_patient_of_a_name_alone_takes_none_of_the_old_patients_demographics(
        archive: PacsServer, tmp_path: Path) -> None:
    """The objects carry the wrong patient's birth date and sex: moved to a
    patient registered with a name alone, the images must not go out as hers
    with his birth date and sex (QIDO-RS shows none; WADO-RS and C-GET agree)."""
    wrong = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-NAM", PatientName="LE^VAN NAM",
                                    PatientBirthDate="19600101", PatientSex="M"))
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        moved = http.post(f"/api/studies/{wrong}/patient",
                          json={"patient": {"id": "RV-HOA", "name": "TRAN^THI HOA"}, "reason": "nhầm"})
    assert moved.status_code == 200, moved.text
    expected = {"PatientName": "TRAN^THI HOA", "PatientID": "RV-HOA", "IssuerOfPatientID": "",
                "PatientBirthDate": "", "PatientSex": ""}
    assert _metadata(archive, wrong) == [expected]
    assert _c_get(archive, wrong, tmp_path / "get") == [expected]


def test_a_later_series_under_the_mistyped_id_brings_no_empty_patient_back(
        archive: PacsServer, tmp_path: Path) -> None:
    """The modality sends the rest of the study, still under the mistyped ID,
    after the move (imported: a writer that has not seen the study): it joins
    the study under the right patient, and the mistyped patient the move
    removed does not come back without a study."""
    own = _store(archive, make_ct(tmp_path / "own.dcm", PatientID="RV-AN", PatientName="PHAM^VAN AN"))
    study = _store(archive, make_ct(tmp_path / "typo.dcm", PatientID="RV-NA", PatientName="PHAM^VAN AN"))
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        moved = http.post(f"/api/studies/{study}/patient", json={"patient": {"id": "RV-AN"}, "reason": "gõ sai"})
        assert moved.status_code == 200, moved.text
        assert http.get("/api/patients/RV-NA").status_code == 404
    later = tmp_path / "later"
    later.mkdir()
    make_ct(later / "b.dcm", PatientID="RV-NA", PatientName="PHAM^VAN AN", StudyInstanceUID=study,
            SeriesInstanceUID=generate_uid())
    archive.cli("import", str(later))
    assert _qido(archive, study) == [("PHAM^VAN AN", "RV-AN")] and _qido(archive, own) == [("PHAM^VAN AN", "RV-AN")]
    assert {item["PatientID"] for item in _metadata(archive, study)} == {"RV-AN"}
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        assert http.get("/api/patients/RV-NA").status_code == 404
    assert archive.cli("patient", "show", "RV-NA", check=False).returncode == 1


def test_the_cli_audits_the_patient_the_study_is_filed_under(archive: PacsServer, tmp_path: Path) -> None:
    """`--to ID` without issuer finds the one patient holding that ID under
    an issuer: the event names that patient (ID^^^issuer), as the HTTP
    route's does, not the bare ID typed (`pacs audit --patient` searches
    by the patient as events name it)."""
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        registered = http.put("/api/patients/RV-BN1", json={"issuer": "BVDK", "name": "NGO^THI MAI"})
        assert registered.status_code in (200, 201), registered.text
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-BN2", PatientName="NGO^VAN MAI"))
    done = archive.cli("patient", "move-study", study, "--to", "RV-BN1", "--reason", "nhầm", "--yes", check=False)
    assert done.returncode == 0, done.stderr
    assert _qido(archive, study) == [("NGO^THI MAI", "RV-BN1")]
    assert sorted(p for e in _events(archive, study) for p in e["patient_id"].split("\\")) == \
        ["RV-BN1^^^BVDK", "RV-BN2"]


def test_a_registered_patient_left_without_a_study_keeps_the_registration(
        archive: PacsServer, tmp_path: Path) -> None:
    """The technologist typed the ID of a patient the HIS registered (no
    study of theirs yet): moving the stranger's study away leaves that
    registration, its demographics and other IDs, as the HIS made it; the
    next study under that ID is still corrected to them."""
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        made = http.put("/api/patients/RV-REG", json={"name": "DO^VAN BINH", "birth_date": "19700707", "sex": "M",
                                                      "other_ids": [{"value": "001070000123", "issuer": "CCCD"}]})
        assert made.status_code in (200, 201), made.text
    stranger = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-REG", PatientName="VU^THI LAN"))
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        moved = http.post(f"/api/studies/{stranger}/patient",
                          json={"patient": {"id": "RV-LAN", "name": "VU^THI LAN"}, "reason": "gõ nhầm mã"})
        assert moved.status_code == 200, moved.text
        kept = http.get("/api/patients/RV-REG")
        assert kept.status_code == 200, kept.text
        assert kept.json()["name"] == "DO^VAN BINH" and kept.json()["birth_date"] == "19700707"
        assert [o["value"] for o in kept.json()["other_ids"]] == ["001070000123"]
    own = _store(archive, make_ct(tmp_path / "b.dcm", PatientID="RV-REG", PatientName="DO VAN BINH"))
    assert _qido(archive, own) == [("DO^VAN BINH", "RV-REG")]
    assert {item["PatientName"] for item in _metadata(archive, own)} == {"DO^VAN BINH"}


def test_an_id_several_issuers_hold_is_refused_without_its_issuer(archive: PacsServer, tmp_path: Path) -> None:
    """Two hospitals' RV-DUP are two people: `{"id": "RV-DUP"}` names
    neither, and with a name it must not make a third, without issuer (409:
    give the issuer); with the issuer the study goes to that one."""
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        for issuer, name in (("BVA", "HA^VAN MOT"), ("BVB", "HA^VAN HAI")):
            made = http.put("/api/patients/RV-DUP", json={"issuer": issuer, "name": name})
            assert made.status_code in (200, 201), made.text
        study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-D0", PatientName="HA^VAN BA"))
        url = f"/api/studies/{study}/patient"
        for patient in ({"id": "RV-DUP"}, {"id": "RV-DUP", "name": "HA^VAN MOT"}):
            for dry_run in ("true", "false"):
                answer = http.post(url, params={"dry_run": dry_run}, json={"patient": patient, "reason": "x"})
                assert answer.status_code == 409 and "issuer" in answer.text, (patient, answer.text)
        assert http.get("/api/patients/RV-DUP").status_code != 200  # no third RV-DUP
        assert _qido(archive, study) == [("HA^VAN BA", "RV-D0")]
        moved = http.post(url, json={"patient": {"id": "RV-DUP", "issuer": "BVB"}, "reason": "x"})
        assert moved.status_code == 200, moved.text
    assert _metadata(archive, study)[0]["IssuerOfPatientID"] == "BVB"
    assert _qido(archive, study) == [("HA^VAN HAI", "RV-DUP")]


def _imaging_study(server: PacsServer, study: str) -> dict[str, Any]:
    with server.http() as http:
        reply = http.get(f"/fhir/ImagingStudy/{study}")
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_back_and_forth_and_a_dry_run_that_changes_nothing(archive: PacsServer, tmp_path: Path) -> None:
    """Moved A -> B -> A (the wrong study chosen to move), the study is A's
    again everywhere, FHIR's subject and meta.lastUpdated following each
    move; a dry run naming an issuer gives the patient without issuer none."""
    own_a = _store(archive, make_ct(tmp_path / "a1.dcm", PatientID="RV-A", PatientName="LY^VAN A",
                                    PatientBirthDate="19500101", PatientSex="M"))
    study = _store(archive, make_ct(tmp_path / "a2.dcm", PatientID="RV-A", PatientName="LY^VAN A",
                                    PatientBirthDate="19500101", PatientSex="M"))
    _store(archive, make_ct(tmp_path / "b1.dcm", PatientID="RV-B", PatientName="LY^THI B",
                            PatientBirthDate="19800202", PatientSex="F"))
    first = _imaging_study(archive, study)
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        dry = http.post(f"/api/studies/{study}/patient", params={"dry_run": "true"},
                        json={"patient": {"id": "RV-B", "issuer": "BVDK"}, "reason": "x"})
        assert dry.status_code == 200 and dry.json()["patient"]["issuer"] == "BVDK", dry.text
        assert http.get("/api/patients/RV-B", params={"issuer": ""}).status_code == 200
        assert http.get("/api/patients/RV-B", params={"issuer": "BVDK"}).status_code == 404
        assert _imaging_study(archive, study)["meta"]["lastUpdated"] == first["meta"]["lastUpdated"]
        to_b = http.post(f"/api/studies/{study}/patient", json={"patient": {"id": "RV-B"}, "reason": "nhầm"})
        assert to_b.status_code == 200, to_b.text
        at_b = _imaging_study(archive, study)
        assert at_b["subject"]["identifier"]["value"] == "RV-B" and at_b["subject"]["display"] == "LY THI B"
        assert at_b["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
        back = http.post(f"/api/studies/{study}/patient", json={"patient": {"id": "RV-A"}, "reason": "chọn lại"})
        assert back.status_code == 200 and back.json()["previous"] == "RV-B", back.text
    at_a = _imaging_study(archive, study)
    assert at_a["subject"] == first["subject"] and at_a["meta"]["lastUpdated"] > at_b["meta"]["lastUpdated"]
    a = {"PatientName": "LY^VAN A", "PatientID": "RV-A", "IssuerOfPatientID": "", "PatientBirthDate": "19500101",
         "PatientSex": "M"}
    assert _metadata(archive, study) == [a] and _c_get(archive, study, tmp_path / "get") == [a]
    assert _qido(archive, study) == [("LY^VAN A", "RV-A")] and _qido(archive, own_a) == [("LY^VAN A", "RV-A")]


def test_an_oversized_name_is_a_bad_request(archive: PacsServer, tmp_path: Path) -> None:
    """A name no PN holds (64 characters a component group) is refused 4xx, never a 500."""
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-LONG", PatientName="DANG^VAN LONG"))
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        answer = http.post(f"/api/studies/{study}/patient",
                           json={"patient": {"id": "RV-LONG2", "name": "DANG^" + "A" * 6000}, "reason": "x"})
    assert answer.status_code in (400, 422), (answer.status_code, answer.text[:200])
    assert _qido(archive, study) == [("DANG^VAN LONG", "RV-LONG")]


def test_an_id_a_patient_holds_as_another_id_names_that_patient(archive: PacsServer, tmp_path: Path) -> None:
    """The citizen ID (with its issuer) of a patient the HIS registered under
    the hospital number names that patient, as a study received under it is
    filed there: moving to it does not make a twin of the citizen ID."""
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        made = http.put("/api/patients/RV-HN1", json={"issuer": "BVDK", "name": "TRINH^VAN KHOA",
                                                      "other_ids": [{"value": "001090000777", "issuer": "CCCD"}]})
        assert made.status_code in (200, 201), made.text
        study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="RV-HN9", PatientName="TRINH^VAN KHOA"))
        moved = http.post(f"/api/studies/{study}/patient", json={
            "patient": {"id": "001090000777", "issuer": "CCCD", "name": "TRINH^VAN KHOA"}, "reason": "mã CCCD"})
        assert moved.status_code == 200, moved.text
        assert (moved.json()["patient"]["id"], moved.json()["patient"]["issuer"]) == ("RV-HN1", "BVDK")
        assert http.get("/api/patients/001090000777", params={"issuer": "CCCD"}).status_code == 404
    assert _qido(archive, study) == [("TRINH^VAN KHOA", "RV-HN1")]
    assert _metadata(archive, study)[0]["IssuerOfPatientID"] == "BVDK"
