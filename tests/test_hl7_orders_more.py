"""The HIS order path under a second exploratory tester's findings: ORDER
groups (ORC with its OBR/TQ1/IPC), identity of a requested procedure (the
accession; placer numbers and Study Instance UIDs), resent control IDs,
issuer-less patient IDs, order changes that move the patient, grouped and
cancelled MPPS, several messages in one frame, LF segment breaks, v2.3
timing in ORC-7, year-only birth dates and merges by other IDs.

Everything goes over real sockets to a real `pacs serve`: MLLP (python-hl7
and raw frames), DCMTK findscu for the worklist, pynetdicom for MPPS, HTTP
for the JSON API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_hl7_robustness import adt, fields, send_raw, with_pid
from .test_worklist_ris import WL_KEYS, _cfind_names, _mpps_status, msa, orm, send, worklist

MSH = "MSH|^~\\&|HIS|BVDK|FILMLESS|BVDK|20261204083100||{kind}|{control}|P|2.5|||||VN|UNICODE UTF-8"


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per index backend for the module; each test uses its own
    accessions and patients."""
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp_path_factory.mktemp("hl7more") / "data", Backend(request.param, pg, None, {}))
    server.start()
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def message(control: str, *segments: str, kind: str = "OMI^O23^OMI_O23") -> str:
    return "\n".join([MSH.format(kind=kind, control=control), *segments])


def order(server: PacsServer, accession: str) -> dict[str, Any]:
    with server.http() as http:
        response = http.get(f"/api/orders/{accession}")
    assert response.status_code == 200, response.text
    return response.json()


def no_order(server: PacsServer, accession: str) -> bool:
    with server.http() as http:
        return http.get(f"/api/orders/{accession}").status_code == 404


# -- 1: segments belong to their ORDER group, every IPC is a step ------------------------------
def test_two_ipc_under_one_order_give_two_steps(server: PacsServer, tmp_path: Path) -> None:
    uid1, uid2 = generate_uid(), generate_uid()
    two_ipc = message(
        "G1",
        "PID|1||BN700300^^^BVDK^PI||Lê^Minh Châu||19750505|M",
        "PV1|1|O",
        "ORC|NW|PLG3000|||SC",
        "TQ1|1||||||20261204110000|||R",
        "OBR|1|PLG3000||CT02^CT ngực bụng^L",
        f"IPC|GACC3001|GRP3001|{uid1}|GSPS3001|CT||CT ROOM 1|P.CT|CT_ROOM1",
        f"IPC|GACC3002|GRP3002|{uid2}|GSPS3002|CT||CT ROOM 1|P.CT|CT_ROOM1",
    )
    assert msa(send(server, two_ipc)) == ("AA", "G1")
    items = worklist(server, tmp_path, *WL_KEYS, "AccessionNumber=GACC300*")
    got = sorted((i.AccessionNumber, i.StudyInstanceUID, i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID,
                  i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate) for i in items)
    assert got == [("GACC3001", uid1, "GSPS3001", "20261204"), ("GACC3002", uid2, "GSPS3002", "20261204")]


def test_tq1_of_the_second_group_times_the_second_order(server: PacsServer) -> None:
    tq1_second = message(
        "G2",
        "PID|1||BN700310^^^BVDK^PI||Phan^Văn Mười Một||19810101|M",
        "ORC|NW|PLGT1|||SC",
        "OBR|1|PLGT1||XQ01^X-quang ngực^L|||20261205070000",
        f"IPC|GACCT1|GRPT1|{generate_uid()}|GSPST1|DX||DX ROOM 1|P.XQ|DX_ROOM1",
        "ORC|NW|PLGT2|||SC",
        "TQ1|1||||||20261205150000||S",  # TQ1-9 priority
        "OBR|2|PLGT2||SA01^Siêu âm bụng^L",
        f"IPC|GACCT2|GRPT2|{generate_uid()}|GSPST2|US||US ROOM 1|P.SA|US_ROOM1",
    )
    assert msa(send(server, tq1_second))[0] == "AA"
    first, second = order(server, "GACCT1"), order(server, "GACCT2")
    assert (first["start_date"], first["start_time"], first["priority"]) == ("20261205", "070000", "")
    assert (second["start_date"], second["start_time"], second["priority"]) == ("20261205", "150000", "STAT")
    assert (first["modality"], second["modality"]) == ("DX", "US")


