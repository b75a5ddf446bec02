"""The HIS link under a reviewer's findings: MLLP framing (a start block
inside an unfinished frame, an end block without its CR), the HIS refusing
our order status messages as unsupported, outbound MSH-10s after a restore,
MRG-1 as one patient's identifier list, HD assigning authorities, MSH-2
delimiters other than ``^~\\&`` and enhanced acknowledgment mode (MSH-15).

Everything over real sockets: one `pacs serve` for the module, raw MLLP
clients (byte-exact frames), DCMTK findscu for the worklist and storescu for
images, pynetdicom for MPPS, the HTTP API for reports, and a stand-in HIS
that answers the outbound messages as each test tells it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import MLLPListener, wait_until
from .test_worklist_ris import _mpps, worklist

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
# Seconds the HIS has to ACK an outbound message: short, so that an ACK we
# fail to read shows as a resend soon.
ACK_TIMEOUT = 3


def his_ack(message: str, code: str, *, error: str = "", end: bytes = FS + CR) -> bytes:
    """A framed ACK to *message* (its MSH-10 echoed): MSA-1 *code*, an ERR
    with ERR-3 *error* when given, the frame closed by *end*."""
    control = fields(message, "MSH")[9]
    err = f"\rERR|||{error}^Unsupported message type^HL70357|E" if error else ""
    text = f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261206090000||ACK^R01^ACK|A{control}|P|2.5\rMSA|{code}|{control}{err}\r"
    return VT + text.encode() + end


class StandInHIS(MLLPListener):
    """An MLLP listener that records every message and answers with the
    bytes ``answer(message)`` returns (a framed ACK; None hangs up)."""

    def __init__(self, port: int) -> None:
        self.received: list[str] = []
        self.answer: Callable[[str], bytes | None] = lambda m: his_ack(m, "AA")
        super().__init__(port)

    def respond(self, message: bytes) -> bytes | None:
        self.received.append(message.decode())
        return self.answer(message.decode())

    def about(self, accession: str, kind: str) -> list[str]:
        """The messages of type *kind* (ORM^O01, ORU^R01) for *accession* (OBR-18)."""
        return [m for m in list(self.received)
                if kind in fields(m, "MSH")[8] and (fields(m, "OBR") + [""] * 19)[18] == accession]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server for the module (each test uses its own accessions and
    patients), its outbound messages going to a stand-in HIS (``server.his``)."""
    tmp = tmp_path_factory.mktemp("hl7-review")
    his_port = free_port()
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}), extra_env={
        "PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HL7_ACK_TIMEOUT": str(ACK_TIMEOUT),
    })
    server.his = StandInHIS(his_port)  # type: ignore[attr-defined]
    server.start()
    server.radiologist = server.make_token("bs.lan", "radiologist", "Trần^Thị Lan")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        server.his.stop()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def his_answers_aa(server: PacsServer) -> Iterator[StandInHIS]:
    his: StandInHIS = server.his  # type: ignore[attr-defined]
    his.answer = lambda m: his_ack(m, "AA")
    yield his
    his.answer = lambda m: his_ack(m, "AA")


# -- helpers ------------------------------------------------------------------------------------
def fields(message: str | bytes, segment: str) -> list[str]:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    line = next(s for s in text.replace("\n", "\r").split("\r") if s.startswith(segment))
    return line.split(line[3]) if len(line) > 3 else [line]


def orm(control: str, accession: str, *, pid: str, name: str = "Nguyễn^Văn An", order_control: str = "NW",
        study_uid: str = "", msh: str = "MSH|^~\\&|HIS|BVDK|PACS|BVDK|") -> str:
    """An ORM^O01 (segments separated by CR)."""
    zds = f"\rZDS|{study_uid}^100^Application^DICOM" if study_uid else ""
    return (f"{msh}20261206083000||ORM^O01|{control}|P|2.5|||||VN|UNICODE UTF-8\r"
            f"PID|1||{pid}||{name}||19850101|M\r"
            f"PV1|1|O||||||BS001^Đỗ^Thanh Tùng\r"
            f"ORC|{order_control}|P{accession}|F{accession}||SC\r"
            f"OBR|1|P{accession}|F{accession}|CT-NGUC^CT ngực không cản quang^L|||20261207090000|||||||||||"
            f"{accession}|RP{accession}|SPS{accession}||||CT|||^^^20261207090000^^R{zds}")


