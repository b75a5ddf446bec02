"""The known-AE registry: who may associate with us, and where C-MOVE sends.

Rows live in the index database so every node of a cluster shares them and
``pacs ae add`` takes effect on a running server within a few seconds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from .index.models import KnownAE
from .index.writer_helpers import insert_ignore

log = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


# What a registered AE may ask of us over DICOM (C-ECHO is always allowed):
# C-STORE to us; C-FIND on the archive; C-MOVE and C-GET from it; the
# modality worklist; MPPS; storage commitment; and withdrawing images of a
# study with a rejection note (pacs.rejections).
SERVICES = ("store", "query", "retrieve", "worklist", "mpps", "commitment", "reject")
# What "all" (and an AE registered without --services) grants: rejection
# notes delete images, so only an AE granted "reject" by name sends them.
ALL_SERVICES = frozenset(SERVICES) - {"reject"}


def parse_services(text: str) -> frozenset[str]:
    """``"*"``/``"all"`` or a comma list of :data:`SERVICES` (``all,reject``
    too); ``ValueError`` otherwise."""
    words = {w.strip().lower() for w in text.split(",") if w.strip()}
    unknown = words - set(SERVICES) - {"*", "all"}
    if unknown or not words:
        raise ValueError(f"unknown DICOM service {', '.join(sorted(unknown)) or text!r}: "
                         f"give 'all' or a comma list of {', '.join(SERVICES)}")
    if words & {"*", "all"}:
        return ALL_SERVICES | (words & {"reject"})
    return frozenset(words)


def services_text(services: frozenset[str]) -> str:
    """How *services* are stored and shown: ``*`` for all (``*,reject``),
    else in :data:`SERVICES` order."""
    if services >= ALL_SERVICES:
        return ",".join(["*", *sorted(services - ALL_SERVICES)])
    return ",".join(s for s in SERVICES if s in services)


@dataclass(frozen=True)
class RemoteAE:
    title: str
    host: str
    port: int
    description: str = ""
    enabled: bool = True
    # We open associations to it over DICOM TLS (pacs.tls.client_context).
    tls: bool = False
    services: frozenset[str] = ALL_SERVICES
    # Calls under this title must come over TLS with exactly this client certificate.
    cert_sha256: str | None = None
    # "ascii": answers to it without diacritics (see :data:`CHARSETS`); "": UTF-8.
    charset: str = ""

    @property
    def ascii_only(self) -> bool:
        """Whether its C-FIND and worklist answers must be ASCII (pacs.names.ascii_text)."""
        return self.charset == "ascii"

    def permits(self, service: str) -> bool:
        """May this AE use *service* (one of :data:`SERVICES`)?"""
        return service in self.services

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "host": self.host, "port": self.port, "description": self.description,
                "enabled": self.enabled, "tls": self.tls, "services": services_text(self.services),
                "cert_sha256": self.cert_sha256, "charset": self.charset or "utf-8"}


# What an AE's C-FIND and worklist answers are written in: UTF-8 (ISO_IR 192,
# stored as "") or ASCII, the text without diacritics, for a modality that
# reads no other character set.
CHARSETS = ("utf-8", "ascii")


def parse_charset(text: str) -> str:
    """The stored form of a charset name (:data:`CHARSETS`), or ValueError."""
    value = text.strip().lower()
    if value not in CHARSETS:
        raise ValueError(f"unknown charset {text!r}: give {' or '.join(CHARSETS)}")
    return "" if value == "utf-8" else value


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
        self._last: dict[str, RemoteAE] | None = None  # kept through invalidations, for index outages
        self._cached_at = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _select() -> Any:
        return select(KnownAE.title, KnownAE.host, KnownAE.port, KnownAE.description, KnownAE.enabled, KnownAE.tls,
                      KnownAE.services, KnownAE.cert_sha256, KnownAE.charset)

    @staticmethod
    def _remote(row: Any) -> RemoteAE:
        try:
            services = parse_services(row.services)
        except ValueError:
            services = frozenset()  # a hand-edited row we cannot read grants nothing
        return RemoteAE(row.title, row.host, row.port, row.description, row.enabled, bool(row.tls),
                        services, row.cert_sha256, row.charset or "")

    def list(self) -> list[RemoteAE]:
        with self.engine.connect() as conn:
            rows = conn.execute(self._select().order_by(KnownAE.title)).all()
        return [self._remote(r) for r in rows]

    def get(self, title: str) -> RemoteAE | None:
        """*title* as cached (checks made per association or object)."""
        return self.cached().get(title.strip())

    def lookup(self, title: str) -> RemoteAE | None:
        """*title* as registered now, not as cached: where we are about to
        open an association to it (C-MOVE, routing), an address changed or
        added a moment ago must be used at once."""
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(KnownAE.title == title.strip())).first()
        return self._remote(row) if row else None

    def cached(self) -> dict[str, RemoteAE]:
        """All known AEs, at most a few seconds old (hot path of every association).

        While the index cannot be read, the last copy read stays in use (an
        association check must not fail where the object it brings would be
        answered "index unavailable, try again": 0xA703); with no copy at
        all the error goes to the caller."""
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cached_at > self.CACHE_SECONDS:
                try:
                    self._cache = {ae.title: ae for ae in self.list()}
                except SQLAlchemyError as exc:
                    if self._last is None:
                        raise
                    log.warning("AE registry unreadable, its last copy stays in use: %s", str(exc).splitlines()[0])
                    self._cache = self._last
                self._last = self._cache
                self._cached_at = now
            return self._cache

    def add(self, title: str, host: str, port: int, description: str = "", *, tls: bool = False,
            services: frozenset[str] | None = None, cert_sha256: str | None = None,
            forget_cert: bool = False, charset: str | None = None) -> RemoteAE:
        """Register *title* (or update its address); *tls*: we reach it over DICOM TLS.

        *services* (default: all for a new AE, unchanged for a known one) are
        what it may ask of us; *cert_sha256* pins its TLS client certificate
        (unchanged when None, removed with *forget_cert*); *charset* (a name
        of :data:`CHARSETS`; unchanged when None) is what its answers are in.
        """
        title = validate_ae_title(title)
        if not host or not 0 < port < 65536:
            raise ValueError("host must be set and port must be 1-65535")
        if not _HOST.fullmatch(host):
            raise ValueError(f"host {host!r} is not a host name or an IP address")
        if services is not None and not services:
            raise ValueError("an AE needs at least one service (remove it to refuse it everything)")
        values: dict[str, Any] = {"host": host, "port": port, "description": description, "enabled": True, "tls": tls}
        if services is not None:
            values["services"] = services_text(services)
        if cert_sha256 is not None or forget_cert:
            values["cert_sha256"] = cert_sha256
        if charset is not None:
            values["charset"] = parse_charset(charset)
        with self.engine.begin() as conn:
            inserted = insert_ignore(
                conn, KnownAE.__table__, {"title": title, "created_at": datetime.now(UTC), **values}, ["title"]  # type: ignore[arg-type]
            )
            if inserted is None:
                conn.execute(update(KnownAE).where(KnownAE.title == title).values(**values))
            row = conn.execute(self._select().where(KnownAE.title == title)).one()
        self._cache = None
        return self._remote(row)

    def remove(self, title: str) -> bool:
        with self.engine.begin() as conn:
            removed = conn.execute(delete(KnownAE).where(KnownAE.title == title.strip())).rowcount
        self._cache = None
        return bool(removed)
