"""The data set of a C-STORE-RQ while it arrives, in bounded memory.

A CT volume or a long ultrasound clip in one object can be gigabytes: held
in memory as it arrives, three at once took 3.2 GB of RAM. Fragments are
kept in memory up to :data:`IN_MEMORY` bytes (every CT or MR slice, most
radiographs: the fast path), then in an unnamed temporary file in the data
directory, which disappears with its last descriptor (and with the process,
should it die). An object whose store is below its low-water mark when it
starts, or that grows past ``max_object_bytes``, is refused when it ends
without its bytes being kept: the message must still be read to the end
before DIMSE can answer it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pacs.app import Pacs
from pacs.errors import IngestError, Status
from pacs.header import stray_meta_length
from pacs.part10 import BufferSource, FileBodySource, Source

# Bytes of a data set kept in memory before it goes to a file.
IN_MEMORY = 8 << 20
# Bytes read from the start of a spooled data set to find stray File Meta elements.
_HEAD = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Where large data sets go and when an arriving object is refused."""

    spool_dir: str
    max_object_bytes: int
    pacs: Pacs | None = None  # its ingest path says whether the store has room

    @classmethod
    def of(cls, pacs: Pacs) -> Limits:
        spool = os.path.join(pacs.settings.data_dir, "dimse-spool")
        os.makedirs(spool, mode=0o750, exist_ok=True)
        return cls(spool, pacs.settings.max_object_bytes, pacs)


class ReceivedData:
    """File-like sink of one data set's fragments (``write``), then the
    object's :class:`~pacs.part10.Source` for the ingest path."""

    def __init__(self, limits: Limits | None) -> None:
        self._limits = limits
        self._memory: BytesIO | None = BytesIO()
        self._file: Any = None
        self.size = 0
        # The status the object gets, decided while it arrives.
        self.refusal: IngestError | None = None

    def write(self, data: bytes | memoryview) -> int:
        if self.size == 0 and self._limits is not None and self._limits.pacs is not None:
            try:
                self._limits.pacs.ingestor.check_space(0)
            except IngestError as exc:
                self._refuse(exc)
        self.size += len(data)
        if self.refusal is not None:
            return len(data)
        if self._limits is not None and self.size > self._limits.max_object_bytes:
            limit = self._limits.max_object_bytes
            self._refuse(IngestError(Status.OBJECT_TOO_LARGE,
                                     f"object exceeds the limit of {limit} bytes (max_object_bytes)"))
            return len(data)
        try:
            if self._memory is not None and self._limits is not None and self.size > IN_MEMORY:
                self._file = tempfile.TemporaryFile(dir=self._limits.spool_dir)  # noqa: SIM115 - closed in close()
                self._file.write(self._memory.getbuffer())
                self._memory = None
            (self._memory if self._memory is not None else self._file).write(data)
        except OSError as exc:
            status = Status.OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else Status.STORAGE_FAILED
            self._refuse(IngestError(status, f"cannot keep the arriving object: {exc.strerror or exc}"))
        return len(data)

    def _refuse(self, error: IngestError) -> None:
        self.refusal = error
        self._release()

    def _release(self) -> None:
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def getbuffer(self) -> memoryview:
        """The bytes, when they are in memory (small objects)."""
        if self._memory is None:
            raise ValueError("the data set is not in memory")
        return self._memory.getbuffer()

    def getvalue(self) -> bytes:
        """All the bytes (pynetdicom's own readers of a data set)."""
        if self._memory is not None:
            return self._memory.getvalue()
        if self._file is None:
            return b""
        self._file.flush()
        return os.pread(self._file.fileno(), self.size, 0)

    def source(self, prefix: bytes, transfer_syntax: str) -> tuple[Source, int]:
        """The object to ingest, our File Meta *prefix* first, and how many
        leading bytes of stray File Meta elements were left out."""
        if self.refusal is not None:
            raise self.refusal
        if self._memory is not None:
            body = self._memory.getbuffer()
            stray = stray_meta_length(body, transfer_syntax)
            return BufferSource(prefix, body[stray:]), stray
        self._file.flush()
        fd = self._file.fileno()
        stray = stray_meta_length(os.pread(fd, min(self.size, _HEAD), 0), transfer_syntax)
        return FileBodySource(prefix, fd, stray, self.size - stray), stray

    def close(self) -> None:
        """Let the bytes go (the spool file disappears)."""
        self._release()
