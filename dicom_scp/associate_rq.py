"""The A-ASSOCIATE-RQ as this acceptor reads it, and what a refusal says.

Read as DCMTK (and so Orthanc) reads it: a modality that works with them
must work here. Before pynetdicom decodes a request, :func:`tolerate_quirks`
rewrites what pynetdicom would answer with a bare A-ABORT although the
standard, or every common archive, accepts it:

- items and user-information sub-items of unknown types are skipped
  (PS3.8 9.3.1: "shall be ignored"; Annex D.2 Note 2: acceptors "are
  required to ignore such unrecognized ... Sub-Items and not reject an
  Association because of their presence");
- a protocol version with bit 0 set is version 1 (PS3.8 9.3.2: a receiver
  "shall only test that bit 0 is set");
- an AE title padded with NULs reads up to its first NUL, as a space-padded
  one (DCMTK copies the field as a C string; pynetdicom issue #746);
- the Implementation Version Name is informational: one longer than 16
  characters, or with characters an AE value may not hold, is cut and
  cleaned (dcmjs-dimse #61: "observed in the wild"); an Implementation Class
  UID longer than 64 characters, or a Maximum Length sub-item not 4 bytes
  long, is left out;
- no Maximum Length sub-item (or no User Information item) means no limit,
  as a value of 0 does (PS3.8 D.1; DCMTK takes it as 0): pynetdicom
  accepted such an association and crashed on its first response.

A request that still cannot be read is aborted as before (PS3.8 9.2, event
19), and so is one with a Maximum Length (1-6) no P-DATA-TF can keep to; an
application context other than DICOM's is refused with A-ASSOCIATE-RJ 1/1/2
(PS3.8 9.3.4). Every refusal and abort of a request
gives one WARNING naming the peer's address, calling and called AE title,
the reason and the A-ASSOCIATE-RJ code, and an audit event with the same
reason (:class:`AssociationGate`). Log lines about one peer address are
limited per kind (:class:`PeerLines`): a peer cannot fill the disk through
the log, and a misconfigured modality retrying every few seconds is said
five times a minute, with the count of lines left out; a quirk tolerated is
said at INFO once an hour per address.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt

from pacs.app import Pacs
from pacs.audit import Event
from pacs.dicom_net import SMALLEST_MAXIMUM_LENGTH
from pacs.logtext import association_peer, peer_text

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_ITEM = struct.Struct(">BBH")
_HEADER = struct.Struct(">BBI")
# Items of an A-ASSOCIATE-RQ (PS3.8 9.3.2): application context, presentation
# context, user information; of a presentation context: abstract and
# transfer syntax; of user information: those PS3.7 Annex D defines for a
# request (0x59 is the acceptor's User Identity response).
_REQUEST_ITEMS = {0x10, 0x20, 0x50}
_CONTEXT_SUB_ITEMS = {0x30, 0x40}
_USER_SUB_ITEMS = {0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58}
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}

# Set while pynetdicom decodes a peer's A-ASSOCIATE-RQ in this thread: its
# validators log each bad value at ERROR before raising, which we say once
# ourselves (dicom_scp.server's _PeerPduErrors drops those records).
_decoding = threading.local()


def decoding_peer_request() -> bool:
    """True while this thread decodes a peer's A-ASSOCIATE-RQ."""
    return getattr(_decoding, "active", False)


# -- quirks, at the byte level -------------------------------------------------------
def _items(data: bytes) -> list[tuple[int, bytes]] | None:
    """(type, value) of each item of *data* (type, reserved, 2-byte length);
    None when the lengths do not add up (pynetdicom then says what is wrong)."""
    items = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            return None
        kind, _, length = _ITEM.unpack_from(data, pos)
        value = data[pos + 4:pos + 4 + length]
        if len(value) != length:
            return None
        items.append((kind, value))
        pos += 4 + length
    return items


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def _title_field(field: bytes) -> bytes:
    """A 16-byte AE title field up to its first NUL, padded with spaces."""
    return field.split(b"\0", 1)[0].ljust(16, b" ")


def _version_name(value: bytes) -> bytes:
    """An Implementation Version Name as an AE value may hold it: up to a
    NUL, 16 printable ASCII characters, no backslash."""
    text = value.split(b"\0", 1)[0].decode("latin-1").strip()
    return "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)[:16].strip().encode("ascii")


