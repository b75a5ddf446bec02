"""Association and DIMSE wire behaviour found by the association review
(negotiation per presentation context, releases of the associations this node
requests, several messages in one P-DATA-TF, messages off their context),
checked with raw PDUs, pynetdicom and DCMTK against a real `pacs serve`.

1. Each presentation context is answered in its own first supported syntax
   (PS3.8 9.3.3.2), as DCMTK's storescp does: contexts of one SOP class were
   merged into one preference list, so [JPEG Baseline, Explicit LE] beside
   [Explicit LE] got Explicit LE in both. The C-GET policy stays.
2. A C-MOVE destination that never answers our A-RELEASE-RQ: the final
   C-MOVE response came after a hard-coded 30 s whatever dicom_timeout, and
   a second A-ABORT in Sta13 killed the DUL thread with a traceback.
3. Several messages in one P-DATA-TF: a message after one served by
   pynetdicom's own decoder was dropped unanswered (the peer timed out).
4. A C-STORE for another SOP class than its context's was stored (0122H
   now), and a data set on another context than its command was stored
   (A-ABORT now, PS3.8 E.1, as DCMTK).
5. An association idle past dicom_timeout was an ERROR naming no AE title.
6. A peer accepting our association with a Maximum Length of 1-6 (no PDV
   fits): each message then failed in the fragmentation, after the
   association was open, and that error was all the operator saw ("read
   length must be non-negative or -1" as a C-MOVE's Error Comment, "'fragment_length'
   cannot be between 1 and 7" or "division by zero" as a routing job's).
   It is aborted at once now, said once, and the caller's refusal path runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove, Verification

from pacs import dicom_net

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import encode_dataset, image_dataset
from .peers import dcmtk, read_pdu, wait_port, wait_until

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = Verification.encode()
CT = CTImageStorage.encode()
MR = MRImageStorage.encode()
EVRLE = ExplicitVRLittleEndian.encode()
IVRLE = ImplicitVRLittleEndian.encode()
TRACEBACK = "Traceback (most recent call last)"


# -- raw DICOM UL -----------------------------------------------------------------------
def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def _context(context_id: int, abstract: bytes, syntaxes: list[bytes]) -> bytes:
    return _item(0x20, bytes([context_id, 0, 0, 0]) + _item(0x30, abstract)
                 + b"".join(_item(0x40, ts) for ts in syntaxes))


def _scp_role(sop_class: bytes) -> bytes:
    return _item(0x54, struct.pack(">H", len(sop_class)) + sop_class + bytes([0, 1]))


def associate_rq(contexts: list[bytes], called: bytes = b"FILMLESS", calling: bytes = b"RAWSCU",
                 extra_user_items: bytes = b"") -> bytes:
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4") + extra_user_items)
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, APP_CONTEXT) + b"".join(contexts) + user)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _items(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        kind, _, length = struct.unpack(">BBH", data[offset:offset + 4])
        yield kind, data[offset + 4:offset + 4 + length]
        offset += 4 + length


def accepted_syntaxes(ac_body: bytes) -> dict[int, str | None]:
    """Context ID -> the syntax accepted in it (None: rejected), from an A-ASSOCIATE-AC."""
    answers: dict[int, str | None] = {}
    for kind, data in _items(ac_body[68:]):
        if kind == 0x21:
            syntaxes = [ts for sub, ts in _items(data[4:]) if sub == 0x40]
            answers[data[0]] = syntaxes[0].decode().rstrip("\0 ") if data[2] == 0 and syntaxes else None
    return answers


def pdata(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF of (context ID, message control header, fragment) PDVs."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def _pdvs(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    while offset < len(body):
        length, cid, control = struct.unpack(">IBB", body[offset:offset + 6])
        yield cid, control, body[offset + 6:offset + 4 + length]
        offset += 4 + length


RELEASE_RQ = struct.pack(">BBIxxxx", 5, 0, 4)
RELEASE_RP = struct.pack(">BBIxxxx", 6, 0, 4)


def _element(element: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        value = struct.pack("<H", value)
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, element, len(value)) + value


def command(elements: list[bytes]) -> bytes:
    """A command set (Implicit VR Little Endian) with its group length."""
    body = b"".join(elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def echo_rq(message_id: int) -> bytes:
    return command([_element(0x0002, VERIFICATION), _element(0x0100, 0x0030), _element(0x0110, message_id),
                    _element(0x0800, 0x0101)])


def store_rq(sop_class: bytes, sop_uid: str, message_id: int, *extra: bytes) -> bytes:
    return command([_element(0x0002, sop_class), _element(0x0100, 0x0001), _element(0x0110, message_id),
                    _element(0x0700, 0), _element(0x0800, 0x0000), _element(0x1000, sop_uid.encode()), *extra])


def parse_command(data: bytes) -> dict[int, Any]:
    values: dict[int, Any] = {}
    offset = 0
    while offset < len(data):
        _, element, length = struct.unpack("<HHI", data[offset:offset + 8])
        value = data[offset + 8:offset + 8 + length]
        values[element] = struct.unpack("<H", value)[0] if length == 2 else value
        offset += 8 + length
    return values


def read_response(sock: socket.socket) -> dict[int, Any] | str:
    """The next response command set, or what came instead ('A-ABORT', 'closed')."""
    fragments = b""
    while True:
        try:
            kind, body = read_pdu(sock)
        except (EOFError, OSError):
            return "closed"
        if kind == 7:
            return "A-ABORT"
        assert kind == 4, f"PDU type {kind}"
        for _, control, data in _pdvs(body):
            assert control & 1, "a response with a data set"
            fragments += data
            if control & 2:
                return parse_command(fragments)


def ct_dataset(sop_uid: str, patient_id: str = "WIRE1") -> bytes:
    """A small CT data set (Explicit VR Little Endian) under *sop_uid*."""
    return encode_dataset(image_dataset(sop_uid=sop_uid, PatientName="WIRE^TEST", PatientID=patient_id))


class Raw:
    """An association of raw PDUs with a server."""

    def __init__(self, port: int, contexts: list[bytes], extra_user_items: bytes = b"", *, calling: bytes = b"RAWSCU",
                 source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        self.sock.sendall(associate_rq(contexts, calling=calling, extra_user_items=extra_user_items))
        kind, body = read_pdu(self.sock)
        assert kind == 2, f"no A-ASSOCIATE-AC: PDU type {kind}"
        self.accepted = accepted_syntaxes(body)

    def release(self) -> str:
        try:
            self.sock.sendall(RELEASE_RQ)
            kind, _ = read_pdu(self.sock)
            return "A-RELEASE-RP" if kind == 6 else f"PDU type {kind}"
        except (EOFError, OSError):
            return "closed"
        finally:
            self.sock.close()


STORE_CONTEXTS = [_context(1, VERIFICATION, [IVRLE]), _context(3, CT, [EVRLE]), _context(5, MR, [EVRLE])]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("assoc-wire")
    pacs = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                      extra_env={"PACS_DICOM_TIMEOUT": "3"}).start()
    yield pacs
    pacs.stop()


def stored(server: PacsServer, sop_uid: str) -> bool:
    core = server.core()
    try:
        return core.reader.instance_key(sop_uid) is not None
    finally:
        core.close()


def assert_serving(server: PacsServer) -> None:
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    raw.sock.sendall(pdata([(1, 3, echo_rq(99))]))
    answer = read_response(raw.sock)
    assert isinstance(answer, dict) and answer[0x0900] == 0, answer
    assert raw.release() == "A-RELEASE-RP"
    assert TRACEBACK not in server.log_text()


# -- 1. transfer syntax per presentation context ---------------------------------------------
JLL, J2K, JBASE, RLE = (JPEGLosslessSV1.encode(), JPEG2000Lossless.encode(), JPEGBaseline8Bit.encode(),
                        RLELossless.encode())
PER_CONTEXT_CASES = {
    # proposed (context ID -> syntaxes, in the requestor's order) -> accepted
    "JPEG beside an uncompressed-only context": ({3: [EVRLE], 5: [JBASE, EVRLE]},
                                                 {3: ExplicitVRLittleEndian, 5: JPEGBaseline8Bit}),
    "one compression per context, each with a fallback": ({3: [JLL, EVRLE], 5: [J2K, EVRLE]},
                                                          {3: JPEGLosslessSV1, 5: JPEG2000Lossless}),
    "overlapping lists": ({3: [RLE, EVRLE], 5: [JLL, RLE, EVRLE]}, {3: RLELossless, 5: JPEGLosslessSV1}),
}


@contextlib.contextmanager
def storescp(tmp_path: Path) -> Iterator[int]:
    """DCMTK's storescp accepting every syntax it knows (+xa); its port."""
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "+xa", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("case", list(PER_CONTEXT_CASES))
def test_each_context_is_answered_in_its_own_first_syntax_as_dcmtk_does(server: PacsServer, tmp_path: Path,
                                                                         case: str) -> None:
    proposed, expected = PER_CONTEXT_CASES[case]
    contexts = [_context(1, VERIFICATION, [IVRLE])] + [_context(cid, CT, ts) for cid, ts in proposed.items()]
    raw = Raw(server.dicom_port, contexts)
    raw.release()
    assert {cid: raw.accepted[cid] for cid in proposed} == expected
    with storescp(tmp_path) as port:
        reference = Raw(port, contexts)
        reference.release()
        assert {cid: reference.accepted[cid] for cid in proposed} == expected, "DCMTK's storescp answers otherwise"


