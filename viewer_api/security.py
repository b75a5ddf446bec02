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

from pacs.audit import Event
from pacs.auth import Principal

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


def audit(request: Request, action: str, principal: Principal | None, *, outcome: str = "success",
          study_uid: str = "", patient_id: str = "", detail: str = "") -> None:
    """Record an access in the audit trail."""
    request.app.state.pacs.audit.record(
        Event(
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
    )


def _study_of(request: Request) -> str:
    return str(
        request.path_params.get("study")
        or request.query_params.get("StudyInstanceUID")
        or request.query_params.get("studyUID")
        or ""
    )


def guard(*roles: str, action: str) -> Any:
    """A dependency: the caller must hold one of *roles*; the access is audited."""

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
        detail = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        audit(request, action, principal, study_uid=study, detail=detail)
        request.state.user = principal.username
        request.state.principal = principal
        return principal

    return Depends(check)


def requires(*roles: str, action: str) -> list[Any]:
    """Router-level dependencies list for :func:`guard`."""
    return [guard(*roles, action=action)]


Guard = Callable[..., Principal]