# -- 2: a Study Instance UID belongs to one order ----------------------------------------------------
def test_reused_study_uid_is_refused_ae_and_409(server: PacsServer) -> None:
    study_uid = generate_uid()
    assert msa(send(server, orm("SU1", "HSU001", pid="BN700401", study_uid=study_uid)))[0] == "AA"
    ack = send(server, orm("SU2", "HSU002", pid="BN700401", study_uid=study_uid))
    assert msa(ack) == ("AE", "SU2")  # not AR: a resend as is would fail forever
    err = fields(ack, "ERR")
    assert err[3].startswith("205^") and "Study Instance UID" in err[8] and "HSU001" in err[8]
    assert no_order(server, "HSU002")
    with server.http() as http:
        refused = http.post("/api/orders", json={"patient": {"id": "BN700402"}, "accession_number": "HSU003",
                                                 "study_uid": study_uid})
        assert refused.status_code == 409, refused.text
        assert "Study Instance UID" in refused.text
    assert server.alive() and "IntegrityError" not in server.log_text()


# -- 3: procedures sharing one placer order number -----------------------------------------------------
def test_procedures_sharing_a_placer_order_number_are_all_placed(server: PacsServer) -> None:
    shared = message(
        "PL1",
        "PID|1||BN700200^^^BVDK^PI~079190001234^^^CCCD^NI||Trần^Thị Đào||19900101|F",
        "ORC|NW|PLS2000|||SC",
        "TQ1|1||||||20261204100000|||R",
        "OBR|1|PLS2000||XQ01^X-quang ngực thẳng^L",
        f"IPC|PACC2001|PRP2001|{generate_uid()}|PSPS2001|DX||DX ROOM 1|P.X-QUANG|DX_ROOM1",
        "ORC|NW|PLS2000|||SC",
        "TQ1|1||||||20261204101500|||S",
        "OBR|2|PLS2000||SA01^Siêu âm bụng tổng quát^L",
        f"IPC|PACC2002|PRP2002|{generate_uid()}|PSPS2002|US||US ROOM 1|P.SIEU-AM|US_ROOM1",
    )
    assert msa(send(server, shared)) == ("AA", "PL1")
    assert order(server, "PACC2001")["placer_order_number"] == "PLS2000"
    assert order(server, "PACC2002")["placer_order_number"] == "PLS2000"
    # A third procedure of the same placer order, in a later message, is placed too.
    third = orm("PL2", "PACC2003", pid="BN700200").replace("|PPACC2003|", "|PLS2000|")
    assert msa(send(server, third))[0] == "AA"
    assert order(server, "PACC2003")["placer_order_number"] == "PLS2000"
    # The accession decides what a CA cancels: only that procedure.
    cancel = (orm("PL3", "PACC2002", pid="BN700200", order_control="CA").replace("|PPACC2002|", "|PLS2000|")
              .replace("|SPSPACC2002|", "|PSPS2002|"))  # OBR-20: the step's SPS ID (IPC-4 of the NW)
    assert msa(send(server, cancel))[0] == "AA"
    assert [order(server, a)["status"] for a in ("PACC2001", "PACC2002", "PACC2003")] == [
        "SCHEDULED", "CANCELLED", "SCHEDULED"]


# -- 4: a reused control ID with other content is a new message -------------------------------------
def test_reused_control_id_with_other_content_is_applied(server: PacsServer) -> None:
    first = orm("RC1", "HRC001", pid="BN700501")
    assert msa(send(server, first))[0] == "AA"
    # A resend: same content, MSH-7 refreshed by the HIS engine: still a duplicate.
    resend = first.replace("|20241120083000|", "|20241120090000|")
    again = fields(send(server, resend), "MSA")
    assert again[1] == "AA" and "already applied" in again[3]
    # The HIS restarted its counter: same control ID, another order.
    restarted = orm("RC1", "HRC002", pid="BN700502")
    ack = fields(send(server, restarted), "MSA")
    assert ack[1] == "AA" and "already applied" not in ack[3]
    assert order(server, "HRC002")["status"] == "SCHEDULED"
    # ...and its own resend is recognised in turn.
    assert "already applied" in fields(send(server, restarted), "MSA")[3]


