"""The patient's side of a share link (pacs.shares): ``/share/{token}``,
no login. A phone scans the QR code on the receipt and gets a page
(static/share.html, share.js) that reads everything it shows from the
routes below, each scoped to the link's one study -- or, for a link made
for an order before its images (the receipt printed at registration), to
the studies linked to that order at the time of the request
(pacs.share_orders), none before they come:

- ``GET /share/{token}``: the page; an unknown token is a 404 page, an
  expired or revoked link, or one whose order the HIS cancelled, a 410
  page (short, in Vietnamese and English).
- ``GET .../study``: the patient's name, the study's date, description and
  modality, its key images (shown first), its series of images, and its
  SIGNED report only. For an order
  link: the order (its date and procedure) and ``studies``, each study as
  a study link shows it; ``ready`` false and no studies before the images.
- ``POST .../birth-year``: the second factor (share_birth_year): the right
  year sets a cookie scoped to the link's path (HttpOnly, SameSite=Strict,
  Secure over HTTPS) that the other routes then need; five wrong ones
  lock the link for 15 minutes (pacs.shares.answer_birth_year).
- ``GET .../series/{series}/thumbnail``, ``.../series/{series}/instances/
  {sop}/frames/{n}``: JPEG renders of the study's images (no DICOM ever
  leaves by a link), a series or instance of another study is a 404.
- ``GET .../report.pdf``: the signed report's PDF (a study link's, or the
  only study's of an order link); ``GET .../studies/{study}/report.pdf``:
  that study's, one the link shows.

A token not of a token's shape is a 404 without a look at the index.
Every other request is audited as ``share:<id>`` (role ``share``) with the
client's address, the study and what was read, with the answer's outcome
(security.AuditMiddleware); the token itself never reaches the trail or
the log (routes are logged by their template). The app's security headers
apply: the page's Content-Security-Policy is the viewer's (its own script
and stylesheet, images from this origin), no framing, no Referer (the
token is in the URL), nothing stored by a cache.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import Field

from pacs import shares
from pacs.audit import Event
from pacs.key_images import key_refs
from pacs.query import Level
from pacs.reports import ReportError, ReportService, procedure_modalities
from pacs.retrieve import RetrieveItem, resolve
from pacs.studylist import study_detail

from . import rendering
from .errors import HTTPProblem, JsonBody, require_uids
from .mediatypes import video_media_types
from .render import RenderParams

router = APIRouter(prefix="/share", tags=["share links (patient)"])
COOKIE = "pacs_share"
# Frames are sent at most this many pixels on their longer side (a phone's
# screen; a mobile connection); smaller images as they are, never enlarged.
FRAME_MAX = 1024
FRAME_QUALITY = 85
THUMBNAIL = RenderParams("image/jpeg", quality=80, viewport=(160, 160))
PAGE = Path(__file__).resolve().parent / "static" / "share.html"


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _opened(request: Request, token: str, action: str, what: str) -> shares.ShareLink:
    """The link of *token*, if it may show its study, with the request's
    audit event prepared (``share:<id>``, *action*, *what* was asked);
    HTTPProblem 404 (unknown: the index is not asked for a token of the
    wrong shape, and nothing is audited) or 410 (expired, revoked)."""
    if not shares.is_token_shaped(token):
        raise HTTPProblem(404, "no such share link")
    event = Event(action=action, user="", role="share", client=_client(request), protocol="http",
                  detail=f"share link: {what}")
    request.state.audit = event  # written with the answer's status (AuditMiddleware)
    try:
        found = shares.open_link(request.app.state.pacs.engine, token)
    except shares.ShareError as exc:
        if exc.link is not None:
            _name(event, exc.link)
            event.detail = f"share link {exc.link.id}: {what}: {exc}"
        else:
            event.detail = f"share link: {what}: unknown token"
        raise HTTPProblem(exc.http_status, str(exc)) from None
    _name(event, found)
    event.detail = f"share link {found.id}: {what}"
    return found


def _name(event: Event, found: shares.ShareLink) -> None:
    """The link, its study and patient in *event*: an order link's names the
    order's Study Instance UID and its patient (no study may exist yet);
    the routes that serve one of its studies name that one instead."""
    event.user, event.study_uid = f"share:{found.id}", found.audit_study
    if found.accession:
        event.patient_id = found.patient


def _needs_answer(request: Request, found: shares.ShareLink) -> bool:
    """Whether this browser must still answer the birth year."""
    if not shares.needs_birth_year(found, request.app.state.pacs.settings.share_birth_year):
        return False
    return not shares.cookie_valid(found, request.cookies.get(COOKIE))


def _answered(request: Request, found: shares.ShareLink) -> None:
    if _needs_answer(request, found):
        raise HTTPProblem(403, "answer the patient's birth year first")


def _moved_meanwhile(request: Request, found: shares.ShareLink) -> shares.ShareLink | None:
    """The link as the index has it now if this browser's birth-year answer
    does not hold for it (None: it still does). Called once the page's data
    is read: the cookie was judged before, on the patient the link named
    then, and an HIS XO moving the order, a match moving the study or a
    merge committed in between gave the next patient's name to the browser
    that had answered the previous patient's year. (Images and the report's
    PDF name no one, or the patient of the signature: what the link showed
    before the move.)"""
    fresh = shares.link(request.app.state.pacs.engine, found.id)
    if fresh is None:  # its study deleted meanwhile
        raise HTTPProblem(404, "no such share link")
    return fresh if _needs_answer(request, fresh) else None


def _secure(request: Request) -> bool:
    return bool(request.app.state.pacs.settings.http_tls) or request.url.scheme == "https"


# -- the page ------------------------------------------------------------------------
_ERRORS = {
    "unknown": ("Liên kết không tồn tại", "Kiểm tra lại địa chỉ, hoặc quét lại mã QR trên phiếu.",
                "This link does not exist", "Check the address, or scan the QR code on the receipt again."),
    "expired": ("Liên kết đã hết hạn", "Vui lòng liên hệ bệnh viện để được cấp liên kết mới.",
                "This link has expired", "Please ask the hospital for a new link."),
    "revoked": ("Liên kết đã bị thu hồi", "Vui lòng liên hệ bệnh viện nếu bạn cần xem lại kết quả.",
                "This link was revoked", "Please contact the hospital if you need to see the results again."),
    "cancelled": ("Ca chụp đã bị hủy", "Bệnh viện đã hủy chỉ định chụp này. Vui lòng liên hệ bệnh viện nếu bạn "
                  "có thắc mắc.", "The examination was cancelled",
                  "The hospital cancelled this examination. Please contact the hospital if you have questions."),
}


def error_page(status: int, message: str) -> HTMLResponse:
    """The short page of a link that shows nothing (404, 410), in
    Vietnamese and English; its stylesheet is the page's own (no inline
    style: the Content-Security-Policy forbids it)."""
    kind = ("revoked" if "revoked" in message else "cancelled" if "cancelled" in message
            else "expired" if status == 410 else "unknown")
    vi_title, vi_text, en_title, en_text = _ERRORS[kind]
    body = f"""<!doctype html>
