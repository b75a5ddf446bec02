"""Network limits of every DIMSE association, listening or calling: the
node's timeouts and PDU size on an AE, and the TCP options of its sockets.

Slow links to satellite hospitals drop without a FIN and stall halfway
through a PDU: each limit here bounds how long such a link can hold a
thread, an association slot or a routing worker.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE

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
    except (OSError, AttributeError):
        pass


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
