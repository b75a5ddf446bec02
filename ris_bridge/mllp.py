"""MLLP framing (HL7 v2 over TCP): <VT> message <FS><CR>.

Read leniently: <FS> alone ends a frame (a <CR> or LF right after it
belongs to it; one coming later is a line break between frames, ignored),
and a second <VT> before the end block begins the message anew (HL7 v2.5
Appendix C: the one begun before was abandoned; dropped and logged).

The listener answers every framed message with the ACK its handler returns,
one message at a time per connection, many connections at once; the handler
runs in a worker thread so database work never blocks the event loop.
Garbage between frames is skipped; an oversized frame closes the connection,
and so does a connection that sends nothing for ``idle_timeout`` seconds (a
client that stopped half-way through a frame would otherwise hold its socket
and buffer forever), or that does not finish a message within
``frame_timeout`` seconds of its first byte however slowly it trickles.

A HIS uses a handful of connections: at most ``max_connections`` are served
at once, ``max_per_host`` of them from one address, and the excess is closed
as soon as it is accepted (idle connections by the thousand once took the
process past 1024 descriptors, where select()-based DICOM code fails, and
then to its descriptor limit). Refusals and accept errors (EMFILE) are
logged at most once per ``LOG_INTERVAL``, never a line per connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

# (message, peer address) -> the ACK to send, or the ACKs in order (enhanced
# mode: the accept ACK, then the application ACK); b"" or [] for none.
Handler = Callable[[bytes, str], bytes | Sequence[bytes]]
log = logging.getLogger(__name__)

VT, FS, CR, LF = b"\x0b", b"\x1c", b"\x0d", b"\x0a"
MAX_MESSAGE = 16 * 1024 * 1024
IDLE_TIMEOUT = 300.0
FRAME_TIMEOUT = 60.0
MAX_CONNECTIONS = 32
LOG_INTERVAL = 60.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Throttled:
    """Log lines of one kind at most once per *interval*, saying how many were held back."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._held[kind] += 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            message += f" ({held} more like this in the last {self.interval:.0f}s)"
        log.warning(message, *args)


class _Limits:
    """Connections served at once, overall and per peer address (used only
    from the listener's event loop thread)."""

    def __init__(self, total: int, per_host: int) -> None:
        self.total = max(1, total)
        self.per_host = per_host if per_host > 0 else max(1, self.total // 2)
        self.open = 0
        self.by_host: Counter[str] = Counter()

    def take(self, address: str) -> tuple[str, str]:
        """("", "") when *address* may have one more connection (counted),
        else which limit refuses it ("total", "host") and why."""
        if self.open >= self.total:
            return "total", f"{self.open} HL7 connections open, the most allowed (hl7_max_connections {self.total})"
        if self.by_host[address] >= self.per_host:
            return "host", (f"{self.by_host[address]} HL7 connections open from that address, the most allowed "
                    f"(hl7_max_connections_per_host {self.per_host})")
        self.open += 1
        self.by_host[address] += 1
        return "", ""

    def give_back(self, address: str) -> None:
        self.open -= 1
        self.by_host[address] -= 1
        if self.by_host[address] <= 0:
            del self.by_host[address]


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


def _frame_in(buffer: bytes, first: int) -> tuple[int, int, int] | None:
    """The first complete frame in *buffer* from its start block at *first*:
    (its last start block, its end block, where what follows it begins), or
    None while no end block has come. The last start block before the end
    block begins the message (an earlier one began a frame abandoned
    half-way); the end block alone ends it, and a CR (as the standard says)
    or LF right after it is part of it -- a peer that leaves it out is still
    understood (its frame waited for a CR that never came)."""
    end = buffer.find(FS, first)
    if end < 0:
        return None
    start = buffer.rfind(VT, first, end)
    after = end + 1
    if buffer[after : after + 1] in (CR, LF):
        after += 1
    return start, end, after


async def _read(reader: asyncio.StreamReader, idle_timeout: float | None) -> bytes | None:
    """The next chunk; None when the peer sent nothing for *idle_timeout* s."""
    try:
        return await asyncio.wait_for(reader.read(65536), idle_timeout)
    except TimeoutError:
        return None


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler,
    idle_timeout: float | None = IDLE_TIMEOUT, allowed: Callable[[str], bool] | None = None,
    frame_timeout: float | None = FRAME_TIMEOUT, limits: _Limits | None = None,
    throttled: _Throttled | None = None,
) -> None:
    peer = writer.get_extra_info("peername")
    address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    if limits is not None:
        limit, refused = limits.take(address)
        if limit:
            # Closed at once: before the allowlist check, so a flood costs no thread or audit row each.
            (throttled or _Throttled()).warning(
                f"refused-{limit}", "HL7 connection from %s refused: %s", address, refused)
            writer.transport.abort()
            return
    try:
        if allowed is not None and not await asyncio.to_thread(allowed, address):
            # MLLP has no credentials: the address is all there is to go by.
            writer.close()
            return
        await _converse(reader, writer, handler, peer, address, idle_timeout, frame_timeout)
    finally:
        if limits is not None:
            limits.give_back(address)


