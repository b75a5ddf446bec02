"""Small files written whole or not at all (keys, certificates, secrets)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _written_beside(path: Path, data: bytes, mode: int) -> str:
    """*data* in a new temporary file beside *path*, *mode* set before any
    byte lands, synced; its name (the caller puts it in place or removes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; fchmod makes the final mode exact whatever the umask.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to *path* with *mode* set before any byte lands (no
    readable window), synced, then renamed into place: a crash leaves the
    old file or the new one, never a part."""
    tmp = _written_beside(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_once(path: Path, data: bytes, mode: int) -> bool:
    """Put *data* at *path* with *mode* unless a file is there already; False
    when one was (another process's came first: keep it, never replace it; a
    secret replaced under a key already sealed with it loses that key).
    Written beside, synced, then linked into place: a reader never sees a
    partial file, and of two creators at once exactly one wins."""
    tmp = _written_beside(path, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        # The new name survives a power cut.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