<html lang="vi">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="robots" content="noindex, nofollow">
  <title>{vi_title} / {en_title}</title>
  <link rel="icon" href="data:,">
  <link rel="stylesheet" href="/static/share.css">
</head>
<body class="share">
  <main class="share-main share-gone" data-status="{status}">
    <h1 id="gone-title">{vi_title}</h1>
    <p>{vi_text}</p>
    <h2 lang="en">{en_title}</h2>
    <p lang="en">{en_text}</p>
  </main>
</body>
</html>
"""
    return HTMLResponse(body, status_code=status)


@router.get("/{token}", response_class=HTMLResponse, summary="The patient's page of a share link")
def page(request: Request, token: str) -> Response:
    try:
        _opened(request, token, "view", "page")
    except HTTPProblem as exc:
        return error_page(exc.status, exc.message)
    return FileResponse(PAGE, media_type="text/html; charset=utf-8")


# -- the study -----------------------------------------------------------------------
def _shown(instance: dict[str, Any]) -> bool:
    """An instance the page shows: an image (a video, a PDF, a structured
    report are not frames to render)."""
    return bool(instance["rows"] and instance["columns"]) and not video_media_types(
        instance["transfer_syntax_uid"] or "")


def _report(request: Request, study_uid: str) -> dict[str, Any]:
    """The newest signed version of the report ("none" without one): a
    draft, or an amendment in progress, is never the patient's to read."""
    reports = ReportService(request.app.state.pacs)
    current = reports.get(study_uid, signed_only=True)["current"]
    if current is None:
        return {"status": "none"}
    try:
        reports.pdf(study_uid, current_patient=True)
        pdf = True
    except ReportError:  # names the patient the study was filed under before (or is missing)
        pdf = False
    return {"status": "signed", "findings": current["findings"], "impression": current["impression"],
            "signed_by": current["signed_by"], "signed_at": current["signed_at"], "version": current["version"],
            "pdf": pdf}


