"""A process-wide bound on the decoded pixel bytes conversions hold at once.

A frame decoded (or read to be encoded) for a client is held from its decode
until its last byte is handed to the connection: a 3000x3000 16-bit frame is
17 MB, and eight clients of a tomosynthesis each holding one or two took
``pacs serve`` to 450-635 MB (issue 9, scenario 8: < 300 MB whatever the
study). The codec work alone was already bounded (``pacs.transcode.codec_work``:
one frame per CPU, ``CODEC_BUDGET`` bytes), not the frames waiting for a
slow client.

Every frame a conversion holds takes a :class:`Lease` of its bytes from one
:data:`PIXELS` budget (``conversion_memory_bytes``) before it is decoded and
gives it back once it is written out, or when its response ends or is
aborted (the lease is released in the generator's ``finally``, and by the
lease's own finalizer for a response whose body never started). An encoded
frame keeps a lease of its encoded size. Conversions that find no room wait
their turn, in order of arrival: a response gives its frame's lease back
before it asks for the next one, so a wait lasts about one frame's
conversion per client ahead, however many frames each asks for. A wait
longer than ``conversion_wait_seconds`` raises :class:`PixelMemoryBusy`
(HTTP 503 with Retry-After before a response starts, a body cut off after;
a failed C-STORE sub-operation; a routing job tried again later). A frame
larger than the whole budget is served alone: it waits until nothing else
is held.

What is counted: decoded WADO-RS frames, frame-by-frame instance conversions
(WADO-RS, WADO-URI, C-MOVE, C-GET, routing), whole-object conversions and
rendered frames. What is not: frames sent as stored (no codec), metadata,
the codecs' own working buffers (bounded by ``codec_work``).

Bounding what is in use is not all: glibc kept the freed buffers of big
frames in its arenas, so a big frame given back, or the codec work of one
ending, also trims the heap (:func:`trim_heap`, ``TRIM_FROM``).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from storage import StorageError

# Pieces a held frame is handed to the connection in: a whole 17 MB frame
# given at once was copied again by the HTTP layer (chunk framing, the
# socket's write buffer), outside any count; one piece at a time is not.
CHUNK = 1 << 20
# What a refused client is told to wait before it asks again (RFC 9110 10.2.3).
RETRY_AFTER_SECONDS = 10
DEFAULT_BUDGET = 24 * 1024 * 1024  # the setting's default (pacs.settings)
DEFAULT_WAIT_SECONDS = 60.0
# A frame at least this big given back (and the codec work of one, in
# pacs.transcode.codec_work) also gives the allocator's free memory back to
# the system (glibc malloc_trim). glibc raises its mmap threshold to the size
# of each big buffer freed (up to 32 MB), so later 17 MB frames and the
# codecs' buffers come from its arenas and stay resident once freed: with the
# frames held bounded, what the two arenas kept made ~90-120 MB of the peak.
# Ordinary frames (a 512 KB CT slice) never trim.
TRIM_FROM = 4 * 1024 * 1024


class PixelMemoryBusy(StorageError):
    """No room for a frame's pixels within the wait limit: the archive is
    busy converting for other clients; a transient refusal (HTTP 503 with
    ``Retry-After``), as a store that is down is. A :class:`StorageError`,
    so routing tries the job again later rather than failing it for good."""

    http_status = 503

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Holder:
    """A thread converting several objects before it sends the first (a
    routing batch): its leases count, but it never waits while it holds one
    (it cannot give that back while it waits: it would wait for itself)."""

    leases: int = 0


@dataclass(eq=False)  # each ticket is itself: two waiting for as many bytes are two
class _Ticket:
    """A conversion waiting for room."""

    nbytes: int


class Lease:
    """Room for one frame's bytes in a :class:`PixelMemory`, held until
    :meth:`release` (idempotent; also on garbage collection, for a response
    dropped before its body started)."""

    __slots__ = ("_memory", "_holder", "nbytes")

    def __init__(self, memory: PixelMemory | None, nbytes: int, holder: _Holder | None = None) -> None:
        self._memory = memory
        self._holder = holder
        self.nbytes = nbytes

    def resize(self, nbytes: int) -> None:
        """Hold *nbytes* from now on, if fewer (an encoded frame replaces its
        decoded pixels); a lease never grows without waiting."""
        memory = self._memory
        if memory is not None and 0 <= nbytes < self.nbytes:
            memory._give_back(self.nbytes - nbytes)
            self.nbytes = nbytes

    def release(self) -> None:
        """Give the room back (the frame is written out, or abandoned)."""
        memory, self._memory = self._memory, None
        if memory is not None:
            memory._give_back(self.nbytes, self._holder)
            self.nbytes = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the module may be half gone
            pass


class PixelMemory:
    """At most *budget* bytes of frames held at once by conversions; a
    conversion waits at most *wait_seconds* for room."""

    def __init__(self, budget: int = DEFAULT_BUDGET, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        # Re-entrant: a lease's finalizer may run in a thread that is inside.
        self._changed = threading.Condition(threading.RLock())
        self._local = threading.local()
        self._queue: list[_Ticket] = []
        self.budget, self.wait_seconds = budget, wait_seconds
        self._used = self._peak = self._waited = self._refused = 0

    def configure(self, budget: int, wait_seconds: float) -> None:
        """The operator's settings (``conversion_memory_bytes``, ``conversion_wait_seconds``)."""
        with self._changed:
            self.budget, self.wait_seconds = max(1, int(budget)), float(wait_seconds)
            self._changed.notify_all()

    def lease(self, nbytes: int) -> Lease:
        """Room for *nbytes*, waited for in turn; raises
        :class:`PixelMemoryBusy` when none comes within the wait limit."""
        nbytes = max(0, int(nbytes))
        if not nbytes:
            return Lease(None, 0)
        holder: _Holder | None = getattr(self._local, "holder", None)
        with self._changed:
            if (holder is not None and holder.leases) or (not self._queue and self._fits(nbytes)):
                return self._grant(nbytes, holder)
            ticket = _Ticket(nbytes)
            self._queue.append(ticket)
            self._waited += 1
            deadline = time.monotonic() + self.wait_seconds
            try:
                while not (self._queue[0] is ticket and self._fits(nbytes)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._refused += 1
                        raise PixelMemoryBusy(
                            f"the archive is busy converting images for other clients ({_mb(self._used)} of "
                            f"decoded pixels held, {_mb(self.budget)} allowed at once, this needs {_mb(nbytes)}; "
                            f"waited {self.wait_seconds:g} s): try again later")
                    self._changed.wait(left)
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now (or could not while this one was first).
                self._changed.notify_all()
            return self._grant(nbytes, holder)

    def _fits(self, nbytes: int) -> bool:
        # A frame larger than the whole budget runs alone.
        return self._used == 0 or self._used + nbytes <= self.budget

    def _grant(self, nbytes: int, holder: _Holder | None) -> Lease:
        self._used += nbytes
        self._peak = max(self._peak, self._used)
        if holder is not None:
            holder.leases += 1
        return Lease(self, nbytes, holder)

    def _give_back(self, nbytes: int, holder: _Holder | None = None) -> None:
        with self._changed:
            self._used -= nbytes
            if holder is not None:
                holder.leases -= 1
            self._changed.notify_all()
        if nbytes >= TRIM_FROM:
            trim_heap()

    @contextmanager
    def one_holder(self) -> Iterator[None]:
        """Leases taken by this thread inside the block belong to one holder,
        which never waits while it holds one: for a caller that prepares
        several conversions before it sends the first (a routing batch)."""
        outer = getattr(self._local, "holder", None)
        if outer is not None:
            yield
            return
        self._local.holder = _Holder()
        try:
            yield
        finally:
            self._local.holder = None

    def stats(self) -> dict[str, int]:
        """Budget, bytes held now, the most held at once since the start,
        conversions waiting now, conversions that had to wait, and refused."""
        with self._changed:
            return {"budget": self.budget, "in_use": self._used, "peak": self._peak, "waiting": len(self._queue),
                    "waited": self._waited, "refused": self._refused}


def _heap_trimmer() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _heap_trimmer()


def trim_heap() -> None:
    """Free memory of every malloc arena back to the system (well under a
    millisecond to a few; the GIL is released meanwhile)."""
    if _TRIM is not None:
        _TRIM()


def _mb(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MB"


# The process's one budget, configured from the settings when the archive opens (pacs.app.Pacs).
PIXELS = PixelMemory()


def held_pieces(data: bytes | bytearray | memoryview, lease: Lease | None = None) -> Iterator[bytes]:
    """*data* in pieces of at most ``CHUNK`` bytes, *lease* released once the
    last piece is taken (or the consumer stops: a client gone midway).

    Only one piece at a time is copied; a whole frame handed to the HTTP
    server at once was copied there two or three times more while the
    client read it."""
    try:
        if len(data) <= CHUNK and isinstance(data, bytes):
            yield data
        else:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            for start in range(0, len(view), CHUNK):
                yield bytes(view[start:start + CHUNK])
            del view
        del data
    finally:
        if lease is not None:
            lease.release()
