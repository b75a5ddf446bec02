"""The JSON API of Structured Reports for the web viewer: one SR instance as
a document (its content tree, title, flags and observers, its image
references located in the archive) and a study's radiation dose summary.

Reads of patient data like the study routes: the reading roles, a
referring physician only for the studies they referred, audited as
``view`` with the study (and so its patient)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pacs.auth import Principal
from pacs.header import valid_uid
from pacs.sr_reads import SrError, find_instance, instance_study, sr_json, study_dose

from .errors import HTTPProblem, require_uids
from .security import READERS, guard, may_see_study

router = APIRouter(tags=["viewer"])
NOT_REFERRED = "this study was not referred by you"


def sr_study(request: Request) -> str:
    """The study of the instance a ``/api/instances/{sop}`` route names
    ('' when the archive has no such instance): the access check and the
    audit trail see the study, as for the routes that name it."""
    sop = str(request.path_params.get("sop") or "")
    if not valid_uid(sop):
        raise HTTPProblem(400, f"invalid SOP Instance UID {sop[:80]!r}")
    return instance_study(request.app.state.pacs, sop) or ""


@router.get("/api/instances/{sop}/sr",
            summary="A structured report (SR, RDSR, Key Object Selection) as a document: its content tree, "
                    "title, completion and verification, observers; 409 for an instance that is no SR")
def structured_report(request: Request, sop: str,
                      principal: Principal = guard(*READERS, action="view", study_of=sr_study)) -> dict[str, Any]:
    pacs = request.app.state.pacs
    item = find_instance(pacs, sop)
    if item is None:
        # A referring physician learns no more of an instance than of a
        # study they did not refer: unknown or not theirs, both 403.
        if principal.role == "referring":
            raise HTTPProblem(403, NOT_REFERRED)
        raise HTTPProblem(404, f"no instance {sop}")
    try:
        return sr_json(pacs, item, lambda study: may_see_study(request, principal, study))
    except SrError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


@router.get("/api/studies/{study}/dose",
            summary="The radiation dose of the study's X-Ray Radiation Dose SRs (CT: events, CTDIvol, DLP, "
                    "total DLP; projection: DAP, dose at the reference point); reports is empty when none")
def dose(request: Request, study: str, _: Principal = guard(*READERS, action="view")) -> dict[str, Any]:
    require_uids(study, name="Study Instance UID")
    summary = study_dose(request.app.state.pacs, study)
    if summary is None:
        raise HTTPProblem(404, f"no study {study}")
    return summary
