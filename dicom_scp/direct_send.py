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
from pynetdicom.dimse_primitives import C_STORE

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


def _command_element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, tag, len(value)) + value


def _uid_value(uid: str) -> bytes:
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def store_response_command(primitive: Any) -> bytes | None:
    """The command set of a plain C-STORE-RSP (no error comment or offending
    element), encoded as pynetdicom encodes it (Implicit VR Little Endian,
    PS3.7 9.3.1.2); None for any other primitive.

    One is sent per received object: building it through pydicom (command
    Dataset, then encode) cost ~0.25 ms, this ~10 us. pynetdicom's
    EVT_DIMSE_SENT is not raised for it (nothing here listens to it); with
    pynetdicom's debug logging on, its own path runs so its log stays whole.
    """
    if (
        not isinstance(primitive, C_STORE)
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG)
    ):
        return None
    body = b"".join([
        _command_element(0x0002, _uid_value(primitive.AffectedSOPClassUID)) if primitive.AffectedSOPClassUID else b"",
        _command_element(0x0100, struct.pack("<H", 0x8001)),
        _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _command_element(0x0800, struct.pack("<H", 0x0101)),  # no data set
        _command_element(0x0900, struct.pack("<H", primitive.Status)),
        _command_element(0x1000, _uid_value(primitive.AffectedSOPInstanceUID))
        if primitive.AffectedSOPInstanceUID else b"",
    ])
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


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
        command = store_response_command(primitive)
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
