"""Per-SOP-Instance-UID locks shared by the processes of one node.

Several processes ingest into one filesystem store and one index: the DICOM
workers (``--dicom-workers``), the main process (STOW-RS, imports, C-MOVE
retrievals) and CLI commands on the same data directory. Two copies of one
instance received by two of them at once must be written and indexed one
after the other, or the row may describe one copy while the store holds the
other (see :meth:`pacs.ingest.Ingestor.ingest`).

A lock is an open-file-description (OFD) lock on one byte of one file,
``DATA_DIR/locks/instances``, at an offset hashed from the UID: one file
whatever the archive's size (the file stays empty; a lock may lie past its
end), and two UIDs share a byte about once in four billion. Each hold opens
the file anew, so threads of one process exclude each other too (an OFD
lock belongs to an open file description, not to the process), and the
kernel lets go of it when its holder dies: a crash leaves nothing locked.
Uncontended, a hold costs an open, a lock and a close: no write, no fsync,
and no file is made per instance. (Made one by one, per-bucket lock files
each put a new inode into the journal commit of the object's own fsync:
ingest into a fresh archive ran ~8% slower.)
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# struct flock (fcntl(2)): l_type, l_whence (short), l_start, l_len (off_t), l_pid (0 for OFD locks).
_FLOCK = "hhqqi"
LOCK_FILE = "instances"


class InstanceFileLocks:
    """Exclusive per-instance locks in *directory*, across processes."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE

    @staticmethod
    def offset_for(sop_uid: str) -> int:
        """The byte of the lock file that locks *sop_uid*."""
        return zlib.crc32(sop_uid.encode())

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @contextmanager
    def hold(self, sop_uid: str) -> Iterator[None]:
        """Hold the lock of *sop_uid* for the block, waiting for it if
        another process or thread holds it. Raises OSError when the lock
        file cannot be opened or locked."""
        fd = self._open()
        try:
            request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, self.offset_for(sop_uid), 1, 0)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
            yield
        finally:
            os.close(fd)  # lets go of the lock