def test_a_c_get_requester_still_gets_a_syntax_the_archive_can_always_give(server: PacsServer) -> None:
    """The policy for a context where this node sends (the requestor takes
    the SCP role): the first syntax any stored object can be given in, also
    when another context of the same class proposes something else; a
    syntax proposed alone is accepted as is."""
    contexts = [_context(1, VERIFICATION, [IVRLE]),
                _context(3, CT, [ExplicitVRBigEndian.encode(), JBASE, EVRLE]),
                _context(5, CT, [JLL])]
    raw = Raw(server.dicom_port, contexts, extra_user_items=_scp_role(CT))
    raw.release()
    assert raw.accepted[3] == ExplicitVRLittleEndian
    assert raw.accepted[5] == JPEGLosslessSV1


# -- 2. release of the associations this node requests -----------------------------------------
class Destination:
    """A C-MOVE destination of raw PDUs that accepts every context. Recording
    the PDU types it receives, it either answers each request (C-STORE,
    C-ECHO) with success and never answers A-RELEASE-RQ (``silent_release``,
    the connection stays open), or answers a C-STORE-RQ with an A-RELEASE-RQ
    of its own (``release_mid_store``: an impatient peer), or answers the
    requests and the release (``store``). Its A-ASSOCIATE-AC says Maximum
    Length *maximum* (None: no Maximum Length sub-item); it closes the
    connection on an A-ABORT."""

    def __init__(self, mode: str, maximum: int | None = 16384) -> None:
        self.mode = mode
        self.maximum = maximum
        self.port = free_port()
        self.received: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._association, args=(conn,), daemon=True).start()

    def _association(self, conn: socket.socket) -> None:
        with conn:
            _, rq = read_pdu(conn)
            answers = b""
            for kind, data in _items(rq[68:]):
                if kind == 0x20:
                    first = next(ts for sub, ts in _items(data[4:]) if sub == 0x40)
                    answers += _item(0x21, bytes([data[0], 0, 0, 0]) + _item(0x40, first))
            maximum = _item(0x51, struct.pack(">I", self.maximum)) if self.maximum is not None else b""
            body = (struct.pack(">HH", 1, 0) + rq[4:36] + bytes(32) + _item(0x10, APP_CONTEXT) + answers
                    + _item(0x50, maximum + _item(0x52, b"1.2.3.4")))
            conn.sendall(struct.pack(">BBI", 2, 0, len(body)) + body)
            fragments = b""
            while True:
                try:
                    kind, body = read_pdu(conn)
                except (EOFError, OSError):
                    return
                self.received.append(kind)
                if kind == 7:
                    return
                if kind == 5 and self.mode == "store":
                    conn.sendall(RELEASE_RP)
                if kind != 4:
                    continue  # A-RELEASE-RQ: no answer but in "store" mode
                for cid, control, data in _pdvs(body):
                    if control & 1:
                        fragments += data
                        # Answered at its last fragment: a request without a data set (C-ECHO).
                        if not control & 2 or parse_command(fragments).get(0x0800) != 0x0101:
                            continue
                    elif not control & 2:
                        continue
                    elif self.mode == "release_mid_store":
                        conn.sendall(RELEASE_RQ)
                        continue
                    rq_command = parse_command(fragments)
                    fragments = b""
                    rsp = command([_element(0x0002, rq_command[0x0002]),
                                   _element(0x0100, rq_command[0x0100] | 0x8000),
                                   _element(0x0120, rq_command[0x0110]), _element(0x0800, 0x0101),
                                   _element(0x0900, 0),
                                   *([_element(0x1000, rq_command[0x1000])] if 0x1000 in rq_command else [])])
                    conn.sendall(pdata([(cid, 3, rsp)]))

    def close(self) -> None:
        self.listener.close()


