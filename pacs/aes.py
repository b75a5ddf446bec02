"""The known-AE registry: who may associate with us, and where C-MOVE sends.

Rows live in the index database so every node of a cluster shares them and
``pacs ae add`` takes effect on a running server within a few seconds.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update

from .index.models import KnownAE
from .index.writer_helpers import insert_ignore

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


@dataclass(frozen=True)
class RemoteAE:
    title: str
    host: str
    port: int
    description: str = ""
    enabled: bool = True
    # We open associations to it over DICOM TLS (pacs.tls.client_context).
    tls: bool = False


def validate_ae_title(title: str) -> str:
    """Return the normalised AE title or raise ``ValueError``."""
    value = title.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"invalid AE title {title!r}: 1-16 printable characters, no backslash")
    return value


# A DNS name, an IPv4 or an IPv6 address: what a modality's address can be.
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,252}[A-Za-z0-9])?|[0-9A-Fa-f:.]{2,45}")


class AeRegistry:
    """CRUD on known AEs plus a short-lived cache for association checks."""

    CACHE_SECONDS = 2.0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, RemoteAE] | None = None
        self._cached_at = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _select() -> Any:
        return select(KnownAE.title, KnownAE.host, KnownAE.port, KnownAE.description, KnownAE.enabled, KnownAE.tls)

    @staticmethod
    def _remote(row: Any) -> RemoteAE:
        return RemoteAE(row.title, row.host, row.port, row.description, row.enabled, bool(row.tls))

    def list(self) -> list[RemoteAE]:
        with self.engine.connect() as conn:
            rows = conn.execute(self._select().order_by(KnownAE.title)).all()
        return [self._remote(r) for r in rows]

    def get(self, title: str) -> RemoteAE | None:
        return self.cached().get(title.strip())

    def lookup(self, title: str) -> RemoteAE | None:
        """*title* as registered now, not as cached (for rare calls made long
        after the association that named the AE)."""
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(KnownAE.title == title.strip())).first()
        return self._remote(row) if row else None

    def cached(self) -> dict[str, RemoteAE]:
        """All known AEs, at most a few seconds old (hot path of every association)."""
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cached_at > self.CACHE_SECONDS:
                self._cache = {ae.title: ae for ae in self.list()}
                self._cached_at = now
            return self._cache

    def add(self, title: str, host: str, port: int, description: str = "", *, tls: bool = False) -> RemoteAE:
        """Register *title* (or update its address); *tls*: we reach it over DICOM TLS."""
        title = validate_ae_title(title)
        if not host or not 0 < port < 65536:
            raise ValueError("host must be set and port must be 1-65535")
        if not _HOST.fullmatch(host):
            raise ValueError(f"host {host!r} is not a host name or an IP address")
        values = {"host": host, "port": port, "description": description, "enabled": True, "tls": tls}
        with self.engine.begin() as conn:
            inserted = insert_ignore(
                conn, KnownAE.__table__, {"title": title, "created_at": datetime.now(UTC), **values}, ["title"]  # type: ignore[arg-type]
            )
            if inserted is None:
                conn.execute(update(KnownAE).where(KnownAE.title == title).values(**values))
        self._cache = None
        return RemoteAE(title, host, port, description, tls=tls)

    def remove(self, title: str) -> bool:
        with self.engine.begin() as conn:
            removed = conn.execute(delete(KnownAE).where(KnownAE.title == title.strip())).rowcount
        self._cache = None
        return bool(removed)
