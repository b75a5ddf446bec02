"""DIMSE messages written to the socket by the thread that sends them.

pynetdicom queues every P-DATA PDU for its DUL thread, which runs each through
the state machine and sends it: a thread hand-off (and a wake-up) per PDU.
For a C-FIND with a hundred matches or a C-STORE response per received
object, that hand-off is a large share of the work. While the association is
established (state Sta6, where P-DATA needs no state change), the sending
thread encodes the PDUs and writes them itself; in any other state the
message takes pynetdicom's path so the state machine sees it.

Only one thread sends DIMSE messages on an association (its handler thread);
the DUL thread sends ACSE PDUs, which come only after (release) or instead
of (abort) further DIMSE traffic.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE

_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

# Bytes gathered per socket write.
WRITE_BYTES = 256 * 1024
_HEADER = struct.Struct(">BBIIB")


def p_data_pdu(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV (PS3.8 9.3.5); *pdv* starts with its
    message control header byte."""
    return _HEADER.pack(0x04, 0, len(pdv) + 5, len(pdv) + 1, context_id) + pdv


def message_pdus(context_id: int, command: bytes, dataset: bytes | None, max_pdu: int) -> Iterator[bytes]:
    """The P-DATA-TF PDUs of one DIMSE message, fragmented for the peer's
    maximum PDU length (0: unlimited) as pynetdicom fragments them."""
    fragment = max_pdu - 6 if max_pdu else max(len(command), len(dataset or b""), 1)
    if len(command) <= fragment and (dataset is None or len(dataset) <= fragment):
        # The usual case (a C-FIND match, a C-STORE-RSP): one PDU each.
        yield p_data_pdu(context_id, b"\x03" + command)
        if dataset:
            yield p_data_pdu(context_id, b"\x02" + dataset)
        return
    for payload, more, last in ((command, b"\x01", b"\x03"), (dataset, b"\x00", b"\x02")):
        if payload is None:
            continue
        for start in range(0, len(payload), fragment):
            chunk = payload[start:start + fragment]
            yield p_data_pdu(context_id, (last if start + fragment >= len(payload) else more) + chunk)


def write_pdus(assoc: Any, pdus: Iterable[bytes]) -> None:
    """Write PDUs to the association's socket, a few hundred KB per write."""
    batch: list[bytes] = []
    size = 0
    for pdu in pdus:
        batch.append(pdu)
        size += len(pdu)
        if size >= WRITE_BYTES:
            assoc.dul.socket.send(b"".join(batch))
            batch, size = [], 0
    if batch:
        assoc.dul.socket.send(b"".join(batch))


def dimse_message(assoc: Any, primitive: Any, context_id: int) -> Any:
    """The DIMSE message of *primitive*, announced as sent (as pynetdicom does)."""
    if primitive.MessageIDBeingRespondedTo is None:
        message = _RQ_TO_MESSAGE[primitive.__class__]()
    else:
        message = _RSP_TO_MESSAGE[primitive.__class__]()
    message.primitive_to_message(primitive)
    message.context_id = context_id
    evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
    return message


def _value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return struct.pack("<H", value)
    text = (value.decode("ascii") if isinstance(value, bytes) else str(value)).strip() if vr == "AE" else str(value)
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def encode_command(elements: list[tuple[int, str, Any]]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian, PS3.7 E) from
    (element number, VR, value) in element order; None values are left out,
    as pynetdicom leaves out unset parameters."""
    body = b"".join(
        struct.pack("<HHI", 0, element, len(data)) + data
        for element, vr, value in elements
        if value is not None
        for data in (_value(vr, value),)
    )
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


# Command fields (PS3.7 E.1).
C_STORE_RQ, C_FIND_RQ = 0x0001, 0x0020
C_STORE_RSP, C_GET_RSP, C_FIND_RSP, C_MOVE_RSP = 0x8001, 0x8010, 0x8020, 0x8021
NO_DATASET, DATASET = 0x0101, 0x0001


def store_request_command(sop_class: str, sop_uid: str, message_id: int, priority: int,
                          originator_aet: str | None, originator_id: int | None) -> bytes:
    """The command set of a C-STORE-RQ with a dataset (PS3.7 9.3.1.1), as
    pynetdicom encodes it; one per C-MOVE/C-GET sub-operation."""
    return encode_command([
        (0x0002, "UI", sop_class), (0x0100, "US", C_STORE_RQ), (0x0110, "US", message_id),
        (0x0700, "US", priority), (0x0800, "US", DATASET), (0x1000, "UI", sop_uid),
        (0x1030, "AE", originator_aet or None), (0x1031, "US", originator_id),
    ])


def store_response_command(sop_class: str | None, sop_uid: str | None, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP without an Error Comment (PS3.7 9.3.1.2)."""
    return encode_command([
        (0x0002, "UI", sop_class), (0x0100, "US", C_STORE_RSP), (0x0120, "US", message_id),
        (0x0800, "US", NO_DATASET), (0x0900, "US", status), (0x1000, "UI", sop_uid),
    ])


