"""Correcting a patient where no HIS does it, or where the HIS speaks JSON:
`PUT /api/patients/{id}` and `POST /api/patients/merge` (ADT^A08 and ADT^A40
over JSON) and `pacs patient show|update|merge`, against a real `pacs serve`
on SQLite and PostgreSQL, checked with DCMTK (storescu, findscu, getscu),
WADO-RS and QIDO-RS.

The name the technologist typed at the modality without diacritics is
corrected: C-FIND finds the study by the new name (with and without
diacritics), retrieval sends the new values, the stored bytes stay as
received, and the correction says who made it and why."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from .conftest import Backend, PacsServer, run_dcmtk
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_merge_review import _c_get, _corrections, _metadata, _qido, _store


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp_path_factory.mktemp(f"patients-{request.param}") / "data",
                        Backend(request.param, pg, None, {}))
    server.start()
    server.tokens = {role: server.make_token(f"u-{role}", role)  # type: ignore[attr-defined]
                     for role in ("his", "radiologist", "modality", "emr")}
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def _as(server: PacsServer, role: str) -> object:
    return server.http(token=server.tokens[role])  # type: ignore[attr-defined]


def _found(server: PacsServer, tmp: Path, name: str) -> list[tuple[str, str]]:
    """(PatientName, StudyInstanceUID) of the studies DCMTK findscu finds by *name*, asked in UTF-8."""
    tmp.mkdir()
    result = run_dcmtk("findscu", "-S", "-aec", server.ae_title, "-X", "-od", str(tmp),
                       "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
                       "-k", f"PatientName={name}", "-k", "StudyInstanceUID", "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    answers = [dcmread(p) for p in sorted(tmp.iterdir())]
    return sorted((str(a.PatientName), str(a.StudyInstanceUID)) for a in answers)


def _stored_sha(server: PacsServer, study_uid: str) -> set[str]:
    core = server.core()
    try:
        return {hashlib.sha256(core.store.read_bytes(i.storage_key)).hexdigest()
                for i in core.reader.iter_stored(study_uid)}
    finally:
        core.close()


def test_a_name_typed_without_diacritics_is_corrected(archive: PacsServer, tmp_path: Path) -> None:
    sent = make_ct(tmp_path / "ct.dcm", PatientID="079085001234", PatientName="NGUYEN^VAN AN",
                   PatientBirthDate="", PatientSex="M")
    study = _store(archive, sent)
    before = _stored_sha(archive, study)
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        answer = http.put("/api/patients/079085001234",
                          json={"name": "Nguyễn^Văn An", "birth_date": "19850314", "reason": "gõ không dấu"})
    assert answer.status_code == 200, answer.text
    assert {k: answer.json()[k] for k in ("id", "name", "birth_date", "sex", "studies")} == {
        "id": "079085001234", "name": "Nguyễn^Văn An", "birth_date": "19850314", "sex": "M", "studies": 1}

    # Found by the new name, with and without its diacritics; no longer by a name it does not have.
    assert _found(archive, tmp_path / "f1", "Nguyễn*") == [("Nguyễn^Văn An", study)]
    assert _found(archive, tmp_path / "f2", "NGUYEN^VAN*") == [("Nguyễn^Văn An", study)]
    assert _qido(archive, study) == [("Nguyễn^Văn An", "079085001234")]
    # Retrieved with the new values (C-GET and WADO-RS); the stored bytes are as received.
    corrected = {"PatientName": "Nguyễn^Văn An", "PatientID": "079085001234", "IssuerOfPatientID": "",
                 "PatientBirthDate": "19850314", "PatientSex": "M"}
    assert _c_get(archive, study, tmp_path / "got") == [corrected]
    assert _metadata(archive, study) == [corrected]
    assert _stored_sha(archive, study) == before
    assert _corrections(archive, study) == {"PatientName": "Nguyễn^Văn An", "PatientBirthDate": "19850314"}
    with archive.http() as http:
        reasons = {c["reason"] for c in http.get(f"/api/studies/{study}/corrections").json()}
        events = http.get("/api/audit", params={"action": "patient-update", "user": "u-his"}).json()
    assert reasons == {"patient update by u-his: gõ không dấu"}
    assert [e["patient_id"] for e in events] == ["079085001234"], events

    # A key left out keeps its value; an empty one removes it.
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        answer = http.put("/api/patients/079085001234", json={"sex": ""})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["name"], answer.json()["sex"]) == ("Nguyễn^Văn An", "")


def test_a_duplicate_registration_is_merged_over_json(archive: PacsServer, tmp_path: Path) -> None:
    """The emergency desk registered the patient under a temporary ID; the
    HIS (or the administrator) merges it into the real one."""
    real = _store(archive, make_ct(tmp_path / "real.dcm", PatientID="BN2001", PatientName="Lê^Thị Hoa",
                                   PatientBirthDate="19600101", PatientSex="F", SpecificCharacterSet="ISO_IR 192"))
    urgent = _store(archive, make_ct(tmp_path / "tmp.dcm", PatientID="CC-0007", PatientName="CAP CUU^NU",
                                     PatientBirthDate="", PatientSex="F"))
    body = {"patient": {"id": "BN2001"}, "prior": [{"id": "CC-0007"}], "reason": "cấp cứu chưa rõ danh tính"}
    with _as(archive, "radiologist") as http:  # type: ignore[attr-defined]
        assert http.post("/api/patients/merge", json=body).status_code == 403
    with archive.http() as http:
        answer = http.post("/api/patients/merge", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["moved_studies"] == 1
        assert answer.json()["patient"]["studies"] == 2
        # Merged already: nothing to move, the same answer.
        again = http.post("/api/patients/merge", json=body)
        assert again.status_code == 200 and again.json()["moved_studies"] == 0, again.text
        assert http.get("/api/patients/CC-0007").status_code == 404
    assert _qido(archive, urgent) == [("Lê^Thị Hoa", "BN2001")]
    assert _metadata(archive, urgent)[0]["PatientID"] == "BN2001"
    assert sorted(s for _, s in _found(archive, tmp_path / "f", "LE^THI HOA")) == sorted([real, urgent])
    with archive.http() as http:
        reasons = {c["reason"] for c in http.get(f"/api/studies/{urgent}/corrections").json()}
    assert reasons == {"patient merge by pacs-test: cấp cứu chưa rõ danh tính"}


def test_bad_requests_are_refused_clearly(archive: PacsServer, tmp_path: Path) -> None:
    _store(archive, make_ct(tmp_path / "x.dcm", PatientID="BAD100", PatientName="X^Y"))
    with archive.http() as http:
        for body, status, words in (
            ({"birth_date": "19851301"}, 422, "not a valid YYYYMMDD"),
            ({"birth_date": "1985-03-14"}, 400, "birth_date"),
            ({"sex": "X"}, 400, "sex"),
            ({"nickname": "An"}, 400, "nickname"),
        ):
            answer = http.put("/api/patients/BAD100", json=body)
            assert answer.status_code == status and words in answer.text, (body, answer.status_code, answer.text)
        long_id = http.put("/api/patients/" + "9" * 65, json={"name": "A^B"})
        assert long_id.status_code == 400 and "longer than 64" in long_id.text, long_id.text
        unknown = http.post("/api/patients/merge", json={"patient": {"id": "BAD100"}, "prior": [{"id": "NOBODY"}]})
        assert unknown.status_code == 404 and "unknown" in unknown.text, unknown.text
        assert http.post("/api/patients/merge", json={"patient": {"id": "BAD100"}, "prior": []}).status_code == 400
        assert http.get("/api/patients/BAD100").json()["name"] == "X^Y"  # nothing refused was applied
    for role in ("radiologist", "modality", "emr"):
        with _as(archive, role) as http:  # type: ignore[attr-defined]
            assert http.put("/api/patients/BAD100", json={"name": "Z^Z"}).status_code == 403


def test_the_cli_corrects_and_merges_with_a_dry_run(archive: PacsServer, tmp_path: Path) -> None:
    first = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="CLI-A", PatientName="TRAN^VAN BINH",
                                    PatientBirthDate="19700101", PatientSex="M"))
    second = _store(archive, make_ct(tmp_path / "b.dcm", PatientID="CLI-B", PatientName="TRAN VAN BINH",
                                     PatientBirthDate="19700101", PatientSex="M"))
    updated = archive.cli("patient", "update", "CLI-A", "--name", "Trần^Văn Bình", "--reason", "sai tên", "--json")
    assert json.loads(updated.stdout)["name"] == "Trần^Văn Bình"
    assert _qido(archive, first) == [("Trần^Văn Bình", "CLI-A")]

    dry = json.loads(archive.cli("patient", "merge", "CLI-A", "--from", "CLI-B", "--reason", "trùng", "--json").stdout)
    assert dry["merged"] is False and dry["prior"]["studies"] == dry["moved_studies"] == 1
    assert _qido(archive, second) == [("TRAN VAN BINH", "CLI-B")]  # a dry run changes nothing
    done = json.loads(archive.cli("patient", "merge", "CLI-A", "--from", "CLI-B", "--reason", "trùng", "--yes",
                                  "--json").stdout)
    assert (done["merged"], done["moved_studies"], done["patient"]["studies"]) == (True, 1, 2)
    assert _qido(archive, second) == [("Trần^Văn Bình", "CLI-A")]
    shown = json.loads(archive.cli("patient", "show", "CLI-A", "--json").stdout)
    assert shown["name"] == "Trần^Văn Bình"

    missing = archive.cli("patient", "update", "NO-SUCH", "--name", "A^B", "--reason", "x", check=False)
    assert missing.returncode == 1 and "no patient NO-SUCH" in missing.stderr, missing.stderr
    refused = archive.cli("patient", "update", "CLI-A", "--birth-date", "19701301", "--reason", "x", check=False)
    assert refused.returncode == 2 and "not a valid YYYYMMDD" in refused.stderr, refused.stderr
    nothing = archive.cli("patient", "update", "CLI-A", "--reason", "x", check=False)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr, nothing.stderr
    actions = [e["action"] for e in json.loads(archive.cli("audit", "--patient", "CLI-A", "--format", "json").stdout)]
    assert "patient-update" in actions and "patient-merge" in actions, actions


def test_an_order_whose_name_is_no_dicom_pn_is_refused(archive: PacsServer) -> None:
    """An order over JSON named its patient with a backslash (DICOM's value
    separator): the worklist and every study filed under the order carried
    two names. Refused 400 like a correction's, naming the field."""
    order = {"patient": {"id": "PN-ORDER", "name": "Phạm\\Văn D"}, "accession_number": "PN0001", "modality": "CT"}
    with _as(archive, "his") as http:  # type: ignore[attr-defined]
        refused = http.post("/api/orders", json=order)
        assert refused.status_code == 400 and "patient.name" in refused.text and "backslash" in refused.text, \
            refused.text
        assert http.get("/api/orders/PN0001").status_code == 404
        order["patient"]["name"] = "Phạm^Văn D"
        assert http.post("/api/orders", json=order).status_code == 201


