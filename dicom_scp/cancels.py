"""Which request a C-CANCEL cancels (PS3.7 9.3.2.3).

A C-CANCEL names a Message ID and applies to the request with that ID still
outstanding: received and not answered in full yet. pynetdicom keeps the
C-CANCELs it receives by Message ID in ``dimse.cancel_req`` and empties it
when it starts and when it ends serving a request, so a cancel that arrived
while its request waited (behind another, or while its calling AE's
permissions were looked up) was lost; and a cancel kept by Message ID alone
outlives its request: a *late* one, crossing its request's final response,
then cancelled the next request reusing that ID (pynetdicom's SCUs send
every request as message 1), a C-MOVE answered 0xFE00 with nothing sent.

:func:`track_cancels` ties each C-CANCEL, the moment it is received, to the
request it cancels: the last C-FIND, C-MOVE or C-GET received under its
Message ID, if that one is not answered in full yet. That request is marked
cancelled (:func:`is_cancelled`, whenever its handler looks); a C-CANCEL for
no outstanding request is dropped there and then, so nothing keeps it.

The DUL thread receives requests and cancels in the order they came on the
wire: a cancel sent after its request is always tied to it, and a late
cancel is always received before the next request that reuses its ID.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND, C_GET, C_MOVE

log = logging.getLogger(__name__)

_CANCELLABLE = (C_FIND, C_MOVE, C_GET)
# On a request primitive: a C-CANCEL for it was received.
_CANCELLED = "_filmless_cancelled"
# On a request primitive: its service ended (its final response is sent).
_DONE = "_filmless_done"


class _Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Message ID -> the last cancellable request received under it.
        self.latest: dict[int, Any] = {}

    def received(self, message: Any) -> None:
        """A request was queued for the reactor (DUL thread)."""
        if isinstance(message, _CANCELLABLE) and message.MessageID is not None:
            with self.lock:
                self.latest[message.MessageID] = message

    def cancel(self, cancel: C_CANCEL) -> bool:
        """Mark the outstanding request *cancel* names (DUL thread); False
        when there is none: the cancel is late, or for no request at all."""
        with self.lock:
            request = self.latest.get(cancel.MessageIDBeingRespondedTo)
            if request is None or getattr(request, _DONE, False):
                return False
            setattr(request, _CANCELLED, True)
            return True

    def finished(self, message: Any) -> None:
        """*message*'s service ended: a cancel of its ID from now on is late."""
        if isinstance(message, _CANCELLABLE):
            with self.lock:
                setattr(message, _DONE, True)
                if self.latest.get(message.MessageID) is message:
                    del self.latest[message.MessageID]


class _CancelRequests(dict):  # type: ignore[type-arg]
    """pynetdicom's ``cancel_req``: keeps only cancels of outstanding requests."""

    def __init__(self, tracker: _Tracker, items: Any = ()) -> None:
        super().__init__(items)
        self.tracker = tracker

    def __setitem__(self, message_id: Any, primitive: Any) -> None:
        if isinstance(primitive, C_CANCEL) and not self.tracker.cancel(primitive):
            log.info("C-CANCEL for message %s ignored: no such request outstanding", message_id)
            return
        super().__setitem__(message_id, primitive)


class _TrackingDIMSE(DIMSEServiceProvider):
    """A DIMSE provider whose ``cancel_req`` (whatever pynetdicom or we
    assign to it) ties each cancel to its request as it is stored."""

    @property  # type: ignore[override]
    def cancel_req(self) -> _CancelRequests:
        return self.__dict__["_filmless_cancel_req"]  # type: ignore[no-any-return]

    @cancel_req.setter
    def cancel_req(self, value: Any) -> None:
        self.__dict__["_filmless_cancel_req"] = _CancelRequests(self.__dict__["_filmless_tracker"], value)


def track_cancels(assoc: Any) -> None:
    """Tie every C-CANCEL received on *assoc* to its outstanding request
    (idempotent). Install it outermost: it wraps ``_serve_request``."""
    dimse = assoc.dimse
    if isinstance(dimse, _TrackingDIMSE):
        return
    tracker = _Tracker()
    pending = dimse.__dict__.pop("cancel_req", {})
    dimse.__dict__["_filmless_tracker"] = tracker
    dimse.__class__ = _TrackingDIMSE
    dimse.cancel_req = {}
    for message_id, primitive in pending.items():  # none before the association is up
        dimse.cancel_req[message_id] = primitive

    put = dimse.msg_queue.put

    def put_and_note(item: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(item, tuple) and len(item) == 2:
            tracker.received(item[1])
        put(item, *args, **kwargs)

    dimse.msg_queue.put = put_and_note
    serve = assoc._serve_request

    def serve_request(message: Any, context_id: int) -> None:
        try:
            serve(message, context_id)
        finally:
            tracker.finished(message)

    assoc._serve_request = serve_request


def is_cancelled(request: Any) -> bool:
    """Whether a C-CANCEL of *request* was received (on a tracked association),
    also one that came before it was served."""
    return bool(getattr(request, _CANCELLED, False))


__all__ = ["is_cancelled", "track_cancels"]