# -- 5: a PID-3 without assigning authority is the one patient with that ID ---------------------------
def test_issuerless_patient_id_is_the_known_patient(server: PacsServer, tmp_path: Path) -> None:
    assert msa(send(server, with_pid(orm("IS1", "HIS001"), "PID|1||BN700123^^^BVDK^PI||Nguyễn^Văn An||19850315|M")))[0] == "AA"
    assert msa(send(server, with_pid(orm("IS2", "HIS002"), "PID|1||BN700123||Nguyễn^Văn An||19850315|M")))[0] == "AA"
    assert msa(send(server, adt("IS3", "PID|1||BN700123^^^BVDK^PI||Nguyễn^Văn Anh||19850316|M")))[0] == "AA"
    items = worklist(server, tmp_path, "PatientID=BN700123", "AccessionNumber", "IssuerOfPatientID", "PatientName")
    assert sorted((i.AccessionNumber, i.IssuerOfPatientID, str(i.PatientName)) for i in items) == [
        ("HIS001", "BVDK", "Nguyễn^Văn Anh"), ("HIS002", "BVDK", "Nguyễn^Văn Anh")]
    assert order(server, "HIS002")["issuer"] == "BVDK"


# -- 6: XO to another patient moves the linked study too ----------------------------------------------
def test_order_change_to_another_patient_moves_its_study(server: PacsServer, tmp_path: Path) -> None:
    wrong = "PID|1||BN700601^^^BVDK^PI||Sai^Bệnh Nhân||19600101|M"
    right = "PID|1||BN700602^^^BVDK^PI||Đúng^Bệnh Nhân||19700101|F"
    assert msa(send(server, with_pid(orm("XP1", "HXP001"), wrong)))[0] == "AA"
    ct = make_ct(tmp_path / "xo.dcm", PatientName="SAI^BENH NHAN", PatientID="BN700601", AccessionNumber="HXP001")
    assert server.storescu(str(ct)).returncode == 0
    study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    assert _cfind_names(server, StudyInstanceUID=study) == [("Sai^Bệnh Nhân", "BN700601", study)]
    assert msa(send(server, with_pid(orm("XP2", "HXP001", order_control="XO"), right)))[0] == "AA"
    assert order(server, "HXP001")["patient_id"] == "BN700602"
    assert _cfind_names(server, StudyInstanceUID=study) == [("Đúng^Bệnh Nhân", "BN700602", study)]
    assert _cfind_names(server, PatientID="BN700601") == []
    with server.http() as http:
        corrections = [c for c in http.get(f"/api/studies/{study}/corrections").json() if c["keyword"] == "PatientID"]
        assert corrections[-1]["corrected"] == "BN700602"


