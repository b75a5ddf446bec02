"""The S3 store's local read-through cache (storage/cache.py), against a real SeaweedFS.

Readers that need a local file (a frame of a multi-frame object, a video's
byte ranges, a render) downloaded the whole object from S3 at every request:
a viewer paging through a 600-frame clip fetched it once per frame. They now
read a local copy, checked against S3's ETag at each use. GETs are counted
by the store itself (``S3Store.gets``), nothing of S3 is mocked.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import ObjectNotFound, open_store
from storage.s3 import S3Store

from .conftest import S3_ACCESS, S3_SECRET, Backend, PacsServer, make_backend
from .dicomfiles import frame_pixels, multiframe_rgb
from .test_dicomweb_more import _parts

KB = 1024


def _open(url: str, cache_dir: Path | None = None, budget: int = 0) -> S3Store:
    store = open_store(url, access_key=S3_ACCESS, secret_key=S3_SECRET, cache_dir=cache_dir, cache_bytes=budget)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def cached(s3_bucket_url: str, tmp_path: Path) -> Iterator[S3Store]:
    """This node's store, with a 1 MB cache."""
    store = _open(s3_bucket_url, tmp_path / "cache", 1024 * KB)
    yield store
    store.close()


@pytest.fixture
def other_node(s3_bucket_url: str) -> Iterator[S3Store]:
    """Another node on the same bucket (its own cache, none here)."""
    store = _open(s3_bucket_url)
    yield store
    store.close()


def _put(store: S3Store, key: str, data: bytes) -> None:
    store.put(key, io.BytesIO(data), len(data))


def _read(store: S3Store, key: str) -> bytes:
    with store.local_path(key) as path:
        return path.read_bytes()


def test_second_local_path_does_not_download_again(cached: S3Store) -> None:
    data = os.urandom(200 * KB)
    _put(cached, "1.2/3.4/5.6.dcm", data)
    assert _read(cached, "1.2/3.4/5.6.dcm") == data
    assert (cached.gets, cached.validations) == (1, 0)  # no copy yet: fetched at once
    for _ in range(3):
        assert _read(cached, "1.2/3.4/5.6.dcm") == data
    assert (cached.gets, cached.validations) == (1, 3)  # validated by a HEAD each time, never fetched again
    assert cached.cache is not None
    (entry,) = cached.cache.entries("1.2/3.4/5.6.dcm")
    assert entry.stat().st_mode & 0o777 == 0o440  # patients' images: owner and group, read only


def test_cache_off_downloads_each_time(s3_bucket_url: str, tmp_path: Path) -> None:
    """s3_cache_bytes = 0: no cache, each local_path downloads as before."""
    store = _open(s3_bucket_url, tmp_path / "cache", 0)
    assert store.cache is None
    _put(store, "a/b", b"x" * 1000)
    assert _read(store, "a/b") == _read(store, "a/b") == b"x" * 1000
    assert store.gets == 2
    assert not (tmp_path / "cache").exists()


def test_object_replaced_by_another_node_is_never_served_stale(cached: S3Store, other_node: S3Store) -> None:
    """Same key, same size, other bytes (a corrected resend under the
    overwrite policy on another node): the ETag check sees it."""
    first, second = os.urandom(100 * KB), os.urandom(100 * KB)
    _put(other_node, "s/r/x.dcm", first)
    assert _read(cached, "s/r/x.dcm") == first
    _put(other_node, "s/r/x.dcm", second)
    assert _read(cached, "s/r/x.dcm") == second
    assert _read(cached, "s/r/x.dcm") == second
    assert cached.gets == 2
    assert cached.cache is not None and len(cached.cache.entries("s/r/x.dcm")) == 1  # the old copy dropped


def test_object_replaced_by_this_node_drops_its_copy(cached: S3Store) -> None:
    _put(cached, "s/r/y.dcm", b"first version")
    assert _read(cached, "s/r/y.dcm") == b"first version"
    assert cached.cache is not None and cached.cache.entries("s/r/y.dcm")
    staged = cached.stage(io.BytesIO(b"second version"), 14)  # ingest's way: staged, then committed
    staged.commit("s/r/y.dcm", replace=True)
    assert cached.cache.entries("s/r/y.dcm") == []
    assert _read(cached, "s/r/y.dcm") == b"second version"


def test_delete_removes_the_cached_copy(cached: S3Store, other_node: S3Store) -> None:
    assert cached.cache is not None
    _put(cached, "d/1", b"one" * 100)
    _put(cached, "d/2", b"two" * 100)
    assert _read(cached, "d/1") and _read(cached, "d/2")
    with cached.local_path("d/1") as held:
        cached.delete("d/1")
        assert cached.cache.entries("d/1") == []
        assert held.read_bytes() == b"one" * 100  # a reader holding it keeps its file
    with pytest.raises(ObjectNotFound):
        _read(cached, "d/1")
    # Deleted by another node: the next use finds it gone, and drops the copy.
    other_node.delete("d/2")
    with pytest.raises(ObjectNotFound):
        _read(cached, "d/2")
    assert cached.cache.entries("d/2") == []