def test_a_later_study_is_retrieved_with_the_corrected_name(archive: PacsServer, tmp_path: Path) -> None:
    """The modality (no worklist) keeps the name as the technologist typed
    it: after the correction, its next study of the patient came with the
    old name, which C-FIND no longer showed but C-GET and WADO-RS sent.
    A registered patient's new study is corrected to the registered values."""
    _store(archive, make_ct(tmp_path / "first.dcm", PatientID="REG-1", PatientName="PHAM^THI MAI",
                            PatientBirthDate="19900101", PatientSex="F"))
    assert archive.cli("patient", "update", "REG-1", "--name", "Phạm^Thị Mai", "--reason", "không dấu").returncode == 0
    later = _store(archive, make_ct(tmp_path / "later.dcm", PatientID="REG-1", PatientName="PHAM^THI MAI",
                                    PatientBirthDate="19900101", PatientSex="F"))
    corrected = {"PatientName": "Phạm^Thị Mai", "PatientID": "REG-1", "IssuerOfPatientID": "",
                 "PatientBirthDate": "19900101", "PatientSex": "F"}
    assert _qido(archive, later) == [("Phạm^Thị Mai", "REG-1")]
    assert _c_get(archive, later, tmp_path / "got") == [corrected]
    assert _metadata(archive, later) == [corrected]
    with archive.http() as http:
        [correction] = http.get(f"/api/studies/{later}/corrections").json()
    assert (correction["keyword"], correction["received"]) == ("PatientName", "PHAM^THI MAI")
    assert "as registered" in correction["reason"]


def test_studies_of_a_patient_no_one_registered_keep_their_values(archive: PacsServer, tmp_path: Path) -> None:
    """Known only from what modalities sent, a patient's studies are each
    retrieved as received: a better-typed later study is not made to say
    what an earlier one said."""
    _store(archive, make_ct(tmp_path / "a.dcm", PatientID="UNREG-1", PatientName="VO^VAN TAN"))
    later = _store(archive, make_ct(tmp_path / "b.dcm", PatientID="UNREG-1", PatientName="Võ^Văn Tần",
                                    SpecificCharacterSet="ISO_IR 192"))
    assert _c_get(archive, later, tmp_path / "got")[0]["PatientName"] == "Võ^Văn Tần"
    assert _corrections(archive, later) == {}