def store_ct(server: PacsServer, patient_id: str) -> None:
    """One CT of *patient_id* into the archive."""
    sop_uid = generate_uid()
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    raw.sock.sendall(pdata([(3, 3, store_rq(CT, sop_uid, 1)), (3, 2, ct_dataset(sop_uid, patient_id))]))
    answer = read_response(raw.sock)
    assert isinstance(answer, dict) and answer[0x0900] == 0, answer
    raw.release()


@contextlib.contextmanager
def move_destination(server: PacsServer, mode: str, patient_id: str,
                     maximum: int | None = 16384) -> Iterator[tuple[str, Destination]]:
    """A registered :class:`Destination` and one CT of *patient_id* in the archive."""
    destination = Destination(mode, maximum)
    title = f"DEST{destination.port}"
    try:
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(destination.port))
        store_ct(server, patient_id)
        yield title, destination
    finally:
        destination.close()


def c_move(server: PacsServer, title: str, patient_id: str) -> Dataset:
    """The final response to a C-MOVE of *patient_id* to *title*, from a
    requester that waits 20 s for each response (its DIMSE timeout)."""
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    ae.dimse_timeout = 20
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID = patient_id
        responses = [status for status, _ in
                     assoc.send_c_move(identifier, title, PatientRootQueryRetrieveInformationModelMove)]
    finally:
        if assoc.is_established:
            assoc.release()
    assert "Status" in responses[-1], "no final C-MOVE response within the requester's DIMSE timeout"
    return responses[-1]


def test_a_move_destination_that_never_answers_the_release_does_not_hold_the_final_response(
        server: PacsServer) -> None:
    """dicom_timeout is 3 s here. The requester gives the final C-MOVE
    response 20 s (its DIMSE timeout): it came after 30 s, the ACSE timeout
    pynetdicom waits for the A-RELEASE-RP, and then a second A-ABORT in Sta13
    killed the association's thread with a traceback."""
    with move_destination(server, "silent_release", "SILENT1") as (title, destination):
        final = c_move(server, title, "SILENT1")
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1
        # The destination got our A-RELEASE-RQ, then our A-ABORT.
        assert wait_until(lambda: 7 in destination.received, timeout=20), destination.received
        assert destination.received.index(5) < destination.received.index(7)
    log = server.log_text()
    assert f"{title} at 127.0.0.1 did not answer our A-RELEASE-RQ" in log
    assert "Invalid event" not in log and TRACEBACK not in log
    assert_serving(server)