async def _converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler,
    peer: object, address: str, idle_timeout: float | None, frame_timeout: float | None,
) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    loop = asyncio.get_running_loop()
    buffer = b""
    # When the bytes not yet part of a complete message began to arrive
    # (None: between messages); the frame deadline counts from there, so a
    # client trickling a byte now and then cannot hold the connection.
    frame_started: float | None = None
    try:
        while True:
            timeout, frame_due = idle_timeout, False
            if frame_started is not None and frame_timeout:
                remaining = frame_started + frame_timeout - loop.time()
                if timeout is None or remaining <= timeout:
                    timeout, frame_due = max(0.0, remaining), True
            chunk = await _read(reader, timeout) if timeout != 0.0 else None
            if chunk is None and frame_due:
                log.warning("MLLP connection from %s did not finish a message within %gs; closing",
                            peer, frame_timeout)
                return
            if chunk is None:
                log.warning("MLLP connection from %s idle for %.0fs%s; closing", peer, idle_timeout,
                            " in the middle of a message" if buffer else "")
                return
            if not chunk:
                return
            buffer += chunk
            stray = False
            while True:
                first = buffer.find(VT)
                if first < 0:
                    stray = stray or bool(buffer.strip())
                    buffer = b""  # nothing framed yet: discard the noise
                    break
                stray = stray or bool(buffer[:first].strip())
                found = _frame_in(buffer, first)
                if found is None:
                    buffer = buffer[first:]
                    if len(buffer) > MAX_MESSAGE:
                        log.warning("MLLP message from %s exceeds %d bytes; closing", peer, MAX_MESSAGE)
                        return
                    break
                start, end, after = found
                if buffer[first:start].strip(VT):
                    # HL7 v2.5 Appendix C: a start block before the end block
                    # means the frame begun was abandoned. Taken as one message
                    # with the next, its MSH and PID headed the next one's orders.
                    log.warning("MLLP connection from %s started a new message before ending the one before: "
                                "%d bytes of the unfinished message dropped", peer, start - first)
                message, buffer = buffer[start + 1 : end], buffer[after:]
                frame_started, stray = None, False
                reply = await asyncio.to_thread(handler, message, address)
                # Nothing when the sender asked for no acknowledgment (MSH-15, MSH-16);
                # in enhanced mode the accept ACK and the application ACK, each framed.
                replies = [reply] if isinstance(reply, bytes) else reply
                for one in replies:
                    if one:
                        writer.write(frame(one))
                if any(replies):
                    await writer.drain()
            if (buffer or stray) and frame_started is None:
                frame_started = loop.time()  # a partial frame, or noise (not a bare line break)
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


class MLLPServer:
    """An MLLP listener in its own thread and event loop."""

    def __init__(
        self, host: str, port: int, handler: Handler, *,
        idle_timeout: float | None = IDLE_TIMEOUT, allowed: Callable[[str], bool] | None = None,
        frame_timeout: float | None = FRAME_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
        max_per_host: int = 0,
    ) -> None:
        """*handler*: (message, peer address) -> ACK. *allowed*: whether a peer
        address may connect at all (it is closed at once otherwise).
        *max_per_host* 0: half of *max_connections*."""
        self.host, self.port, self.handler, self.allowed = host, port, handler, allowed
        # None or 0: never close an idle connection (or a slow frame).
        self.idle_timeout = idle_timeout or None
        self.frame_timeout = frame_timeout or None
        self.limits = _Limits(max_connections, max_per_host)
        self.throttled = _Throttled()
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
        self._loop.set_exception_handler(self._loop_error)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(
                    lambda r, w: _serve_connection(r, w, self.handler, self.idle_timeout, self.allowed,
                                                   self.frame_timeout, self.limits, self.throttled),
                    self.host, self.port, reuse_address=True,
                )
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        log.info("HL7 MLLP listening on %s:%d", self.host, self.port)
        self._loop.run_forever()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Out of descriptors (EMFILE and the like) asyncio stops accepting for
        a second and logs a traceback per failed accept(): hundreds a second
        while it lasts. One line per interval says it instead."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS:
            self.throttled.warning("accept", "HL7 (MLLP) cannot accept connections: %s; retrying", exc)
            return
        loop.default_exception_handler(context)

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
    """The first framed message the peer sends back; its end block alone
    ends it (a HIS that leaves out the CR after it had its ACK never read,
    and every message sent again forever)."""
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        buffer += chunk
        first = buffer.find(VT)
        found = _frame_in(buffer, first) if first >= 0 else None
        if found is not None:
            start, end, _ = found
            return buffer[start + 1 : end]
