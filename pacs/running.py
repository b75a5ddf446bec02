"""Whether `pacs serve` runs on a data dir: a shared lock every server holds.

Several servers may share a data dir (each takes the lock shared); `pacs
restore`, which must not swap the index under a running server, takes it
exclusively. The kernel frees a lock with its process, so a crashed server
leaves nothing stale behind.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import PacsError

LOCK_NAME = "serve.lock"


class ServerRunning(PacsError):
    """The data dir is in use by `pacs serve` (or by a restore)."""


def _open(data_dir: Path) -> IO[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return open(data_dir / LOCK_NAME, "a+b")  # noqa: SIM115 - held for the caller's lifetime


def _take(data_dir: Path, mode: int, refusal: str) -> IO[bytes]:
    handle = _open(data_dir)
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerRunning(refusal) from None
    return handle


def hold_for_serving(data_dir: Path) -> IO[bytes]:
    """Mark *data_dir* as served until the returned handle is closed (or the
    process ends; child processes such as DICOM workers keep it too)."""
    return _take(data_dir, fcntl.LOCK_SH, f"a restore of the index in {data_dir} is running; start pacs serve "
                                          "once it has finished")


def hold_as_sole_server(data_dir: Path) -> IO[bytes] | None:
    """The lock taken exclusively when no other server (or restore) holds
    it, else None: the first server may upgrade the index schema, then
    shares the lock (:func:`share`)."""
    try:
        return _take(data_dir, fcntl.LOCK_EX, "")
    except ServerRunning:
        return None


@contextmanager
def no_server_running(data_dir: Path) -> Iterator[bool]:
    """Whether no `pacs serve` (or restore) holds *data_dir*; while the
    answer is True none can start, until the block ends."""
    lock = hold_as_sole_server(data_dir)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.close()


def share(handle: IO[bytes]) -> None:
    """Let other servers start beside the holder of an exclusive lock."""
    fcntl.flock(handle.fileno(), fcntl.LOCK_SH)


def hold_exclusively(data_dir: Path) -> IO[bytes]:
    """For work that must not run beside a server of *data_dir* (restore)."""
    return _take(data_dir, fcntl.LOCK_EX, f"pacs serve is running on {data_dir} (process holding "
                                          f"{data_dir / LOCK_NAME}); stop it first")


__all__ = ["LOCK_NAME", "ServerRunning", "hold_as_sole_server", "hold_exclusively", "hold_for_serving", "no_server_running",
           "share"]
