"""Access control and auditing for every HTTP route.

A route declares the roles that may use it and the audit action it
performs; :func:`guard` authenticates the caller (``Authorization: Bearer``
or the ``pacs_session`` cookie set at login), answers 401/403 with a clear
body, and records the access (who, role, client, study, action, outcome).
With ``PACS_AUTH_ENABLED=false`` (a local demo only) everyone is an admin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs.audit import Event, patient_chunks
from pacs.auth import Principal
from pacs.names import same_person
from pacs.studylist import referring_of

from .errors import HTTPProblem, answer

COOKIE = "pacs_session"
# Sent by the viewer with a request it makes by itself, no one at the
# workstation asking (the worklist's refresh): not a use of the session, whose
# end after 30 minutes without use it would otherwise push for ever.
UNATTENDED_HEADER = "x-pacs-unattended"
READERS = ("radiologist", "admin", "emr", "referring")
# Who may read /metrics (viewer_api.metrics_api): a monitoring system, and admins.
SCRAPERS = ("monitor", "admin")
DEMO = Principal("demo", "admin", "Demo (auth disabled)")


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(COOKIE)


def principal_of(request: Request) -> Principal | None:
    pacs = request.app.state.pacs
    if not pacs.settings.auth_enabled:
        return DEMO
    token = token_of(request)
    if not token:
        return None
    return pacs.auth.authenticate(token, use=request.headers.get(UNATTENDED_HEADER, "") != "1")


def http_event(request: Request, action: str, principal: Principal | None, *, outcome: str = "success",
               study_uid: str = "", patient_id: str = "", detail: str = "") -> Event:
    """The audit event of one HTTP access by *principal* (None: not authenticated)."""
    return Event(
        action=action,
        user=principal.username if principal else "",
        role=principal.role if principal else "",
        client=request.client.host if request.client else "",
        protocol="http",
        outcome=outcome,
        study_uid=study_uid,
        patient_id=patient_id,
        detail=detail[:500],
    )


def audit(request: Request, action: str, principal: Principal | None, *, outcome: str = "success",
          study_uid: str = "", patient_id: str = "", detail: str = "") -> None:
    """Record an access in the audit trail."""
    request.app.state.pacs.audit.record(http_event(request, action, principal, outcome=outcome, study_uid=study_uid,
                                                   patient_id=patient_id, detail=detail))


def audit_patients(request: Request, patient_ids: Iterable[str]) -> None:
    """Name the patients an answer shows in its audit event ("who saw which
    patient"): backslash-separated, in as many events as their size needs
    (:func:`pacs.audit.patient_chunks`). Study routes get theirs from the study."""
    event = getattr(request.state, "audit", None)
    if event is None:
        return
    chunks = patient_chunks(patient_ids)
    event.patient_id = chunks[0] if chunks else ""
    request.state.audit_more = [(event.study_uid, chunk) for chunk in chunks[1:]]


def audit_studies(request: Request, studies: Iterable[tuple[str, str]]) -> None:
    """Name the (study, patient) pairs a request touched in its audit
    trail, one event per study (``pacs audit --study UID`` finds each): the
    first in the route's own event, the others in copies of it written with
    the same outcome. A patient left empty is filled in from the study."""
    event = getattr(request.state, "audit", None)
    if event is None:
        return
    pairs = list(dict.fromkeys((s, p) for s, p in studies if s))
    if not pairs:
        return
    event.study_uid, event.patient_id = pairs[0]
    request.state.audit_more = pairs[1:]


StudyOf = Callable[[Request], str]
"""How a route tells which study a request names: the one its handler
serves, so the access check and the audit see exactly that study."""


def path_study(request: Request) -> str:
    """The study a route's path names (``{study}``); '' for none. The
    default: a route that serves a study names it in its path (WADO-RS,
    FHIR ImagingStudy, the JSON API); a query parameter of such a route
    (``?StudyInstanceUID=``) is not what it serves."""
    return str(request.path_params.get("study") or "")


def searched_study(request: Request) -> str:
    """QIDO-RS: the study of the path, else the StudyInstanceUID (keyword or
    tag) values searched for, backslash-separated, for the audit trail."""
    study = path_study(request)
    if study:
        return study
    values = [v for k, v in request.query_params.multi_items()
              if (k == "StudyInstanceUID" or k.upper() == "0020000D") and v]
    return "\\".join(dict.fromkeys(values))


def _quietly(study_of: StudyOf, request: Request) -> str:
    """The study for the audit of a refused request ('' if it names it badly)."""
    try:
        return study_of(request)
    except HTTPProblem:
        return ""


def may_see_study(request: Request, principal: Principal, study_uid: str) -> bool:
    """A referring physician sees only the studies they referred; other
    reading roles see every study."""
    if principal.role != "referring":
        return True
    referring = referring_of(request.app.state.pacs.engine, study_uid)
    return referring is not None and same_person(referring, principal.display_name)


# Set in the scope of a HEAD that HeadAsGet (viewer_api.app) runs as a GET:
# the route sees GET, the audit trail says HEAD.
HEAD_SCOPE_KEY = "filmless.head"


def request_target(request: Request) -> str:
    """What a request asked for, as its audit event's detail: the path and
    query string, after "HEAD " for a HEAD (it runs the GET route, with its
    action, but was given no data: not a retrieve like the GET)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"HEAD {target}" if request.scope.get(HEAD_SCOPE_KEY) else target


def refusal_detail(request: Request, status: int, reason: str) -> str:
    """The detail of a refused request's event: what it asked for (a denied
    ``/api/worklist?q=nguyen`` says what was searched), the status and why.
    The reason is kept whole when the event's 500 characters cut the path."""
    tail = f" -> {status}: {reason}"[:250]
    return request_target(request)[:500 - len(tail)] + tail


def unauthenticated(request: Request) -> tuple[Principal | None, str]:
    """Who a request without a working credential is, for its refusal's
    event, and why it is refused: the user of a token we issued that is
    revoked, expired or whose user is disabled (never the token itself);
    None for no credentials or a token we never issued."""
    token = token_of(request)
    if token is None:
        return None, "not authenticated: no credentials"
    refused = request.app.state.pacs.auth.refused(token)
    if refused is None:
        return None, "not authenticated: unknown token"
    return Principal(refused.username, ""), f"not authenticated: {refused.describe()}"


def guard(*roles: str, action: str, study_of: StudyOf = path_study) -> Any:
    """A dependency: the caller must hold one of *roles* (and, for a referring
    physician, have referred the study the request names: *study_of*, which
    must return the study the handler serves); the access is audited with
    the answer's outcome (:class:`AuditMiddleware`)."""

    def check(request: Request) -> Principal:
        principal = principal_of(request)
        if principal is None:
            # Who presented a token that no longer works (revoked, expired):
            # the trail must show bob's revoked token still in use.
            presenter, why = unauthenticated(request)
            audit(request, action, presenter, outcome="denied", study_uid=_quietly(study_of, request),
                  detail=refusal_detail(request, 401, why))
            raise HTTPProblem(401, "authentication required: log in or send Authorization: Bearer <token>")
        if principal.role not in roles:
            audit(request, action, principal, outcome="denied", study_uid=_quietly(study_of, request),
                  detail=refusal_detail(request, 403, f"role {principal.role} not allowed"))
            raise HTTPProblem(403, f"role {principal.role!r} may not do this (needs: {', '.join(roles)})")
        try:
            study = study_of(request)
        except HTTPProblem as exc:
            # A request naming two studies: refused, never guessed at.
            audit(request, action, principal, outcome="failure",
                  detail=refusal_detail(request, exc.status, exc.message))
            raise
        # Every route that names a study is checked here, whatever its API
        # (DICOMweb, WADO-URI, FHIR, JSON): one rule, no route forgotten.
        # Routes that search without naming a study filter their answers.
        if study and not may_see_study(request, principal, study):
            audit(request, action, principal, outcome="denied", study_uid=study,
                  detail=refusal_detail(request, 403, "not the referring physician"))
            raise HTTPProblem(403, "this study was not referred by you")
        # Recorded by AuditMiddleware once the answer's status is known.
        request.state.audit = http_event(request, action, principal, study_uid=study, detail=request_target(request))
        request.state.user = principal.username
        request.state.principal = principal
        return principal

    return Depends(check)


class AuditMiddleware:
    """Writes the audit event a route's guard prepared once the answer has
    ended: success, denied (401/403) or failure (any other error status),
    so a 404 or a refused store is not recorded as a successful access; and
    a streamed answer (a whole study over WADO-RS) that broke off before its
    last byte is a failure saying so, by whom (the client went away, or the
    server failed while sending) and after how many bytes. The answer is
    passed through as it comes: nothing is held back or delayed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded = False
        status = 0
        sent = 0
        client_failed = False
        client_gone = False
        # A HEAD answered by its GET route (app.HeadAsGet) is complete once
        # its headers are out; the body is never sent.
        head = bool(scope.get(HEAD_SCOPE_KEY))

        def record(broken: str = "") -> None:
            nonlocal recorded
            event = scope.get("state", {}).get("audit")
            if recorded or not isinstance(event, Event):
                return
            recorded = True
            answered = f" -> {status}" if status else " -> no answer"
            if broken:
                event.outcome = "denied" if status in (401, 403) else "failure"
                event.detail = f"{event.detail}{answered}, broken off after {sent} bytes: {broken}"
            elif status >= 400:
                event.outcome = "denied" if status in (401, 403) else "failure"
                event.detail = f"{event.detail}{answered}"
            event.detail = event.detail[:500]
            trail = scope["app"].state.pacs.audit
            trail.record(event)
            # More studies or patients than one event names (audit_studies,
            # audit_patients): copies with the same outcome, one per name.
            for study_uid, patient_id in scope.get("state", {}).get("audit_more", ()):
                trail.record(dataclasses.replace(event, study_uid=study_uid, patient_id=patient_id))

        async def receive_and_note() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def send_and_record(message: Message) -> None:
            nonlocal status, sent, client_failed
            # A HEAD is answered once its headers are out (no body follows).
            last = head and message["type"] == "http.response.start"
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                last = not message.get("more_body", False)
            # The server drops what is sent after the client left (ASGI 2.3),
            # without a word: a stream that ends then did not reach it.
            gone = client_gone
            try:
                await send(message)
            except BaseException:
                client_failed = True
                raise
            if last:
                record("the client went away" if gone else "")  # the last byte is with the server

        try:
            await self.app(scope, receive_and_note, send_and_record)
        except BaseException as exc:
            if not status:
                status = 500  # nothing went out: the server answers 500
                record()
            elif client_failed:
                record("the client went away")
            else:
                record(f"server error ({exc.__class__.__name__})")
            raise
        # Returned without its last byte: Starlette stops a streamed answer
        # when the client disconnects (and the server drops what is sent then).
        record("the client went away")


def requires(*roles: str, action: str, study_of: StudyOf = path_study) -> list[Any]:
    """Router-level dependencies list for :func:`guard`."""
    return [guard(*roles, action=action, study_of=study_of)]


Guard = Callable[..., Principal]


# -- cross-site request forgery ------------------------------------------------------------
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _origin_parts(url: str) -> tuple[str, str] | None:
    """(scheme, host[:port]) of an origin or URL, lower case; None for
    anything else (``null``, the origin of a sandboxed or opaque document)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return parts.scheme, parts.netloc.lower()


def _same_origin(request: Request, origin: tuple[str, str]) -> bool:
    """Whether *origin* is the app's own: the public_url, or the host the
    browser addressed (the Host header, port included, as a browser writes
    both). A TLS-terminating proxy may reach us over plain HTTP, so an
    https page is ours when the request came over http; an http page is
    never ours when the request came over https."""
    settings = request.app.state.pacs.settings
    public = _origin_parts(settings.public_url or "")
    if public is not None and origin == public:
        return True
    host = request.headers.get("host", "").lower()
    scheme = request.url.scheme
    return bool(host) and origin[1] == host and (origin[0] == scheme or scheme == "http")


def cross_site_refusal(request: Request) -> str | None:
    """Why a browser's state-changing request authenticated by the session
    cookie must be refused as cross-site; None when it may go on.

    Origin (else Referer) must be the app's own origin or one of
    cors_origins ("*" does not count: it opens reading to token clients, not
    the cookie to every site). A request with neither header is let through:
    browsers send Origin with every POST/PUT/PATCH/DELETE (a page can make
    it ``null``, never drop it), so only a non-browser client omits both,
    and the cookie stays SameSite=Strict."""
    origin = request.headers.get("origin")
    source, value = ("Origin", origin) if origin is not None else ("Referer", request.headers.get("referer"))
    if value is None:
        return None
    parts = _origin_parts(value)
    if parts is not None:
        if _same_origin(request, parts):
            return None
        allowed = request.app.state.pacs.settings.cors_origins.split(",")
        if any(_origin_parts(o) == parts for o in allowed if o.strip() not in ("", "*")):
            return None
    return (f"cross-site request refused: {source} {value[:100]!r} is not this server's origin; "
            "a session cookie is only honoured from the server's own pages "
            "(other clients send Authorization: Bearer <token>)")


def _cookie_authenticated(request: Request) -> bool:
    """Whether the request's credentials are ambient (the browser adds them
    to any request, whichever site makes it): the session cookie without a
    Bearer token, or no credentials at all when auth is off (everyone is an
    admin then)."""
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return False
    return COOKIE in request.cookies or not request.app.state.pacs.settings.auth_enabled


class CsrfMiddleware:
    """403 for a cookie-authenticated POST/PUT/PATCH/DELETE from another
    site (:func:`cross_site_refusal`), before any route runs: a form on
    another site must not sign a report or create a user with the session
    of whoever visits it. Bearer-token requests are not checked (a browser
    never adds that header by itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            request = Request(scope)
            refusal = cross_site_refusal(request) if _cookie_authenticated(request) else None
            if refusal is not None:
                # Whose session the other site tried to use (a thread: it may read the index).
                principal = await run_in_threadpool(principal_of, request)
                audit(request, "csrf", principal, outcome="denied",
                      detail=f"{scope['method']} {request.url.path}: {refusal}")
                await answer(request, 403, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- response headers ---------------------------------------------------------------------
# The web viewer (viewer_api/static): its own modules, stylesheet and
# rendered images, fetch() to its own API, the data: favicon; no inline
# script or style (inline style values are set through CSSOM, allowed).
VIEWER_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
              "form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc load their scripts from a CDN with inline
# bootstrap code: no viewer policy there, but never framed either.
_DOCS_PATHS = ("/docs", "/redoc")
HSTS = "max-age=31536000"
REFERRER_POLICY = "no-referrer"
# Every answer but the viewer's own files is stored by no cache: images,
# metadata, reports and searches hold patient data, and a browser's disk
# cache on a shared reading-room PC (or a proxy) must not keep them; a read
# served from a cache would also reach neither the access check nor the
# audit trail, and would miss an amendment. Plain no-store, not private
# with a max-age: the viewer keeps its own in-memory cache of decoded
# slices (viewer.js, CACHE_LIMIT), so scrolling back does not ask again,
# and nothing is left on disk when the tab closes. FHIR DiagnosticReport
# keeps its ETag and Last-Modified (R4 read), which no-store leaves to
# clients comparing versions, never to a cache answering by itself.
NO_STORE = "no-store"
# Answers that hold no patient data and may be cached: the viewer's
# scripts and styles (index.html says no-cache itself) and the public
# FHIR CapabilityStatement.
_CACHEABLE_PREFIXES = ("/static/",)
_CACHEABLE_PATHS = frozenset({"/fhir/metadata"})


class SecurityHeaders:
    """Headers every answer carries unless its route set them: nosniff (an
    answer is never run as another type than it says), no framing
    (clickjacking), no Referer to other sites (viewer URLs hold study UIDs),
    ``Cache-Control: no-store`` (:data:`NO_STORE`) but on the viewer's own
    files, the viewer's Content-Security-Policy on HTML pages, and HSTS over HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = scope.get("scheme") == "https" or bool(scope["app"].state.pacs.settings.http_tls)
        path = str(scope.get("path", ""))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", REFERRER_POLICY)
                if path.startswith(_CACHEABLE_PREFIXES):
                    # Kept, but asked again each time (a 304 while unchanged): without a
                    # Cache-Control a browser uses a file a tenth of its age unasked, and
                    # ran an upgraded server with the old scripts (or old and new mixed).
                    headers.setdefault("Cache-Control", "no-cache")
                elif path not in _CACHEABLE_PATHS:
                    headers.setdefault("Cache-Control", NO_STORE)
                is_html = headers.get("content-type", "").lower().startswith("text/html")
                if is_html and not path.startswith(_DOCS_PATHS):
                    headers.setdefault("Content-Security-Policy", VIEWER_CSP)
                if tls:
                    headers.setdefault("Strict-Transport-Security", HSTS)
            await send(message)

        await self.app(scope, receive, send_with_headers)
