"""The HIS link under an exploratory tester's findings: partial patient updates,
the HL7 null value, ACK rules (AE vs AR, readable MSH), VR limits, result status
and line breaks of outbound reports, identifier types and idle connections.

Everything talks over real sockets: a real `pacs serve`, MLLP clients (python-hl7
and raw sockets for byte-exact frames), DCMTK findscu for the worklist, HTTP
for DICOMweb and the JSON API, and a stand-in HIS for outbound messages.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import psycopg
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import PG_ADMIN, create_database, drop_database, serving_with_his, wait_until
from .test_worklist_ris import WL_KEYS, _mpps_status, msa, orm, send, worklist

IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def his(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server for the module (each test uses its own accessions and
    patients): a stand-in HIS receives the outbound messages."""
    tmp = tmp_path_factory.mktemp("hl7")
    his_port = free_port()
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}), extra_env={
        "PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HL7_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "PACS_HL7_FACILITY": "BVDK-CDHA", "PACS_HIS_APPLICATION": "HIS-VNPT", "PACS_HIS_FACILITY": "BVDK",
    })
    with serving_with_his(server, his_port, ("bs.lan", "Trần^Thị Lan")) as serving:
        yield serving


def with_pid(message: str, pid: str) -> str:
    """*message* (from orm()) with its PID segment replaced."""
    return "\n".join(pid if s.startswith("PID|") else s for s in message.split("\n"))


def adt(control: str, pid: str, trigger: str = "A08") -> str:
    return (f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ADT^{trigger}|{control}|P|2.5|||||VN|UNICODE UTF-8\n"
            f"EVN|{trigger}|20241120083000\n{pid}")


def send_raw(server: PacsServer, data: bytes) -> bytes:
    """One byte-exact MLLP frame over a plain socket; the ACK's bytes."""
    with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30) as sock:
        sock.sendall(b"\x0b" + data + b"\x1c\r")
        reply = b""
        while b"\x1c\r" not in reply:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the ACK"
            reply += chunk
    return reply[reply.index(b"\x0b") + 1 : reply.index(b"\x1c\r")]


def fields(ack: str | bytes, segment: str) -> list[str]:
    text = ack.decode("utf-8", "replace") if isinstance(ack, bytes) else ack
    return next(s for s in text.replace("\n", "\r").split("\r") if s.startswith(segment + "|")).split("|")


def one_item(server: PacsServer, tmp_path: Path, accession: str) -> object:
    items = worklist(server, tmp_path, *WL_KEYS, f"AccessionNumber={accession}")
    assert len(items) == 1, items
    return items[0]


