"""Object storage: one interface, a filesystem store and an S3 store.

``open_store(url)`` picks the backend from a URL:

- ``file:///var/lib/pacs/objects`` (or a plain path): :class:`FileStore`;
- ``s3://BUCKET?endpoint=HOST:PORT&secure=false[&region=R][&prefix=P]``:
  :class:`S3Store`, keys from ``access_key``/``secret_key`` arguments; with
  a ``cache_dir`` and ``cache_bytes``, its :meth:`~ObjectStore.local_path`
  reads through a local cache (:mod:`storage.cache`).
"""

from __future__ import annotations

import logging
import os
from urllib.parse import parse_qs, unquote, urlsplit

from .base import (
    ObjectDamaged,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StagedObject,
    StorageError,
    StorageFullError,
    sha256_of,
    validate_key,
)
from .filesystem import FileStore

log = logging.getLogger(__name__)

__all__ = [
    "FileStore",
    "ObjectDamaged",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StagedObject",
    "StorageError",
    "StorageFullError",
    "file_store_path",
    "open_store",
    "sha256_of",
    "url_problem",
    "validate_key",
]


def file_store_path(url: str) -> str | None:
    """The folder a ``file://`` URL (or a plain path) names; None for other stores."""
    parts = urlsplit(url)
    if parts.scheme not in ("", "file"):
        return None
    return unquote(parts.path) if parts.scheme else url


def url_problem(url: str) -> str | None:
    """Why *url* cannot name an object store (None: it can): a folder
    (``file:///path`` or a plain path) or ``s3://BUCKET?endpoint=HOST:PORT``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        # file://srv/pacs (two slashes) names the host "srv" and the folder
        # /pacs: objects went to /pacs, created there without a word.
        if parts.netloc not in ("", "localhost"):
            return (f"{url!r} names the host {parts.netloc!r}, not a folder: a folder is "
                    f"file:///{parts.netloc}{parts.path} (three slashes)")
        if not parts.path:
            return f"{url!r} names no folder (file:///var/lib/pacs/objects)"
    elif parts.scheme == "s3":
        if not parts.netloc or not parse_qs(parts.query).get("endpoint"):
            return f"{url!r}: an S3 store is s3://BUCKET?endpoint=HOST:PORT[&secure=false]"
    elif parts.scheme:
        return f"{url!r}: the object store is file:///PATH or s3://BUCKET?endpoint=HOST:PORT"
    return None


def open_store(
    url: str, access_key: str | None = None, secret_key: str | None = None, *, create: bool = True,
    cache_dir: str | os.PathLike[str] | None = None, cache_bytes: int = 0,
) -> ObjectStore:
    """Open the object store that *url* names. Without *create*, an S3
    bucket that does not exist is not created (a mistyped bucket name given
    to a command reading an archive made a new, empty one). A remote store
    keeps local copies of what readers need random access to in *cache_dir*,
    at most *cache_bytes* (0: none); the filesystem store needs none."""
    if (problem := url_problem(url)) is not None:
        raise ValueError(problem)
    parts = urlsplit(url)
    path = file_store_path(url)
    if path is not None:
        return FileStore(path)
    # Not a folder: url_problem let only an S3 URL through.
    from .s3 import S3Store  # the minio client is only imported when used

    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    store = S3Store(
        bucket=parts.netloc,
        endpoint=query["endpoint"],
        access_key=access_key,
        secret_key=secret_key,
        secure=query.get("secure", "true").lower() not in ("false", "0", "no"),
        region=query.get("region", "us-east-1"),
        prefix=query.get("prefix", ""),
        sse=query.get("sse", ""),
        create_bucket=create,
    )
    if cache_dir is not None and cache_bytes > 0:
        try:
            store.use_cache(cache_dir, cache_bytes)
        except OSError as exc:
            # Reads work without it (each downloads its object), as before.
            log.warning("S3 object cache at %s not usable, reads download whole objects: %s", cache_dir, exc)
    return store
