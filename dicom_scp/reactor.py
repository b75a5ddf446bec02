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

import logging
import os
import queue
import ssl
import time
import weakref
from typing import Any

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider

from pacs.dicom_net import readable
from pacs.logtext import association_peer

log = logging.getLogger(__name__)

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
            # poll, not select: see pacs.dicom_net.readable (descriptors >= 1024).
            ready = readable(fds, IDLE_WAIT)
        except (OSError, ValueError):  # the socket closed under us
            time.sleep(0.001)
            return
        if self._wake_r in ready:
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


# Put on an acceptor's DIMSE message queue when the DUL hands it an ACSE
# primitive (release, abort): ends the reactor's wait for a message at once.
_WAKE = object()


def _blocking_reactor_reads(assoc: Any) -> None:
    """The acceptor reactor asks for a message without blocking, then sleeps
    1 ms: let that ask wait a little for the message instead, and run the
    reactor without its sleep (:func:`_run_acceptor_reactor`).

    An A-RELEASE-RQ or A-ABORT reaches the reactor through the DUL's user
    queue, not the message queue: it is followed by a wake-up on the message
    queue, or the reply to a release waited up to ``REACTOR_WAIT`` (a
    release took 6 ms against DCMTK's 0.1 ms).
    """
    dimse, dul = assoc.dimse, assoc.dul

    def get_msg(block: bool = False) -> Any:
        timeout = dimse.dimse_timeout if block else REACTOR_WAIT
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                context_id, message = dimse.msg_queue.get(block=True, timeout=remaining)
            except queue.Empty:
                return None, None
            if message is not _WAKE:
                return context_id, message
            if not block:
                return None, None

    user_put = dul.to_user_queue.put

    def put_and_wake(item: Any, *args: Any, **kwargs: Any) -> None:
        user_put(item, *args, **kwargs)
        dimse.msg_queue.put((None, _WAKE))

    dimse.get_msg = get_msg
    dul.to_user_queue.put = put_and_wake
    assoc._run_reactor = lambda: _run_acceptor_reactor(assoc)


def _run_acceptor_reactor(assoc: Any) -> None:
    """pynetdicom's acceptor loop (``Association._run_reactor``) minus the
    1 ms sleep it takes before every turn: after each answer the next
    request (the next C-STORE of a modality) waited for that sleep to end.

    The same checks in the same order: a DIMSE message to serve, a release
    or abort from the peer, the DUL gone, the network timeout.
    """
    assoc._is_paused = False
    while not assoc._kill:
        if not assoc._reactor_checkpoint.is_set():
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc._is_paused = False
        context_id, message = assoc.dimse.get_msg(block=False)
        if message:
            # A C-CANCEL received before the request is served (pynetdicom
            # forgets those) has marked it already: dicom_scp.cancels.
            assoc._serve_request(message, context_id)
            # Serving is activity: a C-MOVE to a slow satellite that took
            # longer than the network timeout otherwise ended with the
            # requester's association aborted as "idle" (pynetdicom restarts
            # the timer only for PDUs received).
            assoc.dul._idle_timer.restart()
        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            assoc.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            log.warning("%s", idle_line(assoc))
            if assoc.network_timeout_response == "A-RELEASE":
                assoc.release()
            else:
                assoc.abort()
            assoc.kill()
            return


def idle_line(assoc: Any) -> str:
    """What an association closed for the network timeout (dicom_timeout)
    says: a peer that went quiet, named, not an error of ours."""
    answer = "A-RELEASE-RQ" if getattr(assoc, "network_timeout_response", "") == "A-RELEASE" else "A-ABORT"
    timeout = getattr(assoc, "network_timeout", None)
    idle = f"{timeout:g} s" if isinstance(timeout, int | float) else "too long"
    return f"association from {association_peer(assoc)} idle for {idle} (dicom_timeout): {answer} sent"


def _close_pair(read_fd: int, write_fd: int) -> None:
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass
