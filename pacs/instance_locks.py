"""Per-SOP-Instance-UID locks shared by the processes of one node.

Several processes ingest into one filesystem store and one index: the DICOM
workers (``--dicom-workers``), the main process (STOW-RS, imports, C-MOVE
retrievals) and CLI commands on the same data directory. Two copies of one
instance received by two of them at once must be written and indexed one
after the other, or the row may describe one copy while the store holds the
other (see :meth:`pacs.ingest.Ingestor.ingest`).

A lock is an ``flock`` on one of :data:`BUCKETS` files under
``DATA_DIR/locks``, chosen by a hash of the UID: a bounded number of files
whatever the archive's size; two UIDs sharing a bucket only wait for each
other. Each hold opens the file anew, so threads of one process exclude each
other too (an ``flock`` belongs to an open file description), and the
kernel lets go of it when its holder dies: a crash leaves nothing locked.
Uncontended, a hold costs an open, an flock and a close: no write, no fsync.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Bucket files: enough that unrelated instances rarely share one.
BUCKETS = 4096


class InstanceFileLocks:
    """Exclusive per-instance locks in *directory*, across processes."""

    def __init__(self, directory: Path | str, buckets: int = BUCKETS) -> None:
        self.directory = Path(directory)
        self.buckets = buckets

    def path_for(self, sop_uid: str) -> Path:
        """The bucket file that locks *sop_uid*."""
        return self.directory / f"{zlib.crc32(sop_uid.encode()) % self.buckets:03x}"

    def _open(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @contextmanager
    def hold(self, sop_uid: str) -> Iterator[None]:
        """Hold the lock of *sop_uid* for the block, waiting for it if
        another process or thread holds it. Raises OSError when the lock
        file cannot be opened."""
        fd = self._open(self.path_for(sop_uid))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # lets go of the lock
