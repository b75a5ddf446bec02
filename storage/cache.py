"""A bounded, local read-through cache of remote objects, for ``local_path``.

Readers that need random access to an object (one frame of a multi-frame
object, a byte range of a video, a render) get a local file. Without a cache
an S3 store downloaded the whole object for each such read: a viewer paging
through a 600-frame ultrasound clip fetched its hundreds of MB once per frame.

The cache is a cache only, never the source of truth:

- a copy is used only once the store said it is of the version it holds
  (the object's S3 ETag and size, from one HEAD; without a copy the object
  is fetched at once, no HEAD first): a copy of another version
  (the object replaced under its key: the overwrite policy, ``pacs
  compress``, another node) is never handed out; an object gone from the
  store is gone from the cache;
- a file is published under its entry name only once complete (written to
  ``tmp/``, renamed), and its name says which version it holds
  (``<aa>/<key hash>.<version hash>``): a crash mid-download leaves only a
  temp file, removed at the next start. Entries are not fsynced: a power
  loss could leave one with its name but not all of its bytes, so a cache
  found after a reboot (another boot id) is emptied before use. A size other
  than the store's is a damaged entry: dropped and fetched again;
- each reader gets its own hard link of the entry (``use/``) for as long as
  it holds the path, so an eviction, a replacement or a deletion meanwhile
  never changes or removes the file under it.

Several processes (``pacs serve``'s DICOM workers, commands) share one cache
directory: a download holds an ``flock`` on the key's lock file (one of 4096
stripes), so two requests for the same uncached object download it once; the
second waits and then uses the first's copy. Each node has its own cache.

Size: at most ``budget`` bytes of entries, least recently used (by mtime,
set at each use) dropped first, entries in use by a reader last; an object
larger than half the budget is downloaded for its reader alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .base import ObjectNotFound, StorageError, pid_alive

log = logging.getLogger(__name__)

_TMP = "tmp"
_USE = "use"
_LOCKS = "locks"
_BOOT = "boot-id"
_STALE_SECONDS = 24 * 3600
# Entries are scanned (and the oldest dropped) when this process's estimate
# of the total passes the budget, or once it has added this share of the
# budget since its last scan (other processes add entries too).
_RESCAN_SHARE = 10
# An eviction brings the total down to this share of the budget, so that the
# next download does not scan again at once.
_EVICT_TO = 0.9
_LOCK_STRIPES = 3  # hex digits of the key hash: 4096 lock files at most


@dataclass(frozen=True)
class Version:
    """Which bytes the store holds under a key: its validator and size."""

    etag: str
    size: int


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _unlink(path: str | Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _create(path: Path) -> BinaryIO:
    """A new file for writing, readable by its owner and group only (the
    objects are patients' images: the filesystem store's files are 0640)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "wb")


@contextmanager
def _flock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on *path* (created if needed); yields
    False without waiting when *wait* is false and another holds it. A lock
    is per open file: threads of one process exclude each other too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