def adt(control: str, trigger: str, segments: str) -> str:
    return (f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261206090000||ADT^{trigger}|{control}|P|2.5|||||VN|UNICODE UTF-8\r"
            f"EVN|{trigger}|20261206090000\r{segments}")


def with_modes(message: str, accept: str, application: str) -> str:
    """*message* with MSH-15 (accept ACK type) and MSH-16 (application ACK type)."""
    msh, rest = message.split("\r", 1)
    parts = msh.split("|")
    parts += [""] * (18 - len(parts))
    parts[14], parts[15] = accept, application  # MSH-1 is the separator: MSH-n is parts[n - 1]
    return "|".join(parts) + "\r" + rest


def connect(server: PacsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.hl7_port), timeout=15)


def read_frame(sock: socket.socket) -> str:
    """The next framed message the server sends (up to its end block). Read
    a byte at a time: ACKs to pipelined messages may arrive in one segment,
    and the bytes after this frame are the next one's."""
    data = b""
    while not data.endswith(FS):
        chunk = sock.recv(1)
        assert chunk, f"connection closed; got {data!r}"
        data += chunk
    return data[data.index(VT) + 1 : data.index(FS)].decode()


def exchange(server: PacsServer, payload: bytes) -> str:
    """Send raw bytes on a new connection; the first ACK."""
    with connect(server) as sock:
        sock.sendall(payload)
        return read_frame(sock)


def send(server: PacsServer, message: str) -> str:
    return exchange(server, VT + message.encode() + FS + CR)


def msa(ack: str) -> tuple[str, str]:
    line = fields(ack, "MSA")
    return line[1], line[2]


def one_item(server: PacsServer, tmp_path: Path, accession: str) -> Dataset:
    """The one worklist item of *accession*."""
    items = worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientID", "PatientName",
                     "IssuerOfPatientID", "OtherPatientIDsSequence", "RequestedProcedureDescription",
                     "ScheduledProcedureStepSequence[0].Modality")
    assert len(items) == 1, items
    return items[0]


def store_and_sign(server: PacsServer, tmp_path: Path, findings: str, **image: object) -> str:
    """Store one CT (*image*: its attributes) and sign a report on its study; the study UID."""
    path = make_ct(tmp_path / f"{generate_uid()}.dcm", **image)
    assert server.storescu(str(path)).returncode == 0
    study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    with server.http(token=server.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{study}/report", json={"findings": findings, "impression": "Kết luận."}
                       ).status_code == 200
        signed = rad.post(f"/api/studies/{study}/report/sign")
        assert signed.status_code == 200, signed.text
    return study


def outbox(server: PacsServer, state: str = "") -> list[dict]:
    args = ["outbox", "list", "--json"] + (["--state", state] if state else [])
    return json.loads(server.cli(*args).stdout)["messages"]


# -- 1: a start block inside an unfinished frame ------------------------------------------------
def test_a_start_block_inside_an_unfinished_frame_begins_a_new_message(server: PacsServer, tmp_path: Path) -> None:
    """The sender gives up on a frame half-way (A: its MSH, PID, PV1) and sends
    another (B) on the same connection. A second start block means the first
    frame was abandoned (HL7 v2.5 Appendix C): B alone is applied and its own
    MSH-10 is acknowledged. Read as one message, B's exam landed under patient
    A and the ACK named A's control ID."""
    a = orm("VTA1", "RVT001", pid="BN7001^^^BVDK^MR", name="Lê^Thị Hoa")
    b = orm("VTB1", "RVT002", pid="BN7002^^^BVDK^MR", name="Phạm^Văn Bình")
    with connect(server) as sock:
        sock.sendall(VT + a[: a.index("ORC|")].encode())
        sock.sendall(VT + b.encode() + FS + CR)
        assert msa(read_frame(sock)) == ("AA", "VTB1")
    item = one_item(server, tmp_path, "RVT002")
    assert (item.PatientID, str(item.PatientName)) == ("BN7002", "Phạm^Văn Bình")
    assert worklist(server, tmp_path, "AccessionNumber=RVT001", "PatientID") == []

    # The same for a patient update cut after its PID: B's update is applied.
    cut = adt("VTC1", "A08", "PID|1||BN7001^^^BVDK^MR||Lê^Thị Hoa||19850101|F\rPV1|1|O")
    update = adt("VTD1", "A08", "PID|1||BN7002^^^BVDK^MR||Phạm^Văn Bình Minh||19790505|M\rPV1|1|O")
    assert msa(exchange(server, VT + cut[: cut.index("\rPV1")].encode() + VT + update.encode() + FS + CR)) \
        == ("AA", "VTD1")
    assert str(one_item(server, tmp_path, "RVT002").PatientName) == "Phạm^Văn Bình Minh"

    # Two start blocks in a row, then a whole frame: that frame.
    assert msa(exchange(server, VT + VT + orm("VTE1", "RVT003", pid="BN7003^^^BVDK^MR").encode() + FS + CR)) \
        == ("AA", "VTE1")
    assert one_item(server, tmp_path, "RVT003").PatientID == "BN7003"
    assert "bytes of the unfinished message dropped" in server.log_text()


