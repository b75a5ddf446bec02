"""GET /metrics: the archive's figures in the Prometheus text format.

Readable by the ``monitor`` role (a monitoring system's token: it reads
nothing else) and by admins; with ``metrics_local_unauthenticated`` also
without a token from this machine itself. The answer names no patient and
no study, so a scrape is not an access to patient data and is not audited;
a refused one is (who tried, from where), but at most once per client,
user and status in :data:`REFUSAL_EVERY` seconds, the next event saying how
many were refused since: a scraper left with a revoked token, asking every
15 seconds, must not bury the trail.

Tokens are checked in the index. While it cannot be read, a token that
passed the check lately (:class:`RecentScrapers`) still reads this node's
figures: ``pacs_index_up 0`` is what a monitoring system is there to see.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import SQLAlchemyError

from pacs.auth import Principal
from pacs.metrics.exposition import CONTENT_TYPE
from pacs.metrics.service import MetricsService

from .errors import HTTPProblem
from .http_metrics import HttpCounters
from .security import SCRAPERS, audit, principal_of, refusal_detail, token_of, unauthenticated

REFUSAL_EVERY = 600.0
# Headers a reverse proxy adds: a request relayed by a proxy on this machine
# comes from 127.0.0.1 without being local. Any of them, not only those naming
# the client: a TLS-terminating proxy may send X-Forwarded-Proto alone.
_PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-proto", "x-forwarded-host",
                  "x-forwarded-port", "x-forwarded-server", "via")
_MAX_REFUSERS = 10_000
# A token that passed the scrape check within this many seconds reads the
# figures while the index (where tokens are checked) cannot be read.
SCRAPER_MEMORY = 3600.0
_MAX_SCRAPERS = 64

router = APIRouter()


class RefusalTrail:
    """Audits refused scrapes, one event per client, user and status per
    :data:`REFUSAL_EVERY` seconds (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (client, user, status) -> (monotonic time of the last event, refusals not written since)
        self._last: dict[tuple[str, str, int], tuple[float, int]] = {}

    def record(self, request: Request, principal: Principal | None, status: int, reason: str) -> None:
        client = request.client.host if request.client else ""
        key = (client, principal.username if principal else "", status)
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (float("-inf"), 0))
            if now - last < REFUSAL_EVERY:
                self._last[key] = (last, skipped + 1)
                return
            if len(self._last) >= _MAX_REFUSERS:
                self._last.clear()
            self._last[key] = (now, 0)
        if skipped:
            reason = f"{reason} ({skipped} more refused since the last event)"
        audit(request, "metrics", principal, outcome="denied", detail=refusal_detail(request, status, reason))


class RecentScrapers:
    """The tokens (their SHA-256) that passed the scrape check lately.

    Only consulted while the index cannot be read: then no token can be
    checked (nor revoked), and a scraper refused with a 503 would never see
    ``pacs_index_up 0``. A token the index refuses is forgotten at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passed: dict[str, float] = {}  # token hash -> monotonic time it last passed

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def passed(self, token: str) -> None:
        key = self._key(token)
        with self._lock:
            self._passed.pop(key, None)
            if len(self._passed) >= _MAX_SCRAPERS:
                self._passed.pop(next(iter(self._passed)))  # the one that passed longest ago
            self._passed[key] = time.monotonic()

    def refused(self, token: str) -> None:
        with self._lock:
            self._passed.pop(self._key(token), None)

    def known(self, token: str) -> bool:
        with self._lock:
            at = self._passed.get(self._key(token))
        return at is not None and time.monotonic() - at < SCRAPER_MEMORY


def _local(request: Request) -> bool:
    """A request from this machine itself, not relayed by a proxy."""
    if any(header in request.headers for header in _PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.client.host) if request.client is not None else None
    except ValueError:
        return False
    # A dual-stack listener (host "::") sees 127.0.0.1 as ::ffff:127.0.0.1,
    # which Python before 3.13 does not call loopback.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


def scrape_access(request: Request) -> None:
    """Raise 401 or 403 unless the caller may read /metrics (the module doc)."""
    settings = request.app.state.pacs.settings
    if settings.metrics_local_unauthenticated and token_of(request) is None and _local(request):
        return
    refusals: RefusalTrail = request.app.state.metrics_refusals
    scrapers: RecentScrapers = request.app.state.metrics_scrapers
    token = token_of(request)
    try:
        principal = principal_of(request)
    except SQLAlchemyError:
        if token is not None and scrapers.known(token):
            return  # the index is down: this node's figures say so (pacs_index_up 0)
        raise  # 503: nothing can tell who this is
    if principal is None:
        if token is not None:
            scrapers.refused(token)
        presenter, why = unauthenticated(request)
        refusals.record(request, presenter, 401, why)
        raise HTTPProblem(401, "authentication required: log in or send Authorization: Bearer <token>")
    if principal.role not in SCRAPERS:
        if token is not None:
            scrapers.refused(token)
        refusals.record(request, principal, 403, f"role {principal.role} not allowed")
        raise HTTPProblem(403, f"role {principal.role!r} may not do this (needs: {', '.join(SCRAPERS)})")
    if token is not None:
        scrapers.passed(token)


@router.get("/metrics", tags=["system"], summary="Prometheus metrics (text format 0.0.4); roles monitor, admin",
            response_class=Response)
def metrics(request: Request) -> Response:
    # One thread for the access check and the figures (the index is read at
    # most once per metrics_cache_seconds): a dependency would take another.
    scrape_access(request)
    service: MetricsService = request.app.state.metrics
    counters: HttpCounters = request.app.state.http_counters
    return Response(service.text(counters.families(service.node)), media_type=CONTENT_TYPE)


def install(app: object, pacs: object) -> None:
    """The state /metrics needs on *app* (the HTTP app of *pacs*)."""
    state = app.state  # type: ignore[attr-defined]
    state.metrics = MetricsService(pacs)  # type: ignore[arg-type]
    state.http_counters = HttpCounters()
    state.metrics_refusals = RefusalTrail()
    state.metrics_scrapers = RecentScrapers()
