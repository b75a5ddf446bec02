"""Streaming ``multipart/related`` (RFC 2387) for DICOMweb (PS3.18).

Writer: :func:`multipart_related_stream` turns parts whose bodies are chunk
iterators into a byte stream a Starlette ``StreamingResponse`` sends as is::

    boundary = new_boundary()
    return StreamingResponse(
        multipart_related_stream(parts, boundary),
        media_type=content_type_header("application/dicom", boundary),
    )

Parser: :func:`parse_multipart_related` reads a STOW-RS body from
``request.stream()``, spooling each part to a temporary file while keeping
only a window of about one boundary in memory::

    async with contextlib.aclosing(parse_multipart_related(
            request.headers.get("content-type"), request.stream(),
            spool_dir=spool, max_part_bytes=limit)) as parts:
        async for part in parts:
            with part:                      # deletes part.path on exit
                store(part.path, part.content_type)

Framing follows RFC 2046 5.1.1: a delimiter is CRLF ``--boundary`` followed
by optional spaces/tabs and CRLF, the close delimiter is CRLF
``--boundary--``.  The CRLF before a delimiter belongs to the delimiter, not
to the body.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self, TypeVar

import anyio.to_thread

from .mediatypes import (
    _TOKEN_RE,
    canonical_media_type,
    format_media_type,
    parse_media_type,
)

__all__ = [
    "MultipartContentType",
    "MultipartError",
    "Part",
    "ReceivedPart",
    "SpoolFull",
    "build_multipart_related",
    "multipart_related_iter",
    "content_type_header",
    "file_chunks",
    "multipart_related_stream",
    "new_boundary",
    "parse_multipart_content_type",
    "parse_multipart_related",
]

T = TypeVar("T")

Body = bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]

# RFC 2046 bchars: what a boundary may contain (a trailing space is excluded).
_BCHARS: Final = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
# Some clients generate longer boundaries than RFC 2046's 70; reading them
# costs nothing, so only the writer enforces 70.
_MAX_READ_BOUNDARY: Final = 200
_MAX_HEADER_BYTES: Final = 16 * 1024
# Whitespace tolerated between a boundary and its CRLF (RFC 2046 transport padding).
_MAX_PADDING: Final = 1024
# Writer: pieces smaller than this are coalesced so the ASGI server is not
# handed thousands of tiny messages (part headers, CRLFs, small frames).
_COALESCE: Final = 64 * 1024
# Parser: part data is batched to this size and written from a worker thread,
# keeping disk latency off the event loop at one thread hop per batch.
_WRITE_BATCH: Final = 1024 * 1024
_THREAD_WRITE_MIN: Final = 256 * 1024
_DEFAULT_PART_TYPE: Final = "text/plain; charset=us-ascii"  # RFC 2046 5.1
# Free space of the spool's filesystem is looked at again after this many
# bytes: often enough that a refusal comes a few MB past the low-water mark,
# rarely enough that statvfs costs nothing next to the writes.
_FREE_CHECK_EVERY: Final = 4 * 1024 * 1024
# Errors that say "the disk is full", not "this request is wrong".
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_DONE: Final = object()
_ListIterator: Final[type] = type(iter([]))
_TupleIterator: Final[type] = type(iter(()))


class MultipartError(Exception):
    """A request body that cannot be read as ``multipart/related``.

    ``http_status`` is 400 (malformed), 413 (part or part count over the
    limit) or 415 (not ``multipart/related``).
    """

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message


class SpoolFull(MultipartError):
    """The spool's filesystem is full or below its low-water mark: the
    archive's lack of resources (HTTP 503, DICOM 0xA700), not a bad request.
    The part being spooled is deleted before this is raised."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


