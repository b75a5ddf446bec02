"""Critical results (pacs.critical_results) over the JSON API: the open ones
for the radiologists, the quality staff and the EMR, and their
acknowledgement (who was told, how).

    GET  /api/critical[?state=open|acknowledged|all&limit=N]   (limit=0: the total only, as the viewer's badge asks)
    POST /api/studies/{uid}/report/critical/ack   {"acknowledgement": "BS. Lan, khoa Cấp cứu, qua điện thoại"}

A critical result is flagged when the report is signed (``critical`` and
``critical_note`` in the body of ``POST .../report/sign``). Each study a
listing shows is audited with its patient; an acknowledgement is audited
as ``critical-ack`` with what it says.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import Field

from pacs import critical_results
from pacs.auth import Principal

from .errors import JsonBody, refused_as_problem, require_uids
from .security import audit_studies, guard
from .ui_api import _audit_detail, _not_shown_this_hour

router = APIRouter(tags=["critical results"])
# Who lists them: those who read, act on or pass on results.
LISTERS = ("radiologist", "admin", "emr", "his")
# Who acknowledges: also the referring doctor told (their own studies only, as every study route).
ACKNOWLEDGERS = ("radiologist", "admin", "emr", "his", "referring")


class Acknowledgement(JsonBody):
    acknowledgement: str = Field(..., min_length=1, max_length=2000,
                                 description="who was told of the critical result, and how")


@router.get("/api/critical", summary="Critical results (kết quả nguy kịch): open ones oldest first")
def list_critical(request: Request, state: str = Query("open", description="open, acknowledged or all"),
                  limit: int = Query(100, ge=0, le=1000),
                  principal: Principal = guard(*LISTERS, action="query", study_of=lambda r: "")) -> dict[str, Any]:
    found, total = refused_as_problem(critical_results.listing, request.app.state.pacs.engine, state, limit)
    # The viewer's badge and open list refresh themselves every minute (unattended): audited as the
    # worklist's refresh is, only the studies this user was not shown this hour, no event when none
    # (a badge's count shows no patient).
    new = set(_not_shown_this_hour(request, principal, [c.study_uid for c in found]))
    _audit_detail(request, f"critical results ({state}): {total}")
    # Each with its patient, filled in from the study.
    audit_studies(request, [(c.study_uid, "") for c in found if c.study_uid in new])
    now = datetime.now(UTC)
    # minutes_open on the server's clock (a workstation's may be off).
    return {"state": state, "total": total, "critical": [c.listed(now) for c in found]}


@router.post("/api/studies/{study}/report/critical/ack", summary="Record who was told of the study's critical "
             "result, and how; audited")
def acknowledge_critical(request: Request, study: str, body: Acknowledgement,
                         principal: Principal = guard(*ACKNOWLEDGERS, action="critical-ack")) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    done = refused_as_problem(critical_results.acknowledge, request.app.state.pacs.engine, study,
                              principal.username, body.acknowledgement)
    _audit_detail(request, f"critical result of report version {done.version} acknowledged: {done.acknowledgement}")
    return done.as_dict()