def test_a_state_machine_fault_on_a_requested_association_is_answered_not_a_traceback(
        server: PacsServer) -> None:
    """A destination answers our C-STORE-RQ with an A-RELEASE-RQ: our DIMSE
    timeout aborts the association (Sta13), then pynetdicom's reactor may
    still answer that release (event 14, invalid in Sta13), which killed the
    DUL thread with a traceback in 3 runs of 4. The guard the listener had
    for its own associations now covers the ones this node requests. Three
    moves: each is answered, none leaves a traceback."""
    with move_destination(server, "release_mid_store", "EARLYREL1") as (title, _):
        for _ in range(3):
            final = c_move(server, title, "EARLYREL1")
            assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 1
    assert TRACEBACK not in server.log_text()
    assert_serving(server)


# -- 3. several messages in one P-DATA-TF ----------------------------------------------------
def test_every_message_of_one_p_data_is_answered(server: PacsServer) -> None:
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    try:
        # Two C-ECHO-RQs (pynetdicom's decoder serves C-ECHO).
        raw.sock.sendall(pdata([(1, 3, echo_rq(1)), (1, 3, echo_rq(2))]))
        answers = [read_response(raw.sock), read_response(raw.sock)]
        assert [a[0x0120] for a in answers if isinstance(a, dict)] == [1, 2], answers

        # A C-ECHO-RQ, then a C-STORE-RQ with its data set (this module's path).
        first = generate_uid()
        raw.sock.sendall(pdata([(1, 3, echo_rq(3)), (3, 3, store_rq(CT, first, 4)), (3, 2, ct_dataset(first))]))
        answers = [read_response(raw.sock), read_response(raw.sock)]
        assert [(a[0x0120], a[0x0900]) for a in answers if isinstance(a, dict)] == [(3, 0), (4, 0)], answers

        # A C-STORE pynetdicom serves (an element this module does not take
        # in its command), then a plain one.
        second, third = generate_uid(), generate_uid()
        raw.sock.sendall(pdata([(3, 3, store_rq(CT, second, 5, _element(0x7777, b"ZZ"))),
                                (3, 2, ct_dataset(second)),
                                (3, 3, store_rq(CT, third, 6)), (3, 2, ct_dataset(third))]))
        answers = [read_response(raw.sock), read_response(raw.sock)]
        assert [(a[0x0120], a[0x0900]) for a in answers if isinstance(a, dict)] == [(5, 0), (6, 0)], answers
    finally:
        assert raw.release() == "A-RELEASE-RP"
    assert all(stored(server, uid) for uid in (first, second, third))
    assert_serving(server)


# -- 4. a message off its presentation context -------------------------------------------------
@pytest.mark.parametrize("extra", [(), (_element(0x7777, b"ZZ"),)], ids=["direct", "pynetdicom"])
def test_a_store_for_another_class_than_its_context_is_refused_0122(server: PacsServer, extra: tuple) -> None:
    """A CT on the MR context, or on the Verification context: 0122H with
    an Error Comment, nothing stored, the association goes on."""
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    uids = [generate_uid(), generate_uid()]
    try:
        for message_id, (context_id, sop_uid) in enumerate(zip((5, 1), uids), start=1):
            raw.sock.sendall(pdata([(context_id, 3, store_rq(CT, sop_uid, message_id, *extra))]))
            raw.sock.sendall(pdata([(context_id, 2, ct_dataset(sop_uid))]))
            answer = read_response(raw.sock)
            assert isinstance(answer, dict), answer
            assert answer[0x0900] == 0x0122 and answer[0x0120] == message_id
            assert b"negotiated" in answer[0x0902]
        # The association goes on: a CT on its own context is stored.
        good = generate_uid()
        raw.sock.sendall(pdata([(3, 3, store_rq(CT, good, 9)), (3, 2, ct_dataset(good))]))
        answer = read_response(raw.sock)
        assert isinstance(answer, dict) and answer[0x0900] == 0, answer
    finally:
        assert raw.release() == "A-RELEASE-RP"
    assert not any(stored(server, uid) for uid in uids)
    assert stored(server, good)
    assert_serving(server)


@pytest.mark.parametrize("contexts", [(3, 5), (5, 3)], ids=["data-on-MR-context", "data-on-CT-context"])
def test_a_data_set_on_another_context_than_its_command_aborts(server: PacsServer, contexts: tuple[int, int]) -> None:
    """PS3.8 E.1: every fragment of a message on one presentation context.
    DCMTK's storescp aborts ("Presentation Contexts of Command and Data
    Differ"); this was stored and answered success."""
    command_context, data_context = contexts
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    sop_uid = generate_uid()
    sop_class = CT if command_context == 3 else MR
    raw.sock.sendall(pdata([(command_context, 3, store_rq(sop_class, sop_uid, 1)),
                            (data_context, 2, ct_dataset(sop_uid))]))
    assert read_response(raw.sock) == "A-ABORT"
    raw.sock.close()
    assert not stored(server, sop_uid)
    assert "its command on" in server.log_text()
    assert_serving(server)


