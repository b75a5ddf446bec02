"""Moving one study to the patient it belongs to, where no HIS order files
it: the technologist typed another patient's ID at the modality (a real
person's history then showed a stranger's images) or chose the wrong
patient. `POST /api/studies/{uid}/patient` and `pacs patient move-study`,
against a real `pacs serve` on SQLite and PostgreSQL, checked with DCMTK
(findscu, getscu), QIDO-RS and WADO-RS: the study is found and retrieved
as the right patient's, the stored bytes unchanged, the patient it left
keeps their own studies, and a patient that existed only through it goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_merge_review import _c_get, _metadata, _qido, _store
from .test_patient_corrections import _as, _found, _stored_sha, archive  # noqa: F401 (a fixture)


def _audit(server: PacsServer, study: str) -> list[dict[str, Any]]:
    with server.http() as http:
        return [e for e in http.get("/api/audit", params={"study": study}).json() if e["action"] == "study-move"]


def test_a_study_under_another_patients_id_moves_to_its_patient(archive: PacsServer, tmp_path: Path) -> None:
    """Trần Thị Hoa's chest X-ray was sent under Lê Văn Nam's ID: moved to
    her ID (a new patient of that name), it is hers in C-FIND, QIDO-RS,
    WADO-RS and C-GET; Lê Văn Nam keeps his own study only."""
    his = _store(archive, make_ct(tmp_path / "nam.dcm", PatientID="MV-NAM", PatientName="Lê^Văn Nam",
                                  PatientBirthDate="19600101", PatientSex="M", SpecificCharacterSet="ISO_IR 192"))
    wrong = _store(archive, make_ct(tmp_path / "hoa.dcm", PatientID="MV-NAM", PatientName="Lê^Văn Nam",
                                    PatientBirthDate="19600101", PatientSex="M", SpecificCharacterSet="ISO_IR 192"))
    before = _stored_sha(archive, wrong)
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        body = {"patient": {"id": "MV-HOA", "name": "Trần^Thị Hoa", "birth_date": "19900505", "sex": "F"},
                "reason": "chọn nhầm bệnh nhân"}
        dry = http.post(f"/api/studies/{wrong}/patient", params={"dry_run": "true"}, json=body)
        assert dry.status_code == 200 and dry.json()["dry_run"] is True, dry.text
        assert _qido(archive, wrong) == [("Lê^Văn Nam", "MV-NAM")]  # a dry run changes nothing
        assert http.get("/api/patients/MV-HOA").status_code == 404
        moved = http.post(f"/api/studies/{wrong}/patient", json=body)
    assert moved.status_code == 200, moved.text
    assert moved.json()["previous"] == "MV-NAM" and moved.json()["patient"]["name"] == "Trần^Thị Hoa"
    assert _qido(archive, wrong) == [("Trần^Thị Hoa", "MV-HOA")]
    assert _qido(archive, his) == [("Lê^Văn Nam", "MV-NAM")]
    assert _found(archive, tmp_path / "f1", "TRAN^THI*") == [("Trần^Thị Hoa", wrong)]
    assert _found(archive, tmp_path / "f2", "LE^VAN*") == [("Lê^Văn Nam", his)]
    expected = {"PatientName": "Trần^Thị Hoa", "PatientID": "MV-HOA", "IssuerOfPatientID": "",
                "PatientBirthDate": "19900505", "PatientSex": "F"}
    assert _metadata(archive, wrong) == [expected]
    assert _c_get(archive, wrong, tmp_path / "get") == [expected]
    assert _stored_sha(archive, wrong) == before  # the bytes stay as received
    # One event per patient named (the study's trail shows both), the dry run's said so.
    events = [e for e in _audit(archive, wrong) if "dry run" not in e["detail"]]
    assert sorted(e["patient_id"] for e in events) == ["MV-HOA", "MV-NAM"], events
    assert all(e["user"] == "u-his" and "chọn nhầm bệnh nhân" in e["detail"] for e in events), events
    assert len(_audit(archive, wrong)) == 4


def test_the_cli_moves_a_study_to_an_existing_patient(archive: PacsServer, tmp_path: Path) -> None:
    """No HIS: the administrator moves the study typed under a made-up ID to
    the patient it belongs to; the made-up patient, left without a study,
    goes. A dry run first says what would happen."""
    own = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="MV-AN", PatientName="Phạm^Văn An",
                                  SpecificCharacterSet="ISO_IR 192"))
    typo = _store(archive, make_ct(tmp_path / "b.dcm", PatientID="MV-NA", PatientName="PHAM^VAN AN"))
    dry = json.loads(archive.cli("patient", "move-study", typo, "--to", "MV-AN", "--reason", "gõ sai mã",
                                 "--json").stdout)
    assert dry["moved"] is False and dry["previous"] == "MV-NA" and dry["patient"]["studies"] == 2
    assert _qido(archive, typo) == [("PHAM^VAN AN", "MV-NA")]
    done = json.loads(archive.cli("patient", "move-study", typo, "--to", "MV-AN", "--reason", "gõ sai mã",
                                  "--yes", "--json").stdout)
    assert done["moved"] is True and done["patient"]["studies"] == 2
    assert _qido(archive, typo) == [("Phạm^Văn An", "MV-AN")] and _qido(archive, own) == [("Phạm^Văn An", "MV-AN")]
    gone = archive.cli("patient", "show", "MV-NA", check=False)
    assert gone.returncode == 1
    events = _audit(archive, typo)
    assert len(events) == 1 and events[0]["protocol"] == "cli" and "gõ sai mã" in events[0]["detail"]


def test_what_a_move_refuses(archive: PacsServer, tmp_path: Path) -> None:
    """Each refusal changes nothing and says why: an unknown study (404), an
    unknown patient without a name (404), the patient it is filed under
    (409), other demographics for an existing patient (409: a patient
    update), a study an HIS order files (409: the order decides), a bad UID
    or Patient ID (400), another role than the HIS and administrators (403)."""
    study = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="MV-R1", PatientName="VO^VAN R",
                                    AccessionNumber="MV-ACC1"))
    other = _store(archive, make_ct(tmp_path / "b.dcm", PatientID="MV-R2", PatientName="VO^THI S"))
    url = f"/api/studies/{study}/patient"
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        cases = [
            (f"/api/studies/{generate_uid()}/patient", {"id": "MV-R2"}, 404, "no study"),
            (url, {"id": "MV-NOBODY"}, 404, "give their name"),
            (url, {"id": "MV-R1"}, 409, "filed under MV-R1 already"),
            (url, {"id": "MV-R2", "name": "VO^THI T"}, 409, "pacs patient update"),
            (url, {"id": " MV-R2"}, 400, "leading or trailing spaces"),
        ]
        for path, patient, status, says in cases:
            answer = http.post(path, json={"patient": patient, "reason": "x"})
            assert answer.status_code == status and says in answer.text, (patient, answer.status_code, answer.text)
        assert http.post(url, json={"patient": {"id": "MV-R2"}}).status_code in (400, 422)  # no reason
        order = {"patient": {"id": "MV-R1", "name": "VO^VAN R"}, "accession_number": "MV-ACC1",
                 "study_uid": study, "modality": "CT", "scheduled_start": "20261207100000"}
        placed = http.post("/api/orders", json=order)
        assert placed.status_code in (200, 201), placed.text
        ordered = http.post(url, json={"patient": {"id": "MV-R2"}, "reason": "x"})
        assert ordered.status_code == 409 and "HIS order MV-ACC1" in ordered.text, ordered.text
    with _as(archive, "radiologist") as http:  # type: ignore[attr-defined]
        assert http.post(url, json={"patient": {"id": "MV-R2"}, "reason": "x"}).status_code == 403
    bad = archive.cli("patient", "move-study", "1.2.abc", "--to", "MV-R2", "--reason", "x", check=False)
    assert bad.returncode == 2 and "not a UID" in bad.stderr
    refused = archive.cli("patient", "move-study", other, "--to", "MV-NOBODY", "--reason", "x", "--yes", check=False)
    assert refused.returncode == 1 and "give their name" in refused.stderr, refused.stderr
    assert _qido(archive, study) == [("VO^VAN R", "MV-R1")] and _qido(archive, other) == [("VO^THI S", "MV-R2")]
