"""Filesystem object store: the embedded default.

Layout: ``ROOT/<aa>/<bb>/<key>`` where ``aabb`` are the first hex digits of
the sha1 of the key's first segment (the study UID for DICOM objects). That
keeps every directory small at millions of objects while a whole study stays
in one directory, so listing a study prefix touches one folder.

Writes are atomic and durable: bytes go to ``ROOT/.tmp/``, are fsynced,
renamed into place, and the target directory is fsynced. A crash before the
rename leaves only a temp file, removed at the next start.
"""

from __future__ import annotations

import errno
import logging
import hashlib
import io
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .base import (
    CHUNK,
    HashingReader,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StagedObject,
    StorageError,
    StorageFullError,
    pid_alive,
    validate_key,
)

log = logging.getLogger(__name__)

_TMP = ".tmp"
# How list() names a file outside the key layout ("?" is in no valid key).
STRAY_PREFIX = "?"
_STALE_TMP_SECONDS = 24 * 3600
_SPARE_MAX_AGE = 3600.0
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _unlistable(exc: OSError) -> None:
    """os.walk's error: a folder that vanished meanwhile holds nothing to
    list; any other (permissions, I/O) is the store's error."""
    if not isinstance(exc, FileNotFoundError):
        raise StorageError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    """Best-effort cleanup: the error being handled matters more than this one."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class RangeReader(io.RawIOBase):
    """A read-only view of ``length`` bytes of an open file from its position."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        n = self._raw.readinto(view)  # type: ignore[attr-defined]
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _os_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in _FULL_ERRNOS:
        return StorageFullError(f"no space left to {what}")
    return StorageError(f"cannot {what}: {exc}")


class _FileStaged(StagedObject):
    def __init__(self, store: FileStore, tmp: Path, size: int, sha256: str) -> None:
        self._store = store
        self._tmp = tmp
        self.size = size
        self.sha256 = sha256

    def commit(self, key: str, *, replace: bool = True) -> ObjectInfo:
        self._store._publish(self._tmp, key, replace)
        return ObjectInfo(key=key, size=self.size, sha256=self.sha256)

    def abort(self) -> None:
        _remove_quietly(self._tmp)