# -- 5. an idle peer -------------------------------------------------------------------------
@pytest.mark.parametrize("event_driven", [True, False], ids=["our reactor", "pynetdicom's reactor"])
def test_an_idle_association_is_a_warning_naming_its_peer(server: PacsServer, tmp_path: Path,
                                                          event_driven: bool) -> None:
    """An association idle past dicom_timeout was an ERROR naming the address
    alone ("network timeout reached with 127.0.0.1"; pynetdicom's reactor:
    "Network timeout reached", no peer at all), and a link stalled in the
    middle of a PDU named nobody: the operator could not tell which modality
    went quiet. A quiet peer is a WARNING naming its address and AE title."""
    if not event_driven:
        server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
            "PACS_DICOM_TIMEOUT": "3", "PACS_DICOM_EVENT_DRIVEN": "false"}).start()
    try:
        start = server.log_path.stat().st_size
        idle = Raw(server.dicom_port, STORE_CONTEXTS, calling=b"IDLE_CT", source="127.0.0.21")
        stalled = Raw(server.dicom_port, STORE_CONTEXTS, calling=b"STALLED", source="127.0.0.22")
        stalled.sock.sendall(pdata([(1, 3, echo_rq(1))])[:20])  # 20 bytes of a PDU, then nothing
        assert read_pdu(idle.sock)[0] == 7  # A-ABORT, once dicom_timeout (3 s) has passed
        idle_line = "WARNING dicom_scp.reactor: association from 127.0.0.21 (calling IDLE_CT) idle for 3 s " \
                    "(dicom_timeout): A-ABORT sent"
        if not event_driven:
            idle_line = idle_line.replace("dicom_scp.reactor", "pynetdicom.association")
        stalled_line = "connection from 127.0.0.22 (calling STALLED) lost in the middle of a PDU: TimeoutError"
        assert wait_until(lambda: stalled_line in server.log_text(start), timeout=30, interval=0.2)
        text = server.log_text(start)
        assert idle_line in text and " ERROR " not in text and TRACEBACK not in text, text
        idle.sock.close()
        stalled.sock.close()
        assert_serving(server)
    finally:
        if not event_driven:
            server.stop()


# -- 6. an A-ASSOCIATE-AC whose Maximum Length no PDV fits in --------------------------------------
def aborted_line(title: str, port: int, maximum: int) -> str:
    return (f"WARNING pacs.dicom_net: association with {title} at 127.0.0.1:{port} aborted: its A-ASSOCIATE-AC's "
            f"Maximum Length {maximum} cannot carry a PDV (at least 7, or 0 for no limit: PS3.8 9.3.5, D.1)")


def said_about(text: str, title: str) -> list[str]:
    return [line for line in text.splitlines() if "pacs.dicom_net" in line and title in line]


@pytest.mark.parametrize("maximum", [1, 6])
def test_a_move_destination_accepting_a_maximum_length_no_pdv_fits_in_is_aborted(server: PacsServer,
                                                                                maximum: int) -> None:
    """The store association was kept and each sub-operation failed with
    the fragmentation's error as its reason (1: "read length must be
    non-negative or -1", 6: "range() arg 3 must not be zero"; pynetdicom
    logged it at ERROR), the destination getting an A-RELEASE-RQ. It is
    aborted at once (the destination gets an A-ABORT and nothing before it),
    said once, and the C-MOVE refused 0xA702 as for a destination that
    rejects us, the cause in its Error Comment. The same destination
    accepting with 0 (no limit) then gets the object."""
    patient = f"MAXLEN{maximum}"
    start = server.log_path.stat().st_size
    with move_destination(server, "store", patient, maximum) as (title, destination):
        final = c_move(server, title, patient)
        assert final.Status == 0xA702, final
        assert final.ErrorComment == f"{title} accepted with Maximum Length {maximum}: no PDV fits"
        assert (final.NumberOfFailedSuboperations, final.NumberOfCompletedSuboperations) == (1, 0)
        assert wait_until(lambda: destination.received, timeout=10, interval=0.05)
        assert destination.received == [7]
        text = server.log_text(start)
        assert len(said_about(text, title)) == 1 and aborted_line(title, destination.port, maximum) in text, text
        assert TRACEBACK not in text
        destination.maximum, destination.received = 0, []
        final = c_move(server, title, patient)
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1, final
        assert destination.received[0] == 4 and 7 not in destination.received
    assert TRACEBACK not in server.log_text(start)
    assert_serving(server)


def _route_job(server: PacsServer, rule: str) -> dict[str, Any] | None:
    jobs = json.loads(server.cli("route", "list", "--json").stdout)["jobs"]
    return next((job for job in jobs if job["rule"] == rule), None)


def first_routing_try(server: PacsServer, rule: str, title: str, patient: str) -> dict[str, Any]:
    """The job of a new rule *rule* routing *patient*'s CT to *title*, once
    tried: its error recorded (a destination that takes no association
    counts no try, see pacs.routing.postpone)."""
    server.cli("route", "add", rule, "--if", f"PatientID={patient}", "--to-ae", title)
    store_ct(server, patient)
    job: dict[str, Any] = {}

    def tried() -> bool:
        job.update(_route_job(server, rule) or {})
        return bool(job.get("last_error"))

    assert wait_until(tried, timeout=20, interval=0.2), job
    return job


def test_routing_to_a_destination_accepting_a_maximum_length_no_pdv_fits_in_is_retried_with_the_reason(
        server: PacsServer) -> None:
    """Each try's association was kept and the job failed with "C-STORE to
    DEST: 'fragment_length' cannot be between 1 and 7.": now the association
    is aborted at once and the job waits for its next try with the reason;
    once the destination takes PDUs, the job is delivered."""
    destination = Destination("store", 1)
    title, rule, patient = f"ROUTE{destination.port}", f"maxlen-{destination.port}", f"ROUTEMAX{destination.port}"
    start = server.log_path.stat().st_size
    try:
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(destination.port))
        job = first_routing_try(server, rule, title, patient)
        assert job["state"] == "pending", job
        assert job["last_error"] == (f"association with {title} at 127.0.0.1:{destination.port} aborted: "
                                     f"it accepted with Maximum Length 1: no PDV fits"), job
        assert set(destination.received) == {7}, destination.received
        text = server.log_text(start)
        assert aborted_line(title, destination.port, 1) in text and TRACEBACK not in text, text
        destination.maximum = 0
        server.cli("route", "retry", "--job", str(job["pk"]))
        assert wait_until(lambda: (_route_job(server, rule) or {}).get("state") == "done", timeout=20,
                          interval=0.2), _route_job(server, rule)
    finally:
        destination.close()
        server.cli("route", "remove", rule, "--force", check=False)
    assert TRACEBACK not in server.log_text(start)


def test_remote_echo_and_a_commitment_report_to_such_a_peer_fail_with_the_reason(
        server: PacsServer, caplog: pytest.LogCaptureFixture) -> None:
    """The helper every other association of ours goes through (`pacs remote`
    echo/find/move/get, `pacs remote pull`, routing, storage commitment
    reports): `pacs remote echo` ended in "error: ValueError:
    'fragment_length' cannot be between 1 and 7.", a commitment report in
    "report to DEST failed" with that. Now: the peer refused us, with the
    reason, and the report is tried again later as for a peer that is down."""
    from dicom_scp.commitment import _on_new_association
    from pacs import remote

    destination = Destination("store", 1)
    title = f"ECHO{destination.port}"
    server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(destination.port))
    core = server.core()
    try:
        with caplog.at_level(logging.WARNING):
            with pytest.raises(remote.Unreachable) as refused:
                remote.echo(core, title)
            info = Dataset()
            info.TransactionUID = generate_uid()
            assert _on_new_association(core, core.aes.get(title), 1, info) is False
        reason = f"association with {title} at 127.0.0.1:{destination.port} aborted: it accepted with Maximum " \
                 "Length 1: no PDV fits"
        assert str(refused.value) == reason
        assert f"storage commitment: no association with {title}: {reason}" in caplog.messages
        said = [r.getMessage() for r in caplog.records if r.name == "pacs.dicom_net"]
        assert said == [aborted_line(title, destination.port, 1).split(": ", 1)[1]] * 2, said
        assert set(destination.received) == {7}
        destination.maximum = 0
        assert remote.echo(core, title) == 0
    finally:
        core.close()
        destination.close()


def test_a_peer_accepting_without_a_maximum_length_sub_item_is_sent_to_as_without_a_limit(
        server: PacsServer, caplog: pytest.LogCaptureFixture) -> None:
    """PS3.8 D.1 makes the sub-item mandatory, and the listener reads a
    request without one as 0 (no limit). Our requests read its absence from
    an A-ASSOCIATE-AC as None: `pacs remote echo` (and routing, commitment
    reports) failed with "unsupported operand type(s) for -: 'NoneType' and
    'int'". Said once at INFO."""
    from pacs import remote

    destination = Destination("store", None)
    title = f"NOMAX{destination.port}"
    server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(destination.port))
    core = server.core()
    try:
        with caplog.at_level(logging.INFO, logger="pacs.dicom_net"):
            assert [remote.echo(core, title) for _ in range(2)] == [0, 0]
        assert [r.getMessage() for r in caplog.records if r.name == "pacs.dicom_net"] == [
            f"{title} at 127.0.0.1:{destination.port} accepted our association without a Maximum Length sub-item: "
            "no limit, as for 0 (PS3.8 D.1)"]
    finally:
        core.close()
        destination.close()


# -- 7. why an association we requested was not had: said once, with the reason -----------------
PYNETDICOM_REQUEST_LINES = ("TCP Initialisation Error", "unable to connect to remote", "Association Rejected",
                            "Unable to associate with destination AE", "Reason: ", "Result: ")