def test_budget_evicts_the_least_recently_used(cached: S3Store) -> None:
    """1 MB budget, 300 KB objects: the fourth evicts the least recently
    used one, never one a reader holds."""
    cache = cached.cache
    assert cache is not None
    blobs = {name: os.urandom(300 * KB) for name in "abcde"}
    for name, data in blobs.items():
        _put(cached, f"e/{name}", data)
    for name in "abc":
        assert _read(cached, f"e/{name}") == blobs[name]
    assert _read(cached, "e/a") == blobs["a"]  # a used again: b is now the oldest
    assert _read(cached, "e/d") == blobs["d"]
    assert cache.entries("e/b") == []
    assert all(cache.entries(f"e/{name}") for name in "acd")
    assert cache.size() <= cache.budget
    gets = cached.gets
    assert _read(cached, "e/a") == blobs["a"]
    assert cached.gets == gets
    # A reader holds c, made the least recently used: d and a go instead.
    with cached.local_path("e/c") as held:
        (entry,) = cache.entries("e/c")
        os.utime(entry, (0, 0))
        assert _read(cached, "e/e") == blobs["e"]
        assert _read(cached, "e/b") == blobs["b"]
        assert cache.entries("e/c") == [entry]
        assert cache.entries("e/a") == cache.entries("e/d") == []
        assert held.read_bytes() == blobs["c"]
    assert cache.size() <= cache.budget


def test_object_larger_than_half_the_budget_is_not_kept(cached: S3Store) -> None:
    data = os.urandom(600 * KB)
    _put(cached, "big/1", data)
    assert _read(cached, "big/1") == data
    assert _read(cached, "big/1") == data
    assert cached.gets == 2
    assert cached.cache is not None and cached.cache.entries("big/1") == []
    assert list((cached.cache.root / "use").iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_and_damaged_copies_are_never_used(s3_bucket_url: str, tmp_path: Path) -> None:
    """A crash mid-download leaves a temp file: removed at the next start.
    A copy whose size is not the object's (truncated by hand, by a disk)
    is dropped and fetched again. After a reboot the cache is emptied
    (copies are not fsynced: a power loss may have left one incomplete)."""
    store = _open(s3_bucket_url, tmp_path / "cache", 1024 * KB)
    cache = store.cache
    assert cache is not None
    data = os.urandom(100 * KB)
    _put(store, "t/1", data)
    assert _read(store, "t/1") == data
    (entry,) = cache.entries("t/1")
    leftover = cache.root / "tmp" / f"{_dead_pid()}.0123abcd.dcm"
    leftover.write_bytes(data[:5000])
    reader_link = cache.root / "use" / f"{_dead_pid()}.4567cdef.dcm"
    os.link(entry, reader_link)
    store.close()

    store = _open(s3_bucket_url, tmp_path / "cache", 1024 * KB)
    cache = store.cache
    assert cache is not None
    assert not leftover.exists() and not reader_link.exists()
    os.chmod(entry, 0o644)
    with open(entry, "r+b") as f:
        f.truncate(50 * KB)
    assert _read(store, "t/1") == data
    assert store.gets == 1  # fetched again
    assert _read(store, "t/1") == data
    assert store.gets == 1

    (cache.root / "boot-id").write_text("a boot before this one\n")
    store.close()
    store = _open(s3_bucket_url, tmp_path / "cache", 1024 * KB)
    assert store.cache is not None and store.cache.entries("t/1") == []
    assert _read(store, "t/1") == data
    store.close()


def test_concurrent_readers_download_once(cached: S3Store) -> None:
    data = os.urandom(450 * KB)
    _put(cached, "c/1", data)
    start = threading.Barrier(4)
    results: list[bytes] = []

    def read() -> None:
        start.wait()
        results.append(_read(cached, "c/1"))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [data] * 4
    assert cached.gets == 1


def test_wado_frames_of_a_multiframe_object_served_from_the_cache(tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    """End to end on PostgreSQL + S3: frame 17 of a 40-frame clip asked
    twice, the object fetched from S3 once (its copy in the data dir's cache
    is the same file after the second request)."""
    frames, rows, columns = 40, 120, 160
    study, series, sop = multiframe_rgb(tmp_path / "clip.dcm", frames, rows, columns)
    backend: Backend = make_backend("pg-s3", request)
    server = PacsServer(tmp_path / "data", backend)
    try:
        server.cli("import", str(tmp_path / "clip.dcm"))
        server.start()
        url = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/17"
        accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
        cache = tmp_path / "data" / "cache" / "objects"
        with server.http() as http:
            ((_, first),) = _parts(http.get(url, headers=accept))
            assert first == frame_pixels(17, rows, columns)
            entries = [p for p in cache.glob("??/*")]
            assert len(entries) == 1
            inode = entries[0].stat().st_ino
            ((_, again),) = _parts(http.get(url, headers=accept))
            assert again == first
            ((_, other),) = _parts(http.get(url.replace("/17", "/38"), headers=accept))
            assert other == frame_pixels(38, rows, columns)
        assert [p.stat().st_ino for p in cache.glob("??/*")] == [inode]
        assert "S3 object cache at" in server.log_text()
    finally:
        server.stop()
