"""One contract, every backend: the filesystem store and S3 (a real SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import (
    FileStore,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    open_store,
)

from .conftest import S3_ACCESS, S3_SECRET


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "fs":
        yield open_store(f"file://{tmp_path}/objects")
    else:
        url = request.getfixturevalue("s3_bucket_url")
        yield open_store(url, access_key=S3_ACCESS, secret_key=S3_SECRET)


def put_bytes(store: ObjectStore, key: str, data: bytes) -> None:
    info = store.put(key, io.BytesIO(data), len(data))
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_put_get_stat_roundtrip(store: ObjectStore) -> None:
    data = os.urandom(100_000)
    put_bytes(store, "1.2.3/4.5/6.7.dcm", data)
    assert store.read_bytes("1.2.3/4.5/6.7.dcm") == data
    assert store.stat("1.2.3/4.5/6.7.dcm").size == len(data)
    assert store.exists("1.2.3/4.5/6.7.dcm")
    assert store.checksum("1.2.3/4.5/6.7.dcm") == hashlib.sha256(data).hexdigest()


def test_range_read(store: ObjectStore) -> None:
    data = bytes(range(256)) * 100
    put_bytes(store, "r/a.bin", data)
    with store.open("r/a.bin", offset=1000, length=300) as f:
        assert f.read() == data[1000:1300]
    with store.open("r/a.bin", offset=25_000) as f:
        assert f.read() == data[25_000:]


def test_overwrite_replaces(store: ObjectStore) -> None:
    put_bytes(store, "o/x", b"first")
    put_bytes(store, "o/x", b"second version")
    assert store.read_bytes("o/x") == b"second version"


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.stat("no/such/key")
    with pytest.raises(ObjectNotFound):
        store.open("no/such/key")
    assert not store.exists("no/such/key")
    store.delete("no/such/key")  # deleting nothing is not an error


def test_delete(store: ObjectStore) -> None:
    put_bytes(store, "d/1", b"x")
    store.delete("d/1")
    assert not store.exists("d/1")


def test_list_by_prefix(store: ObjectStore) -> None:
    for key in ("s1/a/1", "s1/a/2", "s1/b/1", "s2/a/1"):
        put_bytes(store, key, key.encode())
    assert sorted(o.key for o in store.list("s1/")) == ["s1/a/1", "s1/a/2", "s1/b/1"]
    assert sorted(o.key for o in store.list("s1/a/")) == ["s1/a/1", "s1/a/2"]
    assert sorted(o.key for o in store.list()) == ["s1/a/1", "s1/a/2", "s1/b/1", "s2/a/1"]
    assert {o.size for o in store.list("s2/")} == {6}


def test_large_object_streams_and_multipart(store: ObjectStore) -> None:
    # Larger than the S3 part size, so the S3 store does a multipart upload.
    size = 40 * 1024 * 1024 + 123
    chunk = os.urandom(1024 * 1024)

    class Gen(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = min(len(b), self.left, len(chunk))
            b[:n] = chunk[:n]
            self.left -= n
            return n

    info = store.put("big/object", io.BufferedReader(Gen()), size)
    assert info.size == size
    digest = hashlib.sha256()
    read = 0
    with store.open("big/object") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
            read += len(block)
    assert read == size
    assert digest.hexdigest() == info.sha256


def test_short_stream_is_not_published(store: ObjectStore) -> None:
    with pytest.raises(StorageError):
        store.put("short/x", io.BytesIO(b"12345"), 10)
    assert not store.exists("short/x")


@pytest.mark.parametrize("key", ["", "../etc/passwd", "/abs", "a//b", "a/../b", "a/b c"])
def test_bad_keys_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, io.BytesIO(b"x"), 1)


def test_staged_abort_leaves_nothing(store: ObjectStore) -> None:
    staged = store.stage(io.BytesIO(b"staged bytes"), 12)
    staged.abort()
    assert not store.exists("st/a")
    staged = store.stage(io.BytesIO(b"staged bytes"), 12)
    info = staged.commit("st/a")
    assert info.size == 12
    assert store.read_bytes("st/a") == b"staged bytes"


def test_filesystem_write_is_atomic_and_temp_files_cleaned(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")

    class Failing(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            if self.sent > 3 * 1024 * 1024:
                raise OSError("connection reset by peer")
            b[: len(b)] = b"x" * len(b)
            self.sent += len(b)
            return len(b)

    with pytest.raises((StorageError, OSError)):
        store.put("a/b/c", io.BufferedReader(Failing()), None)
    assert not store.exists("a/b/c")
    store.close()  # removes the staging files made ahead of need; the failed one is gone already
    assert list((tmp_path / "objects" / ".tmp").iterdir()) == []
    # A temp file left by a dead process is removed at the next start.
    stale = tmp_path / "objects" / ".tmp" / "999999999.deadbeef.tmp"
    stale.write_bytes(b"half an object")
    FileStore(tmp_path / "objects")
    assert not stale.exists()
    assert list(store.list()) == []


def test_filesystem_layout_is_sharded(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    put_bytes(store, "1.2.3/4/5.dcm", b"x")
    path = store.path_for("1.2.3/4/5.dcm")
    rel = path.relative_to(tmp_path).parts
    assert len(rel[0]) == 2 and len(rel[1]) == 2 and rel[2:] == ("1.2.3", "4", "5.dcm")


def test_s3_unreachable_raises_storage_error() -> None:
    store = open_store("s3://bucket?endpoint=127.0.0.1:1&secure=false", access_key="a", secret_key="b")
    with pytest.raises(StorageError):
        store.put("a/b", io.BytesIO(b"x"), 1)
    with pytest.raises(StorageError):
        store.check()


def test_s3_server_side_encryption_is_requested(s3_bucket_url: str) -> None:
    """`sse=s3` in the storage URL: every object is encrypted at rest by the server."""
    store = open_store(s3_bucket_url + "&sse=s3", access_key=S3_ACCESS, secret_key=S3_SECRET)
    put_bytes(store, "aa/bb/enc", b"secret pixels" * 100)
    assert "sse=s3" in store.url
    # Ask the server itself, with a separate client, how it holds the object.
    from minio import Minio
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(s3_bucket_url)
    client = Minio(parse_qs(parts.query)["endpoint"][0], S3_ACCESS, S3_SECRET, secure=False)
    meta = client.stat_object(parts.netloc, "aa/bb/enc").metadata
    assert meta.get("x-amz-server-side-encryption") == "AES256"
    with store.open("aa/bb/enc") as stream:
        assert stream.read() == b"secret pixels" * 100
    with pytest.raises(ValueError, match="server-side encryption"):
        open_store(s3_bucket_url + "&sse=rot13", access_key=S3_ACCESS, secret_key=S3_SECRET)


def test_the_test_s3_server_starts_although_its_port_was_taken(tmp_path: Path) -> None:
    """A port checked free can be taken before SeaweedFS binds it (weed exits
    at once); one such start once failed every S3 test of a CI run."""
    import socket

    from .peers import S3Server, weed_ports

    ports = weed_ports()
    (tmp_path / "weed").mkdir()
    s3 = S3Server(f"127.0.0.1:{ports['s3']}", S3_ACCESS, S3_SECRET, workdir=tmp_path / "weed", ports=ports)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["s3"]))  # bound, not listening: a client's port
        try:
            s3.start()
            assert s3.ports["s3"] != ports["s3"]
            stored = open_store(s3.url("taken"), access_key=S3_ACCESS, secret_key=S3_SECRET)
            put_bytes(stored, "k", b"payload")
            assert stored.read_bytes("k") == b"payload"
        finally:
            s3.stop()