# -- 7 and 8: MPPS for a group of orders; no MPPS on a cancelled order; no CA of a completed one -------
def _create(accessions: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "US"
    ds.PerformedStationAETitle = "US_ROOM1"
    ds.PerformedProcedureStepStartDate = "20261204"
    ds.PerformedProcedureStepStartTime = "100000"
    ds.PerformedProcedureStepID = "PPSG"
    items = []
    for accession, study_uid in accessions:
        item = Dataset()
        item.AccessionNumber = accession
        item.StudyInstanceUID = study_uid
        items.append(item)
    ds.ScheduledStepAttributesSequence = Sequence(items)
    return ds


def _completed() -> Dataset:
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = "20261204"
    done.PerformedProcedureStepEndTime = "101000"
    return done


def test_mpps_for_two_scheduled_steps_moves_both_orders(server: PacsServer) -> None:
    for control, accession in (("MG1", "HMG001"), ("MG2", "HMG002")):
        assert msa(send(server, orm(control, accession, pid="BN700701", modality="US")))[0] == "AA"
    refs = [(a, order(server, a)["study_uid"]) for a in ("HMG001", "HMG002")]
    uid = generate_uid()
    assert int(_mpps_status(server, uid, _create(refs), create=True).Status) == 0
    assert [order(server, a)["status"] for a in ("HMG001", "HMG002")] == ["IN PROGRESS"] * 2
    assert int(_mpps_status(server, uid, _completed(), create=False).Status) == 0
    assert [order(server, a)["status"] for a in ("HMG001", "HMG002")] == ["COMPLETED"] * 2


def test_cancelled_order_is_not_resurrected_and_completed_one_not_cancelled(server: PacsServer, tmp_path: Path) -> None:
    assert msa(send(server, orm("SG1", "HSG001", pid="BN700801")))[0] == "AA"
    assert msa(send(server, orm("SG2", "HSG001", pid="BN700801", order_control="CA")))[0] == "AA"
    refused = _mpps_status(server, generate_uid(), _create([("HSG001", order(server, "HSG001")["study_uid"])]),
                           create=True)
    assert int(refused.Status) == 0x0110 and "cancelled" in refused.ErrorComment
    assert order(server, "HSG001")["status"] == "CANCELLED"
    assert worklist(server, tmp_path, "AccessionNumber=HSG001", "PatientName") == []

    assert msa(send(server, orm("SG3", "HSG002", pid="BN700801")))[0] == "AA"
    uid = generate_uid()
    assert int(_mpps_status(server, uid, _create([("HSG002", order(server, "HSG002")["study_uid"])]),
                            create=True).Status) == 0
    assert int(_mpps_status(server, uid, _completed(), create=False).Status) == 0
    ack = send(server, orm("SG4", "HSG002", pid="BN700801", order_control="CA"))
    assert msa(ack) == ("AE", "SG4")
    assert "unable to cancel" in fields(ack, "ERR")[8]
    assert order(server, "HSG002")["status"] == "COMPLETED"
    with server.http() as http:
        assert http.delete("/api/orders/HSG002").status_code == 409
    # A later step on the completed exam (a repeat acquisition, then discontinued) does not move it back.
    again = generate_uid()
    assert int(_mpps_status(server, again, _create([("HSG002", order(server, "HSG002")["study_uid"])]),
                            create=True).Status) == 0
    assert order(server, "HSG002")["status"] == "COMPLETED"
    discontinued = Dataset()
    discontinued.PerformedProcedureStepStatus = "DISCONTINUED"
    discontinued.PerformedProcedureStepEndDate = "20261204"
    discontinued.PerformedProcedureStepEndTime = "120000"
    _mpps_status(server, again, discontinued, create=False)
    assert order(server, "HSG002")["status"] == "COMPLETED"
    assert msa(send(server, orm("SG4b", "HSG002", pid="BN700801", order_control="CA")))[0] == "AE"

    # Cancelled while the modality was at it: the step completes, the order stays cancelled.
    assert msa(send(server, orm("SG5", "HSG003", pid="BN700801")))[0] == "AA"
    uid = generate_uid()
    assert int(_mpps_status(server, uid, _create([("HSG003", order(server, "HSG003")["study_uid"])]),
                            create=True).Status) == 0
    assert msa(send(server, orm("SG6", "HSG003", pid="BN700801", order_control="CA")))[0] == "AA"
    assert int(_mpps_status(server, uid, _completed(), create=False).Status) == 0
    assert order(server, "HSG003")["status"] == "CANCELLED"


# -- 9: one message per frame --------------------------------------------------------------------
def test_two_messages_in_one_frame_are_refused(server: PacsServer, tmp_path: Path) -> None:
    def a08(control: str, pid: str) -> bytes:
        return adt(control, f"PID|1||{pid}^^^BVDK^PI||Trần^Văn {control}||19700101|M").replace("\n", "\r").encode() + b"\r"

    ack = send_raw(server, a08("TWO1", "BN700971") + a08("TWO2", "BN700972"))
    assert msa(ack.decode()) == ("AE", "TWO1")
    err = fields(ack, "ERR")
    assert err[3].startswith("100^") and "2 messages" in err[8]
    # Nothing of the frame was applied: the first patient has no order or study to show, so
    # place one for it without a name (PID-5): it is refused for want of a name, which the
    # frame's A08 would have given it.
    refused = send(server, with_pid(orm("TWO3", "HTW001"), "PID|1||BN700971^^^BVDK^PI"))
    assert msa(refused)[0] == "AE" and "no name" in fields(refused.encode(), "ERR")[8]
    assert worklist(server, tmp_path, "AccessionNumber=HTW001", "PatientName") == []


# -- 10: LF (or CRLF) between segments ------------------------------------------------------------
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_lf_segment_separators_keep_the_ack_header_clean(server: PacsServer, tmp_path: Path, newline: str) -> None:
    tag = "L" if newline == "\n" else "C"
    plain = orm(f"LF{tag}1", f"HLF{tag}01", pid=f"BN70095{tag}").replace("|UNICODE UTF-8", "")
    ack = send_raw(server, plain.replace("\n", newline).encode() + newline.encode())
    assert b"\n" not in ack
    assert msa(ack.decode()) == ("AA", f"LF{tag}1")
    assert fields(ack, "MSH")[17] == "UNICODE UTF-8"
    latin = with_pid(orm(f"LF{tag}2", f"HLF{tag}02").replace("UNICODE UTF-8", "8859/1"),
                     f"PID|1||BN70096{tag}^^^BVDK^PI||Jos\xe9^A||19700101|F")
    ack = send_raw(server, latin.replace("Nguyễn", "Nguyen").replace("ngực", "nguc").replace("không cản", "khong can")
                   .replace("Đỗ^Thanh Tùng", "Do^Thanh Tung").replace("\n", newline).encode("latin-1"))
    assert b"\n" not in ack
    assert msa(ack.decode("latin-1")) == ("AA", f"LF{tag}2")
    assert fields(ack.decode("latin-1"), "MSH")[17] == "8859/1"
    assert str(worklist(server, tmp_path, f"AccessionNumber=HLF{tag}02", "PatientName")[0].PatientName) == "José^A"


# -- 11: v2.3 timing in ORC-7 -------------------------------------------------------------------------
def test_v23_orc7_timing_gives_the_scheduled_date(server: PacsServer, tmp_path: Path) -> None:
    v23 = "\n".join([
        "MSH|^~\\&|HIS|BVDK|FILMLESS|BVDK|20261204083300||ORM^O01|V23-1|P|2.3",
        "PID|1||BN700400^^^BVDK^PI~036200009999^^^CCCD^NI||Dang^Thi Hong Nhung||20000229|F",
        "PV1|1|I|NOI^^^BVDK||||BS003^Vo^Thanh Son",
        "ORC|NW|PLV4001|HV4001||SC||^^^20261204130000^^S",
        "OBR|1|PLV4001|HV4001|MR01^MRI cot song that lung^L|||||||||||||||HV4001|||||MR",
    ])
    assert msa(send(server, v23))[0] == "AA"
    items = worklist(server, tmp_path, "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261204",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
                     "AccessionNumber=HV4001", "RequestedProcedurePriority")
    assert len(items) == 1
    assert items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "130000"
    assert items[0].RequestedProcedurePriority == "STAT"


# -- 12: a birth year alone does not wipe the stored birth date -----------------------------------------
def test_year_only_birth_date_keeps_a_consistent_stored_date(server: PacsServer, tmp_path: Path) -> None:
    assert msa(send(server, with_pid(orm("BD1", "HBD001"), "PID|1||BN701200^^^BVDK^PI||Võ^Thị Sáu||19900101|F")))[0] == "AA"
    assert msa(send(server, adt("BD2", "PID|1||BN701200^^^BVDK^PI||Võ^Thị Sáu||1990|F")))[0] == "AA"
    assert one_birth_date(server, tmp_path, "HBD001") == "19900101"
    assert msa(send(server, adt("BD3", "PID|1||BN701200^^^BVDK^PI||Võ^Thị Sáu||199001|F")))[0] == "AA"
    assert one_birth_date(server, tmp_path, "HBD001") == "19900101"
    # Another year contradicts the stored date: it cannot stay, and no day is invented.
    assert msa(send(server, adt("BD4", "PID|1||BN701200^^^BVDK^PI||Võ^Thị Sáu||1991|F")))[0] == "AA"
    assert one_birth_date(server, tmp_path, "HBD001") == ""
    # A new patient known by the year only: no birth date rather than a made-up one.
    assert msa(send(server, with_pid(orm("BD5", "HBD002"), "PID|1||BN701201^^^BVDK^PI||Lý^Văn Bảy||1935|M")))[0] == "AA"
    assert one_birth_date(server, tmp_path, "HBD002") == ""


def one_birth_date(server: PacsServer, tmp_path: Path, accession: str) -> str:
    items = worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientBirthDate")
    assert len(items) == 1
    return str(items[0].PatientBirthDate)


# -- 13: merge by another identifier; DICOM types of other IDs --------------------------------------------
def test_a40_merges_a_patient_named_by_its_citizen_id(server: PacsServer, tmp_path: Path) -> None:
    prior = "PID|1||BN701300^^^BVDK^PI~001301000111^^^CCCD^NI||Bùi^Văn Mười||19800101|M"
    assert msa(send(server, with_pid(orm("MR1", "HMR001"), prior)))[0] == "AA"
    a40 = adt("MR2", "PID|1||BN701301^^^BVDK^PI||Bùi^Văn Mười||19800101|M\nMRG|001301000111^^^CCCD^NI", "A40")
    assert msa(send(server, a40))[0] == "AA"
    items = worklist(server, tmp_path, "AccessionNumber=HMR001", "PatientID", "OtherPatientIDsSequence")
    assert items[0].PatientID == "BN701301"
    types = {o.PatientID: o.TypeOfPatientID for o in items[0].OtherPatientIDsSequence}
    assert types.get("001301000111") == "TEXT"


def test_other_ids_type_is_a_dicom_defined_term(server: PacsServer, tmp_path: Path) -> None:
    pid = "PID|1||BN701310^^^BVDK^PI~001301000222^^^CCCD^NI~DN4797900001310^^^BHYT^HC||Lâm^Văn Tư"
    assert msa(send(server, with_pid(orm("TY1", "HTY001"), pid)))[0] == "AA"
    items = worklist(server, tmp_path, "AccessionNumber=HTY001", "OtherPatientIDsSequence")
    assert {o.TypeOfPatientID for o in items[0].OtherPatientIDsSequence} == {"TEXT"}
    # The study's C-FIND / QIDO answers too.
    assert server.storescu(str(make_ct(tmp_path / "ty.dcm", PatientID="BN701310", AccessionNumber="HTY001"))).returncode == 0
    with server.http() as http:
        found = http.get("/dicom-web/studies", params={"AccessionNumber": "HTY001",
                                                       "includefield": "OtherPatientIDsSequence"}).json()
    types = {item["00100022"]["Value"][0] for item in found[0]["00101002"]["Value"]}
    assert types == {"TEXT"}



def test_a40_never_guesses_between_patients_of_one_id(server: PacsServer, tmp_path: Path) -> None:
    """Patient ID DUP under two assigning authorities: an MRG-1 without one, or
    with one nobody has, must not merge whichever the database returns first."""
    for issuer, accession in (("BVDK", "HDU001"), ("XYZ", "HDU002")):
        pid = f"PID|1||DUP7^^^{issuer}^PI||Trùng^{issuer}||19800101|M"
        assert msa(send(server, with_pid(orm(f"DU{issuer}", accession), pid)))[0] == "AA"
    for control, mrg in (("DU3", "MRG|DUP7"), ("DU4", "MRG|DUP7^^^NOPE")):
        ack = send(server, adt(control, f"PID|1||NEW7^^^BVDK^PI||Mới^Người||19800101|M\n{mrg}", "A40"))
        assert msa(ack)[0] == "AE", ack
    for accession in ("HDU001", "HDU002"):
        assert [str(i.PatientID) for i in worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientID")] \
            == ["DUP7"]


def test_resends_a_his_engine_restamps_are_still_resends(server: PacsServer) -> None:
    """An engine that rebuilds a message for its resend refreshes EVN and ORC-9
    (date/time of transaction) besides MSH-7: still the same message (it was
    applied again and refused AE 205 "already exists")."""
    first = orm("RS1", "HRS001", pid="BN700601").replace("||SC\n", "||SC||||20241120083000\n")
    assert msa(send(server, first))[0] == "AA"
    rebuilt = first.replace("|20241120083000|", "|20241120090500|").replace("||||20241120083000\n",
                                                                          "||||20241120090500\n")
    assert rebuilt != first
    again = fields(send(server, rebuilt), "MSA")
    assert again[1] == "AA" and "already applied" in again[3]


def test_a_raw_line_feed_inside_a_field_does_not_cut_the_segment(server: PacsServer) -> None:
    message = orm("LF1", "HLF001", pid="BN700602").replace("\n", "\r").replace(
        "CT ngực không cản quang", "CT ngực\nkhông cản quang")
    assert msa(send_raw(server, message.encode()).decode())[0] == "AA"
    placed = order(server, "HLF001")
    assert placed["modality"] == "CT"


def test_a_malformed_birth_date_is_refused_not_erased(server: PacsServer, tmp_path: Path) -> None:
    assert msa(send(server, with_pid(orm("BM1", "HBM001"), "PID|1||BN700603^^^BVDK^PI||Lê^Văn Tám||19700101|M")))[0] == "AA"
    ack = send(server, adt("BM2", "PID|1||BN700603^^^BVDK^PI||Lê^Văn Tám||1970010|M"))
    assert msa(ack)[0] == "AE" and fields(ack, "ERR")[3].startswith("102")
    assert one_birth_date(server, tmp_path, "HBM001") == "19700101"


def test_an_oversized_message_is_ae_not_a_request_to_resend(server: PacsServer) -> None:
    huge = orm("BIG1", "HBG001").replace("\n", "\r") + "\rNTE|1||" + "x" * (1024 * 1024 + 10)
    ack = send_raw(server, huge.encode()).decode()
    assert msa(ack)[0] == "AE"


# -- one message over several connections at once (a HIS engine with parallel senders) ----------
def test_messages_racing_for_one_patient_and_order_are_all_accepted(server: PacsServer) -> None:
    """Eight connections send the same new order (a resend while the first
    is in flight) and eight others new orders of one new patient, all at
    once. On PostgreSQL the writers that lost a unique-key race answered AR
    (the HIS resent them or raised an alarm); every ACK is now AA, applied
    once."""
    from concurrent.futures import ThreadPoolExecutor

    same = orm("RACE1", "HRACE000", pid="BN709000")
    others = [orm(f"RACE{n + 2}", f"HRACE{n + 1:03d}", pid="BN709001") for n in range(8)]
    with ThreadPoolExecutor(16) as pool:
        acks = list(pool.map(lambda m: fields(send(server, m), "MSA"), [same] * 8 + others))
    assert [a[1] for a in acks] == ["AA"] * 16, [a[1:4] for a in acks if a[1] != "AA"]
    assert sum("already applied" in a[3] for a in acks[:8]) == 7
    assert all(order(server, f"HRACE{n:03d}")["status"] == "SCHEDULED" for n in range(9))


# -- conformance: ACK control IDs and the ACK layout of older versions --------------------------------
def test_ack_control_ids_stay_within_20_characters_and_unique(server: PacsServer) -> None:
    """MSH-10 is an ST of at most 20 characters (HL7 v2.5): it ran to 21 from
    the 1000th ACK of a process, and the counter in it restarted with every
    process and node. 1001 ACKs over one connection (a type we refuse: AR)."""
    import socket

    ids = []
    with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30) as sock:
        for n in range(1001):
            sock.sendall(b"\x0b" + MSH.format(kind="QRY^A19", control=f"CI{n}").encode() + b"\r\x1c\r")
            reply = b""
            while b"\x1c\r" not in reply:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the ACK"
                reply += chunk
            ack = reply[reply.index(b"\x0b") + 1 : reply.index(b"\x1c\r")]
            assert msa(ack.decode()) == ("AR", f"CI{n}")
            ids.append(fields(ack, "MSH")[9])
    assert max(len(i) for i in ids) <= 20, max(ids, key=len)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5"])
def test_ack_layout_follows_the_message_version(server: PacsServer, version: str) -> None:
    """MSH-9's third component (message structure) exists from v2.3.1; ERR-2
    and later from v2.5 -- before, the error is ERR-1 (segment^sequence^field^code)."""
    control = f"VR{version.replace('.', '')}"
    refused = orm(control, f"HVR{version.replace('.', '')}", order_control="ZZ").replace("|P|2.5|", f"|P|{version}|")
    ack = send(server, refused)
    assert msa(ack) == ("AE", control)
    msh, err = fields(ack, "MSH"), fields(ack, "ERR")
    assert msh[11] == version
    assert msh[8] == ("ACK^O01" if version == "2.3" else "ACK^O01^ACK")
    if version == "2.5":
        assert err[3] == "103^Table value not found^HL70357" and err[4] == "E"
    else:
        assert err[1:] == ["^^^103&Table value not found&HL70357"]