def _key_images(request: Request, study_uid: str, series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The key images the radiologists marked (pacs.key_images), among the
    images the page shows, each a frame to open (1 for a whole instance):
    which image and frame only, never who marked it or their note."""
    shown = {(s["series_uid"], i["sop_uid"]) for s in series for i in s["images"]}
    return [{"series_uid": ref["series_uid"], "sop_uid": ref["sop_uid"], "frame": ref["frame"] or 1}
            for ref in key_refs(request.app.state.pacs, study_uid) if (ref["series_uid"], ref["sop_uid"]) in shown]


def _study(request: Request, study_uid: str) -> dict[str, Any] | None:
    """A study as the page shows it: its date, description, modalities,
    key images, series of images and signed report (None: no longer in the
    archive)."""
    detail = study_detail(request.app.state.pacs.engine, study_uid)
    if detail is None:
        return None
    series = []
    for s in detail["series"]:
        images = [{"sop_uid": i["sop_uid"], "frames": i["frames"], "rows": i["rows"], "columns": i["columns"]}
                  for i in s["instances"] if _shown(i)]
        if images:
            series.append({"series_uid": s["series_uid"], "modality": s["modality"], "number": s["series_number"],
                           "description": s["description"], "images": images})
    return {
        "study_uid": study_uid,
        "patient_name": detail["patient_name"],
        "study_date": detail["study_date"],
        "study_time": detail["study_time"],
        "description": detail["description"],
        "modalities": procedure_modalities(detail["modalities"]),
        "key_images": _key_images(request, study_uid, series),
        "series": series,
        "report": _report(request, study_uid),
    }


def _order_view(request: Request, found: shares.ShareLink) -> dict[str, Any]:
    """An order link's page data: the order, and each study linked to it
    now, as a study link shows it (none: "not ready yet"). The event names
    every study shown (one event each), with the order's patient."""
    engine = request.app.state.pacs.engine
    order = shares.shown_order(engine, found)
    if order is None:  # orders are never deleted; a link goes with its order row anyway
        raise HTTPProblem(404, "the order is no longer in the archive")
    studies = [shown for uid in shares.shown_studies(engine, found) if (shown := _study(request, uid))]
    if studies:
        event = request.state.audit
        event.study_uid = studies[0]["study_uid"]
        request.state.audit_more = [(s["study_uid"], found.patient) for s in studies[1:]]
        event.detail += f": {len(studies)} studies" if len(studies) > 1 else ""
    else:
        request.state.audit.detail += ": images not ready yet"
    return {
        "kind": "order",
        "patient_name": order.patient_name,
        "order": {"accession": order.accession, "date": order.start_date, "time": order.start_time,
                  "procedure": order.procedure, "modalities": order.modalities, "status": order.status},
        "ready": bool(studies),
        "studies": studies,
        "expires_at": found.expires_at.isoformat(),
    }


@router.get("/{token}/study", summary="What the link's page shows: the study (an order's studies), its images "
            "and signed report")
def study(request: Request, token: str) -> Response:
    found = _opened(request, token, "view", "study")
    pacs = request.app.state.pacs
    if _needs_answer(request, found):
        return _ask_birth_year(found)
    if found.accession:
        view = _order_view(request, found)
    else:
        shown = _study(request, found.study_uid)
        if shown is None:
            raise HTTPProblem(404, "the study is no longer in the archive")
        view = {"kind": "study", **shown, "expires_at": found.expires_at.isoformat()}
    fresh = _moved_meanwhile(request, found)
    if fresh is not None:
        # Nothing read is shown: the event names the link's patient now, as a refused request does.
        request.state.audit_more = []
        _name(request.state.audit, fresh)
        request.state.audit.detail = f"share link {found.id}: study: its patient changed while read"
        return _ask_birth_year(fresh)
    shares.record_use(pacs.engine, found.id)
    return JSONResponse(view)


def _ask_birth_year(found: shares.ShareLink) -> JSONResponse:
    """The 403 that has the page ask the birth year (with the lock, if any)."""
    now = datetime.now(UTC)
    locked = found.locked_until if found.locked_until is not None and found.locked_until > now else None
    return JSONResponse({"error": "answer the patient's birth year first", "status": 403, "birth_year_required": True,
                         "locked_until": locked.isoformat() if locked else None}, status_code=403)


class BirthYear(JsonBody):
    birth_year: str | int = Field(..., description="the patient's year of birth, 4 digits")


@router.post("/{token}/birth-year", status_code=204, summary="Answer the patient's birth year (second factor)")
def birth_year(request: Request, token: str, body: BirthYear) -> Response:
    found = _opened(request, token, "share-verify", "birth year answered")
    engine = request.app.state.pacs.engine
    if not shares.needs_birth_year(found, request.app.state.pacs.settings.share_birth_year):
        raise HTTPProblem(400, "this link asks no birth year")
    try:
        answer = shares.answer_birth_year(engine, found, str(body.birth_year))
    except shares.ShareError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    event = request.state.audit
    if answer.right:
        event.detail += ": right"
        response = Response(status_code=204)
        response.set_cookie(COOKIE, shares.answered_cookie(found), max_age=int(shares.ANSWERED_FOR.total_seconds()),
                            path=shares.share_path(token), httponly=True, samesite="strict", secure=_secure(request))
        return response
    if answer.locked_until is not None:
        if answer.new_lock:
            event.detail += f": wrong; locked until {answer.locked_until:%Y-%m-%d %H:%M} UTC"
            request.app.state.pacs.audit.record(Event(
                action="share-lockout", user=event.user, role="share", client=event.client, outcome="denied",
                study_uid=event.study_uid, patient_id=event.patient_id, detail=f"share link {found.id} locked until "
                f"{answer.locked_until:%Y-%m-%d %H:%M} UTC after {shares.BIRTH_YEAR_TRIES} wrong birth years"))
        else:
            event.detail += ": refused unchecked, the link is locked"
        retry = max(1, math.ceil((answer.locked_until - datetime.now(UTC)).total_seconds()))
        return JSONResponse({"error": f"too many wrong answers: try again in {math.ceil(retry / 60)} minutes",
                             "status": 429, "locked_until": answer.locked_until.isoformat(), "retry_after": retry},
                            status_code=429, headers={"Retry-After": str(retry)})
    event.detail += f": wrong, {answer.tries_left} tries left"
    return JSONResponse({"error": "wrong birth year", "status": 403, "tries_left": answer.tries_left},
                        status_code=403)


# -- images and the report's PDF -----------------------------------------------------
def _items(request: Request, found: shares.ShareLink, series: str, sop: str | None = None) -> list[RetrieveItem]:
    """The images the path names of the study the link shows (an order
    link: of a study linked to its order now); 404 for a series or instance
    that is not such a study's (or not an image). The audit event names the
    study served."""
    require_uids(series, sop)
    shown = set(shares.shown_studies(request.app.state.pacs.engine, found))
    if not shown:
        raise HTTPProblem(404, "no such series: the images are not ready yet")
    match = {"SeriesInstanceUID": series}
    if len(shown) == 1:
        match["StudyInstanceUID"] = next(iter(shown))
    if sop:
        match["SOPInstanceUID"] = sop
    # Checked again on what the index answered: only the studies the link shows, whatever the match.
    items = [i for i in resolve(request.app.state.pacs, Level.IMAGE, match)
             if i.study_uid in shown and i.rows and i.columns and not video_media_types(i.transfer_syntax_uid)]
    if not items:
        raise HTTPProblem(404, f"no such {'image' if sop else 'series'} in this study")
    request.state.audit.study_uid = items[0].study_uid
    return items


def _frame_params(item: RetrieveItem) -> RenderParams:
    longest = max(item.rows or 0, item.columns or 0)
    return RenderParams("image/jpeg", quality=FRAME_QUALITY,
                        viewport=(FRAME_MAX, FRAME_MAX) if longest > FRAME_MAX else None)


@router.get("/{token}/series/{series}/thumbnail", summary="A series' thumbnail (JPEG)")
def thumbnail(request: Request, token: str, series: str) -> Response:
    found = _opened(request, token, "retrieve", f"thumbnail of series {series[:64]}")
    _answered(request, found)
    return rendering.thumbnail_response(request, _items(request, found, series), params=THUMBNAIL)


@router.get("/{token}/series/{series}/instances/{sop}/frames/{frame}", summary="One image (JPEG)")
def frame_image(request: Request, token: str, series: str, sop: str, frame: int) -> Response:
    found = _opened(request, token, "retrieve", f"frame {frame} of image {sop[:64]}")
    _answered(request, found)
    item = _items(request, found, series, sop)[0]
    params = _frame_params(item)
    return Response(rendering.render_item(request, item, frame, params), media_type=params.media_type)


def _pdf(request: Request, study_uid: str) -> Response:
    request.state.audit.study_uid = study_uid
    try:
        data = ReportService(request.app.state.pacs).pdf(study_uid, current_patient=True)
    except ReportError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    return Response(data, media_type="application/pdf",
                    headers={"Content-Disposition": 'inline; filename="ket-qua.pdf"'})


@router.get("/{token}/report.pdf", summary="The signed report (PDF)")
def report_pdf(request: Request, token: str) -> Response:
    found = _opened(request, token, "download", "report PDF")
    _answered(request, found)
    shown = shares.shown_studies(request.app.state.pacs.engine, found)
    if len(shown) != 1:
        raise HTTPProblem(404, "no report yet: the images are not ready" if not shown else
                          "this order has several studies: ask for one (studies/{uid}/report.pdf)")
    return _pdf(request, shown[0])


@router.get("/{token}/studies/{study_uid}/report.pdf", summary="The signed report of a study the link shows (PDF)")
def study_report_pdf(request: Request, token: str, study_uid: str) -> Response:
    found = _opened(request, token, "download", f"report PDF of study {study_uid[:64]}")
    _answered(request, found)
    require_uids(study_uid)
    if study_uid not in shares.shown_studies(request.app.state.pacs.engine, found):
        raise HTTPProblem(404, "no such study in this link")
    return _pdf(request, study_uid)