def _plain_response(primitive: Any) -> bool:
    return (
        primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.ErrorComment is None
        and getattr(primitive, "OffendingElement", None) is None
        and not _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG)
    )


def response_command(primitive: Any) -> bytes | None:
    """The command set of a plain response -- a C-STORE-RSP, or a C-FIND,
    C-MOVE or C-GET response without an identifier -- encoded as pynetdicom encodes it;
    None for anything else, which takes pynetdicom's path.

    One is sent per received object and per C-MOVE/C-GET sub-operation:
    building it through pydicom (command Dataset, then encode) cost
    ~0.25 ms, this ~10 us. pynetdicom's EVT_DIMSE_SENT is not raised for it
    (nothing here listens to it); with pynetdicom's debug logging on, its
    own path runs so its log stays whole.
    """
    if isinstance(primitive, C_STORE) and _plain_response(primitive):
        return store_response_command(primitive.AffectedSOPClassUID or None, primitive.AffectedSOPInstanceUID or None,
                                      primitive.MessageIDBeingRespondedTo, primitive.Status)
    if isinstance(primitive, C_MOVE | C_GET) and primitive.Identifier is None and _plain_response(primitive):
        return encode_command([
            (0x0002, "UI", primitive.AffectedSOPClassUID or None),
            (0x0100, "US", C_MOVE_RSP if isinstance(primitive, C_MOVE) else C_GET_RSP),
            (0x0120, "US", primitive.MessageIDBeingRespondedTo), (0x0800, "US", NO_DATASET),
            (0x0900, "US", primitive.Status),
            (0x1020, "US", primitive.NumberOfRemainingSuboperations),
            (0x1021, "US", primitive.NumberOfCompletedSuboperations),
            (0x1022, "US", primitive.NumberOfFailedSuboperations),
            (0x1023, "US", primitive.NumberOfWarningSuboperations),
        ])
    if isinstance(primitive, C_FIND) and primitive.Identifier is None and _plain_response(primitive):
        # The final response of every C-FIND (a third of a one-match query's
        # time when pydicom encoded it).
        return encode_command([
            (0x0002, "UI", primitive.AffectedSOPClassUID or None), (0x0100, "US", C_FIND_RSP),
            (0x0120, "US", primitive.MessageIDBeingRespondedTo), (0x0800, "US", NO_DATASET),
            (0x0900, "US", primitive.Status),
        ])
    return None


def can_write_directly(assoc: Any) -> bool:
    """True while the association is established (Sta6)."""
    return bool(assoc.dul.state_machine.current_state == "Sta6" and assoc.dul.socket is not None)


def send_directly(assoc: Any) -> None:
    """Make *assoc*'s DIMSE provider write its messages itself (idempotent)."""
    dimse = assoc.dimse
    original: Callable[[Any, int], None] = dimse.send_msg
    if getattr(original, "direct", False):
        return

    def send_msg(primitive: Any, context_id: int) -> None:
        if not can_write_directly(assoc):
            original(primitive, context_id)
            return
        command = response_command(primitive)
        if command is not None:
            write_pdus(assoc, message_pdus(context_id, command, None, dimse.maximum_pdu_size))
            return
        message = dimse_message(assoc, primitive, context_id)
        write_pdus(
            assoc,
            (
                p_data_pdu(cx, pdv)
                for pdata in message.encode_msg(context_id, dimse.maximum_pdu_size)
                for cx, pdv in pdata.presentation_data_value_list
            ),
        )

    send_msg.direct = True  # type: ignore[attr-defined]
    dimse.send_msg = send_msg