def free_bytes(directory: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer may still use on *directory*'s
    filesystem, or None when it cannot be told."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# -- writer ------------------------------------------------------------------------
@dataclass(frozen=True, init=False)
class Part:
    """One part to send: ``Part(content_type, headers, body)`` or
    ``Part(content_type, body=...)``.

    ``headers`` are extra part headers such as ``Content-Location`` (None or
    empty for none).  ``body`` is bytes, or an iterable / async iterable of
    byte chunks so that only one chunk is in memory at a time.  Synchronous
    iterators other than list/tuple iterators are advanced in a worker thread
    (they usually read files or object storage).
    """

    content_type: str
    headers: Mapping[str, str] = field(hash=False)
    body: Body = field(hash=False)

    def __init__(self, content_type: str, headers: Mapping[str, str] | None = None,
                 body: Body | None = None) -> None:
        # headers sits before body to read like a MIME part; catch the easy
        # mistake of passing the body second.
        if headers is not None and not isinstance(headers, Mapping):
            raise TypeError("Part(content_type, headers, body): headers must be a mapping; "
                            "pass the body as the third argument or body=...")
        if body is None:
            raise TypeError("Part() needs a body")
        object.__setattr__(self, "content_type", content_type)
        object.__setattr__(self, "headers", dict(headers or {}))
        object.__setattr__(self, "body", body)


def new_boundary() -> str:
    """A fresh random boundary.

    128 random bits make a collision with part content negligible, so the
    streaming writer does not scan (possibly gigabytes of) bodies for it.
    """
    return "filmless-" + secrets.token_hex(16)


def _check_boundary(boundary: str) -> bytes:
    if not 1 <= len(boundary) <= 70 or boundary.endswith(" ") or not set(boundary) <= _BCHARS:
        raise ValueError(f"invalid multipart boundary {boundary!r} (RFC 2046: 1-70 bchars)")
    return boundary.encode("ascii")


def content_type_header(type_param: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The Content-Type of a ``multipart/related`` response, e.g.
    ``multipart/related; type="application/dicom"; boundary=...``, with
    ``transfer-syntax=`` after ``type`` when given."""
    _check_boundary(boundary)
    params = {"type": type_param}
    if transfer_syntax:
        params["transfer-syntax"] = transfer_syntax
    params["boundary"] = boundary
    return format_media_type("multipart/related", params)


def _header_line(name: str, value: str) -> bytes:
    # Values come from route code (UIDs, URLs); refusing CR/LF keeps a bad one
    # from injecting headers or a fake boundary.
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid part header name {name!r}")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid characters in part header {name}: {value!r}")
    return f"{name}: {value}\r\n".encode("ascii")


def _part_head(boundary: bytes, content_type: str, headers: Mapping[str, str] | None) -> bytes:
    lines = [b"--", boundary, b"\r\n", _header_line("Content-Type", content_type)]
    for name, value in (headers or {}).items():
        if name.lower() == "content-type":
            raise ValueError("give the part's Content-Type as content_type, not in headers")
        lines.append(_header_line(name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


async def _aiter_sync(it: Iterator[T]) -> AsyncGenerator[T, None]:
    """Advance a blocking iterator in worker threads."""
    try:
        while True:
            # next() with a sentinel: StopIteration must not cross the thread boundary.
            item = await anyio.to_thread.run_sync(next, it, _DONE)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


async def _aiter_async(source: AsyncIterable[T]) -> AsyncGenerator[T, None]:
    it = aiter(source)
    try:
        async for item in it:
            yield item
    finally:
        # Async generators hold files or DB cursors; plain async iterators may
        # have no aclose at all.
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


async def _aiter_any(source: Iterable[T] | AsyncIterable[T]) -> AsyncGenerator[T, None]:
    if isinstance(source, AsyncIterable):
        async with contextlib.aclosing(_aiter_async(source)) as it:
            async for item in it:
                yield item
    elif isinstance(source, (list, tuple, _ListIterator, _TupleIterator)):
        # In memory already: no blocking, so no thread hop per item.
        for item in source:
            yield item
    else:
        async with contextlib.aclosing(_aiter_sync(iter(source))) as it:
            async for item in it:
                yield item


async def _pieces(parts: Iterable[Part] | AsyncIterable[Part], boundary: bytes) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(_aiter_any(parts)) as part_iter:
        async for part in part_iter:
            yield _part_head(boundary, part.content_type, part.headers)
            body = part.body
            if isinstance(body, (bytes, bytearray, memoryview)):
                yield bytes(body)
            else:
                async with contextlib.aclosing(_aiter_any(body)) as chunks:
                    async for chunk in chunks:
                        if chunk:
                            # ASGI servers want bytes; copying a bytearray is cheap next to I/O.
                            yield chunk if isinstance(chunk, bytes) else bytes(chunk)
            yield b"\r\n"
    yield b"--" + boundary + b"--\r\n"


async def multipart_related_stream(parts: Iterable[Part] | AsyncIterable[Part],
                                   boundary: str) -> AsyncGenerator[bytes, None]:
    """Encode ``parts`` as a ``multipart/related`` body, chunk by chunk.

    Output: ``--boundary CRLF headers CRLF body CRLF`` per part, then
    ``--boundary-- CRLF``.  Small pieces are coalesced up to 64 KiB; large body
    chunks pass through without copying.  Memory use is one body chunk plus
    the coalescing buffer.  Zero parts give just the close delimiter.  Closing
    the generator (client disconnect) closes the part and body iterators.
    """
    b = _check_boundary(boundary)
    pending: list[bytes] = []
    pending_len = 0
    async with contextlib.aclosing(_pieces(parts, b)) as pieces:
        async for piece in pieces:
            if len(piece) >= _COALESCE:
                if pending:
                    yield b"".join(pending)
                    pending, pending_len = [], 0
                yield piece
                continue
            pending.append(piece)
            pending_len += len(piece)
            if pending_len >= _COALESCE:
                yield b"".join(pending)
                pending, pending_len = [], 0
    if pending:
        yield b"".join(pending)


def multipart_related_iter(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The blocking twin of :func:`multipart_related_stream`, for a client
    in a worker thread (the router's STOW-RS): parts are taken one at a time
    and bodies (bytes or iterables of byte chunks) chunk by chunk, so a batch
    of large objects never sits in memory whole."""
    b = _check_boundary(boundary)
    for part in parts:
        yield _part_head(b, part.content_type, part.headers)
        if isinstance(part.body, (bytes, bytearray, memoryview)):
            yield bytes(part.body)
        else:
            yield from (bytes(chunk) for chunk in part.body if chunk)
        yield b"\r\n"
    yield b"--" + b + b"--\r\n"


def build_multipart_related(parts: Sequence[tuple[str, bytes]], type_param: str = "application/dicom",
                            *, boundary: str | None = None) -> tuple[bytes, str]:
    """Encode in-memory ``(content_type, body)`` parts; returns
    ``(body, content_type_header)``.  For tests and the CLI.

    A random boundary is re-drawn in the (astronomically unlikely) case a body
    contains it; a given ``boundary`` that occurs in a body raises ValueError.
    """
    chosen = boundary or new_boundary()
    while any(b"--" + chosen.encode("ascii") in body for _, body in parts):
        if boundary is not None:
            raise ValueError(f"boundary {boundary!r} occurs inside a part body")
        chosen = new_boundary()
    b = _check_boundary(chosen)
    out: list[bytes] = []
    for content_type, body in parts:
        out += [_part_head(b, content_type, None), bytes(body), b"\r\n"]
    out.append(b"--" + b + b"--\r\n")
    return b"".join(out), content_type_header(type_param, chosen)


def file_chunks(path: str | os.PathLike[str], chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
    """Read a file in chunks: a :class:`Part` body for a stored object."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


# -- parser ------------------------------------------------------------------------
@dataclass(frozen=True)
class MultipartContentType:
    """The parsed Content-Type of a ``multipart/related`` request."""

    media_type: str
    boundary: str
    type_param: str | None
    params: Mapping[str, str] = field(hash=False)


def parse_multipart_content_type(header: str | None) -> MultipartContentType:
    """Parse and check a request's Content-Type for ``multipart/related``.

    Raises :class:`MultipartError`: 415 when missing or another media type,
    400 when malformed or without a usable boundary.  Route code can call it
    first to check ``type_param`` before reading the body.
    """
    if header is None or not header.strip():
        raise MultipartError(415, "missing Content-Type: expected multipart/related")
    parsed = parse_media_type(header)
    if parsed is None:
        raise MultipartError(400, f"malformed Content-Type {header[:200]!r}")
    media_type, params = parsed
    if media_type != "multipart/related":
        raise MultipartError(415, f"unsupported Content-Type {media_type!r}: expected multipart/related")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError(400, "Content-Type multipart/related has no boundary parameter")
    if len(boundary) > _MAX_READ_BOUNDARY or any(ord(c) < 0x20 or ord(c) > 0x7E for c in boundary):
        raise MultipartError(400, f"invalid multipart boundary {boundary[:80]!r}")
    type_param = params.get("type") or None
    return MultipartContentType(media_type, boundary, type_param, params)


@dataclass(frozen=True)
class ReceivedPart:
    """One received part, its body spooled to ``path``.

    The caller owns the file: delete it with :meth:`discard` or use the part
    as a context manager (``with part: ...``), or move it elsewhere.
    ``headers`` has lowercased names; repeated headers are joined with ", ".
    ``content_type`` (and ``headers["content-type"]``) default to the
    request's ``type`` parameter when the part has none (PS3.18).
    """

    content_type: str
    headers: Mapping[str, str] = field(hash=False)
    path: Path
    size: int

    @property
    def media_type(self) -> str:
        """``content_type`` without parameters, lowercased, PS3.18 spelling."""
        return canonical_media_type(self.content_type)

    @property
    def params(self) -> dict[str, str]:
        """Parameters of ``content_type`` (e.g. ``transfer-syntax``)."""
        parsed = parse_media_type(self.content_type)
        return parsed[1] if parsed else {}

    def open(self) -> IO[bytes]:
        """Open the spooled body for reading."""
        return open(self.path, "rb")

    def read_bytes(self) -> bytes:
        """The whole body; only for parts known to be small."""
        return self.path.read_bytes()

    def discard(self) -> None:
        """Delete the spooled body (no error if already moved or deleted)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


class _Spool:
    """Body of the part being received: batched writes to a temporary file.

    With ``min_free_bytes`` the filesystem's free space is checked before
    the file is made and every few MB while it grows: a part that would take
    the disk below the mark is refused (:class:`SpoolFull`) before it is
    written, rather than spooled whole and refused by the ingest afterwards
    (a 721 MB request once took the disk to 15 MB free, endangering the
    index and every C-STORE). A disk that fills anyway (ENOSPC) is the same
    refusal, not a server error.
    """

    def __init__(self, spool_dir: str | None, max_bytes: int, part_no: int, min_free_bytes: int = 0) -> None:
        self.dir = spool_dir or tempfile.gettempdir()
        self.min_free_bytes = min_free_bytes
        self.part_no = part_no
        self._check_free(0)
        try:
            fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=spool_dir)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:  # no inode left: full as well
                raise self._full(exc) from None
            raise
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.max_bytes = max_bytes
        self.size = 0
        self.pending = bytearray()
        self._unchecked = 0

    def _check_free(self, coming: int) -> None:
        """Refuse when *coming* more bytes would leave less than the mark."""
        if not self.min_free_bytes:
            return
        free = free_bytes(self.dir)
        if free is not None and free - coming < self.min_free_bytes:
            raise SpoolFull(f"part {self.part_no}: the archive is below its low-water mark of free space "
                            f"({free} bytes free, {self.min_free_bytes} kept free); try again later")

    def _full(self, exc: OSError) -> SpoolFull:
        return SpoolFull(f"part {self.part_no}: the archive's disk is full ({exc.strerror}); try again later")

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._unchecked += len(data)
        if self._unchecked >= _FREE_CHECK_EVERY:
            self._check_free(len(data))
            self._unchecked = 0
        try:
            if len(data) >= _THREAD_WRITE_MIN:
                await anyio.to_thread.run_sync(self.file.write, data)
            else:
                self.file.write(data)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise self._full(exc) from None
            raise

    async def write(self, data: memoryview) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise MultipartError(413, f"part {self.part_no} exceeds the limit of {self.max_bytes} bytes")
        if len(data) >= _WRITE_BATCH:
            await self._flush()
            await self._write(data)
        else:
            self.pending += data
            if len(self.pending) >= _WRITE_BATCH:
                await self._flush()

    async def _flush(self) -> None:
        if not self.pending:
            return
        data, self.pending = self.pending, bytearray()
        await self._write(data)

    async def finish(self) -> tuple[Path, int]:
        await self._flush()
        try:
            self.file.close()  # flushes the file's own buffer: may meet a full disk too
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise self._full(exc) from None
            raise
        return self.path, self.size

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _parse_part_headers(block: bytes, part_no: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    # latin-1 maps every byte, so odd bytes cannot raise here.
    for raw in block.decode("latin-1").split("\n"):
        line = raw.removesuffix("\r")
        if not line:
            continue
        if line[0] in " \t":
            if last is None:
                raise MultipartError(400, f"part {part_no}: header block starts with a continuation line")
            headers[last] += " " + line.strip()  # obsolete folding (RFC 5322)
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise MultipartError(400, f"part {part_no}: malformed header line {line[:100]!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        last = name
    return headers


# Outcomes of looking at the bytes after a candidate delimiter.
_NEED_MORE: Final = -1
_NOT_DELIMITER: Final = -2
_CLOSE: Final = -3


def _classify(buf: bytearray, after: int, eof: bool) -> int:
    """What follows ``CRLF--boundary`` at ``after``: the close delimiter, a
    delimiter line (returns the index just past its line end), data that only
    looks like one, or not enough bytes yet.  At EOF "not enough" is returned
    as ``_NEED_MORE`` too; the caller reports truncation."""
    n = len(buf)
    if after >= n:
        return _NEED_MORE
    c = buf[after]
    if c == 0x2D:  # '-'
        if after + 1 >= n:
            return _NEED_MORE
        return _CLOSE if buf[after + 1] == 0x2D else _NOT_DELIMITER
    if c not in b" \t\r\n":
        # RFC 2046 forbids the boundary as a line prefix inside a body; a
        # sender that breaks that still meant it as data, as other parsers read it.
        return _NOT_DELIMITER
    lf = buf.find(b"\n", after, after + _MAX_PADDING)
    if lf < 0:
        return _NOT_DELIMITER if n - after >= _MAX_PADDING or eof and n > after else _NEED_MORE
    line = bytes(buf[after:lf])
    if line.endswith(b"\r"):
        line = line[:-1]
    # Bare LF after the boundary is tolerated: some clients write it.
    return lf + 1 if not line.strip(b" \t") else _NOT_DELIMITER


async def _aiter_chunks(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


async def parse_multipart_related(content_type_header: str | None,
                                  chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                                  spool_dir: str | None = None, max_part_bytes: int,
                                  max_parts: int = 10000,
                                  min_free_bytes: int = 0) -> AsyncGenerator[ReceivedPart, None]:
    """Stream-parse a ``multipart/related`` body (STOW-RS), yielding each part
    once its body is spooled to a temporary file in ``spool_dir``.

    ``chunks`` is typically ``request.stream()``.  Memory is bounded by the
    largest chunk plus ~1 MiB of write batching: the body is scanned with
    ``bytes.find`` and only a boundary-sized tail is kept between chunks.
    Preamble and epilogue are ignored; reading stops at the close delimiter.
    A part without Content-Type gets the request's ``type`` parameter
    (PS3.18), or RFC 2046's text/plain if there is none.

    Raises :class:`MultipartError` (400 malformed or truncated body, 413 part
    larger than ``max_part_bytes`` or more than ``max_parts`` parts, 415 not
    ``multipart/related``), or :class:`SpoolFull` (503) when the spool's
    disk is full or a part would take it below ``min_free_bytes`` free.  The file of a part being received when an error
    or cancellation happens is deleted; files of parts already yielded belong
    to the caller.  Use ``contextlib.aclosing`` when leaving the loop early.
    """
    ct = parse_multipart_content_type(content_type_header)
    default_type = ct.type_param or _DEFAULT_PART_TYPE
    delim = b"\r\n--" + ct.boundary.encode("ascii")
    keep = len(delim) - 1  # longest tail that can hold the start of a delimiter

    # A virtual CRLF in front lets a body that starts with "--boundary"
    # (no preamble) match the same delimiter pattern as every other part.
    buf = bytearray(b"\r\n")
    state = "preamble"  # -> headers -> body -> headers ... -> done
    search_from = 0
    header_search_from = 0
    part_no = 0
    spool: _Spool | None = None
    spool_headers: dict[str, str] = {}
    eof = False
    source = _aiter_chunks(chunks)
    try:
        while True:
            # Consume as much of buf as the state machine can.
            while True:
                if state == "headers":
                    if len(buf) < 2 and not (buf == b"\n" or eof):
                        break
                    if buf.startswith(b"\r\n"):
                        block, body_start = b"", 2
                    elif buf.startswith(b"\n"):
                        block, body_start = b"", 1
                    else:
                        crlf = buf.find(b"\n\r\n", header_search_from)
                        lflf = buf.find(b"\n\n", header_search_from)
                        ends = [i for i in (crlf, lflf) if i >= 0]
                        if not ends:
                            if len(buf) > _MAX_HEADER_BYTES:
                                raise MultipartError(400, f"part {part_no}: headers longer than "
                                                          f"{_MAX_HEADER_BYTES} bytes")
                            header_search_from = max(0, len(buf) - 2)
                            break
                        end = min(ends)
                        if end > _MAX_HEADER_BYTES:
                            raise MultipartError(400, f"part {part_no}: headers longer than "
                                                      f"{_MAX_HEADER_BYTES} bytes")
                        block = bytes(buf[:end + 1])
                        body_start = end + (3 if end == crlf else 2)
                    headers = _parse_part_headers(block, part_no)
                    if not headers.get("content-type"):
                        headers["content-type"] = default_type
                    del buf[:body_start]
                    spool = _Spool(spool_dir, max_part_bytes, part_no, min_free_bytes)
                    spool_headers = headers
                    state, search_from = "body", 0
                    continue

                # preamble or body: look for the next delimiter.
                idx = buf.find(delim, search_from)
                if idx < 0:
                    safe = len(buf) - keep
                    if safe > 0:
                        if spool is not None:
                            with memoryview(buf) as mv, mv[:safe] as data:
                                await spool.write(data)
                        del buf[:safe]
                    search_from = 0
                    break
                if idx > 0:
                    # Bytes before the candidate are data whatever it turns out
                    # to be; flushing them keeps the window small while waiting.
                    if spool is not None:
                        with memoryview(buf) as mv, mv[:idx] as data:
                            await spool.write(data)
                    del buf[:idx]
                outcome = _classify(buf, len(delim), eof)
                if outcome == _NOT_DELIMITER:
                    search_from = 1
                    continue
                search_from = 0
                if outcome == _NEED_MORE:
                    break
                if spool is not None:
                    path, size = await spool.finish()
                    spool = None
                    yield ReceivedPart(spool_headers["content-type"], spool_headers, path, size)
                if outcome == _CLOSE:
                    state = "done"
                    break
                del buf[:outcome]
                part_no += 1
                if part_no > max_parts:
                    raise MultipartError(413, f"more than {max_parts} parts in the request")
                state, header_search_from = "headers", 0

            if state == "done":
                return
            if eof:
                if state == "preamble":
                    raise MultipartError(400, "no multipart boundary delimiter "
                                              f"'--{ct.boundary}' found in the request body")
                where = "headers of" if state == "headers" else "body of"
                raise MultipartError(400, f"request body ends inside the {where} part {part_no}: "
                                          f"closing boundary '--{ct.boundary}--' missing")
            try:
                chunk = await anext(source)
            except StopAsyncIteration:
                eof = True
                continue
            if chunk:
                buf += chunk
    finally:
        if spool is not None:
            spool.abort()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
