"""The HL7 (MLLP) listener under a connection flood and a slowloris trickle.

A reviewer held 1,100 idle TCP connections to the HL7 port: the process went
past 1,024 descriptors, where select()-based DICOM code fails, so DICOM
associations failed; with 10,000 it reached its descriptor limit, /health
timed out and the log grew by a "Too many open files" traceback per accept.
A client sending a byte now and then was never cut (every byte reset the idle
timer). Now the listener serves hl7_max_connections at once (half of them
from one address), closes the excess as soon as it is accepted with one
rate-limited log line, and closes a connection that does not finish a message
within hl7_frame_timeout however slowly it trickles.

Real sockets against a real `pacs serve`; DCMTK echoscu for the DICOM side.
Loopback addresses other than 127.0.0.1 stand in for other hosts.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from .conftest import Backend, PacsServer
from .peers import run_dcmtk, wait_until
from .test_worklist_ris import msa, orm, send

MAX_CONNECTIONS = 8  # per host: half, 4
PER_HOST = MAX_CONNECTIONS // 2
FRAME_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("hl7limits")
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}), extra_env={
        "PACS_HL7_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "PACS_HL7_FRAME_TIMEOUT": str(FRAME_TIMEOUT),
        "PACS_HL7_IDLE_TIMEOUT": "300",
    }).start()
    try:
        yield server
    finally:
        server.stop()


def _connect(server: PacsServer, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30, source_address=(source, 0))


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed *sock* (without waiting)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout, recv() polls for it first
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def _held(socks: list[socket.socket], expected_open: int) -> int:
    """Wait until all but *expected_open* of *socks* are closed; how many are open."""
    wait_until(lambda: sum(not _closed(s) for s in socks) <= expected_open, timeout=90)
    return sum(not _closed(s) for s in socks)


def _descriptors(server: PacsServer) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _echo(server: PacsServer) -> None:
    echo = run_dcmtk("echoscu", "-aet", "LIMITTEST", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
    assert echo.returncode == 0, f"echoscu failed: {echo.stdout[-1500:]}{echo.stderr[-1500:]}"


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


def test_a_connection_flood_is_refused_and_the_node_keeps_working(server: PacsServer) -> None:
    flood: list[socket.socket] = []
    others: list[socket.socket] = []
    try:
        # The reviewer's flood: 1,100 connections held open from one host.
        for _ in range(1100):
            flood.append(_connect(server, "127.0.0.2"))
        assert _held(flood, PER_HOST) == PER_HOST  # the rest closed at once, the first kept
        assert _descriptors(server) < 500
        # The HIS (another address) still gets its ACK, and DICOM still works.
        assert msa(send(server, orm("LIM1", "LIMACC1")))[0] == "AA"
        _echo(server)

        # The cap over all addresses: a second host fills it ...
        for _ in range(10):
            others.append(_connect(server, "127.0.0.3"))
        assert _held(others, PER_HOST) == PER_HOST
        # ... and a third is refused at once, even for a single connection.
        third = _connect(server, "127.0.0.4")
        others.append(third)
        assert wait_until(lambda: _closed(third), timeout=30)
        assert wait_until(lambda: f"hl7_max_connections {MAX_CONNECTIONS})" in server.log_text(), timeout=10)
        # Slots come back when connections end.
        _close_all(flood)
        assert wait_until(lambda: msa(send(server, orm("LIM2", "LIMACC2")))[0] == "AA", timeout=30)
        _echo(server)
    finally:
        _close_all(flood)
        _close_all(others)
    log = server.log_text()
    # One line per interval, not one per refused connection, and no traceback storm.
    assert 1 <= log.count("HL7 connection from") <= 5, log[-3000:]
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]


def test_a_trickled_frame_is_cut_at_the_frame_deadline(server: PacsServer) -> None:
    """A byte every 0.2 s would reset any idle timer: the frame deadline counts
    from the message's first byte."""
    message = orm("LIM3", "LIMACC3").replace("\n", "\r").encode()
    with _connect(server, "127.0.0.1") as sock:
        sock.sendall(b"\x0b")
        cut = False
        for byte in message[:150]:  # 30 s of trickle: far more than the deadline lets through
            time.sleep(0.2)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            if _closed(sock):
                cut = True
                break
        assert cut, "the trickling connection was never closed"
    assert wait_until(lambda: f"did not finish a message within {FRAME_TIMEOUT:g}s" in server.log_text(), timeout=10)


def test_a_quiet_connection_between_messages_is_not_cut(server: PacsServer) -> None:
    """The frame deadline is for a message under way; a connection waiting
    between messages is left to hl7_idle_timeout."""
    with _connect(server, "127.0.0.1") as sock:
        for n, pause in enumerate((0, FRAME_TIMEOUT + 1.5)):
            time.sleep(pause)
            sock.sendall(b"\x0b" + orm(f"LIM4{n}", f"LIMACC4{n}").replace("\n", "\r").encode() + b"\x1c\r")
            reply = b""
            while b"\x1c\r" not in reply:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the ACK"
                reply += chunk
            assert b"MSA|AA" in reply, reply