class _SpareFiles:
    """Staging files created ahead of need by a background thread.

    Creating a file waits on the filesystem journal, which the previous
    object's fsyncs keep busy (traced at ~1.1 ms per create while receiving
    tiny objects). Made while the next object is still on the wire, the create
    costs its acknowledgement nothing: +16% objects/s for tiny objects in
    interleaved A/B runs. Spares are ordinary staging files named for our
    pid: removed at close or, after a crash, by the next start.
    """

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self._directory = directory
        self._keep = keep
        self._ready: deque[tuple[Path, int, float]] = deque()
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._making: Path | None = None

    def _new_path(self) -> Path:
        return self._directory / f"{os.getpid()}.{uuid.uuid4().hex}.tmp"

    @staticmethod
    def _open_new(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def create(self) -> tuple[Path, int]:
        path = self._new_path()
        return path, self._open_new(path)

    def _make_spare(self) -> None:
        path = self._new_path()
        # Known as a spare from before it exists (see paths()).
        self._making = path
        try:
            self._ready.append((path, self._open_new(path), time.monotonic()))
        finally:
            self._making = None

    def _pop(self) -> tuple[Path, int, float] | None:
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    @staticmethod
    def _drop(path: Path, fd: int) -> None:
        os.close(fd)
        _remove_quietly(path)

    def _next_spare(self) -> tuple[Path, int] | None:
        while (spare := self._pop()) is not None:
            path, fd, made = spare
            if time.monotonic() - made < _SPARE_MAX_AGE:
                return path, fd
            # Another process's start removes staging files a day old: an
            # idle server's spare may be gone from the directory.
            self._drop(path, fd)
        return None

    def take(self) -> tuple[Path, int]:
        """A new empty staging file (path, open fd): a spare when one is ready."""
        with self._guard:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="fs-spare-files", daemon=True)
                self._thread.start()
        spare = self._next_spare()
        self._wanted.set()
        return spare if spare is not None else self.create()

    def _run(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and len(self._ready) < self._keep:
                try:
                    self._make_spare()
                except OSError:
                    break  # take() creates its own and reports the error
        self._discard()

    def close(self) -> None:
        """Stop making spares and remove the ones not taken."""
        self._closed = True
        self._wanted.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._discard()

    def paths(self) -> set[Path]:
        """The spares ready now or being made."""
        making = self._making
        return {path for path, _, _ in list(self._ready)} | ({making} if making else set())

    def _discard(self) -> None:
        while (spare := self._pop()) is not None:
            self._drop(*spare[:2])


class FileStore(ObjectStore):
    """Objects as files under one root directory."""


    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self._tmp = self.root / _TMP
        # Directories already known to be durable on disk: fsyncing a parent
        # once per new directory is enough, not once per object.
        # (Strings, not Paths: looked up for every object stored.)
        self._durable_dirs: set[str] = {str(self.root), str(self._tmp)}
        self._spares = _SpareFiles(self._tmp)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temp_files()
        except OSError as exc:
            # Reads (and the index) stay usable; writes fail with a clear
            # status and check() reports the problem.
            log.error("object store at %s is not writable: %s", self.root, exc)

    # -- layout ---------------------------------------------------------
    @staticmethod
    def _shard(first_segment: str) -> str:
        h = hashlib.sha1(first_segment.encode()).hexdigest()
        return f"{h[:2]}/{h[2:4]}"

    def path_for(self, key: str) -> Path:
        """The file that holds *key* (whether or not it exists yet)."""
        return Path(self._file_for(key))

    def _file_for(self, key: str) -> str:
        validate_key(key)
        return f"{self.root}/{self._shard(key.partition('/')[0])}/{key}"

    def _key_for(self, path: Path) -> str:
        rel = path.relative_to(self.root).parts
        return "/".join(rel[2:])

    def _holds(self, key: str, path: Path) -> bool:
        try:
            key.encode("utf-8")  # a name that is not UTF-8 is no key (surrogates)
            return self._file_for(key) == str(path)
        except (ValueError, UnicodeError):
            return False

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._durable_dirs:
            return
        missing: list[str] = []
        d = directory
        while d not in self._durable_dirs and not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(directory, exist_ok=True)
        # A new directory entry is only durable once its parent is fsynced.
        for created in reversed(missing):
            _fsync_dir(os.path.dirname(created))
        self._durable_dirs.add(directory)

    def _remove_stale_temp_files(self) -> None:
        now = time.time()
        for entry in os.scandir(self._tmp):
            pid_part = entry.name.split(".", 1)[0]
            try:
                stale = not pid_part.isdigit() or not pid_alive(int(pid_part))
                stale = stale or now - entry.stat().st_mtime > _STALE_TMP_SECONDS
                if stale:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    # -- contract -------------------------------------------------------
    def stage(self, stream: BinaryIO, size: int | None = None) -> StagedObject:
        reader = HashingReader(stream)
        tmp = self._tmp / "-"
        try:
            tmp, fd = self._spares.take()
            try:
                while chunk := reader.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if size is not None and reader.size != size:
                raise StorageError(f"short write: {reader.size} of {size} bytes")
        except OSError as exc:
            _remove_quietly(tmp)
            raise _os_error(exc, "stage object") from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        finally:
            stream.close()
        return _FileStaged(self, tmp, reader.size, reader.sha256)

    def _publish(self, tmp: Path, key: str, replace: bool = True) -> None:
        target = self._file_for(key)
        directory = target.rpartition("/")[0]
        try:
            try:
                self._place(tmp, target, directory, key, replace)
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                # A folder we made was removed since (by hand, a cleanup
                # script): the cache of folders made would skip re-creating
                # it and refuse every later object of that series until a
                # restart. Forget it, make the folders again, retry once.
                log.warning("folder %s of the object store was removed while serving: made again", directory)
                self._forget_dirs()
                self._place(tmp, target, directory, key, replace)
        except OSError as exc:
            _remove_quietly(tmp)
            raise _os_error(exc, f"store {key}") from exc

    def _place(self, tmp: Path, target: str, directory: str, key: str, replace: bool) -> None:
        """Move the staged *tmp* to *target*, durably."""
        self._ensure_dir(directory)
        if replace:
            os.rename(tmp, target)
        else:
            # link() never replaces: an atomic "create if absent".
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise ObjectExists(key) from None
            os.unlink(tmp)
        _fsync_dir(directory)

    def _forget_dirs(self) -> None:
        """Drop the folders known to exist, but the root and staging ones:
        which of them a removal took is not known (a shard folder holds
        other studies' folders too); each is checked again when next used."""
        self._durable_dirs = {str(self.root), str(self._tmp)}

    def put(self, key: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        self.path_for(key)  # validate the key before writing anything
        return self.stage(stream, size).commit(key)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        path = self.path_for(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc
        if offset:
            f.seek(offset)
        if length is None:
            return f
        return io.BufferedReader(RangeReader(f, length), CHUNK)  # type: ignore[return-value]

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self.path_for(key)
        if not path.exists():
            raise ObjectNotFound(key)
        yield path

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self.path_for(key).stat()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        return ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink()
            # The removal made durable; an error of that fsync is the store's
            # too (it escaped as a bare OSError the callers did not expect).
            _fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if "/" in prefix:
            # The first segment is complete, so only its shard can hold matches.
            first = prefix.split("/", 1)[0]
            tops = [self.root / self._shard(first) / first]
        else:
            tops = [self.root]
        for top in tops:
            if not top.exists():
                continue
            # Folders moved to another disk and linked back are walked (each
            # once: a link loop ends); one that cannot be read is an error,
            # not skipped: `pacs reindex` would rebuild an index without its
            # objects, and `pacs verify` report an archive as whole.
            seen: set[tuple[int, int]] = set()
            for dirpath, dirnames, filenames in os.walk(top, onerror=_unlistable, followlinks=True):
                if Path(dirpath) == self.root:
                    dirnames[:] = [d for d in dirnames if d != _TMP]
                try:
                    identity = _identity(dirpath)
                except FileNotFoundError:
                    identity = None
                if identity is None or identity in seen:
                    dirnames[:] = []
                    continue
                seen.add(identity)
                dirnames.sort()
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    key = self._key_for(path)
                    if not self._holds(key, path):
                        # A file the layout does not explain (copied in by hand,
                        # put back by fsck): listed under a name no key can
                        # have, so that `pacs verify` names it and goes on
                        # (bytes of a name that are not UTF-8 shown escaped).
                        rel = os.fsencode(path.relative_to(self.root)).decode("utf-8", "backslashreplace")
                        key = STRAY_PREFIX + rel
                    if key.startswith(prefix):
                        try:
                            st = path.stat()
                        except FileNotFoundError:
                            continue
                        yield ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def close(self) -> None:
        self._spares.close()

    def staged_files(self) -> list[Path]:
        """Staging files being written or left behind by a crash; not the
        empty spares made ahead of need."""
        listed = list(self._tmp.iterdir())
        spares = self._spares.paths()
        return [path for path in listed if path not in spares]

    def check(self) -> None:
        if not self._tmp.is_dir() or not os.access(self._tmp, os.W_OK):
            raise StorageError(f"store directory {self._tmp} is not writable")
