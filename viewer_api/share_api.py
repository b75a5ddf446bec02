"""Patient share links, the staff's side (pacs.shares): make a link to a
study for its patient (the HIS prints its QR code on the receipt), or to an
order before its images exist (the receipt printed at registration: it
shows the order's studies when they come), list the links, revoke one. The
patient's side is :mod:`viewer_api.share_page`.

A referring physician makes, lists and revokes the links of the studies
they referred (the guard's check), and of the orders that name them their
referring physician (checked here, the same way: an order that names
another, or none, is refused 403 as a study they did not refer).

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
from pacs.names import same_person
from pacs.share_orders import OrderTarget
from pacs.studylist import patient_of

from .errors import HTTPProblem, JsonBody, require_uids
from .security import guard, request_target
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
    referring check and the audit; '' when there is no such link, or it is
    an order link (whose order the route checks: :func:`_referred_order`)."""
    text = str(request.path_params.get("link_id", ""))
    if not text.isdigit() or len(text) > 18:
        return ""
    found = shares.link(request.app.state.pacs.engine, int(text))
    return found.study_uid if found is not None else ""


def _name_order(request: Request, order: OrderTarget) -> None:
    """Name the order's study UID and patient in the route's audit event
    (the path names an accession only; no study may exist yet)."""
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        event.study_uid, event.patient_id = order.study_uid, order.patient


def _referred_order(request: Request, principal: Principal, accession: str) -> OrderTarget:
    """The order *accession*, if the caller may share it: a referring
    physician only the orders whose referring physician they are, as the
    study routes check the studies (an unknown order is refused the same,
    403, to them: it tells nothing of which accessions exist); 404 for the
    other roles when there is no such order."""
    order = shares.find_order(request.app.state.pacs.engine, accession)
    if order is not None:
        _name_order(request, order)
    if principal.role == "referring" and (
            order is None or not same_person(order.referring_physician, principal.display_name)):
        event = getattr(request.state, "audit", None)
        if isinstance(event, Event):
            event.detail = f"{request_target(request)}: not the referring physician"  # the answer's status follows
        raise HTTPProblem(403, "this order was not referred by you")
    if order is None:
        raise HTTPProblem(404, f"no order {accession}")
    return order


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


@router.get("/api/studies/{study}/shares",
            summary="The links that show the study: its own and its orders' (their tokens are not kept)")
def list_shares(request: Request, study: str,
                _: Principal = guard(*SHARERS, action="query")) -> dict[str, Any]:
    require_uids(study)
    engine = request.app.state.pacs.engine
    if patient_of(engine, study) is None:
        raise HTTPProblem(404, f"no study {study}")
    return {"items": [found.as_dict() for found in shares.links(engine, study)]}


# :path: an accession number may hold a "/" (legal in SH; "CT/2024/0153"), which arrives decoded.
@router.post("/api/orders/{accession:path}/shares", status_code=201,
             summary="Make a share link for an order before its images exist: its URL and QR code (SVG); it shows "
                     "the order's studies when they come")
def create_order_share(request: Request, accession: str, body: NewShare | None = None,
                       principal: Principal = guard(*SHARERS, action="share-create")) -> dict[str, Any]:
    settings = request.app.state.pacs.settings
    _referred_order(request, principal, accession)
    days = _call(shares.days_asked, body.days if body else None, settings.share_days, settings.share_days_max)
    _detail(request, f"share link to order {accession} for {days} days: refused")
    new = _call(shares.create_for_order, request.app.state.pacs.engine, accession, principal.username, days=days)
    url = new.url(base_url(request))
    _detail(request, f"share link {new.link.id} made for order {accession}, {days} days, until "
            f"{new.link.expires_at:%Y-%m-%d %H:%M} UTC")
    return {"id": new.link.id, "accession": accession, "study_uid": new.link.order_study_uid, "url": url,
            "expires_at": new.link.expires_at.isoformat(), "qr_svg": shares.qr_svg(url)}


@router.get("/api/orders/{accession:path}/shares", summary="The order's share links (their tokens are not kept)")
def list_order_shares(request: Request, accession: str,
                      principal: Principal = guard(*SHARERS, action="query")) -> dict[str, Any]:
    _referred_order(request, principal, accession)
    return {"items": [found.as_dict() for found in
                      shares.links(request.app.state.pacs.engine, accession=accession)]}


@router.delete("/api/shares/{link_id}", summary="Revoke a share link: it answers 410 from now on")
def revoke_share(request: Request, link_id: int = Path(..., ge=1, le=2**63 - 1),
                 principal: Principal = guard(*SHARERS, action="share-revoke", study_of=linked_study),
                 ) -> dict[str, Any]:
    before = shares.link(request.app.state.pacs.engine, link_id)
    if before is not None and before.accession:
        # An order link: the guard saw no study; the order decides (a referring physician's).
        _referred_order(request, principal, before.accession)
    found, done = _call(shares.revoke, request.app.state.pacs.engine, link_id, principal.username)
    _detail(request, f"share link {link_id} revoked" if done else
            f"share link {link_id} was revoked already (by {found.revoked_by}, {found.revoked_at:%Y-%m-%d %H:%M} UTC)")
    return {**found.as_dict(), "revoked_now": done}
