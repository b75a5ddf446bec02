"""Reviewer findings on the DIMSE services, each against a real `pacs serve`
(one per database for the module):

1. a late C-CANCEL (crossing its request's final response) must not cancel
   the next request reusing its Message ID; a cancel of a request still
   queued must (PS3.7 9.3.2.3);
2. a registered C-MOVE destination that is down, or accepts none of the SOP
   classes, is 0xA702 with the cause, not 0xA801 (PS3.4 C.4.2.1.5);
3. the worklist matches a UTF-8 name sent without Specific Character Set,
   as the Q/R C-FIND does (top level and Scheduled Procedure Step item);
4. a query value without "=" matches one component group of a name with
   ideographic/phonetic groups (PS3.4 C.2.2.2.1), in C-FIND and QIDO-RS;
5. a lone "*" in a UID key of a C-FIND is universal matching.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from bench.dimse_wire import WireFindSCU, encode_command

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import image_dataset
from .peers import create_database, drop_database, wait_until
from .qr_corpus import STUDIES, sop_uid, study_uid, write_corpus
from .test_query_conformance import _create_icu_database

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
MWL = ModalityWorklistInformationFind
PENDING = (0xFF00, 0xFF01)

# A patient with ideographic and phonetic groups (gen.py of the review).
GROUPED_STUDY = "1.2.826.0.1.3680043.8.498.7777.1"
GROUPED_NAME = "Trần^Thị Bích=ちば^ていこ"
MWL_NAME = "Nguyễn^Văn Bình"
MWL_PERFORMER = "Đỗ^Thanh Tùng"


class HeldStoreSCP:
    """A move destination (pynetdicom, in this process) whose C-STOREs wait
    until :meth:`release` is called: a C-MOVE to it stays outstanding."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.received = 0
        ae = AE("HELDDEST")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.4", [ExplicitVRLittleEndian, "1.2.840.10008.1.2",
                                                                "1.2.840.10008.1.2.4.90"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        self.started.set()
        self.go.wait(60)
        self.received += 1
        return 0x0000

    def release(self) -> None:
        self.go.set()

    def stop(self) -> None:
        self.go.set()
        self.server.shutdown()


