"""C-FIND pending responses written by the handler, many per socket write.

pynetdicom turns each match yielded by a C-FIND handler into a Dataset
encode, a C-FIND-RSP primitive, a command set built and encoded with pydicom
and a socket write: ~0.7 ms per match here, most of a 100-match answer.
Every pending response of one request has the same command set, so it is
encoded once; each identifier is encoded from the index values
(:mod:`dicom_scp.identifier_bytes`) and the PDUs are gathered and written
from the handler's thread while the association is established. The final
response (success, cancel, failure) still goes through pynetdicom, after
everything written here.

pynetdicom's EVT_DIMSE_SENT is not raised for the responses written here
(nothing in the server listens to it).
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.uid import UID
from pynetdicom.dsutils import encode

from pacs.query.results import ResultShape

from .direct_send import C_FIND_RSP, DATASET, WRITE_BYTES, can_write_directly, encode_command, message_pdus
from .identifier_bytes import IdentifierEncoder, NotEncodable, can_encode

log = logging.getLogger(__name__)

PENDING = 0xFF00


class PendingResponses:
    """Encodes and writes the pending responses of one C-FIND request."""

    def __init__(self, event: Any, shape: ResultShape, syntax: UID, status: int = PENDING) -> None:
        self.assoc = event.assoc
        self.shape = shape
        self.syntax = syntax
        self.explicit = not syntax.is_implicit_VR
        self.encoder = IdentifierEncoder(shape, self.explicit)
        self.context_id = int(event.context.context_id)
        self.max_pdu = int(self.assoc.dimse.maximum_pdu_size or 0)
        self.command = _pending_command(event.request, status)
        self._buffer: list[bytes] = []
        self._size = 0

    @classmethod
    def open(cls, event: Any, shape: ResultShape, status: int = PENDING) -> PendingResponses | None:
        """A writer for *event*'s request, its matches sent with the pending
        *status* (FF00, or FF01 when optional keys were not supported), or
        None where pynetdicom's own path must send the matches (no direct
        sending, a syntax or VR we do not write ourselves)."""
        assoc = event.assoc
        if not getattr(assoc.dimse.send_msg, "direct", False) or not can_write_directly(assoc):
            return None
        syntax = UID(str(event.context.transfer_syntax))
        if not syntax.is_little_endian or syntax.is_deflated or not can_encode(shape):
            return None
        return cls(event, shape, syntax, status)

    def send(self, row: dict[str, Any]) -> bool:
        """Queue one match; False once the association can take no more."""
        try:
            identifier = self.encoder.encode(row)
        except NotEncodable:
            identifier = encode(self.shape.dataset(row, wire=True), self.syntax.is_implicit_VR, True, False)
        for pdu in message_pdus(self.context_id, self.command, identifier, self.max_pdu):
            self._buffer.append(pdu)
            self._size += len(pdu)
        if self._size >= WRITE_BYTES:
            return self.flush()
        return True

    def flush(self) -> bool:
        """Write what is queued; False when the association is gone."""
        if not self._buffer:
            return True
        data = b"".join(self._buffer)
        self._buffer, self._size = [], 0
        if not can_write_directly(self.assoc):
            return False
        try:
            self.assoc.dul.socket.send(data)
        except OSError as exc:
            log.info("C-FIND responses not delivered: %s", exc)
            return False
        return True


def _pending_command(request: Any, status: int = PENDING) -> bytes:
    """The command set of a pending C-FIND-RSP to *request* with *status*
    (FF00 or FF01), as pynetdicom encodes it (PS3.7 9.3.2.2)."""
    return encode_command([
        (0x0002, "UI", request.AffectedSOPClassUID), (0x0100, "US", C_FIND_RSP),
        (0x0120, "US", request.MessageID), (0x0800, "US", DATASET), (0x0900, "US", status),
    ])


__all__ = ["PendingResponses"]
