"""Reading claims over HTTP: a radiologist marks a study as being read by
them ("đang đọc", pacs.reading_claims), colleagues see it in the worklist.

- ``POST /api/studies/{study}/claim`` ``{"take_over": false}``: claim the
  study, or extend one's own claim (the viewer's heartbeat while the study
  is open: not audited, only a new claim is). A colleague's running claim
  is a 409 whose body names it (``claim``), unless ``take_over`` (audited
  as ``claim-takeover`` naming whom it was taken from; ``"holder"``: only
  the claim of that user, the one the viewer showed). A study whose report
  is signed: 409. Radiologists and administrators.
- ``DELETE /api/studies/{study}/claim``: release one's claim (an
  administrator: anyone's), audited as ``claim-release``; 403 for a
  colleague's, 204 also when there was none.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field
from fastapi.responses import JSONResponse, Response

from pacs.audit import Event
from pacs.auth import Principal
from pacs.reading_claims import ClaimError, claim, release

from .errors import HTTPProblem, JsonBody, require_uids
from .security import guard

router = APIRouter(tags=["viewer"])
# Who claims studies: the roles that write reports (and administrators).
CLAIMERS = ("radiologist", "admin")


class ClaimRequest(JsonBody):
    # Replace a colleague's running claim (they are told by their viewer).
    take_over: bool = False
    # The user name of the claim the taker was shown: one passed to another meanwhile is a 409.
    holder: str = Field("", max_length=64)
    # The open viewer's heartbeat: extend one's own claim, never claim anew.
    refresh: bool = False


def refresh_seconds(minutes: float) -> int:
    """How often the viewer extends a claim: three times per timeout, at most every minute."""
    return max(1, min(60, int(minutes * 60 / 3)))


def _event(request: Request) -> Event | None:
    event = getattr(request.state, "audit", None)
    return event if isinstance(event, Event) else None


def _holder(exc: ClaimError, username: str) -> Any:
    return exc.holder.as_json(username) if exc.holder is not None else None


@router.post("/api/studies/{study}/claim", summary="Claim a study for reading (or extend one's claim)")
def claim_study(request: Request, study: str, body: ClaimRequest | None = None,
                principal: Principal = guard(*CLAIMERS, action="claim")) -> Any:
    require_uids(study, name="Study Instance UID")
    settings = request.app.state.pacs.settings
    minutes = settings.reading_claim_minutes
    try:
        done = claim(request.app.state.pacs.engine, study, principal.username, principal.display_name, minutes,
                     take_over=bool(body and body.take_over), holder=body.holder if body else "",
                     refresh=bool(body and body.refresh))
    except ClaimError as exc:
        event = _event(request)
        if event is not None:
            event.detail = f"{event.detail}: {exc}"[:500]
        if exc.holder is None:
            raise HTTPProblem(exc.http_status, str(exc)) from None
        # The viewer shows who reads it, and offers to take over.
        return JSONResponse({"error": str(exc), "status": exc.http_status,
                             "claim": _holder(exc, principal.username)}, status_code=exc.http_status)
    event = _event(request)
    if done.action == "refresh":
        # A heartbeat of the open viewer: the claim itself was audited once.
        request.state.audit = None
    elif event is not None and done.previous is not None:
        event.action = "claim-takeover"
        taken = done.previous
        event.detail = (f"{event.detail}: taken over from {taken.username} ({taken.display_name}), "
                        f"reading since {taken.claimed_at.isoformat()}")[:500]
    return {**done.claim.as_json(principal.username), "refresh_seconds": refresh_seconds(minutes)}


@router.delete("/api/studies/{study}/claim", status_code=204, summary="Release one's claim on a study")
def release_claim(request: Request, study: str, principal: Principal = guard(*CLAIMERS, action="claim-release")
                  ) -> Response:
    require_uids(study, name="Study Instance UID")
    try:
        ended = release(request.app.state.pacs.engine, study, principal.username, anyone=principal.role == "admin")
    except ClaimError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    event = _event(request)
    if event is not None:
        whose = "no running claim" if ended is None else f"claim of {ended.username} ({ended.display_name}) ended"
        event.detail = f"{event.detail}: {whose}"[:500]
    return Response(status_code=204)
