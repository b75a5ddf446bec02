"""Report templates over HTTP ("mẫu kết quả", pacs.report_templates): the
viewer's template picker and "save as my template".

``GET /api/report-templates?modality=US&body_part=ABDOMEN&q=gan`` lists the
caller's own and the department's templates, those fitting the study first;
``POST`` creates one (a radiologist's own; an administrator's for the
department or anyone); ``PUT /{id}`` changes one at the ``version`` read
(409 on a stale one); ``DELETE /{id}`` archives it. Radiologists and
administrators only; creations, changes and archivings are audited with the
template they touched."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import ConfigDict, Field

from pacs.audit import Event
from pacs.auth import Principal
from pacs.report_templates import MAX_RESULTS, TemplateError, TemplateService, checked

from .errors import HTTPProblem, JsonBody
from .security import guard

router = APIRouter(prefix="/api/report-templates", tags=["report templates"])
EDITORS = ("radiologist", "admin")
# What the index can bind (a larger id was a database error, not a 404).
MAX_ID = 2**63 - 1
_ID = Path(..., ge=1, le=MAX_ID, description="the template's id")


class NewTemplate(JsonBody):
    """A template as written; the core checks the fields (a 400 saying which)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="unique per owner, e.g. Siêu âm ổ bụng bình thường")
    modality: str = Field("", description="free text, at most 16 characters: US, CT, CR/DX; empty: any")
    body_part: str = Field("", description="free text, at most 16 characters: ABDOMEN, CHEST; empty: any")
    findings: str = ""
    impression: str = ""
    owner: str | None = Field(None, max_length=64, description="administrators: '' the department's (their default) "
                                                               "or a username; radiologists: their own only")


class TemplateChange(JsonBody):
    """The fields to change (absent: kept) and the version they were read at."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, le=2**31 - 1, description="the version read; 409 when it changed since")
    name: str | None = None
    modality: str | None = None
    body_part: str | None = None
    findings: str | None = None
    impression: str | None = None


def _service(request: Request) -> TemplateService:
    return TemplateService(request.app.state.pacs.engine)


def _detail(request: Request, detail: str) -> None:
    """What the request did to which template, in the audit event its guard
    prepared (written with the outcome by AuditMiddleware)."""
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        event.detail = detail[:500]


def _refused(request: Request, what: str, exc: TemplateError) -> HTTPProblem:
    _detail(request, f"{what}: {exc}")
    return HTTPProblem(exc.http_status, str(exc))


@router.get("", summary="Report templates: the caller's own and the department's, those fitting the study first")
def list_templates(
    request: Request,
    modality: str = Query("", max_length=64, description="the study's modality (US); several: CT,SR"),
    body_part: str = Query("", max_length=64, description="the study's body part (ABDOMEN)"),
    q: str = Query("", max_length=200, description="words of the name, diacritics and case ignored (sieu am gan)"),
    everyone: bool = Query(False, alias="all", description="administrators: every radiologist's templates too"),
    limit: int = Query(200, ge=1, le=MAX_RESULTS),
    principal: Principal = guard(*EDITORS, action="query"),
) -> dict[str, Any]:
    if everyone and principal.role != "admin":
        raise HTTPProblem(403, "only an administrator lists every radiologist's templates")
    items = _service(request).search(principal.username, modality=modality, body_part=body_part, q=q,
                                     everyone=everyone, limit=limit)
    return {"items": items}


@router.get("/{template_id}", summary="One report template (an archived one too: a report may name it)")
def get_template(request: Request, template_id: int = _ID,
                 principal: Principal = guard(*EDITORS, action="query")) -> dict[str, Any]:
    try:
        return _service(request).get(template_id, principal.username, admin=principal.role == "admin")
    except TemplateError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


@router.post("", status_code=201, summary="Create a report template (a radiologist's own; an administrator's "
                                          "for the department or anyone)")
def create_template(request: Request, body: NewTemplate,
                    principal: Principal = guard(*EDITORS, action="template-create")) -> dict[str, Any]:
    admin = principal.role == "admin"
    owner = body.owner if body.owner is not None else ("" if admin else principal.username)
    whose = "the department" if not owner else owner
    try:
        text = checked(body.name, body.modality, body.body_part, body.findings, body.impression)
        created = _service(request).create(text, owner=owner, by=principal.username, admin=admin)
    except TemplateError as exc:
        raise _refused(request, f"template {str(body.name)[:80]!r} for {whose} not created", exc) from None
    _detail(request, f"created template #{created['id']} {created['name']!r} for {whose}")
    return created


@router.put("/{template_id}", summary="Change a report template at the version read (409 when it changed since)")
def update_template(request: Request, body: TemplateChange, template_id: int = _ID,
                    principal: Principal = guard(*EDITORS, action="template-update")) -> dict[str, Any]:
    changes = body.model_dump(exclude={"version"}, exclude_none=True)
    try:
        before, after = _service(request).update(template_id, changes, version=body.version, by=principal.username,
                                                 admin=principal.role == "admin")
    except TemplateError as exc:
        raise _refused(request, f"template #{template_id} v{body.version} not changed", exc) from None
    changed = [field for field in changes if before[field] != after[field]]
    renamed = f", renamed from {before['name']!r}" if "name" in changed else ""
    _detail(request, f"template #{after['id']} {after['name']!r} v{before['version']} -> v{after['version']} "
                     f"({after['owner'] or 'the department'}): {', '.join(changed) or 'nothing'} changed{renamed}")
    return after


@router.delete("/{template_id}", summary="Archive a report template (no longer offered; kept for the reports "
                                         "written from it)")
def archive_template(request: Request, template_id: int = _ID,
                     version: int | None = Query(None, ge=1, le=2**31 - 1, description="only at this version"),
                     principal: Principal = guard(*EDITORS, action="template-archive")) -> dict[str, Any]:
    try:
        template, now = _service(request).archive(template_id, by=principal.username,
                                                  admin=principal.role == "admin", version=version)
    except TemplateError as exc:
        raise _refused(request, f"template #{template_id} not archived", exc) from None
    _detail(request, f"{'archived' if now else 'already archived'}: template #{template['id']} {template['name']!r} "
                     f"({template['owner'] or 'the department'})")
    return template


def report_source(request: Request, template_id: int, user: str, version: int | None = None) -> str:
    """The template (at *version*, as picked) *user*'s report text was written
    from, for its audit event (pacs.report_templates: archived, not deleted,
    so it stays readable); one *user* may not see is not named."""
    return TemplateService(request.app.state.pacs.engine).describe(template_id, user, version)

