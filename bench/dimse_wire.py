"""A wire-level C-FIND SCU: how long the server takes to answer, not the client.

pynetdicom's SCU decodes every response identifier into a Dataset (~0.5 ms
per match on the test machine), so a 100-match answer timed through it is
mostly the client's own work. This client writes the A-ASSOCIATE-RQ and the
C-FIND-RQ PDUs itself and, while an answer arrives, only reads PDU and PDV
headers and each response's Status: the time from the request's last byte
to the final response is the server's (plus the loopback).

Implicit VR Little Endian, one presentation context, no extended negotiation
(PS3.8 9.3). For benchmarks only; the product's peers are DCMTK and
pynetdicom.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from dicom_scp.direct_send import C_FIND_RQ, encode_command

C_CANCEL_RQ = 0x0FFF
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7134.99.1"
MAX_PDU = 16384
PENDING = (0xFF00, 0xFF01)


class AssociationRefused(RuntimeError):
    """The peer rejected or aborted the association, or refused the context."""


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _pdu(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def find_command(sop_class: str, message_id: int) -> bytes:
    """A C-FIND-RQ command set (PS3.7 9.3.2.1), Implicit VR Little Endian."""
    return encode_command([
        (0x0002, "UI", sop_class), (0x0100, "US", C_FIND_RQ), (0x0110, "US", message_id),
        (0x0700, "US", 0), (0x0800, "US", 0x0000),  # a data set follows
    ])


def command_status(command: bytes) -> int | None:
    """The Status (0000,0900) of an Implicit VR Little Endian command set."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group == 0 and element == 0x0900:
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return None


class WireFindSCU:
    """One association, C-FIND requests timed from the wire."""

    def __init__(self, host: str, port: int, called: str, sop_class: str, calling: str = "BENCH",
                 receive_buffer: int | None = None) -> None:
        """*receive_buffer* caps the socket's receive buffer (set before
        connecting, so the TCP window stays that small): a server answering
        faster than this client reads then blocks on its writes."""
        self.sop_class = sop_class
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._message_id = 0
        self._buffer = bytearray()
        self._offset = 0
        context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, sop_class.encode()) + _item(0x40, IMPLICIT_LE.encode()))
        user = _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID.encode()))
        header = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
        self.sock.sendall(_pdu(0x01, header + _item(0x10, APPLICATION_CONTEXT.encode()) + context + user))
        kind, body = self._read_pdu()
        if kind != 0x02:
            raise AssociationRefused(f"A-ASSOCIATE answered with PDU type {kind:#04x}")
        if not self._context_accepted(body):
            raise AssociationRefused("the presentation context was refused")

    def _read_exact(self, n: int) -> bytes:
        # Buffered: two recv() calls per PDU (header, body) were ~2 ms of a
        # hundred-match answer on this side, charged to the server's latency.
        while len(self._buffer) - self._offset < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssociationRefused("the peer closed the connection")
            if self._offset:
                del self._buffer[:self._offset]
                self._offset = 0
            self._buffer += chunk
        data = bytes(self._buffer[self._offset:self._offset + n])
        self._offset += n
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._read_exact(6))
        return kind, self._read_exact(length)

    @staticmethod
    def _context_accepted(body: bytes) -> bool:
        offset = 68  # after the fixed fields of the A-ASSOCIATE-AC
        while offset + 4 <= len(body):
            kind, _, length = struct.unpack_from(">BBH", body, offset)
            if kind == 0x21:
                return body[offset + 6] == 0  # result/reason: 0 = acceptance
            offset += 4 + length
        return False

    def find(self, identifier: Dataset) -> tuple[int, int]:
        """Send one C-FIND-RQ; (pending responses, final status) once the
        final response has arrived. Identifiers are not decoded."""
        self.send_find(identifier)
        return self.read_responses()

    def send_find(self, identifier: Dataset) -> int:
        """Write a C-FIND-RQ without waiting for its answer; its Message ID."""
        self._message_id = self._message_id % 0xFFFF + 1
        data = encode(identifier, True, True, False)
        if data is None:
            raise ValueError("identifier cannot be encoded")
        command = find_command(self.sop_class, self._message_id)
        self.sock.sendall(
            _pdu(0x04, struct.pack(">IBB", len(command) + 2, 1, 0x03) + command)
            + _pdu(0x04, struct.pack(">IBB", len(data) + 2, 1, 0x02) + data)
        )
        return self._message_id

    def send_cancel(self, message_id: int) -> None:
        """Write a C-CANCEL-RQ for request *message_id* (PS3.7 9.3.2.3)."""
        command = encode_command([
            (0x0100, "US", C_CANCEL_RQ), (0x0120, "US", message_id), (0x0800, "US", 0x0101),
        ])
        self.sock.sendall(_pdu(0x04, struct.pack(">IBB", len(command) + 2, 1, 0x03) + command))

    def read_responses(self, limit: int | None = None) -> tuple[int, int | None]:
        """Read responses until the final one, or until *limit* pending ones
        have arrived (then the status is None)."""
        pending, command_parts = 0, []
        while True:
            kind, body = self._read_pdu()
            if kind != 0x04:
                raise AssociationRefused(f"PDU type {kind:#04x} during C-FIND")
            offset = 0
            while offset < len(body):
                length, _, control = struct.unpack_from(">IBB", body, offset)
                if control & 0x01:
                    command_parts.append(body[offset + 6:offset + 4 + length])
                    if control & 0x02:
                        status = command_status(b"".join(command_parts))
                        command_parts = []
                        if status in PENDING:
                            pending += 1
                        elif status is not None:
                            return pending, status
                offset += 4 + length
            if limit is not None and pending >= limit:
                return pending, None

    def release(self) -> None:
        try:
            self.sock.sendall(_pdu(0x05, bytes(4)))
            self._read_pdu()
        except (OSError, AssociationRefused):
            pass
        finally:
            self.sock.close()


def timed_finds(host: str, port: int, called: str, sop_class: str,
                identifiers: list[Dataset]) -> tuple[list[float], list[int]]:
    """Milliseconds and matches of each C-FIND on one open association."""
    scu = WireFindSCU(host, port, called, sop_class)
    times, counts = [], []
    try:
        for identifier in identifiers:
            start = time.perf_counter()
            pending, _ = scu.find(identifier)
            times.append((time.perf_counter() - start) * 1000)
            counts.append(pending)
    finally:
        scu.release()
    return times, counts


__all__: list[Any] = ["AssociationRefused", "WireFindSCU", "command_status", "find_command", "timed_finds"]
