"""Event-driven waiting for pynetdicom's association threads.

pynetdicom polls: its DUL thread sleeps 1 ms whenever a loop found nothing to
do, and the acceptor's reactor sleeps 1 ms between looks at its message
queue. Each C-STORE round trip crosses those waits several times (request
PDUs in, response primitive out), which costs 1-3 ms per object: a third of
the whole per-object budget on the machines hospitals give a PACS.

:func:`event_driven` makes both threads wait for the thing they wait for:
the DUL thread sleeps in ``select()`` on its socket and a wake-up pipe that
every primitive handed to it (and every kill request) writes to; the acceptor
reactor blocks briefly on its message queue. Nothing changes in the state
machine or the PDU handling, and no thread spins.
"""

from __future__ import annotations

import os
import queue
import select
import ssl
import time
import weakref
from typing import Any

from pynetdicom.dul import DULServiceProvider

# Longest the DUL thread sleeps without a reason to wake: bounds how late it
# notices a timer (ARTIM, idle) or a kill from another thread that did not
# wake it.
IDLE_WAIT = 0.02
# Longest the acceptor reactor waits on its message queue before it looks at
# release and abort requests again.
REACTOR_WAIT = 0.005


class _EventDrivenDUL(DULServiceProvider):
    """A DUL whose idle "sleep" is a wait for socket data or a wake-up."""

    _wake_r: int
    _wake_w: int
    _waiting: bool

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        # The reactor calls time.sleep(self._run_loop_delay) when idle: wait
        # here for a reason to run, then let it sleep for nothing.
        self._wait_for_work()
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass

    def _wait_for_work(self) -> None:
        # Producers write to the wake-up pipe only while we wait (a write
        # per PDU was 15% of a C-FIND with many matches). Set the flag, then
        # look at the queue: a primitive put before the producer saw the flag
        # is found here, one put after it comes with a wake-up.
        self._waiting = True
        try:
            if self.to_provider_queue.qsize():
                return
            self._select()
        finally:
            self._waiting = False

    def _select(self) -> None:
        fds = [self._wake_r]
        raw = getattr(self.socket, "socket", None)
        if raw is not None:
            # TLS may hold decrypted bytes the kernel no longer reports.
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            try:
                fd = raw.fileno()
            except (OSError, ValueError):
                fd = -1
            if fd >= 0:
                fds.append(fd)
        try:
            readable, _, _ = select.select(fds, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # the socket closed under us
            time.sleep(0.001)
            return
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already holds a wake-up


def event_driven(assoc: Any) -> None:
    """Switch *assoc*'s threads from polling to waiting (idempotent).

    Safe before or after the DUL thread started (requestors connect from it).
    """
    dul = assoc.dul
    if isinstance(dul, _EventDrivenDUL):
        return
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dul._wake_r, dul._wake_w = read_fd, write_fd
    dul._waiting = False
    weakref.finalize(dul, _close_pair, read_fd, write_fd)
    send_pdu, kill_dul = dul.send_pdu, dul.kill_dul

    def send_pdu_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        if dul._waiting:
            dul._wake()

    def kill_and_wake() -> None:
        kill_dul()
        dul._wake()

    dul.send_pdu = send_pdu_and_wake
    dul.kill_dul = kill_and_wake
    dul.__class__ = _EventDrivenDUL
    if assoc.is_acceptor:
        _blocking_reactor_reads(assoc)


def _blocking_reactor_reads(assoc: Any) -> None:
    """The acceptor reactor asks for a message without blocking, then sleeps
    1 ms: let that ask wait a little for the message instead."""
    dimse = assoc.dimse

    def get_msg(block: bool = False) -> Any:
        try:
            if block:
                return dimse.msg_queue.get(block=True, timeout=dimse.dimse_timeout)
            return dimse.msg_queue.get(block=True, timeout=REACTOR_WAIT)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg


def _close_pair(read_fd: int, write_fd: int) -> None:
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass
