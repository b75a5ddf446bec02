"""A study moved to another patient after its report was signed and sent
to the HIS (`pacs patient move-study`, `POST /api/studies/{uid}/patient`),
against a real `pacs serve` on SQLite and PostgreSQL with a stand-in HIS
over MLLP: the HIS kept the ORU^R01 under the patient the study left --
another person's findings in that patient's record -- and was told nothing.

HL7 v2 has the result posted as wrong for the patient it was sent for
(OBX-11 "W", table 0085: "post original as wrong, e.g. transmitted for
wrong patient"), then sent for the right one; what the HIS never received
(still queued) is sent once, for the right patient, and a study without a
signed report tells the HIS nothing. So for a reported study linked by hand
to another patient's order (`POST /api/studies/{uid}/match`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder, create_database, drop_database, serving_with_his, wait_until
from .test_review_radiology_day import A, _orus, _send_ct, _sign

WRONG_NAME = "Lê^Văn Sai"  # the patient the study was sent under


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def reading(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """An archive whose reports go to a stand-in HIS (``reading.his``), with
    radiologist A's token (``reading.radiologist``)."""
    pg = create_database() if request.param == "pg" else None
    tmp = tmp_path_factory.mktemp(f"move-report-{request.param}")
    his_port, http_port = free_port(), free_port()
    server = PacsServer(tmp / "data", Backend(request.param, pg, None, {}), http_port=http_port,
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}",
                                   "PACS_PUBLIC_URL": f"http://127.0.0.1:{http_port}"})
    try:
        with serving_with_his(server, his_port, A) as serving:
            serving.work = tmp  # type: ignore[attr-defined]
            yield serving
    finally:
        if pg:
            drop_database(pg)


def _fields(message: str, segment: str) -> list[list[str]]:
    """Every *segment* of an HL7 *message*, as its fields (index = HL7 field
    number; in MSH one less, its field separator being MSH-1)."""
    return [s.split("|") for s in message.split("\r") if s.startswith(segment + "|")]


def _queued(server: PacsServer, study: str) -> list[dict[str, Any]]:
    """The outbox messages about *study* (`pacs outbox list`), oldest first."""
    listed = json.loads(server.cli("outbox", "list", "--json", "--limit", "1000").stdout)["messages"]
    return sorted((m for m in listed if m["key"] == f"study:{study}"), key=lambda m: m["id"])


def _move(server: PacsServer, study: str, patient_id: str, *options: str) -> dict[str, Any]:
    moved = server.cli("patient", "move-study", study, "--to", patient_id, "--issuer", "CCCD", *options,
                       "--reason", "kỹ thuật viên chọn nhầm bệnh nhân", "--json")
    return json.loads(moved.stdout)  # type: ignore[no-any-return]


def _exports(server: PacsServer, study: str) -> list[dict[str, Any]]:
    with server.http() as admin:
        events = admin.get("/api/audit", params={"study": study, "limit": 1000}).json()
    return [e for e in events if e["action"] == "export" and "ORU^R01" in e["detail"]]


