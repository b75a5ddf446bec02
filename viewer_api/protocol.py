"""The HTTP connection protocol: uvicorn's, with a deadline for request headers.

Uvicorn closes a kept-alive connection that stays idle after a response, but
not one that never completes a request: a client that connects and sends
nothing, or sends its headers a byte at a time (slowloris), holds a descriptor
and a connection slot for as long as it likes, and a few hundred of them stop
the appliance from accepting the EMR's and viewers' requests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 38\r\n\r\nrequest headers not received in time\r\n"
)


def header_deadline_protocol(timeout: float) -> type[asyncio.Protocol]:
    """Uvicorn's httptools protocol closing a connection whose request line
    and headers are not complete *timeout* seconds after it connected or
    after the request's first byte (408 if part of a request came)."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _started = False

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401
            super().connection_made(transport)
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

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

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
            client = "%s:%d" % self.client if self.client else "?"
            log.info("HTTP client %s sent no complete request headers within %g s: connection closed",
                     client, timeout)
            if self._started:
                self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()

    return HeaderDeadlineProtocol
