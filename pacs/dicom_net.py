"""Network limits of every DIMSE association, listening or calling: the
node's timeouts and PDU size on an AE, and the TCP options of its sockets;
on an association this node requests, the Maximum Length the peer accepted
with (:func:`request`).

Slow links to satellite hospitals drop without a FIN and stall halfway
through a PDU: each limit here bounds how long such a link can hold a
thread, an association slot or a routing worker.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.transport import AssociationSocket

from .logtext import peer_text
from .settings import Settings

log = logging.getLogger(__name__)

# Longest wait for the A-RELEASE-RP of an association this node requested
# (C-MOVE sub-operations, routing, storage commitment reports, remote
# get/pull) before it is aborted; shorter when dicom_timeout is. Every request
# on it has been answered by then, so an abort loses nothing, while the wait
# holds what comes after: the requester's final C-MOVE response (30 s, the
# ACSE timeout, for a destination that never answered), a routing worker. A
# peer that answers at all answers within a round trip.
RELEASE_WAIT = 5.0
# After an A-ABORT of ours (a release not answered in time), how long the peer
# has to close the connection before we do (PS3.8 ARTIM, Sta13): one that did
# not answer the release will not close either.
ABORT_CLOSE_WAIT = 1.0
# The smallest Maximum Length a P-DATA-TF can live with: a PDV item is a
# 4-byte length, the context ID, the message control header and at least one
# byte of fragment (PS3.8 9.3.5). 0 means no limit (PS3.8 D.1).
SMALLEST_MAXIMUM_LENGTH = 7
# Set on an association this node requested and aborted itself at once
# (:func:`request`): why, for the caller's answer (a C-MOVE's Error Comment).
_REFUSAL = "_filmless_refusal"
# Set on an association this node requested and did not get: why, in the
# words of pynetdicom's ERROR lines about it (see _RequestFailureLines).
_FAILURE = "_filmless_failure"
_REJECTION = "_filmless_rejection"
# Set on a state machine while abort_on_action_error's wrapper runs an event.
_ACTING_ON = "_filmless_acting_on"
# Peers (title, address, port) whose A-ASSOCIATE-AC had no Maximum Length
# sub-item, said once (forgotten past 1,000).
_NO_MAXIMUM_SAID: set[tuple[str, str, int]] = set()
# Seconds between looks at the stop flag while waiting for a response (stop_aware).
STOP_CHECK = 0.5


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
    """*kwargs* of ``AE.associate`` for every association this node requests:
    a handler that, as soon as the association connects (before the
    A-ASSOCIATE-AC is read), puts its socket on poll() (see :func:`readable`),
    answers a state-machine fault as the listener does
    (:func:`abort_on_action_error`) and bounds its release
    (:func:`bound_release`)."""
    handlers = list(kwargs.get("evt_handlers") or [])
    handlers.append((evt.EVT_CONN_OPEN, _requested_open))
    return {**kwargs, "evt_handlers": handlers}


def request(associate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``associate(*args, **kwargs)`` (``AE.associate``) for every association
    this node requests, with :func:`with_polling`'s handlers; one accepted
    with a Maximum Length no P-DATA-TF can keep to is aborted at once.

    A peer's A-ASSOCIATE-AC with a Maximum Length of 1-6 was taken: every
    message then failed in pynetdicom's fragmentation ("'fragment_length'
    cannot be between 1 and 7", "division by zero") or in ours ("range() arg
    3 must not be zero"), after the association was open, with that for the
    only reason (a routing job's error, a C-MOVE's Error Comment, `pacs
    remote echo`'s). Now it is one WARNING naming the peer and the value, an
    A-ABORT, and the association comes back not established: the caller
    treats it as a peer that refused us (:func:`refusal` says why).
    """
    _requesting.reasons = reasons = {}
    try:
        assoc = associate(*args, **with_polling(kwargs))
    finally:
        _requesting.reasons = None
    if not assoc.is_established:
        if _FAILURE not in reasons:
            _rejection_unread(assoc, reasons)
        if _FAILURE in reasons:
            assoc.__dict__.setdefault(_FAILURE, reasons[_FAILURE])
        return assoc
    keep_responses(assoc)
    peer = assoc.acceptor
    maximum = peer.maximum_length
    if maximum is None:
        _no_maximum(assoc)
    elif 0 < maximum < SMALLEST_MAXIMUM_LENGTH:
        log.warning("association with %s at %s:%s aborted: its A-ASSOCIATE-AC's Maximum Length %d cannot carry a "
                    "PDV (at least %d, or 0 for no limit: PS3.8 9.3.5, D.1)",
                    peer_text(str(peer.ae_title).strip(), 16) or "?", peer_text(getattr(peer, "address", "?"), 64),
                    getattr(peer, "port", "?"), maximum, SMALLEST_MAXIMUM_LENGTH)
        assoc.__dict__[_REFUSAL] = f"accepted with Maximum Length {maximum}: no PDV fits"
        _abort_at_once(assoc)
    return assoc