# -- 1 and 8: fields left out keep their value; "" deletes --------------------------------
def test_patient_update_without_birth_date_and_sex_keeps_them(his: PacsServer, tmp_path: Path) -> None:
    pid = "PID|1||BN123456^^^BVDK^PI||Nguyễn^Văn Ánh||19850101|M"
    assert msa(send(his, with_pid(orm("U1", "HRU001"), pid)))[0] == "AA"
    ct = make_ct(tmp_path / "u.dcm", PatientName="NGUYEN^VAN ANH", PatientID="BN123456", AccessionNumber="HRU001",
                 PatientBirthDate="19850101", PatientSex="M", SpecificCharacterSet="ISO_IR 192")
    assert his.storescu(str(ct)).returncode == 0
    study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)

    # ADT^A08 with only PID-3 and PID-5: a new name, nothing else touched.
    assert msa(send(his, adt("U2", "PID|1||BN123456^^^BVDK^PI||Nguyễn Văn Ánh^Thị Đức")))[0] == "AA"
    item = one_item(his, tmp_path, "HRU001")
    assert str(item.PatientName) == "Nguyễn Văn Ánh^Thị Đức"  # type: ignore[attr-defined]
    assert (item.PatientBirthDate, item.PatientSex) == ("19850101", "M")  # type: ignore[attr-defined]
    with his.http() as http:
        meta = http.get(f"/dicom-web/studies/{study}/metadata").json()[0]
        assert meta["00100030"]["Value"] == ["19850101"] and meta["00100040"]["Value"] == ["M"]
        assert meta["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn Văn Ánh^Thị Đức"
        updates = [c for c in http.get(f"/api/studies/{study}/corrections").json()
                   if c["reason"] == "HIS patient update"]
        assert [c["keyword"] for c in updates] == ["PatientName"]  # nothing recorded for what was not sent

    # ORC-1 XO without PID-7/8 keeps them too.
    change = with_pid(orm("U3", "HRU001", order_control="XO"), "PID|1||BN123456^^^BVDK^PI")
    assert msa(send(his, change))[0] == "AA"
    item = one_item(his, tmp_path, "HRU001")
    assert (item.PatientBirthDate, item.PatientSex) == ("19850101", "M")  # type: ignore[attr-defined]

    # JSON PUT: keys absent from the body keep the stored values.
    with his.http() as http:
        put = http.put("/api/orders/HRU001", json={"patient": {"id": "BN123456", "issuer": "BVDK"},
                                                   "accession_number": "HRU001", "reason": "tái khám"})
        assert put.status_code == 200, put.text
    item = one_item(his, tmp_path, "HRU001")
    assert str(item.PatientName) == "Nguyễn Văn Ánh^Thị Đức"  # type: ignore[attr-defined]
    assert (item.PatientBirthDate, item.PatientSex) == ("19850101", "M")  # type: ignore[attr-defined]

    # PID-8 "U" (Unknown: the HIS does not know) keeps the sex stored; it
    # emptied it, and every later study with M or F was the "unknown" patient's.
    assert msa(send(his, adt("U5", "PID|1||BN123456^^^BVDK^PI||||19850101|U")))[0] == "AA"
    item = one_item(his, tmp_path, "HRU001")
    assert (item.PatientBirthDate, item.PatientSex) == ("19850101", "M")  # type: ignore[attr-defined]

    # The null value "" deletes: PID-7 and PID-8 "" empty them.
    assert msa(send(his, adt("U4", 'PID|1||BN123456^^^BVDK^PI||||""|""')))[0] == "AA"
    item = one_item(his, tmp_path, "HRU001")
    assert (item.PatientBirthDate, item.PatientSex) == ("", "")  # type: ignore[attr-defined]
    assert str(item.PatientName) == "Nguyễn Văn Ánh^Thị Đức"  # type: ignore[attr-defined]


def test_hl7_null_value_is_never_stored_as_text(his: PacsServer, tmp_path: Path) -> None:
    pid = 'PID|1||BN200001^^^BVDK^PI||Lê^Văn Tám^""||19700707|M'
    assert msa(send(his, with_pid(orm("N1", "HRN001"), pid)))[0] == "AA"
    item = one_item(his, tmp_path, "HRN001")
    assert str(item.PatientName) == "Lê^Văn Tám"  # type: ignore[attr-defined]
    assert msa(send(his, adt("N2", 'PID|1||BN200001^^^BVDK^PI||""')))[0] == "AA"
    item = one_item(his, tmp_path, "HRN001")
    assert str(item.PatientName) == ""  # type: ignore[attr-defined]
    assert (item.PatientBirthDate, item.PatientSex) == ("19700707", "M")  # type: ignore[attr-defined]
    # A null component elsewhere (the referring physician's middle name) is empty too.
    ref = orm("N3", "HRN002").replace("PV1|1|O||||||BS001^Đỗ^Thanh Tùng", 'PV1|1|O||||||BS001^Đỗ^Thanh Tùng^""')
    assert msa(send(his, with_pid(ref, "PID|1||BN200002^^^BVDK^PI||Võ^An")))[0] == "AA"
    assert str(one_item(his, tmp_path, "HRN002").ReferringPhysicianName) == "Đỗ^Thanh Tùng"  # type: ignore[attr-defined]


# -- 2: our own failure is AR (resend), logged without PHI ----------------------------------
@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[PacsServer]:
    pg = create_database()
    server = PacsServer(tmp_path / "data", Backend("pg", pg, None, {}), extra_env={"PACS_LOG_LEVEL": "INFO"})
    server.start()
    yield server
    server.stop()
    _allow_connections(pg, True)
    drop_database(pg)


def _allow_connections(url: str, allow: bool) -> None:
    """Take the index database away from the server (as a failover would) or give it back."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if allow else "false"}')
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def test_database_failure_is_answered_ar_and_logged(pg_server: PacsServer, tmp_path: Path) -> None:
    message = orm("D1", "HRD001", name="Phùng^Thị Xuyến", pid="079301234567")
    _allow_connections(pg_server.backend.index_url or "", False)
    started = time.monotonic()
    ack = send(pg_server, message)
    assert time.monotonic() - started < 30
    assert msa(ack) == ("AR", "D1")  # not AE: the message is fine, the HIS should resend it
    assert fields(ack, "ERR")[3].startswith("207^")
    _allow_connections(pg_server.backend.index_url or "", True)
    assert msa(send(pg_server, message)) == ("AA", "D1")  # the resend goes through
    assert len(worklist(pg_server, tmp_path, "AccessionNumber=HRD001", "PatientName")) == 1
    pg_server.stop()
    log = pg_server.log_text()
    assert "WARNING" in log and "ORM^O01 control ID 'D1'" in log and "answered AR (207" in log
    assert "Traceback (most recent call last)" in log and "OperationalError" in log
    for secret in ("Phùng", "Xuyến", "079301234567", "HRD001"):
        assert secret not in log, f"{secret!r} in the log"


# -- 4: an AR still echoes MSH-10 and answers the sender -----------------------------------------
def test_ar_echoes_the_readable_msh(his: PacsServer) -> None:
    ok = orm("H1", "HRH001").replace("\n", "\r").encode("utf-8")
    ack = send_raw(his, b"\xef\xbb\xbf" + ok)  # a BOM before MSH is skipped
    assert msa(ack.decode()) == ("AA", "H1")

    bad = orm("H2", "HRH002").replace("\n", "\r").encode("utf-8").replace("Nguyễn".encode(), b"Nguy\xff\xfen")
    ack = send_raw(his, bad)
    assert msa(ack.decode("utf-8", "replace")) == ("AR", "H2")
    assert fields(ack, "ERR")[3].startswith("102^")
    msh = fields(ack, "MSH")
    assert (msh[2], msh[3], msh[4], msh[5]) == ("PACS", "BVDK", "HIS", "BVDK")  # MSH-3..6 swapped

    huge = orm("H3", "HRH003") + "\nNTE|1||" + "x" * (1024 * 1024 + 10)
    ack = send_raw(his, huge.replace("\n", "\r").encode())
    assert msa(ack.decode()) == ("AE", "H3")  # AE: the same bytes can never be accepted
    assert fields(ack, "MSH")[4] == "HIS"
    assert his.alive()


# -- 5: values longer than their DICOM VR are refused like the JSON API does --------------
def test_too_long_accession_and_ids_are_refused(his: PacsServer, tmp_path: Path) -> None:
    long_accession = "HRL" + "1" * 14  # 17 characters; AccessionNumber is SH (16)
    ack = send(his, orm("L1", long_accession))
    assert msa(ack) == ("AE", "L1")
    err = fields(ack, "ERR")
    assert err[3].startswith("102^") and "accession_number" in err[8] and "AccessionNumber" in err[8]
    long_rp = orm("L2", "HRL002").replace("|RPHRL002|", "|RP-0123456789-ABCDEF|")  # OBR-19, 20 characters
    ack = send(his, long_rp)
    assert msa(ack)[0] == "AE" and "RequestedProcedureID" in fields(ack, "ERR")[8]
    assert worklist(his, tmp_path, "AccessionNumber=HRL*", "PatientName") == []
    with his.http() as http:
        body = {"patient": {"id": "BN300001"}, "accession_number": "HRL003", "step_id": "S" * 17}
        refused = http.post("/api/orders", json=body)
        assert refused.status_code == 400 and "ScheduledProcedureStepID" in refused.text


# -- 6 and 7: amended reports are C; line breaks are TX repetitions ---------------------------
def _oru_segments(message: bytes) -> dict[str, list[list[str]]]:
    assert b"\n" not in message, "raw LF inside an ORU"
    parsed = hl7.parse(message.decode("utf-8"))
    out: dict[str, list[list[str]]] = {}
    for segment in parsed:
        out.setdefault(str(segment[0]), []).append(str(segment).split("|"))
    return out


def test_amended_report_is_corrected_and_lines_are_repetitions(his: PacsServer, tmp_path: Path) -> None:
    ct = make_ct(tmp_path / "r.dcm", PatientName="Đặng^Văn Hải", PatientID="BN400001", AccessionNumber="HRR001",
                 SpecificCharacterSet="ISO_IR 192")
    assert his.storescu(str(ct)).returncode == 0
    study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    findings = "Phổi hai bên sáng.\nKhông tràn dịch | khí.\r\nTim không to."
    with his.http(token=his.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{study}/report", json={"findings": findings, "impression": "Bình thường."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200
        assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        rad.put(f"/api/studies/{study}/report", json={"findings": "Bổ sung:\nnốt mờ 3 mm.", "impression": "Theo dõi."})
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200

    def orus() -> list[bytes]:
        return [m for m in his.his.messages if b"ORU^R01" in m and b"HRR001" in m]  # type: ignore[attr-defined]

    assert wait_until(lambda: len(orus()) >= 2, timeout=60), orus()
    first = next(m for m in orus() if "Phổi".encode() in m)
    amended = next(m for m in orus() if "Bổ sung".encode() in m)
    segments = _oru_segments(first)
    # MSH-3 to MSH-6: our application (the AE title) and facility, the HIS's as configured.
    assert segments["MSH"][0][2:6] == [his.ae_title, "BVDK-CDHA", "HIS-VNPT", "BVDK"]
    assert segments["OBR"][0][25] == "F" and {obx[11] for obx in segments["OBX"]} == {"F"}
    by_code = {obx[3].split("^")[0]: obx for obx in segments["OBX"]}
    assert by_code["59776-5"][2] == "TX"
    assert by_code["59776-5"][5] == "Phổi hai bên sáng.~Không tràn dịch \\F\\ khí.~Tim không to."
    assert by_code["19005-8"][5] == "Bình thường."
    segments = _oru_segments(amended)
    assert segments["OBR"][0][25] == "C" and {obx[11] for obx in segments["OBX"]} == {"C"}
    assert {obx[3].split("^")[0]: obx for obx in segments["OBX"]}["59776-5"][5] == "Bổ sung:~nốt mờ 3 mm."


# -- 3: the hospital number is the patient ID wherever PID-3 lists it ----------------------------
def test_patient_id_is_chosen_by_identifier_type(his: PacsServer, tmp_path: Path) -> None:
    cccd_first = "PID|1||079085001234^^^CCCD^NI~BN500001^^^BVDK^PI~DN4797900000001^^^BHYT^HC||Hồ^Văn Nam||19850101|M"
    assert msa(send(his, with_pid(orm("I1", "HRI001"), cccd_first)))[0] == "AA"
    pi_first = "PID|1||BN500001^^^BVDK^PI~079085001234^^^CCCD^NI||Hồ^Văn Nam||19850101|M"
    assert msa(send(his, with_pid(orm("I2", "HRI002"), pi_first)))[0] == "AA"
    items = worklist(his, tmp_path, "AccessionNumber=HRI*", "PatientID", "IssuerOfPatientID")
    assert sorted((i.AccessionNumber, i.PatientID) for i in items) == [("HRI001", "BN500001"), ("HRI002", "BN500001")]
    # The citizen ID and the insurance number stay other identifiers of that patient.
    for other in ("079085001234", "DN4797900000001"):
        found = worklist(his, tmp_path, f"PatientID={other}", "AccessionNumber")
        assert {i.AccessionNumber for i in found} >= {"HRI001"}, other

    # A patient first filed under the citizen ID is found again when the HIS
    # later sends its hospital number as well: still one patient.
    assert msa(send(his, with_pid(orm("I3", "HRI003"), "PID|1||079085009999^^^CCCD^NI||Mai^Lan")))[0] == "AA"
    both = "PID|1||079085009999^^^CCCD^NI~BN500002^^^BVDK^PI||Mai^Thị Lan"
    assert msa(send(his, with_pid(orm("I4", "HRI004"), both)))[0] == "AA"
    items = worklist(his, tmp_path, "PatientID=BN500002", "AccessionNumber", "PatientName")
    assert sorted(i.AccessionNumber for i in items) == ["HRI003", "HRI004"]
    # The hospital number (PI) becomes the patient ID; the citizen ID an other ID.
    assert {(i.PatientID, str(i.PatientName)) for i in items} == {("BN500002", "Mai^Thị Lan")}


# -- 9: a half-sent frame does not hold a connection forever ---------------------------------------
def test_idle_connection_is_closed(his: PacsServer) -> None:
    with socket.create_connection(("127.0.0.1", his.hl7_port), timeout=30) as sock:
        sock.sendall(b"\x0bMSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ADT^A08|Z1|P|2.5\rPID|1||")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert IDLE_TIMEOUT - 0.5 <= time.monotonic() - started < IDLE_TIMEOUT + 10
    assert wait_until(lambda: "idle for 2s in the middle of a message" in his.log_text(), timeout=10)
    # A connection that keeps talking is not affected.
    assert msa(send(his, orm("Z2", "HRZ001")))[0] == "AA"


def test_a_segment_break_where_msh_1_belongs_leaves_no_header() -> None:
    """Fuzzing found "MSH\\r^~\\&|..." (no field separator) made the AR path
    itself fail, so the peer got no ACK at all; now it gets an AR without an
    echoed header (tests/test_fuzz.py sends it over MLLP)."""
    from ris_bridge.hl7v2 import read_header

    assert read_header(b"MSH\r^~\\&|HIS|BVDK|PACS|BVDK|20241120||ORM^O01|FZ1|P|2.5") is None
    assert read_header(b"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120||ORM^O01|FZ1|P|2.5").control_id == "FZ1"


# -- a resend after a lost ACK (slow links to satellite hospitals drop) ----------------------
def test_a_resent_message_is_acknowledged_again_not_applied_twice(his: PacsServer, tmp_path: Path) -> None:
    # The HIS never got our ACK and sends the very same message (same MSH-10) again.
    placed = orm("RS1", "HRS001", pid="BN310001", name="Phạm^Thị Hoa")
    assert msa(send(his, placed))[0] == "AA"
    again = fields(send(his, placed), "MSA")
    assert again[1] == "AA" and "already applied" in again[3]
    assert len(worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRS001")) == 1

    # Another message (another control ID) placing the same accession is still refused.
    refused = send(his, orm("RS2", "HRS001", pid="BN310001", name="Phạm^Thị Hoa"))
    assert msa(refused)[0] == "AE" and fields(refused, "ERR")[3].startswith("205")

    # A cancel resent after its ACK was lost: acknowledged, the order stays cancelled.
    cancel = orm("RS3", "HRS001", pid="BN310001", order_control="CA")
    assert msa(send(his, cancel))[0] == "AA"
    assert msa(send(his, cancel))[0] == "AA"
    assert worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRS001") == []

    # The same control ID from another sending application is another message.
    other = orm("RS1", "HRS002", pid="BN310002").replace("MSH|^~\\&|HIS|", "MSH|^~\\&|LIS|")
    assert msa(send(his, other))[0] == "AA"
    assert len(worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRS002")) == 1

    # A message refused (AE) is not remembered: corrected and resent under its ID, it is applied.
    bad = orm("RS4", "HRS003", pid="BN310003", study_uid="1.2.bad..uid")
    assert msa(send(his, bad))[0] == "AE"
    assert msa(send(his, orm("RS4", "HRS003", pid="BN310003")))[0] == "AA"
    assert len(worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRS003")) == 1


def test_hl7_escape_sequences_are_decoded(his: PacsServer, tmp_path: Path) -> None:
    # A HIS on a 7-bit link writes "ễ" as hexadecimal data (\X..\, HL7 v2.5 2.7.5)
    # and breaks a long procedure name with \.br\; separators are escaped.
    message = with_pid(orm("ES1", "HRE001"), "PID|1||BN600001^^^BVDK^PI||Nguy\\XE1BB85\\n^V\\XC483\\n An")
    message = message.replace("CT-NGUC^CT ngực không cản quang^L",
                              "CT-NGUC^CT ngực\\.br\\không cản quang \\T\\ bụng^L")
    assert msa(send(his, message))[0] == "AA"
    item = one_item(his, tmp_path, "HRE001")
    assert str(item.PatientName) == "Nguyễn^Văn An"  # type: ignore[attr-defined]
    assert item.RequestedProcedureDescription == "CT ngực không cản quang & bụng"  # type: ignore[attr-defined]
    # Hexadecimal data that is not UTF-8 text is refused, not stored as a guess.
    garbled = with_pid(orm("ES2", "HRE002"), "PID|1||BN600002^^^BVDK^PI||Ph\\X1EA1\\m^V\\XC4\\83n")
    refused = send(his, garbled)
    assert msa(refused)[0] == "AE" and fields(refused, "ERR")[3].startswith("102^")
    assert worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRE002") == []


def test_messages_of_a_training_his_are_refused(his: PacsServer, tmp_path: Path) -> None:
    # MSH-11 T: the HIS's training system, wrongly pointed at the production archive.
    training = orm("PT1", "HRP001").replace("|PT1|P|2.5|", "|PT1|T|2.5|")
    ack = send(his, training)
    assert msa(ack) == ("AR", "PT1") and fields(ack, "ERR")[3].startswith("202^")
    assert fields(ack, "MSH")[10] == "T"  # MSH-11; the ACK echoes the message's processing ID
    assert worklist(his, tmp_path, *WL_KEYS, "AccessionNumber=HRP001") == []
    # An empty MSH-11 counts as ours.
    assert msa(send(his, orm("PT2", "HRP002").replace("|PT2|P|2.5|", "|PT2||2.5|")))[0] == "AA"


# -- conformance: escaped separators are data, in and out -------------------------------------------
def _segment(message: bytes, name: str) -> list[str]:
    """Fields of segment *name* as sent (still escaped): split by hand, not
    by a parser that could hide a wrong escape."""
    text = message.decode("utf-8")
    return next(s for s in text.split("\r") if s.startswith(name + "|")).split("|")


def test_escaped_separators_are_data_in_the_order_and_in_what_goes_back(his: PacsServer, tmp_path: Path) -> None:
    # HL7 v2.5 2.7: split into components first, then decode each; \E\S\E\ is the text "\S\".
    sent = "CT bụng có cản quang \\F\\ thì động mạch \\T\\ tĩnh mạch \\S\\ \\E\\ \\E\\S\\E\\"
    message = with_pid(orm("EX1", "HRX001"), "PID|1||BN610001^^^BVDK^PI||Nguyễn \\T\\ Trần^Thị \\F\\ Hoa||19800101|F")
    message = message.replace("CT-NGUC^CT ngực không cản quang^L", f"CT-BUNG^{sent}^L")
    assert msa(send(his, message))[0] == "AA"
    with his.http() as http:
        placed = http.get("/api/orders/HRX001").json()
    text = "CT bụng có cản quang | thì động mạch & tĩnh mạch ^ \\ \\S\\"
    assert (placed["procedure_code"], placed["requested_procedure_description"], placed["procedure_code_scheme"]) \
        == ("CT-BUNG", text, "L")
    assert placed["name"] == "Nguyễn & Trần^Thị | Hoa"
    items = worklist(his, tmp_path, "AccessionNumber=HRX001", "PatientName", "RequestedProcedureDescription")
    assert [str(i.PatientName) for i in items] == ["Nguyễn & Trần^Thị | Hoa"]
    # A "\" separates DICOM values: the modality gets one description, the "\" shown as "/".
    assert [i.RequestedProcedureDescription for i in items] == [text.replace("\\", "/")]

    # Back to the HIS, escaped again: the ORU of a signed report and the ORM of a started step.
    ct = make_ct(tmp_path / "x.dcm", PatientName="Nguyễn & Trần^Thị | Hoa", PatientID="BN610001",
                 AccessionNumber="HRX001", StudyInstanceUID=placed["study_uid"], SpecificCharacterSet="ISO_IR 192")
    assert his.storescu(str(ct)).returncode == 0
    with his.http(token=his.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{placed['study_uid']}/report", json={"findings": "Gan to."}).status_code == 200
        assert rad.post(f"/api/studies/{placed['study_uid']}/report/sign").status_code == 200
    step = Dataset()
    step.PerformedProcedureStepStatus = "IN PROGRESS"
    step.Modality = "CT"
    step.PerformedStationAETitle = "CT_ROOM1"
    step.PerformedProcedureStepStartDate = "20241121"
    step.PerformedProcedureStepStartTime = "090000"
    step.PerformedProcedureStepID = "PPSX1"
    ref = Dataset()
    ref.AccessionNumber = "HRX001"
    ref.StudyInstanceUID = placed["study_uid"]
    step.ScheduledStepAttributesSequence = Sequence([ref])
    assert int(_mpps_status(his, generate_uid(), step, create=True).Status) == 0

    def sent_back(kind: bytes) -> list[bytes]:
        return [m for m in his.his.messages if kind in m and b"HRX001" in m]  # type: ignore[attr-defined]

    assert wait_until(lambda: sent_back(b"ORU^R01") and sent_back(b"ORM^O01"), timeout=60)
    for outbound in (sent_back(b"ORU^R01")[0], sent_back(b"ORM^O01")[0]):
        assert _segment(outbound, "OBR")[4] == f"CT-BUNG^{sent}^L"
    assert _segment(sent_back(b"ORM^O01")[0], "PID")[5] == "Nguyễn \\T\\ Trần^Thị \\F\\ Hoa"


def test_report_carries_the_study_date_time_as_observation_time(his: PacsServer, tmp_path: Path) -> None:
    # OBR-7 is required in a result (HL7 v2.5 4.5.3.7): the study's date and time, or its date alone.
    for accession, (date, time_) in {"HRO001": ("20241203", "101530.25"), "HRO002": ("20241204", "")}.items():
        ct = make_ct(tmp_path / f"{accession}.dcm", PatientID="BN620001", AccessionNumber=accession,
                     StudyDate=date, StudyTime=time_)
        assert his.storescu(str(ct)).returncode == 0
        study = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
        with his.http(token=his.radiologist) as rad:  # type: ignore[attr-defined]
            assert rad.put(f"/api/studies/{study}/report", json={"impression": "Bình thường."}).status_code == 200
            assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200

    def oru(accession: str) -> list[bytes]:
        messages: list[bytes] = his.his.messages  # type: ignore[attr-defined]
        return [m for m in messages if b"ORU^R01" in m and accession.encode() in m]

    assert wait_until(lambda: oru("HRO001") and oru("HRO002"), timeout=60)
    # The modality's precision, then the hospital zone's offset (a time without one is ambiguous to the HIS).
    assert re.fullmatch(r"20241203101530[+-]\d{4}", _segment(oru("HRO001")[0], "OBR")[7])
    assert _segment(oru("HRO002")[0], "OBR")[7] == "20241204"
    assert len(_segment(oru("HRO001")[0], "MSH")[9]) <= 20  # MSH-10 is an ST of at most 20


def test_ack_text_is_cut_between_escape_sequences(his: PacsServer) -> None:
    # "order control '" + 63 or 64 Z: the escaped "|" falls across MSA-3's 80th character.
    for count in (63, 64):
        ack = send(his, orm(f"MT{count}", f"HRM0{count}", order_control="Z" * count + "\\F\\ABC"))
        msa3 = fields(ack, "MSA")[3]
        assert msa(ack)[0] == "AE" and len(msa3) <= 80
        assert re.fullmatch(r"(?:[^\\]|\\[FSRTE]\\)*", msa3), msa3  # no "\F" or lone "\" at the end
        assert msa3.startswith("order control 'ZZZ")
        assert re.fullmatch(r"(?:[^\\]|\\[FSRTE]\\)*", fields(ack, "ERR")[8])


def test_unsupported_order_control_is_table_value_not_found(his: PacsServer) -> None:
    ack = send(his, orm("OC1", "HRC901", order_control="ZZ"))
    assert msa(ack) == ("AE", "OC1")
    assert fields(ack, "ERR")[3] == "103^Table value not found^HL70357"
