"""How large a request body may be.

Every route that takes a body takes a small JSON document (a login, an
order, a user, a token, a report's text), except STOW-RS, which uploads
DICOM objects of any size and has its own limits (``max_object_bytes``, the
spool's disk checks). FastAPI reads a JSON body whole before the route's
access check runs, so without a limit anyone, without a token, could make
the server hold hundreds of megabytes per request.

The other half of the protection, a body that stops coming, is the
connection's business: :mod:`viewer_api.protocol`.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import answer, path_for_log

log = logging.getLogger(__name__)

# Far above any JSON document the API takes (a long report is a few tens of kB).
MAX_BODY_BYTES = 1024 * 1024

STOW_PREFIX = "/dicom-web/studies"


def is_dicom_upload(method: str, path: str) -> bool:
    """Whether a request is a STOW-RS upload (``POST /dicom-web/studies``
    or ``/dicom-web/studies/{study}``): the only route whose body may be
    large, with limits of its own."""
    if method != "POST" or not path.startswith(STOW_PREFIX):
        return False
    rest = path[len(STOW_PREFIX):]
    return rest == "" or (rest.startswith("/") and "/" not in rest[1:] and len(rest) > 1)


class BodyLimit:
    """413 for a request body over *max_bytes*, except STOW-RS uploads.

    A declared Content-Length over the limit is answered before the app
    runs and before any byte of the body is read (a client that asked
    ``Expect: 100-continue`` never sends it). A chunked body is counted as
    the app reads it and answered 413 as soon as it passes the limit; the
    app then sees the client as gone. Both answers close the connection: the
    rest of the body is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_dicom_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"declares {declared} bytes")
            return
        received = 0
        started = False  # the app's answer
        refused = False  # ours

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send, f"passed {received} bytes")
                    # The app stops reading as if the client had gone.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused and not started:
                return  # the 413 was the answer; what the app makes of the "disconnect" is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not (refused and not started):
                raise
            log.debug("error after a too large body was refused", exc_info=True)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        client = scope.get("client")
        log.warning("%s %s from %s refused 413: its body %s, over the %d bytes a request other than a "
                    "STOW-RS upload may have", scope["method"], path_for_log(scope),
                    client[0] if client else "?", what, self.max_bytes)
        request = Request(scope)
        response = answer(request, 413, f"request body too large: at most {self.max_bytes} bytes "
                                        "(DICOM objects are uploaded with STOW-RS, POST /dicom-web/studies)")
        # The rest of the body is not wanted: the connection cannot be reused.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # the server refuses a malformed length before the app sees it