def _rejection_unread(assoc: Any, reasons: dict[str, str]) -> None:
    """An A-ASSOCIATE-RJ pynetdicom received but never read: the peer closed
    the connection right after it (DCMTK does), the DUL took both, and the
    requesting thread, finding the socket closed, aborted without looking at
    the answer waiting on its queue. About one rejection in ten under load
    came back as an abort with no reason (a routing job's error said only
    "failed"). The rejection is taken from the queue as pynetdicom would have."""
    waiting = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    for primitive in list(getattr(waiting, "queue", ())):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            reasons[_FAILURE] = (f"rejected the association: {primitive.reason_str} "
                                 f"({primitive.result_str}, Source: {primitive.source_str})")
            assoc.is_rejected, assoc.is_aborted = True, False
            return


def keep_responses(assoc: Any) -> None:
    """Hand a response back to the ``send_*`` call waiting for it when
    pynetdicom's reactor took it first (an association this node requested;
    one it accepted, where a storage commitment report is sent from another
    thread than the reactor's).

    A ``send_*`` call pauses the reactor (clears its checkpoint, waits for
    its paused flag) before it sends: the reactor sets that flag just before
    it waits at the checkpoint, and clears it only after the wait returned,
    so a sender can see it paused while it is in fact on its way to take the
    next message. A response arriving then was served as a request
    ("Received unexpected C-STORE service message") and lost; the sender
    waited the DIMSE timeout, aborted, and a routing job failed its try (a
    fuzz run's sender lost one in ~7,000). While a sender waits (the
    checkpoint cleared), a message that is no request goes back on the queue
    it reads; the reactor then stops at the checkpoint."""
    serve = assoc._serve_request

    def serve_request(message: Any, context_id: int) -> None:
        if not handed_back(assoc, message, context_id):
            serve(message, context_id)

    assoc._serve_request = serve_request


def handed_back(assoc: Any, message: Any, context_id: int) -> bool:
    """Whether *message*, taken by *assoc*'s reactor, was a response a
    waiting ``send_*`` call was owed, now put back on its queue
    (:func:`keep_responses`)."""
    if message.is_valid_request or assoc._reactor_checkpoint.is_set():
        return False
    assoc.dimse.msg_queue.put((context_id, message))
    return True


def _no_maximum(assoc: Any) -> None:
    """An A-ASSOCIATE-AC without a Maximum Length sub-item (PS3.8 D.1 makes
    it mandatory) means no limit, as a request without one does to the
    listener (dicom_scp.associate_rq). pynetdicom took the missing value as
    None: every message failed in its fragmentation ("unsupported operand
    type(s) for -: 'NoneType' and 'int'"), while our C-MOVE sub-operations
    (dicom_scp.stored_send) already read it as no limit."""
    peer = assoc.acceptor
    item = MaximumLengthNotification()
    item.maximum_length_received = 0
    peer.user_information.append(item)
    key = (str(peer.ae_title).strip(), str(getattr(peer, "address", "?")), int(getattr(peer, "port", 0) or 0))
    if key not in _NO_MAXIMUM_SAID:
        if len(_NO_MAXIMUM_SAID) >= 1000:
            _NO_MAXIMUM_SAID.clear()
        _NO_MAXIMUM_SAID.add(key)
        log.info("%s at %s:%s accepted our association without a Maximum Length sub-item: no limit, as for 0 "
                 "(PS3.8 D.1)", peer_text(key[0], 16) or "?", peer_text(key[1], 64), key[2])


def refusal(assoc: Any) -> str | None:
    """Why :func:`request` aborted *assoc* itself (None: it did not), short
    enough for an Error Comment with the peer's AE title before it."""
    return assoc.__dict__.get(_REFUSAL) if assoc is not None else None


def failure(assoc: Any) -> str | None:
    """Why an association this node requested was not had, as pynetdicom
    saw it ("could not connect: [Errno 111] Connection refused", "rejected
    the association: Called AE title not recognised (Rejected Permanent,
    Service User)"); None when nothing was said. For the caller's one line
    (a routing job's error, a C-MOVE's Error Comment)."""
    return assoc.__dict__.get(_FAILURE) if assoc is not None else None


# The reasons pynetdicom logs in a thread inside :func:`request` (it
# negotiates in the requesting thread, before the association is returned).
_requesting = threading.local()


def thread_association() -> Any:
    """The association whose thread (its own, or its DUL's) logs now; None
    for any other thread."""
    thread = threading.current_thread()
    return thread if isinstance(thread, Association) else getattr(thread, "assoc", None)