def _context(value: bytes, notes: list[str]) -> bytes:
    sub = _items(value[4:]) if len(value) >= 4 else None
    if sub is None:
        return value
    kept = []
    for kind, data in sub:
        if kind in _CONTEXT_SUB_ITEMS:
            kept.append(_item(kind, data))
        else:
            notes.append(f"presentation context sub-item of unknown type 0x{kind:02X} ignored (PS3.8 9.3.1)")
    return value[:4] + b"".join(kept)


def _user_information(value: bytes, notes: list[str]) -> bytes:
    sub = _items(value)
    if sub is None:
        return value
    kept = []
    has_maximum = False
    for kind, data in sub:
        if kind not in _USER_SUB_ITEMS:
            notes.append(f"user information sub-item of unknown type 0x{kind:02X} ignored (PS3.8 D.2)")
            continue
        if kind == 0x51:
            if len(data) != 4:
                notes.append(f"Maximum Length sub-item of {len(data)} bytes ignored")
                continue
            has_maximum = True
        elif kind == 0x52 and len(uid := data.rstrip(b"\0 ")) > 64:
            notes.append(f"Implementation Class UID of {len(uid)} characters ignored")
            continue
        elif kind == 0x55:
            name = _version_name(data)
            if name != data.rstrip(b"\0 ").strip():
                notes.append(f"Implementation Version Name {peer_text(data, 32)} read as {name.decode()!r}")
            if not name:
                continue
            data = name
        kept.append(_item(kind, data))
    if not has_maximum:
        notes.append("no Maximum Length sub-item: no limit, as for 0 (PS3.8 D.1)")
        kept.insert(0, _item(0x51, bytes(4)))
    return b"".join(kept)


def tolerate_quirks(pdu: bytes) -> tuple[bytes, list[str]]:
    """*pdu* (an A-ASSOCIATE-RQ, header included) as pynetdicom can read it
    when DCMTK can (see the module), and what was changed, for the log. A
    PDU that is not an A-ASSOCIATE-RQ, or whose items do not add up, is
    returned as it is (pynetdicom then refuses it)."""
    if len(pdu) < 74 or pdu[0] != 0x01:
        return pdu, []
    notes: list[str] = []
    head = bytearray(pdu[:74])
    version = int.from_bytes(head[6:8], "big")
    if version != 1 and version & 1:
        head[6:8] = b"\x00\x01"
        notes.append(f"protocol version 0x{version:04X} taken as 1 (PS3.8 9.3.2: only bit 0 is tested)")
    for offset, which in ((10, "called"), (26, "calling")):
        field = bytes(head[offset:offset + 16])
        if b"\0" in field:
            head[offset:offset + 16] = _title_field(field)
            notes.append(f"{which} AE title padded with NUL bytes")
    items = _items(pdu[74:])
    if items is None:
        return bytes(head) + pdu[74:], notes
    body = []
    has_user_information = False
    for kind, value in items:
        if kind not in _REQUEST_ITEMS:
            notes.append(f"item of unknown type 0x{kind:02X} ignored (PS3.8 9.3.1)")
            continue
        if kind == 0x20:
            value = _context(value, notes)
        elif kind == 0x50:
            value = _user_information(value, notes)
            has_user_information = True
        if len(value) > 0xFFFF:
            return pdu, []  # cannot be written back; pynetdicom's reading stands
        body.append(_item(kind, value))
    if not has_user_information:
        notes.append("no User Information item: no Maximum Length limit, as for 0 (PS3.8 D.1)")
        body.append(_item(0x50, _item(0x51, bytes(4))))
    payload = bytes(head[6:]) + b"".join(body)
    return _HEADER.pack(0x01, head[1], len(payload)) + payload, notes


def raw_titles(pdu: bytes) -> tuple[str, str]:
    """(called, calling) AE title of an A-ASSOCIATE-RQ that pynetdicom could
    not decode, for the log: escaped, as the fields hold them."""
    def field(offset: int) -> str:
        return peer_text(pdu[offset:offset + 16].split(b"\0", 1)[0].strip(b" "), 16) or "(blank)"

    if len(pdu) < 42:
        return "?", "?"
    return field(10), field(26)