def test_a_signed_report_is_posted_as_wrong_for_the_patient_the_study_left(reading: PacsServer) -> None:
    """Lê Văn Sai's chart at the HIS holds the CT report of Đặng Thị Đúng
    (the technologist picked the wrong patient). Moved with `pacs patient
    move-study`, the HIS gets the report posted as wrong for him (PID his,
    OBR-25 C, every OBX-11 W), then the same report, final, for her; a dry
    run first sends nothing. Each delivery is audited with the patient it
    named."""
    study, wrong, right = generate_uid(), "001185003333", "038092005555"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName=WRONG_NAME,
             PatientBirthDate="19850101", PatientSex="M", AccessionNumber="CT26-0301")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Gan nhiễm mỡ độ I.\nLách kích thước bình thường.", "Gan nhiễm mỡ.")
    signed = _orus(reading, 1, study)
    assert len(signed) == 1 and f"PID|1||{wrong}^^^CCCD" in signed[0], signed

    dry = _move(reading, study, right, "--name", "Đặng^Thị Đúng")
    assert dry["moved"] is False and dry["previous"] == f"{wrong}^^^CCCD" and dry["report_resent"] is True, dry
    assert len(_queued(reading, study)) == 1  # the dry run queued nothing for the HIS
    done = _move(reading, study, right, "--name", "Đặng^Thị Đúng", "--yes")
    assert done["moved"] is True and done["report_resent"] is True, done
    assert [m["status"] for m in _queued(reading, study)] == ["final", "wrong", "final"]

    orus = _orus(reading, 3, study)
    assert len(orus) == 3, orus
    first, retracted, resent = orus
    assert _fields(retracted, "PID")[0][3] == f"{wrong}^^^CCCD" and _fields(retracted, "PID")[0][5] == WRONG_NAME
    assert _fields(resent, "PID")[0][3] == f"{right}^^^CCCD" and _fields(resent, "PID")[0][5] == "Đặng^Thị Đúng"
    assert wrong not in resent, resent
    for message, obr_status, obx_status in ((first, "F", "F"), (retracted, "C", "W"), (resent, "F", "F")):
        assert _fields(message, "MSH")[0][8] == "ORU^R01^ORU_R01", message
        assert _fields(message, "OBR")[0][25] == obr_status, message
        assert {obx[11] for obx in _fields(message, "OBX")} == {obx_status}, message
        # The same result, as it was signed: the order it answers, the signer and the text.
        assert _fields(message, "OBR")[0][3] == _fields(first, "OBR")[0][3] == "CT26-0301"
        assert _fields(message, "OBR")[0][32] == _fields(first, "OBR")[0][32]
        assert [obx[3:6] for obx in _fields(message, "OBX")] == [obx[3:6] for obx in _fields(first, "OBX")]
    assert len({_fields(m, "MSH")[0][9] for m in orus}) == 3  # each message its own MSH-10

    # Audited once delivered (after the HIS's ACK), each naming the patient it told the HIS about.
    assert wait_until(lambda: len(_exports(reading, study)) == 3, timeout=30), _exports(reading, study)
    named = sorted((e["patient_id"], "wrong" in e["detail"]) for e in _exports(reading, study))
    assert named == sorted([(f"{wrong}^^^CCCD", False), (f"{wrong}^^^CCCD", True), (f"{right}^^^CCCD", False)])


def test_a_study_without_a_signed_report_tells_the_his_nothing(reading: PacsServer) -> None:
    """A draft is no result the HIS holds: the study moves, nothing is queued."""
    study = generate_uid()
    _send_ct(reading, study, 1, PatientID="001185004444", IssuerOfPatientID="CCCD", PatientName=WRONG_NAME,
             AccessionNumber="CT26-0302")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        saved = rad.put(f"/api/studies/{study}/report", json={"findings": "Chưa xong.", "impression": "",
                                                               "revision": 0})
        assert saved.status_code == 200, saved.text
    with reading.http() as admin:
        moved = admin.post(f"/api/studies/{study}/patient", json={
            "patient": {"id": "038092006666", "issuer": "CCCD", "name": "Đặng^Thị Khác"}, "reason": "nhầm"})
        assert moved.status_code == 200 and moved.json()["report_resent"] is False, moved.text
    assert _queued(reading, study) == []


