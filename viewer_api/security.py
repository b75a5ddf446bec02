"""Access control and auditing for every HTTP route.

A route declares the roles that may use it and the audit action it
performs; :func:`guard` authenticates the caller (``Authorization: Bearer``
or the ``pacs_session`` cookie set at login), answers 401/403 with a clear
body, and records the access (who, role, client, study, action, outcome).
With ``PACS_AUTH_ENABLED=false`` (a local demo only) everyone is an admin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs.audit import Event
from pacs.auth import Principal
from pacs.names import same_person
from pacs.studylist import referring_of

from .errors import HTTPProblem

COOKIE = "pacs_session"
READERS = ("radiologist", "admin", "emr", "referring")
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
    return pacs.auth.authenticate(token) if token else None


def _event(request: Request, action: str, principal: Principal | None, *, outcome: str = "success",
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
    request.app.state.pacs.audit.record(_event(request, action, principal, outcome=outcome, study_uid=study_uid,
                                               patient_id=patient_id, detail=detail))


def _study_of(request: Request) -> str:
    return str(
        request.path_params.get("study")
        or request.query_params.get("StudyInstanceUID")
        or request.query_params.get("studyUID")
        or ""
    )


def may_see_study(request: Request, principal: Principal, study_uid: str) -> bool:
    """A referring physician sees only the studies they referred; other
    reading roles see every study."""
    if principal.role != "referring":
        return True
    referring = referring_of(request.app.state.pacs.engine, study_uid)
    return referring is not None and same_person(referring, principal.display_name)


def guard(*roles: str, action: str) -> Any:
    """A dependency: the caller must hold one of *roles* (and, for a referring
    physician, have referred the study the request names); the access is
    audited with the answer's outcome (:class:`AuditMiddleware`)."""

    def check(request: Request) -> Principal:
        principal = principal_of(request)
        study = _study_of(request)
        if principal is None:
            audit(request, action, None, outcome="denied", study_uid=study, detail="not authenticated")
            raise HTTPProblem(401, "authentication required: log in or send Authorization: Bearer <token>")
        if principal.role not in roles:
            audit(request, action, principal, outcome="denied", study_uid=study,
                  detail=f"role {principal.role} not allowed")
            raise HTTPProblem(403, f"role {principal.role!r} may not do this (needs: {', '.join(roles)})")
        # Every route that names a study is checked here, whatever its API
        # (DICOMweb, WADO-URI, FHIR, JSON): one rule, no route forgotten.
        # Routes that search without naming a study filter their answers.
        if study and not may_see_study(request, principal, study):
            audit(request, action, principal, outcome="denied", study_uid=study, detail="not the referring physician")
            raise HTTPProblem(403, "this study was not referred by you")
        detail = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        # Recorded by AuditMiddleware once the answer's status is known.
        request.state.audit = _event(request, action, principal, study_uid=study, detail=detail)
        request.state.user = principal.username
        request.state.principal = principal
        return principal

    return Depends(check)


class AuditMiddleware:
    """Writes the audit event a route's guard prepared once the answer's
    status is known: success, denied (401/403) or failure (any other error),
    so a 404 or a refused store is not recorded as a successful access."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            event = scope.get("state", {}).get("audit")
            if recorded or not isinstance(event, Event):
                return
            recorded = True
            if status >= 400:
                event.outcome = "denied" if status in (401, 403) else "failure"
                event.detail = f"{event.detail} -> {status}"[:500]
            scope["app"].state.pacs.audit.record(event)

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            record(500)
            raise


def requires(*roles: str, action: str) -> list[Any]:
    """Router-level dependencies list for :func:`guard`."""
    return [guard(*roles, action=action)]


Guard = Callable[..., Principal]