# -- 2: AR "unsupported message type" to our status messages ------------------------------------
def _order_in_progress(server: PacsServer, control: str, accession: str, pid: str) -> str:
    """An order from the HIS, started by MPPS (which queues ORM^O01 IP); its study UID."""
    study = generate_uid()
    assert msa(send(server, orm(control, accession, pid=pid, study_uid=study))) == ("AA", control)
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedStationAETitle = "CT_ROOM1"
    create.PerformedProcedureStepStartDate = "20261207"
    create.PerformedProcedureStepStartTime = "091500"
    create.PerformedProcedureStepID = f"PPS{accession}"
    scheduled = Dataset()
    scheduled.AccessionNumber = accession
    scheduled.StudyInstanceUID = study
    scheduled.ScheduledProcedureStepID = f"SPS{accession}"
    create.ScheduledStepAttributesSequence = Sequence([scheduled])
    assert _mpps(server, generate_uid(), create, create=True) == 0
    return study


def test_a_his_refusing_status_messages_as_unsupported_still_gets_the_report(
    server: PacsServer, tmp_path: Path
) -> None:
    """A results-only HIS answers our ORM^O01 AR with ERR-3 200 (unsupported
    message type) and takes ORU. The ORM is parked dead at once (listed, not
    sent again) and the report queued after it for the same order goes out;
    before, the ORM was retried forever and the report never left. With
    his_order_status off, no status message is queued at all."""
    his: StandInHIS = server.his  # type: ignore[attr-defined]
    his.answer = lambda m: his_ack(m, "AR", error="200") if "ORM^O01" in m else his_ack(m, "AA")
    study = _order_in_progress(server, "RAR1", "RAR001", "BN6601^^^BVDK^MR")
    store_and_sign(server, tmp_path, "Không thấy bất thường.", StudyInstanceUID=study, AccessionNumber="RAR001",
                   PatientID="BN6601")
    assert wait_until(lambda: len(his.about("RAR001", "ORU^R01")) == 1, timeout=30), his.received
    assert len(his.about("RAR001", "ORM^O01")) == 1
    dead = [m for m in outbox(server, "dead") if m["accession"] == "RAR001"]
    assert [(m["kind"], m["status"], m["attempts"]) for m in dead] == [("order_status", "IN PROGRESS", 1)]
    assert "200" in dead[0]["last_error"] and "unsupported message type" in dead[0]["last_error"]

    # his_order_status = false (a second server, same HIS): the MPPS queues nothing, the report still goes.
    other = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}), extra_env={
        "PACS_HIS_MLLP": f"127.0.0.1:{his.port}", "PACS_HIS_ORDER_STATUS": "false"})
    other.start()
    try:
        other.radiologist = other.make_token("bs.an", "radiologist", "Lê^Văn An")  # type: ignore[attr-defined]
        study = _order_in_progress(other, "RAR2", "RAR002", "BN6602^^^BVDK^MR")
        store_and_sign(other, tmp_path, "Bình thường.", StudyInstanceUID=study, AccessionNumber="RAR002",
                       PatientID="BN6602")
        assert wait_until(lambda: len(his.about("RAR002", "ORU^R01")) == 1, timeout=30), his.received
        assert his.about("RAR002", "ORM^O01") == []
        assert [m["kind"] for m in outbox(other)] == ["report"]
    finally:
        other.stop()


