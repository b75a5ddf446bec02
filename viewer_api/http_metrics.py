"""This process's HTTP figures for /metrics: requests in flight, and
requests answered per route template, method and status with their time.

The route is the template the request matched (``/dicom-web/studies/{study}``),
never the path itself: a path holds study UIDs, and a label per UID would
grow without bound. A request no route took (a 404, or one refused before
routing: 400, 403, 413) counts under ``other``. Per process: every node,
and each `pacs serve`, counts its own (its ``node`` label).
"""

from __future__ import annotations

import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs.metrics.exposition import Family

# The scope key where the outer middleware leaves a holder for the route the
# router chose (a list shared by the scope copies made in between, HEAD's).
ROUTE_KEY = "filmless.metrics_route"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpCounters:
    """Requests counted by :class:`HttpMetrics` (thread-safe reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        # (route, method, status) -> requests; (route, method) -> [count, seconds].
        self._answered: dict[tuple[str, str, str], int] = {}
        self._timed: dict[tuple[str, str], list[float]] = {}

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def ended(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            key = (route, method, str(status))
            self._answered[key] = self._answered.get(key, 0) + 1
            timed = self._timed.setdefault((route, method), [0, 0.0])
            timed[0] += 1
            timed[1] += seconds

    def families(self, node: str) -> list[Family]:
        """The figures as metric families, labelled with *node*."""
        with self._lock:
            in_flight = self.in_flight
            answered = dict(self._answered)
            timed = {key: list(value) for key, value in self._timed.items()}
        flight = Family("pacs_http_requests_in_flight", "gauge",
                        "HTTP requests this process is serving now").add(in_flight, {"node": node})
        requests = Family("pacs_http_requests_total", "counter",
                          "HTTP requests this process answered, per route template, method and status")
        for (route, method, status), count in sorted(answered.items()):
            requests.add(count, {"node": node, "route": route, "method": method, "status": status})
        duration = Family("pacs_http_request_duration_seconds", "summary",
                          "Seconds from a request's arrival to its answer's last byte, per route template and method")
        for (route, method), (count, seconds) in sorted(timed.items()):
            labels = {"node": node, "route": route, "method": method}
            duration.add(round(seconds, 6), labels, "_sum")
            duration.add(count, labels, "_count")
        return [flight, requests, duration]


class HttpMetrics:
    """Outermost middleware: counts every request, refused or not."""

    def __init__(self, app: ASGIApp, counters: HttpCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = [""]
        scope[ROUTE_KEY] = holder
        status = 0
        method = scope["method"] if scope["method"] in METHODS else "other"
        began = time.perf_counter()

        async def noting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.counters.started()
        try:
            await self.app(scope, receive, noting)
        except BaseException:
            status = status or 500  # nothing went out: the server answers 500
            raise
        finally:
            self.counters.ended(holder[0] or "other", method, status, time.perf_counter() - began)


class RouteNote:
    """Innermost middleware: tells :class:`HttpMetrics` the template of the
    route the router chose (Starlette leaves it in the scope)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder = scope.get(ROUTE_KEY)
        try:
            await self.app(scope, receive, send)
        finally:
            path = getattr(scope.get("route"), "path", None)
            if holder is not None and isinstance(path, str):
                holder[0] = path