@contextlib.contextmanager
def refusing_peer() -> Iterator[int]:
    """DCMTK's storescp refusing every association (A-ASSOCIATE-RJ, no reason given)."""
    port = free_port()
    peer = subprocess.Popen([dcmtk("storescp"), "--refuse", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        peer.kill()
        peer.wait()


def test_a_move_destination_that_is_down_is_said_once_with_the_connection_error(server: PacsServer) -> None:
    """pynetdicom wrote three ERROR lines ("Association request failed:
    unable to connect to remote", "TCP Initialisation Error: [Errno 111]
    Connection refused", "Move SCP: Unable to associate with destination
    AE") beside our WARNING, which said "DOWN unreachable at ..." without
    why. Now one WARNING, with the connection's error."""
    port = free_port()
    title, patient = f"DOWN{port}", f"DOWNPAT{port}"
    server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(port))
    store_ct(server, patient)
    start = server.log_path.stat().st_size
    final = c_move(server, title, patient)
    assert final.Status == 0xA702, final
    cause = f"{title} unreachable at 127.0.0.1:{port} (could not connect: [Errno 111] Connection refused)"
    assert str(final.ErrorComment) == cause[:64]
    assert wait_until(lambda: cause in server.log_text(start), timeout=5, interval=0.05), server.log_text(start)
    text = server.log_text(start)
    assert not [line for line in text.splitlines() if "pynetdicom" in line], text
    assert_serving(server)


def test_routing_to_a_destination_that_rejects_us_keeps_the_reason_and_logs_it_once(server: PacsServer) -> None:
    """Each try of a routing job wrote pynetdicom's three ERROR lines of the
    A-ASSOCIATE-RJ and our WARNING "association with DEST at ... failed":
    the reason was only in pynetdicom's lines. Now the job's error and our
    one line carry it."""
    with refusing_peer() as port:
        title, rule, patient = f"RJ{port}", f"reject-{port}", f"RJPAT{port}"
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(port))
        start = server.log_path.stat().st_size
        try:
            job = first_routing_try(server, rule, title, patient)
            reason = (f"association with {title} at 127.0.0.1:{port} failed: rejected the association: No reason "
                      "given (Rejected Permanent, Source: Service User)")
            assert job["last_error"] == reason, job
            assert wait_until(lambda: reason in server.log_text(start), timeout=5, interval=0.05)
        finally:
            server.cli("route", "remove", rule, "--force", check=False)
    text = server.log_text(start)
    assert not [line for line in text.splitlines() if any(s in line for s in PYNETDICOM_REQUEST_LINES)], text


def test_every_rejection_keeps_its_reason_when_the_peer_closes_at_once() -> None:
    """storescp sends its A-ASSOCIATE-RJ and closes the connection: pynetdicom's
    DUL took both, and the requesting thread, finding the socket closed,
    aborted without reading the rejection (about one request in ten, more
    under load): the association came back aborted with no reason, and a
    routing job's error said only "failed" (CI failed the test above once)."""
    said: list[tuple[bool, str | None]] = []

    def requests(port: int) -> None:
        for _ in range(50):
            ae = AE(ae_title="RJTEST")
            ae.add_requested_context(Verification)
            assoc = dicom_net.request(ae.associate, "127.0.0.1", port, ae_title="RJ")
            said.append((assoc.is_rejected, dicom_net.failure(assoc)))

    with refusing_peer() as port:
        threads = [threading.Thread(target=requests, args=(port,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    reason = "rejected the association: No reason given (Rejected Permanent, Source: Service User)"
    assert len(said) == 150 and set(said) == {(True, reason)}, collections.Counter(said)


def test_remote_echo_to_a_peer_that_is_down_says_why(server: PacsServer) -> None:
    port = free_port()
    title = f"NOBODY{port}"
    server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(port))
    answer = server.cli("remote", "echo", title, check=False)
    assert answer.returncode != 0
    said = answer.stdout + answer.stderr
    assert (f"association with {title} at 127.0.0.1:{port} failed: could not connect: [Errno 111] Connection "
            "refused") in said, said
    assert "TCP Initialisation Error" not in said, said


# -- 8. a P-DATA whose command set an action cannot take: one line, not three ----------------------
def test_a_command_set_without_a_command_field_is_aborted_and_said_once(server: PacsServer) -> None:
    """pynetdicom raised in its DT-2 action ("'Dataset' object has no
    attribute 'CommandField'") and wrote "State Machine received an
    exception attempting to perform the action 'DT-2' while in state
    'Sta6'" at ERROR, then the exception (rewritten to "malformed PDU from
    peer"), and ours said "invalid PDU from ... aborting": three lines for
    one PDU (a fuzz run's log). Now ours alone, naming the action."""
    start = server.log_path.stat().st_size
    raw = Raw(server.dicom_port, STORE_CONTEXTS)
    raw.sock.sendall(pdata([(1, 3, command([_element(0x0002, VERIFICATION), _element(0x0110, 7)]))]))
    assert read_response(raw.sock) == "A-ABORT"
    said = "(DT-2 in Sta6: AttributeError: 'Dataset' object has no attribute 'CommandField'); aborting the association"
    assert wait_until(lambda: said in server.log_text(start), timeout=5, interval=0.05), server.log_text(start)
    lines = [line for line in server.log_text(start).splitlines() if "pynetdicom" in line or "dicom_net" in line]
    assert lines == [f"{lines[0][:23]} WARNING pacs.dicom_net: invalid PDU from 127.0.0.1 {said}"], lines
    assert_serving(server)


def test_an_unknown_pdu_type_is_said_with_the_peer_and_rate_limited(server: PacsServer) -> None:
    """pynetdicom wrote "Unknown PDU type received '0x31'" at ERROR, naming
    no peer, once per connection (a fuzz run's log held 7,852 of them). Now
    a WARNING with the peer, at most 5 a minute per address, and the A-ABORT
    at once; a PDU cut short by the peer's close is the INFO line of a
    dropped link."""
    start = server.log_path.stat().st_size
    for _ in range(7):
        raw = Raw(server.dicom_port, STORE_CONTEXTS, source="127.0.0.31")
        raw.sock.sendall(b"\x31\x00\x00\x00\x00\x02ab")
        assert read_response(raw.sock) == "A-ABORT"
        raw.sock.close()
    # Sent with the connection, before any request: pynetdicom read its
    # header, then blocked reading its body as the next header until the
    # network timeout (3 s here; 30 s, or the first-request wait, in service).
    # The answer now comes before that.
    with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=2.5,
                                  source_address=("127.0.0.33", 0)) as sock:
        sock.sendall(b"\x31\x00\x00\x00\x00\x02ab")
        assert read_pdu(sock)[0] == 7
    with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10,
                                  source_address=("127.0.0.32", 0)) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x00\x64" + b"\0" * 10)
    unknown = ("WARNING dicom_scp.associate_rq: malformed PDU from 127.0.0.31 (calling RAWSCU): unknown PDU type "
               "0x31; association aborted")
    short = "INFO pynetdicom.dul: connection from 127.0.0.32 (calling ?) lost in the middle of a PDU: 16 of 106 " \
            "bytes received"
    assert wait_until(lambda: short in server.log_text(start), timeout=10, interval=0.05), server.log_text(start)
    text = server.log_text(start)
    assert text.count(unknown) == 5, text
    assert "malformed PDU from 127.0.0.33 (calling ?): unknown PDU type 0x31; association aborted" in text, text
    assert "ERROR pynetdicom" not in text and "no complete A-ASSOCIATE-RQ" not in text, text
    assert_serving(server)