# -- saying it --------------------------------------------------------------------------
class PeerLines:
    """At most *burst* log lines of one kind about one peer address per
    *period* seconds; the first line of a later period says how many were
    left out. The counts are forgotten past 10,000 addresses."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        self.burst, self.period = burst, period
        self._lock = threading.Lock()
        # (address, kind) -> [period start, lines said, lines left out]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def allow(self, address: str, kind: str) -> tuple[bool, int]:
        """(say it, lines left out in the period before)."""
        now = time.monotonic()
        key = (address, kind)
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.period:
                if len(self._seen) > 10_000:
                    self._seen.clear()
                self._seen[key] = [now, 1, 0]
                return True, int(entry[2]) if entry is not None else 0
            if entry[1] < self.burst:
                entry[1] += 1
                return True, 0
            entry[2] += 1
            return False, 0

    def say(self, address: str, kind: str, message: str, level: int = logging.WARNING) -> None:
        """Log *message* (already escaped) unless this kind of line about
        *address* was said often enough in this period."""
        allowed, left_out = self.allow(address, kind)
        if not allowed:
            return
        if left_out:
            message += f" ({left_out} more such lines about {address} left out since the last one)"
        log.log(level, "%s", message)


def _rj(code: tuple[int, int, int] | None) -> str:
    return "A-ASSOCIATE-RJ %d/%d/%d" % code if code else "A-ASSOCIATE-RJ"


class AssociationGate:
    """The listener's reading of A-ASSOCIATE-RQs, and its word on each one
    it refuses: one WARNING (rate-limited per peer address) and one audit
    event, both with the exact reason.

    Bound as EVT_CONN_OPEN (:meth:`opened`: the lenient reading, and a line
    for a PDU pynetdicom cannot decode), EVT_REQUESTED (:meth:`requested`:
    the application context, a context without a transfer syntax) and
    EVT_REJECTED (:meth:`rejected`: every A-ASSOCIATE-RJ, whoever sent it).
    *worker*: this is one of several DICOM worker processes, which hold a
    share of ``max_associations`` each.
    """

    def __init__(self, pacs: Pacs, *, worker: bool = False) -> None:
        self._pacs = pacs
        self._worker = worker
        self.lines = PeerLines()
        # A modality's quirk is the same on every association: said once an
        # hour per address is enough to know it.
        self.quirk_lines = PeerLines(burst=1, period=3600.0)

    # -- EVT_CONN_OPEN ------------------------------------------------------------
    def opened(self, event: Any) -> None:
        assoc = event.assoc
        if assoc.is_acceptor:
            dul = assoc.dul
            dul._decode_pdu = self._screened(assoc, dul._decode_pdu)
            dul._read_pdu_data = self._typed(assoc, dul._read_pdu_data)

    def _typed(self, assoc: Any, read: Callable[[], None]) -> Callable[[], None]:
        """pynetdicom's PDU reader, a PDU of a type no PDU has aside.

        pynetdicom read such a PDU's 6-byte header only ("Unknown PDU type
        received", at ERROR, naming no peer) and left its body: its next read
        took the body for the next header and blocked for the rest. When the
        garbage came with the connection (the A-ABORT is sent a turn later),
        the connection hung without an answer until the first-request wait
        closed it (10 s, a slot held). Now what is there is read at once, the
        peer is said (rate-limited) and the A-ABORT follows (event 19)."""
        dul = assoc.dul

        def typed() -> None:
            sock = getattr(dul.socket, "socket", None)
            # Called when the socket is readable: neither read waits (a socket
            # with a timeout polls before its recv, whatever the flags say).
            try:
                first = sock.recv(1, socket.MSG_PEEK) if sock is not None else b""
            except (OSError, ValueError):  # ValueError: TLS takes no flags (its records hide the type anyway)
                first = b""
            if not first or first[0] in _PDU_NAMES:
                return read()
            try:
                sock.recv(65536)  # what came with it; more is read as it comes (Sta13)
            except OSError:
                pass  # the peer left: the abort follows either way
            self._say_malformed(assoc, "PDU", f"unknown PDU type 0x{first[0]:02X}")
            dul.event_queue.put("Evt19")

        return typed

    def _screened(self, assoc: Any, decode: Callable[[bytearray], Any]) -> Callable[[bytearray], Any]:
        def screened(bytestream: bytearray) -> Any:
            if bytestream[:1] != b"\x01":
                try:
                    return decode(bytestream)
                except Exception as exc:
                    self._malformed(assoc, bytes(bytestream[:1]), exc)
                    raise
            data, notes = tolerate_quirks(bytes(bytestream))
            _decoding.active = True
            try:
                pdu, fsm_event = decode(bytearray(data))
                # pynetdicom reads some fields only when the state machine
                # makes the primitive (AE-6): a bad one then killed the
                # association's thread. Read them here, where a failure is
                # an invalid PDU (event 19, A-ABORT).
                pdu.to_primitive()
            except Exception as exc:
                self._malformed_request(assoc, data, exc)
                raise
            finally:
                _decoding.active = False
            if not pdu.protocol_version & 1:
                self._unsupported_version(assoc, pdu)
            elif notes:
                self._tolerated(assoc, pdu, notes)
            return pdu, fsm_event

        return screened

    def _malformed(self, assoc: Any, pdu_type: bytes, exc: Exception) -> None:
        """A PDU after the request that pynetdicom cannot decode (A-ABORT)."""
        name = _PDU_NAMES.get(pdu_type[0], "PDU") if pdu_type else "PDU"
        self._say_malformed(assoc, name, _exception_reason(exc))
        exc._pacs_said = True  # type: ignore[attr-defined]

    def _say_malformed(self, assoc: Any, name: str, reason: str) -> None:
        self.lines.say(_address(assoc), "malformed-pdu",
                       f"malformed {name} from {association_peer(assoc)}: {reason}; association aborted")

    def _malformed_request(self, assoc: Any, data: bytes, exc: Exception) -> None:
        address = _address(assoc)
        called, calling = raw_titles(data)
        self._say_abort(address, calling, called, f"A-ASSOCIATE-RQ not understood: {_exception_reason(exc)}")
        exc._pacs_said = True  # type: ignore[attr-defined]

    def _say_abort(self, address: str, calling: str, called: str, reason: str) -> None:
        self.lines.say(address, "malformed-rq",
                       f"association from {address} (calling {calling}, called {called}) refused: {reason}; "
                       "A-ABORT sent")
        self._audit(address, calling, f"{reason} (A-ABORT)")

    def _unsupported_version(self, assoc: Any, pdu: Any) -> None:
        """pynetdicom's state machine answers A-ASSOCIATE-RJ 1/2/2 (AE-6)."""
        address = _address(assoc)
        reason = f"protocol version 0x{pdu.protocol_version:04X} not supported (bit 0 not set)"
        self._say_refusal(address, peer_text(pdu.calling_ae_title.strip(), 16),
                          peer_text(pdu.called_ae_title.strip(), 16), reason, (1, 2, 2))

    def _tolerated(self, assoc: Any, pdu: Any, notes: list[str]) -> None:
        address = _address(assoc)
        self.quirk_lines.say(address, "tolerated",
                       f"A-ASSOCIATE-RQ from {address} (calling {peer_text(pdu.calling_ae_title.strip(), 16)}, "
                       f"called {peer_text(pdu.called_ae_title.strip(), 16)}) read as DCMTK reads it: "
                       + "; ".join(notes), level=logging.INFO)

    # -- EVT_REQUESTED ------------------------------------------------------------
    def requested(self, event: Any) -> None:
        """Refuse an application context other than DICOM's (A-ASSOCIATE-RJ
        1/1/2, PS3.8 9.3.4, as DCMTK), and abort a request proposing a
        presentation context without a transfer syntax (PS3.8 9.3.2.2 requires
        one; pynetdicom's negotiation died on it and left the peer unanswered)
        or a Maximum Length of 1-6 (our first response died on it)."""
        assoc = event.assoc
        if assoc.is_aborted or assoc.is_rejected:
            return
        rq = assoc.requestor.primitive
        name = str(rq.application_context_name or "").strip("\0 ")
        if name != APPLICATION_CONTEXT:
            assoc._pacs_refusal = (f"application context {peer_text(name) or '(none)'} is not DICOM's "
                                   f"({APPLICATION_CONTEXT})")
            assoc.acse.send_reject(0x01, 0x01, 0x02)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        if any(not cx.transfer_syntax for cx in rq.presentation_context_definition_list or []):
            self._abort_request(assoc, rq, "a presentation context proposes no transfer syntax (PS3.8 9.3.2.2)")
            return
        maximum = assoc.requestor.maximum_length
        if maximum is not None and 0 < maximum < SMALLEST_MAXIMUM_LENGTH:
            # No P-DATA-TF could carry a byte of our answers: pynetdicom
            # raised at the first response (a traceback per request), DCMTK
            # accepts and aborts there ("receiver's max PDU size ... is
            # illegal"), after having taken a C-STORE it cannot acknowledge.
            self._abort_request(assoc, rq, f"Maximum Length {maximum} cannot carry a PDV (at least "
                                           f"{SMALLEST_MAXIMUM_LENGTH}, or 0 for no limit: PS3.8 9.3.5, D.1)")

    def _abort_request(self, assoc: Any, rq: Any, reason: str) -> None:
        """Refuse a request whose values we read but cannot work with: one
        line, one audit event, an A-ABORT (PS3.8 9.2: invalid PDU parameter)."""
        self._say_abort(str(assoc.requestor.address), *_titles(rq), reason)
        assoc.acse.send_abort(0x02)
        # Wait for the A-ABORT to go out (and the peer to close, or
        # ARTIM), as pynetdicom does after a rejection; the caller closes.
        assoc.kill()

    # -- EVT_REJECTED -------------------------------------------------------------
    def rejected(self, event: Any) -> None:
        """Say and audit an A-ASSOCIATE-RJ: pynetdicom's (called AE title,
        allowlist, max_associations) and ours (a refusal reason set on the
        association as ``_pacs_refusal``)."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling, called = _titles(rq)
        sent = assoc.acceptor.primitive  # acse.send_reject keeps the A-ASSOCIATE-RJ there
        code = (sent.result, sent.result_source, sent.diagnostic) if sent is not None and sent.result else None
        reason = getattr(assoc, "_pacs_refusal", "") or self._reason(assoc, rq, code)
        address = str(assoc.requestor.address)
        if getattr(assoc, "_pacs_over_host_limit", None) is not None:
            # Said when the connection came (ConnectionGuard, once a minute
            # per address): a host over its share opens many.
            self._audit(address, calling, f"{reason} ({_rj(code)})")
            return
        self._say_refusal(address, calling, called, reason, code)

    def _reason(self, assoc: Any, rq: Any, code: tuple[int, int, int] | None) -> str:
        """Why pynetdicom's negotiation refused, in words."""
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        ours = str(assoc.acceptor.ae_title).strip()
        if code == (1, 1, 7):
            hint = " (AE titles are case-sensitive)" if called.upper() == ours.upper() else ""
            return f"called AE title {peer_text(called, 16)} is not {ours}{hint}"
        if code == (1, 1, 3):
            remote = self._pacs.aes.cached().get(calling)
            if remote is not None and not remote.enabled:
                return f"calling AE title {peer_text(calling, 16)} is disabled in the registry (ae_allowlist)"
            same = [t for t in self._pacs.aes.cached() if t.upper() == calling.upper()]
            hint = f"; {same[0]} is (AE titles are case-sensitive)" if same else ""
            return f"calling AE title {peer_text(calling, 16)} is not in the registry (ae_allowlist){hint}"
        if code == (2, 3, 2):
            limit = assoc.ae.maximum_associations
            others = sum(1 for a in assoc.ae.active_associations if a.is_acceptor and a is not assoc)
            share = " (this DICOM worker's share of max_associations)" if self._worker else ""
            return f"{others} associations open, max_associations is {limit}{share}"
        if code == (2, 2, 1):
            return "user identity not accepted"
        return "refused"

    def _say_refusal(self, address: str, calling: str, called: str, reason: str,
                     code: tuple[int, int, int] | None) -> None:
        self.lines.say(address, f"refused {code}",
                       f"association from {address} (calling {calling}, called {called}) refused: {reason} "
                       f"({_rj(code)})")
        self._audit(address, calling, f"{reason} ({_rj(code)})")

    def _audit(self, address: str, calling: str, detail: str) -> None:
        """An association attempt refused: an access attempt the audit trail
        must show (IHE ATNA), with the title and address it came from."""
        self._pacs.audit.record(Event(action="associate", user=calling[:64], role="dicom", client=address,
                                      protocol="dicom", outcome="denied", detail=detail[:500]))


def _address(assoc: Any) -> str:
    """The requestor's address of an association this node accepted."""
    return str(getattr(assoc.requestor, "address", "?"))


def _titles(rq: Any) -> tuple[str, str]:
    """(calling, called) AE title of a decoded request, for a log line."""
    return (peer_text(str(rq.calling_ae_title or "").strip(), 16) or "?",
            peer_text(str(rq.called_ae_title or "").strip(), 16) or "?")


def _exception_reason(exc: Exception) -> str:
    """An exception raised reading a peer's PDU, for a log line."""
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, KeyError):
        text = f"unknown item type {exc}"
    return peer_text(text, 200)
