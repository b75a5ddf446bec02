"""Patient share links, the staff's side (pacs.shares): make a link to a
study for its patient (the HIS prints its QR code on the receipt), list a
study's links, revoke one. The patient's side is :mod:`viewer_api.share_page`.

Every creation and revocation is audited (by the guard, with the answer's
outcome); the token is in the answer to the creation only, never kept.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request
from pydantic import Field

from pacs import shares
from pacs.auth import Principal
from pacs.audit import Event
from pacs.studylist import patient_of

from .errors import HTTPProblem, JsonBody, require_uids
from .security import guard
from .urls import base_url

router = APIRouter(tags=["share links"])
# Who may make, list and revoke links: the HIS (it prints the receipt),
# the radiologists and admins, and a referring physician for the studies
# they referred (the guard's referring check).
SHARERS = ("radiologist", "admin", "his", "referring")


class NewShare(JsonBody):
    # The most is the share_days_max setting (checked with it: a 400 naming it).
    days: int | None = Field(None, ge=1, description="days the link lasts (default: share_days)")


def _detail(request: Request, detail: str) -> None:
    """What the action did, in the audit event its guard prepared."""
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        event.detail = detail[:500]


def linked_study(request: Request) -> str:
    """The study of the link a path names (``{link_id}``), for the guard's
    referring check and the audit; '' when there is no such link."""
    text = str(request.path_params.get("link_id", ""))
    if not text.isdigit() or len(text) > 18:
        return ""
    found = shares.link(request.app.state.pacs.engine, int(text))
    return found.study_uid if found is not None else ""


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except shares.ShareError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


@router.post("/api/studies/{study}/shares", status_code=201,
             summary="Make a share link for the study's patient: its URL and QR code (SVG); the token is not kept")
def create_share(request: Request, study: str, body: NewShare | None = None,
                 principal: Principal = guard(*SHARERS, action="share-create")) -> dict[str, Any]:
    require_uids(study)
    settings = request.app.state.pacs.settings
    days = _call(shares.days_asked, body.days if body else None, settings.share_days, settings.share_days_max)
    _detail(request, f"share link for {days} days: refused")
    new = _call(shares.create, request.app.state.pacs.engine, study, principal.username, days=days)
    # public_url when set (the address patients reach), else this request's own.
    url = new.url(base_url(request))
    _detail(request, f"share link {new.link.id} made, {days} days, until {new.link.expires_at:%Y-%m-%d %H:%M} UTC")
    return {"id": new.link.id, "study_uid": study, "url": url, "expires_at": new.link.expires_at.isoformat(),
            "qr_svg": shares.qr_svg(url)}


@router.get("/api/studies/{study}/shares", summary="The study's share links (their tokens are not kept)")
def list_shares(request: Request, study: str,
                _: Principal = guard(*SHARERS, action="query")) -> dict[str, Any]:
    require_uids(study)
    engine = request.app.state.pacs.engine
    if patient_of(engine, study) is None:
        raise HTTPProblem(404, f"no study {study}")
    return {"items": [found.as_dict() for found in shares.links(engine, study)]}


@router.delete("/api/shares/{link_id}", summary="Revoke a share link: it answers 410 from now on")
def revoke_share(request: Request, link_id: int = Path(..., ge=1, le=2**63 - 1),
                 principal: Principal = guard(*SHARERS, action="share-revoke", study_of=linked_study),
                 ) -> dict[str, Any]:
    found, done = _call(shares.revoke, request.app.state.pacs.engine, link_id, principal.username)
    _detail(request, f"share link {link_id} revoked" if done else
            f"share link {link_id} was revoked already (by {found.revoked_by}, {found.revoked_at:%Y-%m-%d %H:%M} UTC)")
    return {**found.as_dict(), "revoked_now": done}