def _grouped_study(out: Path, count: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    series = GROUPED_STUDY + ".1"
    for i in range(count):
        ds = image_dataset(sop_uid=f"{series}.{i + 1}", SpecificCharacterSet=["ISO_IR 192"],
                           StudyInstanceUID=GROUPED_STUDY, SeriesInstanceUID=series, PatientName=GROUPED_NAME,
                           PatientID="BIG001", PatientBirthDate="19700101", PatientSex="F", StudyDate="20240315",
                           StudyTime="101500", AccessionNumber="ACCBIG", StudyID="1", SeriesNumber=1,
                           InstanceNumber=i + 1, PixelRepresentation=1,
                           PixelData=(np.arange(16 * 16, dtype=np.int16) + i).tobytes())
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def no_class_dest() -> Iterator[int]:
    """A live AE that accepts associations but no storage SOP class."""
    ae = AE("NOCLASS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


@pytest.fixture(scope="module")
def held_dest() -> Iterator[HeldStoreSCP]:
    scp = HeldStoreSCP()
    yield scp
    scp.stop()


@pytest.fixture(scope="module", params=["sqlite", "pg", "pg-icu"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            no_class_dest: int, held_dest: HeldStoreSCP) -> Iterator[PacsServer]:
    """The known Q/R corpus, a study of a name with three groups, a worklist
    order, and move destinations: MOVEDEST (live, accepts every class),
    DOWNDEST (nothing listening), NOCLASS (accepts no storage class)."""
    tmp = tmp_path_factory.mktemp(f"review-{request.param}")
    # pg-icu: a database whose default collation is ICU Vietnamese (LIKE and
    # equality on the folded names must not depend on it).
    pg = {"sqlite": None, "pg": create_database, "pg-icu": _create_icu_database}[request.param]
    pg = pg() if pg else None
    server = PacsServer(tmp / "data", Backend(request.param, pg, None, {}))
    write_corpus(tmp / "corpus")
    _grouped_study(tmp / "corpus" / "grouped")
    server.cli("import", str(tmp / "corpus"))
    dest = _PyStoreSCP("MOVEDEST")
    core = server.core()  # as `pacs ae add` does, without a process per AE
    try:
        for title, port in (("MOVEDEST", dest.port), ("DOWNDEST", free_port()), ("NOCLASS", no_class_dest),
                            ("HELDDEST", held_dest.port)):
            core.aes.add(title, "127.0.0.1", port)
    finally:
        core.close()
    server.start()
    server.movedest = dest  # type: ignore[attr-defined]
    with server.http() as http:
        created = http.post("/api/orders", json={
            "patient": {"id": "MWLREV1", "issuer": "BVDK", "name": MWL_NAME, "birth_date": "19800101", "sex": "M"},
            "accession_number": "REVMWL1", "modality": "CT", "station_ae_title": "CT_REV",
            "start_date": "20261205", "start_time": "080000", "performing_physician": MWL_PERFORMER,
            "requested_procedure_description": "CT bụng"})
        assert created.status_code == 201, created.text
    yield server
    server.stop()
    dest.stop()
    if pg:
        drop_database(pg)


class _PyStoreSCP:
    """A move destination accepting every storage class (pynetdicom, in this process)."""

    def __init__(self, title: str) -> None:
        from pynetdicom import AllStoragePresentationContexts

        self.received: list[str] = []
        ae = AE(title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, "1.2.840.10008.1.2",
                                                          "1.2.840.10008.1.2.4.90"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _assoc(server: PacsServer, *contexts: str) -> Any:
    ae = AE("VIEWER")
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    return assoc


def _study_find() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    return ds


def _find(assoc: Any, identifier: Dataset, model: str = FIND) -> tuple[int, int]:
    """(matches, final status) of one C-FIND (pynetdicom: Message ID 1)."""
    statuses = [int(s.Status) for s, _ in assoc.send_c_find(identifier, model) if s is not None]
    return sum(1 for s in statuses if s in PENDING), statuses[-1]


# The association-level fixes do not depend on the database: not repeated on pg-icu.
DIMSE_ONLY = pytest.mark.parametrize("archive", ["sqlite", "pg"], indirect=True)


# -- 1. C-CANCEL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pause", [0.0, 0.3], ids=["crossing", "after"])
@DIMSE_ONLY
def test_late_cancel_does_not_cancel_the_next_find(archive: PacsServer, pause: float) -> None:
    """fc2.py: a C-CANCEL after the final response of a C-FIND (message 1)
    is dropped; the next C-FIND (message 1 again) is answered whole."""
    total = len(STUDIES) + 1
    assoc = _assoc(archive, FIND)
    try:
        assert _find(assoc, _study_find()) == (total, 0x0000)
        assoc.send_c_cancel(1, query_model=FIND)
        time.sleep(pause)  # lets the cancel reach the server first (no timing is asserted)
        assert _find(assoc, _study_find()) == (total, 0x0000)
        assert _find(assoc, _study_find()) == (total, 0x0000)
    finally:
        assoc.release()


@DIMSE_ONLY
def test_late_cancel_does_not_cancel_the_next_move(archive: PacsServer) -> None:
    """mc2.py: the C-MOVE after a late C-CANCEL sends its instances."""
    dest = archive.movedest  # type: ignore[attr-defined]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid("S2")
    assoc = _assoc(archive, MOVE)
    try:
        for _ in range(2):
            final = [s for s, _ in assoc.send_c_move(identifier, "MOVEDEST", MOVE) if s is not None][-1]
            assert (int(final.Status), int(final.NumberOfCompletedSuboperations)) == (0x0000, 1)
            assoc.send_c_cancel(1, query_model=MOVE)  # crosses the final response
            time.sleep(0.3)
    finally:
        assoc.release()
    assert dest.received.count(sop_uid("S2", 0, 0)) == 2


@DIMSE_ONLY
def test_late_cancel_does_not_cancel_the_next_worklist_query(archive: PacsServer) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = "REVMWL1"
    ds.PatientName = ""
    assoc = _assoc(archive, MWL)
    try:
        assert _find(assoc, ds, MWL) == (1, 0x0000)
        assoc.send_c_cancel(1, query_model=MWL)
        time.sleep(0.3)
        assert _find(assoc, ds, MWL) == (1, 0x0000)
    finally:
        assoc.release()


class _WireQR(WireFindSCU):
    """One association proposing Study Root Find (context 1) and Move
    (context 3), writing requests without waiting for their answers."""

    def __init__(self, host: str, port: int, called: str) -> None:
        from bench import dimse_wire as wire

        self.sop_class = str(FIND)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect((host, port))
        self._message_id = 0
        self._buffer = bytearray()
        self._offset = 0
        contexts = b"".join(
            wire._item(0x20, bytes([cx, 0, 0, 0]) + wire._item(0x30, str(uid).encode())
                       + wire._item(0x40, wire.IMPLICIT_LE.encode()))
            for cx, uid in ((1, FIND), (3, MOVE)))
        user = wire._item(0x50, wire._item(0x51, struct.pack(">I", wire.MAX_PDU))
                          + wire._item(0x52, wire.IMPLEMENTATION_UID.encode()))
        header = struct.pack(">HH", 1, 0) + wire._ae(called) + wire._ae("VIEWER") + bytes(32)
        self.sock.sendall(wire._pdu(0x01, header + wire._item(0x10, wire.APPLICATION_CONTEXT.encode())
                                    + contexts + user))
        kind, _ = self._read_pdu()
        assert kind == 0x02, f"A-ASSOCIATE answered with PDU type {kind:#04x}"

    def send_move(self, message_id: int, destination: str, identifier: Dataset) -> None:
        from pynetdicom.dsutils import encode

        command = encode_command([
            (0x0002, "UI", str(MOVE)), (0x0100, "US", 0x0021), (0x0110, "US", message_id),
            (0x0600, "AE", destination), (0x0700, "US", 0), (0x0800, "US", 0x0000),
        ])
        data = encode(identifier, True, True, False)
        self.sock.sendall(
            struct.pack(">BBI", 4, 0, len(command) + 6) + struct.pack(">IBB", len(command) + 2, 3, 0x03) + command
            + struct.pack(">BBI", 4, 0, len(data) + 6) + struct.pack(">IBB", len(data) + 2, 3, 0x02) + data
        )


@DIMSE_ONLY
def test_cancel_of_a_queued_request_still_cancels_it(archive: PacsServer, held_dest: HeldStoreSCP) -> None:
    """A C-FIND sent, then cancelled, while a C-MOVE before it is still
    served (its destination holds the C-STORE) is answered 0xFE00 when its
    turn comes (PS3.7 9.3.2.3; pynetdicom forgot a cancel received while
    another request was served). The C-MOVE itself completes."""
    held_dest.started.clear()
    held_dest.go.clear()
    scu = _WireQR("127.0.0.1", archive.dicom_port, archive.ae_title)
    try:
        move = Dataset()
        move.QueryRetrieveLevel = "STUDY"
        move.StudyInstanceUID = study_uid("S4")
        scu.send_move(7, "HELDDEST", move)
        assert held_dest.started.wait(30), "the C-MOVE never reached its destination"
        scu._message_id = 7
        assert scu.send_find(_study_find()) == 8
        scu.send_cancel(8)
        time.sleep(0.3)  # lets the cancel reach the server while the C-MOVE is served (no timing is asserted)
        held_dest.release()
        finals = _read_finals(scu, 2)
    finally:
        held_dest.release()
        scu.release()
    assert finals == {7: 0x0000, 8: 0xFE00}


def _read_finals(scu: WireFindSCU, count: int) -> dict[int, int]:
    """Message ID Being Responded To -> final status, for *count* requests."""
    finals: dict[int, int] = {}
    parts: list[bytes] = []
    while len(finals) < count:
        kind, body = scu._read_pdu()
        assert kind == 0x04, f"PDU type {kind:#04x}"
        offset = 0
        while offset < len(body):
            length, _, control = struct.unpack_from(">IBB", body, offset)
            if control & 0x01:
                parts.append(body[offset + 6:offset + 4 + length])
                if control & 0x02:
                    command = b"".join(parts)
                    parts = []
                    fields = _command_fields(command)
                    if fields.get(0x0900) not in PENDING and fields.get(0x0100) != 0x0001:
                        finals[fields[0x0120]] = fields[0x0900]
            offset += 4 + length
    return finals


def _command_fields(command: bytes) -> dict[int, int]:
    fields, offset = {}, 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group == 0 and length == 2:
            fields[element] = int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return fields


# -- 2. C-MOVE to a registered destination that cannot take the study --------------------------
def _move(server: PacsServer, destination: str, study: str) -> list[Dataset]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    assoc = _assoc(server, MOVE)
    try:
        return [s for s, _ in assoc.send_c_move(identifier, destination, MOVE) if s is not None]
    finally:
        assoc.release()


def _export_events(server: PacsServer, found: Any) -> list[dict[str, Any]]:
    """The export events of the audit trail once *found* holds (written in batches)."""
    from pacs import audit

    core = server.core()
    try:
        events: list[dict[str, Any]] = []

        def ready() -> bool:
            events[:] = audit.query(core.engine, action="export")
            return bool(found(events))

        wait_until(ready, timeout=20, interval=0.2)
        return events
    finally:
        core.close()


@DIMSE_ONLY
@pytest.mark.parametrize(
    ("destination", "cause"),
    [("DOWNDEST", "DOWNDEST unreachable at 127.0.0.1:"),
     ("NOCLASS", "NOCLASS accepts none of the SOP classes of the study")],
)
def test_move_to_a_registered_destination_that_fails_is_a702(archive: PacsServer, destination: str,
                                                              cause: str) -> None:
    """PS3.4 C.4.2.1.5: 0xA801 is for a destination the SCP does not know; a
    known one that is down, or takes none of the classes, is 0xA702 (Refused:
    out of resources, unable to perform sub-operations), with the cause in
    the Error Comment and the audit trail."""
    study = study_uid("S1")  # CT and MR (JPEG 2000)
    responses = _move(archive, destination, study)
    assert [int(r.Status) for r in responses] == [0xA702]
    assert str(responses[0].ErrorComment).startswith(cause), responses[0]
    assert int(responses[0].NumberOfFailedSuboperations) == 3
    assert int(responses[0].NumberOfCompletedSuboperations) == 0
    failed = _export_events(archive, lambda evs: any(cause in e["detail"] for e in evs))
    failed = [e for e in failed if cause in e["detail"]]
    assert failed and {(e["outcome"], e["study_uid"]) for e in failed} == {("failure", study)}
    assert archive.alive()


@DIMSE_ONLY
def test_move_to_an_unregistered_destination_stays_a801(archive: PacsServer) -> None:
    responses = _move(archive, "NOWHERE", study_uid("S1"))
    assert [int(r.Status) for r in responses] == [0xA801]


# -- 3. worklist: UTF-8 without Specific Character Set -----------------------------------------
def _raw(tag: int, vr: str, text: str) -> RawDataElement:
    value = text.encode("utf-8")
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.mark.parametrize(
    ("name", "performer", "matches"),
    [(MWL_NAME, None, 1), (None, MWL_PERFORMER, 1), (MWL_NAME, MWL_PERFORMER, 1),
     ("Nguyễn^Văn Bảo", None, 0), (None, "Đỗ^Thanh Tú", 0)],
    ids=["name", "performer-in-step", "both", "other-name", "other-performer"],
)
def test_worklist_matches_undeclared_utf8(archive: PacsServer, name: str | None, performer: str | None,
                                          matches: int) -> None:
    """rawname.py: raw UTF-8 bytes, no (0008,0005): read as UTF-8, as the
    Q/R C-FIND reads them, at the top level and in the step item."""
    ds = Dataset()
    ds.AccessionNumber = ""
    ds.PatientName = None
    if name is not None:
        ds[0x00100010] = _raw(0x00100010, "PN", name)
    step = Dataset()
    step.ScheduledStationAETitle = "CT_REV"
    step.ScheduledPerformingPhysicianName = None
    if performer is not None:
        step[0x00400006] = _raw(0x00400006, "PN", performer)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    assert "SpecificCharacterSet" not in ds
    assoc = _assoc(archive, MWL)
    try:
        answers = [(int(s.Status), i) for s, i in assoc.send_c_find(ds, MWL) if s is not None]
    finally:
        assoc.release()
    assert answers[-1][0] == 0x0000
    found = [i for status, i in answers if status in PENDING]
    assert len(found) == matches
    if matches:
        assert found[0].AccessionNumber == "REVMWL1" and str(found[0].PatientName) == MWL_NAME


def test_qr_find_matches_undeclared_utf8_too(archive: PacsServer) -> None:
    """The same bytes over Q/R C-FIND (the behaviour the worklist now shares)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds[0x00100010] = _raw(0x00100010, "PN", "Trần^Văn Bình")
    assoc = _assoc(archive, FIND)
    try:
        assert _find(assoc, ds) == (1, 0x0000)
    finally:
        assoc.release()


# -- 4. names with ideographic and phonetic groups ----------------------------------------------
GROUP_QUERIES = [
    ("Trần^Thị Bích", True), ("TRAN^THI BICH", True), ("TRAN THI BICH", True), ("tran thi bich", True),
    ("Trần Thị Bích", True), ("TRAN^THI*", True), ("*BICH", True), ("TRAN THI*", True), ("*THI BICH", True),
    ("ちば^ていこ", True), ("ちば ていこ", True), ("ちば*", True), (GROUPED_NAME, True),
    ("TRAN^THI BICH=ちば^ていこ", True),
    # single value matching is of a whole group
    ("TRAN^THI", False), ("THI BICH", False), ("ていこ", False), ("TRAN^THI BICH=ちば", False),
    ("BICH", False),
]


def _finds_grouped(archive: PacsServer, name: str) -> bool:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = name
    assoc = _assoc(archive, FIND)
    try:
        found = [str(i.StudyInstanceUID) for s, i in assoc.send_c_find(ds, FIND)
                 if s is not None and int(s.Status) in PENDING]
    finally:
        assoc.release()
    return GROUPED_STUDY in found


@pytest.mark.parametrize(("name", "expected"), GROUP_QUERIES, ids=[q for q, _ in GROUP_QUERIES])
def test_cfind_matches_one_group_of_a_name(archive: PacsServer, name: str, expected: bool) -> None:
    """PS3.4 C.2.2.2.1: a value without "=" is compared with one component
    group (the alphabetic one; text in another script: any)."""
    assert _finds_grouped(archive, name) is expected


def test_qido_matches_one_group_of_a_name(archive: PacsServer) -> None:
    with archive.http() as http:
        for name, expected in GROUP_QUERIES:
            answer = http.get("/dicom-web/studies", params={"PatientName": name})
            assert answer.status_code in (200, 204), answer.text
            found = [s["0020000D"]["Value"][0] for s in (answer.json() if answer.status_code == 200 else [])]
            assert (GROUPED_STUDY in found) is expected, name


def test_single_group_names_match_as_before(archive: PacsServer) -> None:
    """The corpus's one-group names: a group-aware match changes nothing."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    assoc = _assoc(archive, FIND)
    try:
        for name, count in (("NGUYEN^VAN AN", 3), ("nguyễn văn an", 3), ("NGUYEN*", 4), ("Trần^Văn Bình", 1),
                            ("TRAN*", 2), ("TRAN^VAN", 0), ("*AN", 3)):
            ds.PatientName = name
            assert _find(assoc, ds)[0] == count, name
    finally:
        assoc.release()


# -- 5. a lone "*" in a UID key -----------------------------------------------------------------
def test_lone_asterisk_in_a_uid_key_is_universal(archive: PacsServer) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "*"
    assoc = _assoc(archive, FIND)
    try:
        assert _find(assoc, ds) == (len(STUDIES) + 1, 0x0000)
        ds.StudyInstanceUID = "1.2.*"
        assert _find(assoc, ds) == (0, 0xA900)  # a wildcard in a UID is still refused
    finally:
        assoc.release()
    with archive.http() as http:
        answer = http.get("/dicom-web/studies", params={"StudyInstanceUID": "*"})
        assert answer.status_code == 200 and len(answer.json()) == len(STUDIES) + 1