class ObjectCache:
    """Local copies of one store's objects, at most *budget* bytes in *directory*.

    *namespace* names the store (its URL): entries of two stores sharing a
    directory never meet.
    """

    def __init__(self, directory: str | os.PathLike[str], budget: int, namespace: str) -> None:
        self.root = Path(directory).absolute()
        self.budget = budget
        self._namespace = namespace
        self._lock = threading.Lock()
        self._estimate = 0
        self._added_since_scan = 0
        for sub in (_TMP, _USE, _LOCKS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Without a boot id a reboot cannot be told: entries are then fsynced.
        self._boot = _boot_id()
        with _flock(self.root / _LOCKS / "start"):
            self._forget_previous_boot()
            self._remove_stale(self.root / _TMP)
            self._remove_stale(self.root / _USE)
        self._scan_and_evict()

    # -- start ------------------------------------------------------------
    def _forget_previous_boot(self) -> None:
        """Empty a cache written before the last reboot: its entries were not
        fsynced, a power loss may have left one short or with holes."""
        marker = self.root / _BOOT
        try:
            recorded = marker.read_text().strip()
        except FileNotFoundError:
            recorded = None
        if self._boot is None or recorded == self._boot:
            return
        for shard in self._shards():
            shutil.rmtree(shard, ignore_errors=True)
        for sub in (_TMP, _USE):
            for entry in os.scandir(self.root / sub):
                _unlink(entry.path)
        tmp = self._private_name(_TMP)
        tmp.write_text(self._boot + "\n")
        os.replace(tmp, marker)

    @staticmethod
    def _remove_stale(folder: Path) -> None:
        """Temp files and readers' links left by processes that died (their
        names start with the pid), or older than a day."""
        now = time.time()
        for entry in os.scandir(folder):
            pid = entry.name.split(".", 1)[0]
            try:
                if not pid.isdigit() or not pid_alive(int(pid)) or now - entry.stat().st_mtime > _STALE_SECONDS:
                    _unlink(entry.path)
            except FileNotFoundError:
                continue

    # -- layout -------------------------------------------------------------
    def _key_hash(self, key: str) -> str:
        return hashlib.sha256(f"{self._namespace}\0{key}".encode()).hexdigest()[:40]

    def _entry(self, key_hash: str, version: Version) -> Path:
        tag = hashlib.sha256(version.etag.encode()).hexdigest()[:24]
        return self.root / key_hash[:2] / f"{key_hash}.{tag}"

    def _shards(self) -> Iterator[Path]:
        for entry in os.scandir(self.root):
            if len(entry.name) == 2 and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)

    def _private_name(self, folder: str) -> Path:
        # The pid first: a start removes what dead processes left.
        return self.root / folder / f"{os.getpid()}.{uuid.uuid4().hex}.dcm"

    def entries(self, key: str) -> list[Path]:
        """The cached copies of *key* (of any version; normally at most one)."""
        key_hash = self._key_hash(key)
        try:
            names = os.listdir(self.root / key_hash[:2])
        except FileNotFoundError:
            return []
        return [self.root / key_hash[:2] / name for name in names if name.startswith(key_hash + ".")]

    # -- use ------------------------------------------------------------------
    @contextmanager
    def use(self, key: str, current: Callable[[], Version],
            fetch: Callable[[BinaryIO], Version]) -> Iterator[Path]:
        """A local file holding *key*'s bytes as the store holds them now.

        *current* asks the store for the object's version (raising
        ``ObjectNotFound`` when it is gone); *fetch* downloads the whole
        object into the file given and returns the version it got (and
        raises ``ObjectNotFound`` likewise). A copy is used once *current*
        says it is of the version stored; without a copy the object is
        fetched at once (no round trip more than without a cache). The file
        is the caller's until the context exits; read it only.

        When the cache's disk fails it (full, not writable) the object is
        downloaded to a temporary file as if there were no cache.
        """
        path: Path | None = None
        try:
            path = self._local(key, current, fetch)
        except OSError as exc:
            log.warning("object cache %s not usable (%s): object read without it", self.root, exc)
        if path is None:
            with tempfile.NamedTemporaryFile(prefix="pacs-", suffix=".dcm") as tmp:
                fetch(tmp)  # type: ignore[arg-type]
                tmp.flush()
                yield Path(tmp.name)
            return
        try:
            yield path
        finally:
            _unlink(path)

    def _local(self, key: str, current: Callable[[], Version], fetch: Callable[[BinaryIO], Version]) -> Path:
        """The reader's own link of a valid copy, fetched first if need be."""
        key_hash = self._key_hash(key)
        version: Version | None = None
        if self.entries(key):
            version = self._current(key, current)
            if (path := self._link(self._entry(key_hash, version), version.size)) is not None:
                return path
        with _flock(self.root / _LOCKS / key_hash[:_LOCK_STRIPES]):
            # Another request may have downloaded it while this one waited
            # (the version it got is the one asked, or a newer one).
            if version is None and self.entries(key):
                version = self._current(key, current)
            if version is not None and (path := self._link(self._entry(key_hash, version), version.size)):
                return path
            return self._fill(key, key_hash, fetch)

    def _current(self, key: str, current: Callable[[], Version]) -> Version:
        try:
            return current()
        except ObjectNotFound:  # its copies are stale too
            self.forget(key)
            raise

    def _link(self, entry: Path, size: int) -> Path | None:
        """A reader's own link of *entry* when it holds *size* bytes, else None
        (absent, or damaged: then dropped)."""
        path = self._private_name(_USE)
        try:
            os.link(entry, path)
        except FileNotFoundError:
            return None
        if (held := os.stat(path).st_size) != size:
            log.warning("cached copy %s has %d bytes, the store %d: dropped", entry, held, size)
            _unlink(path)
            _unlink(entry)
            return None
        with suppress(OSError):  # another account's command may not; the order is a hint
            os.utime(path)  # last use, for the eviction order (the entry is the same inode)
        return path

    def _fill(self, key: str, key_hash: str, fetch: Callable[[BinaryIO], Version]) -> Path:
        """Download into a temp file and publish it as the entry of the
        version got (dropping the key's other versions); returns the
        reader's link. An object larger than half the budget is not kept:
        the reader's file is then its only one."""
        tmp, path = self._private_name(_TMP), self._private_name(_USE)
        try:
            with _create(tmp) as f:
                try:
                    got = fetch(f)
                except ObjectNotFound:
                    self.forget(key)
                    raise
                if self._boot is None:  # a reboot cannot be told: the entry must survive one whole
                    f.flush()
                    os.fsync(f.fileno())
            if (written := os.stat(tmp).st_size) != got.size:
                raise StorageError(f"short download: {written} of {got.size} bytes")
            os.chmod(tmp, 0o440)  # readers read; a writer by mistake fails rather than spoils the copy
            if got.size > self.budget // 2:
                os.rename(tmp, path)
                return path
            entry = self._entry(key_hash, got)
            entry.parent.mkdir(exist_ok=True)
            os.link(tmp, path)
            os.replace(tmp, entry)
        except BaseException:
            _unlink(tmp)
            _unlink(path)
            raise
        for other in os.listdir(entry.parent):
            if other.startswith(key_hash + ".") and other != entry.name:
                _unlink(entry.parent / other)
        self._added(got.size)
        return path

    def forget(self, key: str) -> None:
        """Drop every copy of *key* (the object was replaced or deleted).
        Readers holding one keep reading theirs."""
        for entry in self.entries(key):
            _unlink(entry)

    # -- size -----------------------------------------------------------------
    def _added(self, size: int) -> None:
        with self._lock:
            self._estimate += size
            self._added_since_scan += size
            due = self._estimate > self.budget or self._added_since_scan > self.budget // _RESCAN_SHARE
        if due:
            self._scan_and_evict()

    def _scan_and_evict(self) -> None:
        """Total the entries; above the budget drop the least recently used
        ones, skipping those a reader holds (a link count above one), down to
        90% of it. One process at a time: another one scanning is enough."""
        with _flock(self.root / _LOCKS / "evict", wait=False) as mine:
            if not mine:
                return
            entries: list[tuple[float, int, int, str]] = []
            total = 0
            for shard in self._shards():
                for entry in os.scandir(shard):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime, st.st_nlink, st.st_size, entry.path))
                    total += st.st_size
            if total > self.budget:
                target = int(self.budget * _EVICT_TO)
                for _mtime, links, size, path in sorted(entries):
                    if total <= target:
                        break
                    if links > 1:
                        continue
                    _unlink(path)
                    total -= size
            with self._lock:
                self._estimate, self._added_since_scan = total, 0

    def size(self) -> int:
        """Bytes held in entries now (a scan)."""
        return sum(e.stat().st_size for shard in self._shards() for e in os.scandir(shard))