def test_a_report_the_his_never_received_goes_once_to_the_right_patient(reading: PacsServer) -> None:
    """The HIS is down when the report is signed and when the study is
    moved: it never held the report under the wrong patient, so nothing is
    posted as wrong; back up, it gets the queued report once, for the
    patient the study is filed under now."""
    study, wrong, right = generate_uid(), "001185007777", "038092007777"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName=WRONG_NAME,
             AccessionNumber="CT26-0303")
    his = reading.his  # type: ignore[attr-defined]
    his.stop()
    try:
        with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
            _sign(rad, study, "Phổi hai bên sáng đều.", "Không thấy tổn thương phổi.")
        # Tried and refused at least once (so not in the middle of its first send) before the move.
        assert wait_until(lambda: [m["attempts"] > 0 for m in _queued(reading, study)] == [True], timeout=30)
        with reading.http() as admin:
            moved = admin.post(f"/api/studies/{study}/patient", json={
                "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "reason": "nhầm"})
            assert moved.status_code == 200, moved.text
        assert [m["status"] for m in _queued(reading, study)] == ["final"]
    finally:
        reading.his = MLLPRecorder(his.port)  # type: ignore[attr-defined]
    orus = _orus(reading, 1, study)
    assert len(orus) == 1 and _fields(orus[0], "PID")[0][3] == f"{right}^^^CCCD", orus
    assert {obx[11] for obx in _fields(orus[0], "OBX")} == {"F"}


def test_an_amended_report_posted_as_wrong_names_the_patient_the_left_one_was_merged_into(
        reading: PacsServer) -> None:
    """The HIS holds the amended report (C) under Lê Văn Sai, whom it
    registered. The HIS is down when the study is moved to its patient and
    when the HIS merges Lê Văn Sai's registration into another (ADT^A40
    over JSON): back up, it gets the report posted as wrong for the
    patient it keeps now (the merged-away ID it would refuse), then the
    amended report (C) for the patient the study moved to."""
    study, wrong, kept, right = generate_uid(), "001185008888", "001185008899", "038092008888"
    with reading.http() as admin:
        for pid in (wrong, kept):  # registered by the HIS: kept when their last study moves away
            put = admin.put(f"/api/patients/{pid}", json={"issuer": "CCCD", "name": WRONG_NAME, "reason": "HIS"})
            assert put.status_code == 200, put.text
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName=WRONG_NAME,
             AccessionNumber="CT26-0304")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Sỏi thận trái 5 mm.", "Sỏi thận trái.")
        assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        _sign(rad, study, "Sỏi thận trái 5 mm. Thận phải bình thường.", "Sỏi thận trái.")
    assert len(_orus(reading, 2, study)) == 2
    his = reading.his  # type: ignore[attr-defined]
    his.stop()
    try:
        with reading.http() as admin:
            moved = admin.post(f"/api/studies/{study}/patient", json={
                "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "reason": "nhầm"})
            assert moved.status_code == 200 and moved.json()["report_resent"] is True, moved.text
            merged = admin.post("/api/patients/merge", json={
                "patient": {"id": kept, "issuer": "CCCD"}, "prior": [{"id": wrong, "issuer": "CCCD"}],
                "reason": "trùng hồ sơ"})
            assert merged.status_code == 200, merged.text
    finally:
        reading.his = MLLPRecorder(his.port)  # type: ignore[attr-defined]
    orus = _orus(reading, 2, study)
    assert len(orus) == 2, orus
    retracted, resent = orus
    assert _fields(retracted, "PID")[0][3] == f"{kept}^^^CCCD" and wrong not in retracted, retracted
    assert _fields(resent, "PID")[0][3] == f"{right}^^^CCCD", resent
    assert [_fields(m, "OBR")[0][25] for m in orus] == ["C", "C"]
    assert [{obx[11] for obx in _fields(m, "OBX")} for m in orus] == [{"W"}, {"C"}]
    assert all("Thận phải bình thường" in m for m in orus), orus


def test_a_reported_study_linked_by_hand_to_another_patients_order(reading: PacsServer) -> None:
    """The CT came without order under the wrong patient's ID and was
    reported; the administrator links it to its HIS order, of another
    patient (`POST /api/studies/{uid}/match`): the report is posted as wrong
    for the patient it left, with the numbers the HIS holds it under, then
    sent for the order's patient, answering that order (OBR-2, OBR-3)."""
    study, wrong, right = generate_uid(), "001185009911", "038092009911"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName=WRONG_NAME,
             AccessionNumber="CT26-0306")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Tràn dịch màng phổi phải lượng ít.", "Tràn dịch màng phổi phải.")
    assert len(_orus(reading, 1, study)) == 1
    with reading.http() as admin:
        placed = admin.post("/api/orders", json={
            "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "accession_number": "CT26-0307",
            "placer_order_number": "PL-0307", "filler_order_number": "FL-0307", "modality": "CT",
            "start_date": "20261207"})
        assert placed.status_code in (200, 201), placed.text
        matched = admin.post(f"/api/studies/{study}/match", json={"accession_number": "CT26-0307"})
        assert matched.status_code == 200, matched.text
    orus = _orus(reading, 3, study)
    assert len(orus) == 3, orus
    first, retracted, resent = orus
    assert _fields(retracted, "PID")[0][3] == f"{wrong}^^^CCCD", retracted
    assert _fields(retracted, "OBR")[0][2:4] == _fields(first, "OBR")[0][2:4] == ["", "CT26-0306"]
    assert {obx[11] for obx in _fields(retracted, "OBX")} == {"W"}
    assert _fields(resent, "PID")[0][3] == f"{right}^^^CCCD" and wrong not in resent, resent
    assert _fields(resent, "OBR")[0][2:4] == ["PL-0307", "FL-0307"], resent
    assert {obx[11] for obx in _fields(resent, "OBX")} == {"F"}