def test_the_abort_after_a_failed_action_keeps_pynetdicom_s_lines_when_it_fails_too(
        caplog: pytest.LogCaptureFixture) -> None:
    """abort_on_action_error answers a failed action with event 19 and
    drops pynetdicom's lines of the failed action; those of event 19
    failing in turn (no transition in Sta4) are pynetdicom's to say: the
    exception ends the DUL thread, and its ERROR lines were dropped too."""
    from pynetdicom.association import Association
    from pynetdicom.fsm import InvalidEventError
    from pynetdicom.transport import AddressInformation

    from pacs.dicom_net import abort_on_action_error

    assoc = Association(AE(), mode="requestor")
    assoc.acceptor.address_info = AddressInformation("127.0.0.1", 104)
    abort_on_action_error(assoc)
    fsm = assoc.dul.state_machine
    fsm.current_state = "Sta4"  # awaiting the transport connection
    raised: list[BaseException] = []

    def dul_thread() -> None:
        try:
            fsm.do_action("Evt2")  # AE-2 without its T-CONNECT primitive: raises
        except Exception as exc:  # noqa: BLE001 - as the DUL thread would die of it
            raised.append(exc)

    thread = threading.Thread(target=dul_thread)
    thread.assoc = assoc  # type: ignore[attr-defined]  # what a DUL thread carries (pacs.dicom_net.thread_association)
    with caplog.at_level(logging.INFO):
        thread.start()
        thread.join(5)
    assert raised and isinstance(raised[0], InvalidEventError), raised
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("pynetdicom")]
    assert ("pynetdicom.fsm", "ERROR", "Invalid event 'Evt19' for the current state 'Sta4'") in said, said
    # The failed action itself is said once, ours.
    assert not [m for _, _, m in said if "'AE-2'" in m], said
    assert [r for r in caplog.records if r.name == "pacs.dicom_net" and "AE-2 in Sta4" in r.getMessage()]


# -- 9. a response pynetdicom's reactor takes while a send_* waits for it ----------------------------
def test_a_response_the_reactor_takes_while_the_sender_waits_goes_back_to_the_sender(
        server: PacsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's send_* pauses the reactor by a flag the reactor sets just
    before its checkpoint and clears after it: a reactor on its way past the
    checkpoint takes the response, logs "Received unexpected C-ECHO service
    message", and the sender waits the DIMSE timeout (CI's fuzz test lost a
    C-STORE response so). Forced here: the response, once it arrived, is
    handed to the reactor's serving function before the sender reads it."""
    from pynetdicom.association import Association

    from pacs.dicom_net import request

    from .conftest import PYNETDICOM_SERVE_REQUEST

    # pynetdicom's own serving, not the tests' hand-back (conftest): the product's is tested.
    monkeypatch.setattr(Association, "_serve_request", PYNETDICOM_SERVE_REQUEST)
    ae = AE(ae_title="RACESCU")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 3
    assoc = request(ae.associate, "127.0.0.1", server.dicom_port, ae_title="FILMLESS")
    assert assoc.is_established
    try:
        dimse = assoc.dimse
        send = dimse.send_msg

        def send_then_lose_the_race(primitive: Any, context_id: int) -> None:
            send(primitive, context_id)
            assert wait_until(lambda: dimse.msg_queue.qsize() > 0, timeout=10, interval=0.01)
            taken = dimse.get_msg(block=False)  # what the reactor's loop does
            assoc._serve_request(taken[1], taken[0])

        dimse.send_msg = send_then_lose_the_race
        status = assoc.send_c_echo()
        assert "Status" in status and status.Status == 0x0000, status
    finally:
        assoc.release()
