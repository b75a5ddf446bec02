"""MLLP framing (HL7 v2 over TCP): <VT> message <FS><CR>.

The listener answers every framed message with the ACK its handler returns,
one message at a time per connection, many connections at once; the handler
runs in a worker thread so database work never blocks the event loop.
Garbage between frames is skipped; an oversized frame closes the connection,
and so does a connection that sends nothing for ``idle_timeout`` seconds (a
client that stopped half-way through a frame would otherwise hold its socket
and buffer forever).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
MAX_MESSAGE = 16 * 1024 * 1024
IDLE_TIMEOUT = 300.0


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


async def _read(reader: asyncio.StreamReader, idle_timeout: float | None) -> bytes | None:
    """The next chunk; None when the peer sent nothing for *idle_timeout* s."""
    try:
        return await asyncio.wait_for(reader.read(65536), idle_timeout)
    except TimeoutError:
        return None


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Callable[[bytes, str], bytes],
    idle_timeout: float | None = IDLE_TIMEOUT, allowed: Callable[[str], bool] | None = None,
) -> None:
    peer = writer.get_extra_info("peername")
    address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    if allowed is not None and not await asyncio.to_thread(allowed, address):
        # MLLP has no credentials: the address is all there is to go by.
        writer.close()
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    try:
        while True:
            chunk = await _read(reader, idle_timeout)
            if chunk is None:
                log.warning("MLLP connection from %s idle for %.0fs%s; closing", peer, idle_timeout,
                            " in the middle of a message" if buffer else "")
                return
            if not chunk:
                return
            buffer += chunk
            while True:
                start = buffer.find(VT)
                if start < 0:
                    buffer = b""  # nothing framed yet: discard the noise
                    break
                end = buffer.find(FS + CR, start)
                if end < 0:
                    buffer = buffer[start:]
                    if len(buffer) > MAX_MESSAGE:
                        log.warning("MLLP message from %s exceeds %d bytes; closing", peer, MAX_MESSAGE)
                        return
                    break
                message, buffer = buffer[start + 1 : end], buffer[end + 2 :]
                reply = await asyncio.to_thread(handler, message, address)
                writer.write(frame(reply))
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


class MLLPServer:
    """An MLLP listener in its own thread and event loop."""

    def __init__(
        self, host: str, port: int, handler: Callable[[bytes, str], bytes], *,
        idle_timeout: float | None = IDLE_TIMEOUT, allowed: Callable[[str], bool] | None = None,
    ) -> None:
        """*handler*: (message, peer address) -> ACK. *allowed*: whether a peer
        address may connect at all (it is closed at once otherwise)."""
        self.host, self.port, self.handler, self.allowed = host, port, handler, allowed
        # None or 0: never close an idle connection.
        self.idle_timeout = idle_timeout or None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hl7-mllp", daemon=True)

    def start(self) -> MLLPServer:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(
                    lambda r, w: _serve_connection(r, w, self.handler, self.idle_timeout, self.allowed), self.host,
                    self.port, reuse_address=True,
                )
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        log.info("HL7 MLLP listening on %s:%d", self.host, self.port)
        self._loop.run_forever()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def _close() -> None:
            server.close()
            await server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(_close(), loop)
        self._thread.join(10)


class NoAck(TimeoutError):
    """The peer took the message but sent no ACK in time: it is reachable,
    and may well have applied it (a resend must be recognisable, MSH-10)."""


def send(host: str, port: int, message: bytes, timeout: float = 10.0, ack_timeout: float = 30.0) -> bytes:
    """Send one message and return the ACK. Raises OSError (TimeoutError:
    no connection within *timeout*) or :class:`NoAck` (no ACK within
    *ack_timeout* of sending)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(frame(message))
        sock.settimeout(ack_timeout)
        try:
            return _read_ack(sock)
        except TimeoutError:
            raise NoAck(f"no ACK within {ack_timeout:g} s") from None
        except ConnectionError as exc:  # took the message, then hung up
            raise NoAck(str(exc)) from None


def _read_ack(sock: socket.socket) -> bytes:
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        buffer += chunk
        start, end = buffer.find(VT), buffer.find(FS + CR)
        if start >= 0 and end > start:
            return buffer[start + 1 : end]
