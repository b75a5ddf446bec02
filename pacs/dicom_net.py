"""Network limits of every DIMSE association, listening or calling: the
node's timeouts and PDU size on an AE, and the TCP options of its sockets.

Slow links to satellite hospitals drop without a FIN and stall halfway
through a PDU: each limit here bounds how long such a link can hold a
thread, an association slot or a routing worker.
"""

from __future__ import annotations

import select
import socket
import ssl
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import AssociationSocket

from .settings import Settings


def apply_limits(ae: AE, settings: Settings) -> AE:
    """The node's timeouts and PDU size on *ae* (listening or calling)."""
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.dicom_timeout
    ae.network_timeout = settings.dicom_timeout
    # Connecting to a peer whose link is down (packets dropped) otherwise
    # waits for the kernel's ~2 minutes, holding a routing worker or a C-MOVE.
    ae.connection_timeout = settings.dicom_connect_timeout
    ae.maximum_pdu_size = settings.max_pdu_size
    return ae


# TCP keepalive: a satellite whose link died without a FIN or RST is noticed
# in about 2 minutes (60 s idle, then 4 probes 15 s apart).
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))


def set_keepalive(raw: socket.socket) -> None:
    """TCP keepalive with the node's probe timing on *raw*."""
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        if hasattr(socket, name):
            raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def tune_socket(assoc: Any) -> None:
    """TCP_NODELAY (DIMSE is request/response: Nagle would hold each small
    message ~40 ms), keepalive, and a read/write timeout of the association's
    network timeout: pynetdicom reads a whole PDU in one blocking call, so a
    link that goes silent halfway through a PDU held the association, its
    slot of max_associations and the server's shutdown for good."""
    try:
        raw = assoc.dul.socket.socket
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(raw)
        if assoc.network_timeout:
            raw.settimeout(assoc.network_timeout)
        _acknowledge_at_once(assoc.dul.socket, raw)
        _ready_by_poll(assoc.dul.socket)
    except (OSError, AttributeError):
        pass


_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def readable(fds: list[int], timeout: float) -> set[int]:
    """Which of *fds* can be read (or hit end of file, or an error) within
    *timeout* seconds. poll(), not select(): select() refuses any descriptor
    numbered 1024 or more, and a node holding many connections (HTTP
    clients, HL7, associations) gives new sockets such numbers; every
    association on one then died at its first read. Raises OSError for a
    closed descriptor."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    found = set()
    for fd, events in poller.poll(max(0, int(timeout * 1000))):
        if events & select.POLLNVAL:
            raise OSError(f"descriptor {fd} is closed")
        if events & _READABLE:
            found.add(fd)
    return found


def _poll_ready(wrapper: Any) -> bool:
    raw = wrapper.socket
    if raw is None or wrapper._is_connected is False:
        return False
    try:
        is_ready = bool(readable([raw.fileno()], 0))
    except (OSError, ValueError):
        wrapper.event_queue.put("Evt17")  # transport connection closed
        return False
    # An SSL socket may hold decrypted bytes poll() cannot see.
    return is_ready or (isinstance(raw, ssl.SSLSocket) and bool(raw.pending()))


class _PollingSocket(AssociationSocket):
    """pynetdicom's association socket, its ``ready`` by poll()."""

    ready = property(_poll_ready)  # type: ignore[assignment]


def _ready_by_poll(wrapper: Any) -> None:
    """pynetdicom's AssociationSocket.ready (a property), with poll() instead
    of select() (see :func:`readable`), on this association's socket."""
    if type(wrapper) is AssociationSocket:
        wrapper.__class__ = _PollingSocket


def with_polling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """*kwargs* of ``AE.associate`` with a handler that puts the requested
    association's socket on poll() as soon as it connects (see
    :func:`readable`), before the A-ASSOCIATE-AC is read."""
    handlers = list(kwargs.get("evt_handlers") or [])
    handlers.append((evt.EVT_CONN_OPEN, lambda event: _ready_by_poll(event.assoc.dul.socket)))
    return {**kwargs, "evt_handlers": handlers}


def _acknowledge_at_once(wrapper: Any, raw: socket.socket) -> None:
    """Acknowledge every segment at once (TCP_QUICKACK, renewed after each
    read: Linux drops back to delayed ACKs on its own). A peer that keeps
    Nagle's algorithm on -- DCMTK's default, so most DCMTK-based modalities
    and workstations -- sends a PDU's second segment only once its first is
    acknowledged, and a delayed ACK holds that ~40 ms: such a storescu sent
    22 objects/s here, a getscu took 22 objects/s, instead of hundreds."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return
    recv = wrapper.recv

    def recv_and_acknowledge(nr_bytes: int) -> bytearray:
        data = recv(nr_bytes)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        except OSError:
            pass
        return data

    raw.setsockopt(socket.IPPROTO_TCP, quickack, 1)
    wrapper.recv = recv_and_acknowledge
