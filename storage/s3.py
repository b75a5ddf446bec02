"""S3 object store on the ``minio`` client (MinIO, SeaweedFS, AWS S3).

A PUT is atomic on S3: the object becomes visible only once complete, so a
completed ``put_object`` is our durability point. Large objects go up as
multipart uploads; reads stream from the HTTP response without buffering the
object.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import urllib3
from minio import Minio
from minio.error import S3Error
from minio.sse import Sse, SseKMS, SseS3

from .base import (
    CHUNK,
    HashingReader,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageFullError,
    validate_key,
)
from .cache import ObjectCache, Version

log = logging.getLogger(__name__)

# Below this size one PUT; above it, a multipart upload in parts of this size.
PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NotFound"}
_FULL = {"XMinioStorageFull", "EntityTooLarge", "QuotaExceeded"}
# check(): a write probe (an empty object, removed at once) at most this often.
PROBE_SECONDS = 15.0
PROBE_PREFIX = "_health/"


@contextmanager
def _s3_errors(op: str, key: str) -> Iterator[None]:
    """Translate minio/urllib3 failures into the storage contract's errors."""
    try:
        yield
    except StorageError:
        raise
    except S3Error as exc:
        if exc.code in _NOT_FOUND:
            raise ObjectNotFound(key) from exc
        if exc.code in _FULL:
            raise StorageFullError(f"S3 refused {op} {key}: {exc.code}") from exc
        raise StorageError(f"S3 {op} {key} failed: {exc.code}") from exc
    except Exception as exc:  # urllib3 connection errors and the like
        raise StorageError(f"S3 {op} {key} failed: {exc}") from exc