# -- 3: outbound MSH-10 unique, also after a restore --------------------------------------------
def test_outbound_control_ids_stay_unique_after_a_restore(server: PacsServer, tmp_path: Path) -> None:
    """MSH-10 was "FILMLESS" + the outbox row's number: after `pacs restore`
    the numbers start again, and a different report went out under an MSH-10
    the HIS already had (one that deduplicates drops it). Each message now
    gets a random MSH-10 when queued, kept for its resends."""
    his: StandInHIS = server.his  # type: ignore[attr-defined]
    texts = ["Báo cáo một: gan to.", "Báo cáo hai: sỏi thận phải.", "Báo cáo ba: u phổi trái 2 cm."]

    def sent(text: str) -> bool:
        return any(text in m for m in his.received)

    store_and_sign(server, tmp_path, texts[0], PatientID="BN6801", AccessionNumber="RMS001")
    # Recorded as sent before the backup (else the restored archive sends it again: harmless, same MSH-10).
    assert wait_until(lambda: [m["state"] for m in outbox(server) if m["accession"] == "RMS001"] == ["sent"],
                      timeout=30)
    backup = tmp_path / "index.backup"
    server.cli("backup", "--out", str(backup))
    store_and_sign(server, tmp_path, texts[1], PatientID="BN6802", AccessionNumber="RMS002")
    assert wait_until(lambda: sent(texts[1]), timeout=30)
    server.stop()
    server.cli("restore", str(backup), "--yes")
    server.start()
    store_and_sign(server, tmp_path, texts[2], PatientID="BN6803", AccessionNumber="RMS003")
    assert wait_until(lambda: sent(texts[2]), timeout=30)

    control_ids = {text: {fields(m, "MSH")[9] for m in his.received if text in m} for text in texts}
    assert all(len(ids) == 1 for ids in control_ids.values()), control_ids  # a resend keeps its MSH-10
    assert len(set.union(*control_ids.values())) == 3, control_ids
    assert all(len(next(iter(ids))) == 20 for ids in control_ids.values())  # ST: at most 20


# -- 4: MRG-1 is one patient's identifier list --------------------------------------------------
def test_a40_reads_mrg1_as_the_identifiers_of_one_prior_patient(server: PacsServer, tmp_path: Path) -> None:
    """Two registrations of one person share their citizen ID (CCCD). An
    ADT^A40 whose MRG-1 lists the prior record's CCCD before its hospital
    number merges it (the CCCD names both, and is passed over); it was
    refused "prior patient ... is unknown". An MRG-1 naming two different
    patients is refused (AE), not merged twice."""
    cccd = "079185083001"
    for control, accession, number in (("MG1", "RMG001", "BN8301"), ("MG2", "RMG002", "BN8302")):
        pid = f"{number}^^^BVDK^MR~{cccd}^^^CCCD^NI"
        assert msa(send(server, orm(control, accession, pid=pid, name="Võ^Thị Lan"))) == ("AA", control)
    a40 = adt("MG3", "A40^ADT_A39", f"PID|1||BN8301^^^BVDK^MR~{cccd}^^^CCCD^NI||Võ^Thị Lan||19850101|F\r"
                                    f"MRG|{cccd}^^^CCCD^NI~BN8302^^^BVDK^MR")
    ack = send(server, a40)
    assert msa(ack) == ("AA", "MG3"), ack
    assert [one_item(server, tmp_path, a).PatientID for a in ("RMG001", "RMG002")] == ["BN8301", "BN8301"]

    for control, accession, number in (("MG4", "RMG004", "BN8304"), ("MG5", "RMG005", "BN8305")):
        assert msa(send(server, orm(control, accession, pid=f"{number}^^^BVDK^MR"))) == ("AA", control)
    two = adt("MG6", "A40^ADT_A39", "PID|1||BN8306^^^BVDK^MR||Mới^Người\rMRG|BN8304^^^BVDK^MR~BN8305^^^BVDK^MR")
    ack = send(server, two)
    assert msa(ack)[0] == "AE" and fields(ack, "ERR")[3].startswith("205^"), ack
    assert [one_item(server, tmp_path, a).PatientID for a in ("RMG004", "RMG005")] == ["BN8304", "BN8305"]