def _reasons_here() -> dict[str, str] | None:
    """Where a reason logged now belongs: the association this node
    requested whose DUL thread logs (it connects), or the requesting
    thread's (it negotiates); None for any other thread."""
    assoc = thread_association()
    if getattr(assoc, "is_requestor", False):
        # Only one :func:`request` opened (its handler is bound): another
        # caller of AE.associate (a script, a benchmark) says nothing itself.
        opened = assoc.get_handlers(evt.EVT_CONN_OPEN)
        return assoc.__dict__ if any(handler is _requested_open for handler, _ in opened) else None
    return getattr(_requesting, "reasons", None)


# pynetdicom's functions that connect and negotiate an association we request.
_REQUESTING = ("connect", "negotiate_as_requestor", "_negotiate_as_requestor")
# pynetdicom's ERROR lines while requesting an association, as reasons.
_NEGOTIATION_REASONS = {
    "No accepted presentation contexts": "accepted none of the proposed presentation contexts",
    "Association Aborted": "aborted the association request",
    "Received an invalid A-ASSOCIATE response from the peer": "answered with an invalid A-ASSOCIATE response",
    "ACSE timeout reached while waiting for response to association request":
        "did not answer the association request in time",
}


class _RequestFailureLines(logging.Filter):
    """pynetdicom's ERROR lines about an association this node requested and
    did not get (a destination down, a TLS handshake refused, an
    A-ASSOCIATE-RJ), kept on the association for :func:`failure` and
    dropped from the log.

    Each failed routing try or C-MOVE destination wrote two or three
    pynetdicom ERROR lines ("Association request failed: unable to connect
    to remote", "TCP Initialisation Error: ...", a TLS traceback) beside our
    WARNING, which did not say why ("association with DEST at ... failed").
    Every caller of :func:`request` now says it once, with the peer's title
    and address and this reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.funcName not in _REQUESTING:
            return True
        said = _reasons_here()
        if said is None:
            return True
        message = record.getMessage()
        reason: str | None = None
        if message.startswith("TCP Initialisation Error: "):
            reason = "could not connect: " + message.removeprefix("TCP Initialisation Error: ")
        elif message.startswith("Result: "):  # of an A-ASSOCIATE-RJ, its reason follows
            said[_REJECTION] = message.removeprefix("Result: ")
        elif message.startswith("Reason: "):
            reason = f"rejected the association: {message.removeprefix('Reason: ')}"
            if _REJECTION in said:
                reason += f" ({said[_REJECTION]})"
        elif message in _NEGOTIATION_REASONS:
            reason = _NEGOTIATION_REASONS[message]
        if reason and _FAILURE not in said:
            said[_FAILURE] = reason
        return False


for _name in ("pynetdicom.transport", "pynetdicom.acse"):
    logging.getLogger(_name).addFilter(_RequestFailureLines())


def _abort_at_once(assoc: Any) -> None:
    """A-ABORT from the service provider, as for an invalid PDU parameter
    (PS3.8 9.2, as the listener aborts such a request), before any P-DATA:
    the peer has at most :data:`ABORT_CLOSE_WAIT` to close the connection."""
    assoc.dul.artim_timer.timeout = ABORT_CLOSE_WAIT
    assoc.acse.send_abort(0x02)
    evt.trigger(assoc, evt.EVT_ABORTED, {})
    assoc.kill()


def _requested_open(event: Any) -> None:
    assoc = event.assoc
    _ready_by_poll(assoc.dul.socket)
    abort_on_action_error(assoc)
    bound_release(assoc)


def bound_release(assoc: Any) -> None:
    """Make *assoc*'s ``release()`` wait at most :data:`RELEASE_WAIT` (or its
    network timeout, if shorter) for the A-RELEASE-RP, then abort.

    pynetdicom waits the ACSE timeout (30 s) for the answer, then aborts;
    its reactor then woke, found the network timeout long passed and
    aborted a second time: an A-ABORT request in Sta13, which raised in the
    DUL thread ("Invalid event 'Evt15' for the current state 'Sta13'") and
    killed it with a traceback. The network timeout is off while the release
    runs: the release wait bounds it.
    """
    release = assoc.release

    def release_within() -> None:
        if not assoc.is_established:
            release()  # nothing to release (pynetdicom's no-op)
            return
        network = assoc.network_timeout
        wait = min(RELEASE_WAIT, network) if network else RELEASE_WAIT
        assoc.acse_timeout = wait  # (and ARTIM, set next)
        assoc.dul.artim_timer.timeout = ABORT_CLOSE_WAIT  # only used after an abort here
        assoc.network_timeout = None
        started = time.monotonic()
        release()
        if assoc.is_aborted and not assoc.is_released and time.monotonic() - started >= wait:
            # (An A-ABORT from the peer instead ends it sooner; pynetdicom logs that.)
            peer = assoc.acceptor
            log.warning("%s at %s did not answer our A-RELEASE-RQ within %g s: association aborted "
                        "(its requests had all been answered)", str(peer.ae_title).strip(),
                        getattr(peer, "address", "?"), wait)

    assoc.release = release_within


# State-machine events raised by primitives from the local user (PS3.8 9.2),
# not by the peer's PDUs.
_LOCAL_PRIMITIVE_EVENTS = {"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"}


def abort_on_action_error(assoc: Any) -> None:
    """Answer a PDU that makes a state-machine action fail with an A-ABORT,
    on an association this node accepted or requested.

    pynetdicom decodes some invalid fields lazily: an A-ASSOCIATE-RQ with an
    even presentation context ID raises inside the AE-6 action, which kills
    the association's DUL thread with a traceback and leaves the peer
    connected, unanswered, until the ACSE timeout. Treat it as the standard
    says for an invalid PDU (event 19: A-ABORT, then close).
    """
    fsm = assoc.dul.state_machine
    original = fsm.do_action

    def do_action(fsm_event: str) -> None:
        state = fsm.current_state
        fsm.__dict__[_ACTING_ON] = fsm_event
        try:
            original(fsm_event)
        except Exception as exc:
            if fsm_event == "Evt19":
                raise
            if fsm_event in _LOCAL_PRIMITIVE_EVENTS and fsm.current_state == "Sta13":
                # Found by the fuzz run (bench/fuzz.py, issue 8): a second
                # A-RELEASE-RQ before our A-RELEASE-RP aborts the association
                # (AA-8, Sta13), then our own release response arrives as
                # Evt14, invalid in Sta13. pynetdicom only peeks at its
                # outgoing queue, so the primitive stayed there: the DUL thread
                # retried it forever (100% CPU, an A-ABORT and a log line per
                # turn, ~7 MB of log a second) and never closed the socket.
                # On a requested association, a second A-ABORT of ours after
                # a release that timed out (see bound_release) is the same.
                # The association is gone: drop the primitive, let Sta13 close.
                try:
                    assoc.dul.to_provider_queue.get_nowait()
                except queue.Empty:
                    pass
                log.info("dropped %s from the local user after the association ended", fsm_event)
                return
            peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
            log.warning("invalid PDU from %s (%s in %s: %s: %s); aborting the association",
                        getattr(peer, "address", "?"), TRANSITION_TABLE.get((fsm_event, state), "?"), state,
                        type(exc).__name__, peer_text(exc, 200))
            assoc.dul._kill_thread = False  # do_action killed it: let the abort run
            # Its lines are pynetdicom's to say, as for any Evt19 (_ActionErrorLines).
            fsm.__dict__[_ACTING_ON] = "Evt19"
            original("Evt19")
        finally:
            fsm.__dict__.pop(_ACTING_ON, None)

    fsm.do_action = do_action


class _ActionErrorLines(logging.Filter):
    """pynetdicom's two lines for an action that raised ("State Machine
    received an exception attempting to perform the action 'DT-2' while in
    state 'Sta6'" at ERROR, then the exception with its traceback), dropped
    where :func:`abort_on_action_error` says it in one line, with the peer
    (all events but Evt19, which it lets fail as pynetdicom would). A
    malformed P-DATA wrote three lines for one PDU."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName != "do_action" or record.levelno < logging.ERROR:
            return True
        fsm = getattr(getattr(thread_association(), "dul", None), "state_machine", None)
        event = getattr(fsm, "__dict__", {}).get(_ACTING_ON)
        return event is None or event == "Evt19"


logging.getLogger("pynetdicom.fsm").addFilter(_ActionErrorLines())


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


def stop_aware(assoc: Any, stop: threading.Event) -> None:
    """Make the association's wait for a response end when *stop* is set.

    pynetdicom waits for a C-STORE response on its message queue for the
    whole DIMSE timeout; a wake-up put there is taken by the association's
    own reactor once an abort restarts it, so the sender slept on (a stop
    waited ~1 min for a frozen destination). The wait is cut into short
    slices that look at *stop*; a response still ends it at once."""
    dimse = assoc.dimse
    plain = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            return plain(False)
        deadline = None if dimse.dimse_timeout is None else time.monotonic() + dimse.dimse_timeout
        while True:
            remaining = STOP_CHECK if deadline is None else min(STOP_CHECK, deadline - time.monotonic())
            if remaining <= 0 or stop.is_set():
                return None, None
            try:
                return dimse.msg_queue.get(block=True, timeout=remaining)
            except queue.Empty:
                continue

    dimse.get_msg = get_msg