class _ResponseReader(io.RawIOBase):
    """File-like view of a streaming S3 GET that returns the connection on close."""

    def __init__(self, response: Any, key: str) -> None:
        self._response = response
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        # A connection reset or stall mid-body (the S3 server restarting)
        # is a StorageError like a failed GET: it escaped as urllib3's
        # ProtocolError, which `pacs verify` and `pacs migrate` did not
        # expect (the whole run ended in a traceback, no report).
        with _s3_errors("GET", self._key):
            data = self._response.read(len(buffer))
        n = len(data)
        memoryview(buffer)[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


def server_side_encryption(spec: str) -> Sse | None:
    """Encryption at rest done by the S3 server, from the URL's ``sse=``:
    ``s3`` (SSE-S3, keys managed by the server) or ``kms:KEY-ID`` (SSE-KMS,
    which the S3 API only accepts over HTTPS)."""
    if not spec:
        return None
    if spec.lower() in ("s3", "aes256", "sse-s3"):
        return SseS3()
    if spec.lower().startswith("kms:") and spec[4:]:
        return SseKMS(spec[4:], {})
    raise ValueError(f"unknown S3 server-side encryption {spec!r}: use sse=s3 or sse=kms:KEY-ID")


def _etag(value: str | None) -> str:
    """An ETag without its quotes (HEAD and GET answers compared as equal)."""
    return (value or "").removeprefix("W/").strip('"')


class S3Store(ObjectStore):
    """Objects in one S3 bucket, optionally under a key prefix.

    With a :class:`~storage.cache.ObjectCache` (``cache``), :meth:`local_path`
    reads through it: an object a reader needs random access to is
    downloaded once, not at every frame or byte range asked of it.
    """

    remote = True
    cache: ObjectCache | None = None

    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        *,
        secure: bool = True,
        region: str = "us-east-1",
        prefix: str = "",
        create_bucket: bool = True,
        pool_size: int = 32,
        sse: str = "",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        scheme_query = f"endpoint={endpoint}&secure={'true' if secure else 'false'}"
        self.url = f"s3://{bucket}?{scheme_query}" + (f"&prefix={prefix}" if prefix else "") + (
            f"&sse={sse}" if sse else "")
        self._sse = server_side_encryption(sse)
        self._probed_at = -PROBE_SECONDS
        self._probe_error: str | None = None
        # Few, quick retries: a C-STORE must fail within seconds when the
        # server is down rather than hang the modality. A server that stops
        # answering (stalled, not down) is given 30 s once: a read timeout is
        # not retried (it was 3 x 120 s, a modality waited over three minutes).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=30),
            maxsize=pool_size,
            retries=urllib3.Retry(total=2, read=0, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._create_bucket = create_bucket
        self._bucket_ready = False
        # GET requests made (whole objects and ranges): what the cache saves;
        # HEADs made to validate cached copies: what it costs.
        self.gets = 0
        self.validations = 0
        self._counts_lock = threading.Lock()
        if create_bucket:
            try:
                self._ensure_bucket()
            except StorageError as exc:
                # The server may come up after us: reads of the index must
                # work meanwhile, and the first write tries again.
                log.warning("S3 not ready at start (%s); will retry on first write", exc)

    def bucket_exists(self) -> bool:
        """Whether the bucket exists (StorageError when S3 does not answer)."""
        with _s3_errors("check", self.bucket):
            return bool(self._client.bucket_exists(self.bucket))

    def _ensure_bucket(self) -> None:
        if self._bucket_ready or not self._create_bucket:
            return
        try:
            with _s3_errors("create bucket", self.bucket):
                if not self._client.bucket_exists(self.bucket):
                    self._client.make_bucket(self.bucket)
        except StorageError as exc:
            # Another node may have created it between the check and the make.
            if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        self._bucket_ready = True

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def use_cache(self, directory: str | os.PathLike[str], budget: int) -> ObjectCache:
        """Read :meth:`local_path` through a local cache of *budget* bytes in *directory*."""
        self.cache = ObjectCache(directory, budget, namespace=self.url)
        return self.cache

    def _get(self, key: str, offset: int = 0, length: int = 0) -> Any:
        with self._counts_lock:
            self.gets += 1
        with _s3_errors("GET", key):
            return self._client.get_object(self.bucket, self._name(key), offset=offset, length=length)

    def put(self, key: str, stream: BinaryIO, size: int | None = None) -> ObjectInfo:
        name = self._name(key)
        self._ensure_bucket()
        reader = HashingReader(stream)
        with _s3_errors("PUT", key):
            self._client.put_object(
                self.bucket,
                name,
                reader,  # type: ignore[arg-type]
                length=size if size is not None else -1,
                part_size=PART_SIZE,
                content_type="application/octet-stream",
                sse=self._sse,
            )
        self._forget(key)
        if size is not None and reader.size != size:
            raise StorageError(f"short upload for {key}: {reader.size} of {size} bytes")
        return ObjectInfo(key=key, size=reader.size, sha256=reader.sha256)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        response = self._get(key, offset, length or 0)
        return io.BufferedReader(_ResponseReader(response, key), 1024 * 1024)  # type: ignore[return-value]

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        if self.cache is None:
            with super().local_path(key) as path:
                yield path
            return
        with self.cache.use(key, lambda: self._version(key), lambda f: self._download(key, f)) as path:
            yield path

    def _version(self, key: str) -> Version:
        """The object's current ETag and size (one HEAD)."""
        with self._counts_lock:
            self.validations += 1
        with _s3_errors("HEAD", key):
            st = self._client.stat_object(self.bucket, self._name(key))
        return Version(etag=_etag(st.etag), size=int(st.size or 0))

    def _download(self, key: str, out: BinaryIO) -> Version:
        """The whole object into *out*; the version those bytes are. Errors
        writing *out* stay OSErrors (the cache's disk, not the store)."""
        response = self._get(key)
        try:
            version = Version(etag=_etag(response.headers.get("ETag")),
                              size=int(response.headers.get("Content-Length") or -1))
            received = 0
            while True:
                with _s3_errors("GET", key):
                    chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
        finally:
            response.close()
            response.release_conn()
        if received != version.size:
            raise StorageError(f"S3 GET {key}: {received} of {version.size} bytes received")
        return version

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with _s3_errors("HEAD", key):
            st = self._client.stat_object(self.bucket, name)
        return ObjectInfo(key=key, size=int(st.size or 0),
                          modified=st.last_modified.timestamp() if st.last_modified else None)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            with _s3_errors("DELETE", key):
                self._client.remove_object(self.bucket, name)
        except ObjectNotFound:
            pass
        self._forget(key)

    def _forget(self, key: str) -> None:
        """Drop this node's cached copy of an object it replaced or deleted
        (a copy of another version would not be used anyway: this frees its room)."""
        if self.cache is not None:
            try:
                self.cache.forget(key)
            except OSError as exc:
                log.warning("cached copy of %s not removed: %s", key, exc)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with _s3_errors("LIST", prefix):
            for obj in self._client.list_objects(
                self.bucket, prefix=self.prefix + prefix, recursive=True
            ):
                name = obj.object_name or ""
                yield ObjectInfo(key=name[len(self.prefix) :], size=int(obj.size or 0),
                                 modified=obj.last_modified.timestamp() if obj.last_modified else None)

    def check(self) -> None:
        """The bucket exists and takes writes (a read-only key or a full
        quota refused every C-STORE while /health said "ok", and a load
        balancer kept sending to the node). The write probe runs at most
        every PROBE_SECONDS: load balancers poll /health often."""
        now = time.monotonic()
        if now - self._probed_at < PROBE_SECONDS:
            if self._probe_error is not None:
                raise StorageError(self._probe_error)
            return
        self._probed_at, self._probe_error = now, None
        try:
            with _s3_errors("check", self.bucket):
                exists = self._client.bucket_exists(self.bucket)
            if not exists:
                raise StorageError(f"bucket {self.bucket} does not exist")
            probe = f"{self.prefix}{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}"
            with _s3_errors("write probe", probe):
                self._client.put_object(self.bucket, probe, io.BytesIO(b""), 0)
                self._client.remove_object(self.bucket, probe)
        except StorageError as exc:
            self._probe_error = str(exc)
            raise