# -- 5: HD assigning authorities ----------------------------------------------------------------
def test_an_hd_assigning_authority_gives_its_namespace_as_the_issuer(server: PacsServer, tmp_path: Path) -> None:
    """PID-3.4 BVDK&1.2.840.99999.1&ISO (namespace, universal ID, type): the
    issuer is BVDK (it was the whole text, "BVDK&1.2.840...&ISO"), so the
    modality's images under issuer BVDK are the same patient; the ORU writes
    the issuer as an HD (it went out as BVDK\\T\\...), and the ACK echoes the
    MSH-3/4 HDs as sent."""
    msh = "MSH|^~\\&|HIS^2.16.704.99.1^ISO|BVDK&2.16.704.99&ISO|PACS|BVDK|"
    pid = "BN6301^^^BVDK&1.2.840.99999.1&ISO^MR~079300000111^^^CCCD&2.16.704.1&ISO^NI"
    study = generate_uid()
    ack = send(server, orm("HD1", "RHD001", pid=pid, msh=msh, name="Lý^Thị Hằng", study_uid=study))
    assert msa(ack) == ("AA", "HD1")
    assert fields(ack, "MSH")[4:6] == ["HIS^2.16.704.99.1^ISO", "BVDK&2.16.704.99&ISO"]
    item = one_item(server, tmp_path, "RHD001")
    assert (item.PatientID, item.IssuerOfPatientID) == ("BN6301", "BVDK")
    assert [(o.PatientID, o.IssuerOfPatientID) for o in item.OtherPatientIDsSequence] == [("079300000111", "CCCD")]

    # The modality copies the worklist item into its image, as MWL modalities do.
    store_and_sign(server, tmp_path, "Bình thường.", StudyInstanceUID=study, AccessionNumber="RHD001",
                   PatientID=item.PatientID, IssuerOfPatientID=item.IssuerOfPatientID,
                   PatientName=str(item.PatientName), SpecificCharacterSet="ISO_IR 192")
    his: StandInHIS = server.his  # type: ignore[attr-defined]
    assert wait_until(lambda: len(his.about("RHD001", "ORU^R01")) == 1, timeout=30), his.received
    assert fields(his.about("RHD001", "ORU^R01")[0], "PID")[3] == "BN6301^^^BVDK"


# -- 6: an end block without its CR -------------------------------------------------------------
def test_a_frame_ending_in_fs_without_cr_is_read(server: PacsServer, tmp_path: Path) -> None:
    """<FS> alone (or <FS><LF>) ends a frame: such an inbound message waited
    unanswered until the frame timeout, and a HIS whose ACKs end so had every
    message sent again, forever."""
    for control, accession, end in (("NC1", "RNC001", FS), ("NC2", "RNC002", FS + b"\n")):
        message = orm(control, accession, pid=f"BN69{accession[-2:]}^^^BVDK^MR")
        assert msa(exchange(server, VT + message.encode() + end)) == ("AA", control)
        assert one_item(server, tmp_path, accession).PatientID == f"BN69{accession[-2:]}"

    his: StandInHIS = server.his  # type: ignore[attr-defined]
    his.answer = lambda m: his_ack(m, "AA", end=FS)
    store_and_sign(server, tmp_path, "Bình thường.", PatientID="BN6903", AccessionNumber="RNC003")

    def sent() -> bool:
        return [m["state"] for m in outbox(server) if m["accession"] == "RNC003"] == ["sent"]

    assert wait_until(sent, timeout=30), outbox(server)
    assert len(his.about("RNC003", "ORU^R01")) == 1


# -- 7: MSH-2 delimiters ------------------------------------------------------------------------
def _with_delimiters(message: str, delimiters: str) -> str:
    """*message* (written with the standard delimiters, no escapes) rewritten with the
    field separator and encoding characters *delimiters* (MSH-1 and MSH-2)."""
    if delimiters.startswith("|^~\\&"):  # the standard ones and more (v2.7's truncation character)
        return message.replace("MSH|^~\\&|", f"MSH{delimiters}|", 1)
    table = str.maketrans("|^~&", delimiters[0] + delimiters[1] + delimiters[2] + delimiters[4])
    rest = message[len("MSH|^~\\&|"):]
    return "MSH" + delimiters + delimiters[0] + rest.translate(table)


def test_msh2_delimiters_of_the_message_are_honoured(server: PacsServer, tmp_path: Path) -> None:
    """A message declaring other delimiters in MSH-2 (component "$",
    repetition "!") is read with them: read with the standard ones, the
    patient ID was "BN891$$$BVDK$MR" and the citizen ID was lost. The field
    separator "#" and v2.7's fifth character still work; an MSH-2 that no
    message can use is refused AE 102, nothing stored."""
    for n, delimiters in enumerate(["|$~\\&", "|^!\\&", "#^~\\&", "|^~\\&#"], start=1):
        pid = f"BN89{n}^^^BVDK^MR~07900000089{n}^^^CCCD^NI"
        message = _with_delimiters(orm(f"ENC{n}", f"RENC0{n}", pid=pid, name="Hoàng^Thị Mai"), delimiters)
        assert msa(send(server, message)) == ("AA", f"ENC{n}"), message
        item = one_item(server, tmp_path, f"RENC0{n}")
        assert (item.PatientID, item.IssuerOfPatientID, str(item.PatientName)) == (f"BN89{n}", "BVDK",
                                                                                   "Hoàng^Thị Mai"), delimiters
        assert [(o.PatientID, o.IssuerOfPatientID) for o in item.OtherPatientIDsSequence] == \
            [(f"07900000089{n}", "CCCD")], delimiters
        assert item.RequestedProcedureDescription == "CT ngực không cản quang"
        assert item.ScheduledProcedureStepSequence[0].Modality == "CT"

    unusable = orm("ENC9", "RENC09", pid="BN899^^^BVDK^MR").replace("MSH|^~\\&|", "MSH|^^\\&|", 1)
    ack = send(server, unusable)
    assert msa(ack) == ("AE", "ENC9") and fields(ack, "ERR")[3].startswith("102^"), ack
    assert worklist(server, tmp_path, "AccessionNumber=RENC09", "PatientID") == []


# -- 8: enhanced acknowledgment mode ------------------------------------------------------------
def test_enhanced_mode_accept_acks_follow_msh15(server: PacsServer, tmp_path: Path) -> None:
    """MSH-15 set is enhanced mode (HL7 v2.5 2.9.3): AL gets the accept ACK
    CA (CE, CR on errors), NE none, ER only on an error, SU only on success;
    MSH-16 likewise the application ACK (AA/AE/AR) after it.
    Original mode (MSH-15 and MSH-16 empty) keeps AA/AE/AR. A message that
    gets no ACK is still applied, and the ACK that comes next on the
    connection is the next message's."""
    probe = orm("EMPROBE", "REMP", pid="BN6100^^^BVDK^MR")
    assert msa(send(server, probe)) == ("AA", "EMPROBE")

    def answers(*messages: str) -> list[tuple[str, str]]:
        """Send *messages* on one connection, then an original-mode probe (a
        resend: acknowledged AA again); (MSA-1, MSA-2) of the ACKs before the probe's."""
        got: list[tuple[str, str]] = []
        with connect(server) as sock:
            for message in (*messages, probe):
                sock.sendall(VT + message.encode() + FS + CR)
            while not got or got[-1][1] != "EMPROBE":
                got.append(msa(read_frame(sock)))
        return got[:-1]

    pid = "BN6101^^^BVDK^MR"
    assert answers(with_modes(orm("EM1", "REM001", pid=pid), "AL", "NE")) == [("CA", "EM1")]
    # NE/AL: no accept ACK, the application ACK AA (tests/test_leftovers_fixes.py checks every pair).
    assert answers(with_modes(orm("EM2", "REM002", pid=pid), "NE", "AL")) == [("AA", "EM2")]
    assert answers(with_modes(orm("EM3", "REM003", pid=pid), "ER", "ER")) == []
    assert answers(with_modes(orm("EM4", "REM004", pid=pid), "SU", "")) == [("CA", "EM4")]
    assert [one_item(server, tmp_path, f"REM00{n}").PatientID for n in range(1, 5)] == ["BN6101"] * 4

    wrong = orm("EM5", "REM005", pid=pid, order_control="ZZ")  # ORC-1 ZZ: not in table 0119 (AE 103)
    ack = send(server, with_modes(wrong, "AL", "NE"))
    assert msa(ack) == ("CE", "EM5") and fields(ack, "ERR")[3].startswith("103^"), ack
    unsupported = adt("EM6", "A99", f"PID|1||{pid}")  # AR 201: an event we do not handle
    assert msa(send(server, with_modes(unsupported, "AL", "NE"))) == ("CR", "EM6")
    assert answers(with_modes(wrong.replace("|EM5|", "|EM7|"), "ER", "NE"),
                   with_modes(unsupported.replace("|EM6|", "|EM8|"), "SU", "NE")) == [("CE", "EM7")]
    # Original mode, as before.
    assert msa(send(server, orm("EM9", "REM009", pid=pid))) == ("AA", "EM9")
    assert msa(send(server, wrong.replace("|EM5|", "|EM10|"))) == ("AE", "EM10")
