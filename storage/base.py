"""The object-store contract shared by every backend.

Storage knows nothing about DICOM: it keeps opaque byte objects under string
keys. A key is a relative, slash-separated path (``study/series/sop.dcm``);
backends may lay keys out however suits them (the filesystem store shards
them) but must give back exactly the bytes that were put.

Durability rule: :meth:`ObjectStore.put` returns only once the object is
durable and visible under its key in full; a failure leaves nothing visible.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1024 * 1024

# Keys end up as file paths and S3 object names; a conservative alphabet keeps
# both safe (no "..", no absolute paths, no control characters).
_SEGMENT = re.compile(r"^[A-Za-z0-9._@+=-]{1,200}$")


class StorageError(Exception):
    """The store could not complete an operation (I/O error, server down)."""


class StorageFullError(StorageError):
    """The store refused a write because it is (nearly) out of space."""


class ObjectNotFound(StorageError, KeyError):
    """No object exists under the requested key."""


class ObjectDamaged(StorageError):
    """The stored bytes of an object are not those that were stored: the
    store holds a different size than the index recorded (a file truncated
    by disk damage or by hand). Ours to repair (``pacs verify``), not the
    client's to retry."""


class ObjectExists(StorageError):
    """A commit without ``replace`` found the key taken; nothing was changed."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object."""

    key: str
    size: int
    sha256: str | None = None
    # When the object was written (seconds since the epoch, by the store's
    # clock; S3 counts whole seconds), None when not known: which of two
    # copies of one instance came last (see pacs.maintenance.common.written_after).
    modified: float | None = None


def pid_alive(pid: int) -> bool:
    """Whether process *pid* still runs (its temp files are then in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def validate_key(key: str) -> str:
    """Return *key* if it is a safe relative key, else raise ``ValueError``."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    return key


class HashingReader:
    """Wrap a binary stream, hashing and counting what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def sha256_of(stream: BinaryIO) -> tuple[str, int]:
    """Hash a stream to its end; return (hex digest, byte count)."""
    reader = HashingReader(stream)
    while reader.read(CHUNK):
        pass
    return reader.sha256, reader.size


class StagedObject(ABC):
    """Bytes written (or ready to write) but not yet visible under any key.

    Staging lets a caller start the slow part of a write (copy, fsync) before
    it knows the key, and abandon it if the object turns out to be invalid.
    """

    size: int
    sha256: str | None

    @abstractmethod
    def commit(self, key: str, *, replace: bool = True) -> ObjectInfo:
        """Publish the staged bytes under *key*, durably and atomically.

        With ``replace=False`` an existing object is left alone and
        :class:`ObjectExists` is raised; the staged bytes stay staged, so the
        caller may still commit with ``replace=True`` or abort.
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop the staged bytes; nothing becomes visible."""


class _DeferredPut(StagedObject):
    """Staging for stores that cannot publish cheaply: the PUT happens at commit."""

    def __init__(self, store: ObjectStore, stream: BinaryIO, size: int | None) -> None:
        self._store = store
        self._stream = stream
        self.size = size or 0
        self.sha256 = None

    def commit(self, key: str, *, replace: bool = True) -> ObjectInfo:
        if not replace and self._store.exists(key):
            raise ObjectExists(key)
        try:
            info = self._store.put(key, self._stream, self.size or None)
        finally:
            self._stream.close()
        self.size, self.sha256 = info.size, info.sha256
        return info

    def abort(self) -> None:
        self._stream.close()


class ObjectStore(ABC):
    """One interface for every backend (filesystem, S3)."""

    url: str
    # Each read waits on a network round trip: readers of many objects in a
    # row (retrieval) fetch a few ahead.
    remote: bool = False

    def stage(self, stream: BinaryIO, size: int | None = None) -> StagedObject:
        """Prepare the stream's bytes for a later :meth:`StagedObject.commit`.

        Takes ownership of *stream* (closes it).
        """
        return _DeferredPut(self, stream, size)

    @abstractmethod
    def put(self, key: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        """Store the stream's bytes under *key*, durably and atomically.

        Replaces an existing object. Returns the stored size and sha256.
        Raises :class:`StorageFullError` when out of space and
        :class:`StorageError` for any other failure; on failure nothing new
        is visible under *key*.
        """

    @abstractmethod
    def open(self, key: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        """Open the object for streaming reads (optionally a byte range).

        The caller must close the returned stream.
        """

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Return the object's size; raise :class:`ObjectNotFound` if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with *prefix*."""

    def exists(self, key: str) -> bool:
        """True if an object is stored under *key*."""
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def checksum(self, key: str) -> str:
        """Compute the sha256 of the stored bytes (reads the whole object)."""
        with self.open(key) as stream:
            return sha256_of(stream)[0]

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A local file holding the object, for libraries that want a path
        (random access to one frame of a large multi-frame object).

        The default downloads to a temporary file removed on exit; the
        filesystem store hands out the stored file itself, the S3 store a
        copy from its local cache when it has one (read-only use, both).
        """
        with tempfile.NamedTemporaryFile(prefix="pacs-", suffix=".dcm") as tmp:
            with self.open(key) as stream:
                shutil.copyfileobj(stream, tmp, CHUNK)
            tmp.flush()
            yield Path(tmp.name)

    def read_bytes(self, key: str) -> bytes:
        """Read a whole object; only for small objects (tests, metadata)."""
        with self.open(key) as stream:
            return stream.read()

    def free_bytes(self) -> int | None:
        """Free space for new objects, or None when the backend cannot tell."""
        return None

    def check(self) -> None:
        """Raise :class:`StorageError` if the store is not usable right now."""

    def close(self) -> None:
        """Release connections and other resources."""
