"""The instances rejection notes withdrew (pacs.rejections), over the JSON
API: what ``pacs rejections list|lift`` does, for an administrator's tools.

    GET  /api/rejections[?study=UID&limit=N]
    POST /api/rejections/lift[?dry_run=true]   {"study_uid": ..., "sop_uids": [...], "reason": ...}
    POST /api/rejections/reject[?dry_run=true] {"study_uid": ..., "series_uid": ..., "sop_uids": [...],
                                                "code": "113038", "reason": ...}

``reject`` withdraws images with a rejection note made here
(pacs.rejection_notes). Administrators only; each call audited (a lift as
``rejection-lift``, a rejection as ``reject`` and each of its deletions as
``delete``, in the trail of the study it names, with the reason and what it
did).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import Field

from pacs import rejections
from pacs.auth import Principal
from pacs.key_images import Author
from pacs.rejection_notes import MAX_LISTED, MAX_REASON, reject

from .errors import HTTPProblem, JsonBody, refused_as_problem, require_uids
from .security import guard
from .ui_api import _audit_detail

router = APIRouter(tags=["rejections"])
# A lift names at most this many instances (a whole study: study_uid).
MAX_LIFTED = 10_000


def _query_study(request: Request) -> str:
    """The study the list is asked for, for the audit trail."""
    return str(request.query_params.get("study") or "")


class Lift(JsonBody):
    study_uid: str = Field("", description="every rejected instance of this study")
    sop_uids: list[str] = Field([], max_length=MAX_LIFTED, description="these rejected instances")
    reason: str = Field(..., min_length=1, max_length=400, description="why (kept in the audit trail)")


@router.get("/api/rejections", summary="Instances withdrawn by rejection notes, refused when sent again; admin")
def list_rejections(request: Request, study: str = Query("", description="only this study's"),
                    limit: int = Query(100, ge=1, le=1000),
                    _: Principal = guard("admin", action="query", study_of=_query_study)) -> dict[str, Any]:
    require_uids(study or None, name="study")
    found, total = rejections.rejected(request.app.state.pacs.engine, study, limit)
    _audit_detail(request, f"rejected instances{' of study ' + study if study else ''}: {total}")
    return {"total": total, "rejected": [f.as_dict() for f in found]}


@router.post("/api/rejections/lift", summary="Let rejected instances be received again; admin, audited")
def lift_rejections(request: Request, body: Lift, dry_run: bool = Query(False, description="only show what"),
                    principal: Principal = guard("admin", action="rejection-lift")) -> dict[str, Any]:
    if not body.study_uid and not body.sop_uids:
        raise HTTPProblem(400, "name the study (study_uid) or the instances (sop_uids) whose rejection to lift")
    require_uids(body.study_uid or None, name="study_uid")
    require_uids(*body.sop_uids, name="SOP Instance UID")
    reason = " ".join(body.reason.split())
    if not reason:
        raise HTTPProblem(400, "reason must say why (it goes to the audit trail)")
    lifted = rejections.lift(request.app.state.pacs.engine, by=principal.username, study_uid=body.study_uid,
                             sop_uids=body.sop_uids, dry_run=dry_run)
    event = getattr(request.state, "audit", None)
    studies = sorted({e.study_uid for e in lifted} | ({body.study_uid} if body.study_uid else set()))
    if event is not None and len(studies) == 1:
        event.study_uid = studies[0]
    verb = "would lift" if dry_run else "lifted"
    _audit_detail(request, f"{verb} the rejection of {len(lifted)} instances"
                  + (f" ({lifted[0].sop_uid}{' and more' if len(lifted) > 1 else ''})" if lifted else "")
                  + f" of {', '.join(studies) or 'no study'}; reason: {reason}")
    return {"dry_run": dry_run, "lifted": [e.as_dict() for e in lifted]}


class Reject(JsonBody):
    study_uid: str = Field(..., description="the study")
    series_uid: str = Field("", description="only this series")
    sop_uids: list[str] = Field([], max_length=MAX_LISTED, description="only these instances")
    code: str = Field("", max_length=80, description="113001 (default), 113037, 113038, 113039, or its meaning")
    reason: str = Field(..., min_length=1, max_length=MAX_REASON, description="what happened (note and audit)")


@router.post("/api/rejections/reject", summary="Withdraw images with a rejection note made here; admin, audited")
def reject_images(request: Request, body: Reject, dry_run: bool = Query(False, description="only show what"),
                  principal: Principal = guard("admin", action="reject")) -> dict[str, Any]:
    client = request.client.host if request.client else ""
    author = Author(principal.username, principal.display_name, principal.role, client)
    event = getattr(request.state, "audit", None)
    if event is not None:
        event.study_uid = body.study_uid[:64]  # a refusal too is in the study's trail
    selection, done = refused_as_problem(reject, request.app.state.pacs, author, study_uid=body.study_uid,
                                         series_uid=body.series_uid, sop_uids=body.sop_uids, code=body.code,
                                         reason=body.reason, dry_run=dry_run)
    answer = selection.answer(done)
    _audit_detail(request, done.summary if done is not None
                  else f"would reject {selection.instances} instances: {answer['reason']}")
    return answer
