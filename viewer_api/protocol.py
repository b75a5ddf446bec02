"""The HTTP connection protocol: uvicorn's, with a deadline for request
headers and a stall limit for request bodies.

Uvicorn closes a kept-alive connection that stays idle after a response, but
not one that never completes a request: a client that connects and sends
nothing, or sends its headers a byte at a time (slowloris), or sends its
headers and part of a body and then nothing, holds a descriptor and a
connection slot for as long as it likes, and a few hundred of them stop the
appliance from accepting the EMR's and viewers' requests. Headers have a
deadline; a body has none (a study over a slow satellite link takes what it
takes) but may not stop: no byte for ``http_body_stall_timeout`` seconds and
the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import is_dicom_upload

log = logging.getLogger(__name__)

# Used when the served app carries no settings (pacs.settings: http_body_stall_timeout, dicom_timeout).


def _timeout_answer(text: str) -> bytes:
    body = text.encode() + b"\r\n"
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


_HEADERS_TIMEOUT = _timeout_answer("request headers not received in time")
_BODY_TIMEOUT = _timeout_answer("request body stalled: no data received in time")


class _ReadingWatched(FlowControl):
    """Uvicorn's flow control, telling the protocol when the app asks for
    more of the body (ASGI ``receive``): reading starts again after a pause,
    or a client waiting for ``100 Continue`` gets it."""

    def __init__(self, transport: Any, on_resume: Any) -> None:  # noqa: ANN401
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        self._on_resume(self.read_paused)
        super().resume_reading()


def header_deadline_protocol(timeout: float, body_stall_timeout: float,
                             upload_stall_timeout: float) -> type[asyncio.Protocol]:
    """Uvicorn's httptools protocol closing a connection whose request line
    and headers are not complete *timeout* seconds after it connected or
    after the request's first byte (408 if part of a request came), and one
    whose request body sends no byte for *body_stall_timeout* seconds (408
    if nothing was answered yet).

    A STOW-RS upload has a stall limit of its own (*upload_stall_timeout*,
    dicom_timeout), which the upload handler answers with its report of what
    was stored; the connection gives it *body_stall_timeout* more before it
    steps in. Time the server itself is not reading (the app has not taken
    what came: flow control) or the client waits for our ``100 Continue``
    never counts."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _started = False
        # The body being received: when its last byte came, and how long it may stop.
        _body_timer: asyncio.TimerHandle | None = None
        _last_byte = 0.0
        _stall_limit = 0.0
        _go_ahead_pending = False  # Expect: 100-continue, the app has not asked for the body yet

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401
            super().connection_made(transport)
            self.flow = _ReadingWatched(transport, self._reading_resumed)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # The deadline set on connecting still runs for the first request.
            if self._deadline is None:
                self._arm()
            self._started = True

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            if self._has_body():
                self._watch_body()

        def on_body(self, body: bytes) -> None:
            self._last_byte = self.loop.time()
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._unwatch_body()
            super().on_message_complete()
            cycle = self.cycle
            if (cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None
                    and not self.transport.is_closing() and not self.pipeline):
                # The answer went before the body had all come (its bytes were
                # dropped as they came, and each cancelled the keep-alive
                # timeout the answer had set): idle from now on, as after any answer.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._unwatch_body()
            super().connection_lost(exc)

        # -- headers
        def _arm(self) -> None:
            self._started = False
            self._deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            log.info("HTTP client %s sent no complete request headers within %g s: connection closed",
                     self._client(), timeout)
            if self._started:
                self.transport.write(_HEADERS_TIMEOUT)
            self.transport.close()

        # -- body
        def _has_body(self) -> bool:
            for name, value in self.headers or ():
                if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
                    return True
            return False

        def _watch_body(self) -> None:
            body = body_stall_timeout
            scope = self.scope or {}
            if is_dicom_upload(str(scope.get("method", "")), str(scope.get("path", ""))):
                body += upload_stall_timeout
            self._stall_limit = body
            self._last_byte = self.loop.time()
            self._go_ahead_pending = self.expect_100_continue
            self._unwatch_body()
            self._body_timer = self.loop.call_later(body, self._body_check)

        def _unwatch_body(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _reading_resumed(self, was_paused: bool) -> None:
            # The stall clock restarts when we take the body again, or tell
            # the client to send it: the wait before was ours.
            if was_paused or self._go_ahead_pending:
                self._go_ahead_pending = False
                self._last_byte = self.loop.time()

        def _body_check(self) -> None:
            # One timer per body, moved on when bytes came meanwhile (cheaper
            # than a new timer for every chunk of a large upload).
            self._body_timer = None
            if self.transport.is_closing():
                return
            now = self.loop.time()
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                # We are not reading, or the client waits for our go-ahead:
                # not its stall (the clock restarts when that ends).
                self._last_byte = now
            idle = now - self._last_byte
            if idle < self._stall_limit:
                self._body_timer = self.loop.call_later(self._stall_limit - idle, self._body_check)
                return
            answered = cycle is not None and cycle.response_started
            log.info("HTTP client %s sent no request body data for %g s (%s %s): connection closed",
                     self._client(), self._stall_limit, (self.scope or {}).get("method", "?"),
                     (self.scope or {}).get("path", "?"))
            if cycle is not None and not cycle.response_complete:
                # The app sees the client gone and writes nothing after our answer.
                cycle.disconnected = True
                cycle.message_event.set()
            if not answered:
                self.transport.write(_BODY_TIMEOUT)
            self.transport.close()

        def _client(self) -> str:
            return "%s:%d" % self.client if self.client else "?"

    return HeaderDeadlineProtocol
