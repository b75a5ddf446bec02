"""WADO-URI (PS3.18 chapter 9): the ``/wado?requestType=WADO&...`` links
many EMRs still embed. Rendered JPEG/PNG/GIF or the DICOM object itself."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from pacs.frames import PIXEL_DATA
from pacs.query import Level
from pacs.retrieve import RetrieveItem, resolve
from pacs.transcode import can_serve, prepared_bytes

from .documents import document_media_type, document_response
from .errors import HTTPProblem, require_uids
from .negotiation import LOSSY_SYNTAXES
from .render import MAX_VIEWPORT_DIMENSION, RenderError, RenderParams
from .rendering import check_frame_number, render_item
from .streaming import ClosingStreamingResponse
from .wado import video_response, video_types

router = APIRouter(tags=["WADO-URI"])
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif"}
_DICOM = "application/dicom"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise HTTPProblem(400, f"{name} must be an integer") from None
    if number < 1:
        raise HTTPProblem(400, f"{name} must be positive")
    return number


# Parameters of PS3.18 9.1.2 we do not implement: answered with 400 rather
# than ignored, as ignoring them returns something else than what was asked
# (the identified object for anonymize=yes, the whole image for region=).
_UNSUPPORTED = {
    "anonymize": "anonymization (anonymize=yes) is not supported by this server; "
                 "ask the archive administrator for a de-identified export",
    "region": "region is not supported by this server; use rows/columns for a smaller image",
    "presentationUID": "presentation states (presentationUID) are not supported by this server",
    "presentationSeriesUID": "presentation states (presentationSeriesUID) are not supported by this server",
}


def _refuse_unsupported(request: Request) -> None:
    for name, message in _UNSUPPORTED.items():
        if name in request.query_params:
            raise HTTPProblem(400, message)


def _content_type(request: Request, item: RetrieveItem) -> str:
    """The contentType to answer with (PS3.18 9.1.2.1.3): the first listed
    one this object can be given as; by default a JPEG of an image and the
    DICOM object itself for anything else (a report, an SR, a PDF)."""
    document = document_media_type(item)
    videos = list(video_types(item))
    if videos:
        # A video is its stream as stored (PS3.18 9.1.2.1.3 lists the video
        # types); nothing here decodes it into an image.
        possible, default = [*videos, _DICOM], videos[0]
    elif item.pixel_offset is not None and document is None:
        possible, default = [*sorted(_IMAGE_TYPES), _DICOM], "image/jpeg"
    else:
        possible, default = [_DICOM, *([document] if document else [])], _DICOM
    asked = request.query_params.get("contentType")
    if not asked:
        return default
    wanted = [t.strip().split(";")[0].lower() for t in asked.split(",")]
    chosen = next((c for c in (_matching(t, possible, default) for t in wanted) if c), None)
    if chosen is None:
        raise HTTPProblem(406, f"contentType {asked} cannot be produced for this object; "
                               f"possible: {', '.join(possible)}")
    return chosen


def _matching(asked: str, possible: list[str], default: str) -> str | None:
    """The type of *possible* the lower-cased media range *asked* names
    (``image/*``: the default if it is one, else the first), as spelled there
    (video/H265 as PS3.18 writes it); None for none."""
    if asked == "*/*":
        return default
    if asked.endswith("/*"):
        family = [t for t in possible if t.lower().startswith(asked[:-1])]
        return default if default in family else next(iter(family), None)
    return next((t for t in possible if t.lower() == asked), None)


# Spellings of "the study" a client or an attacker may put in a WADO-URI
# query (lower case): only studyUID is served; the others must not name
# another study, or the access check and the audit could be fooled.
_STUDY_NAMES = frozenset({"studyuid", "studyinstanceuid", "0020000d"})


def requested_study(request: Request) -> str:
    """The study a WADO-URI request is served from: its studyUID ('' when
    absent: the handler answers 400). The role check and the audit use this
    same function (viewer_api.app), so they see exactly the study served;
    a request naming different studies (studyUID repeated, or also as
    StudyInstanceUID or another spelling) is a 400."""
    named = {v for k, v in request.query_params.multi_items() if k.lower() in _STUDY_NAMES}
    if len(named) > 1:
        raise HTTPProblem(400, "the request names more than one study (studyUID, StudyInstanceUID): "
                               "give the study once, as studyUID")
    return request.query_params.get("studyUID") or ""


@router.get("/wado", summary="WADO-URI retrieve")
def wado(request: Request) -> Response:
    q = request.query_params
    if q.get("requestType") != "WADO":
        raise HTTPProblem(400, "requestType=WADO is required")
    # The study through requested_study, as the role check saw it.
    uids = {"studyUID": requested_study(request), "seriesUID": q.get("seriesUID"), "objectUID": q.get("objectUID")}
    for name, uid in uids.items():
        if not uid:
            raise HTTPProblem(400, f"{name} is required")
        require_uids(uid, name=name)
    _refuse_unsupported(request)
    pacs = request.app.state.pacs
    items = resolve(
        pacs,
        Level.IMAGE,
        {"StudyInstanceUID": uids["studyUID"], "SeriesInstanceUID": uids["seriesUID"],
         "SOPInstanceUID": uids["objectUID"]},
    )
    if not items:
        raise HTTPProblem(404, "no such object")
    item = items[0]
    content_type = _content_type(request, item)
    if content_type == _DICOM:
        named = q.get("transferSyntax")
        if named and named != "*":
            require_uids(named, name="transferSyntax")  # PS3.18 9.1.2.1.5: a UID, else 400
        target = named or EXPLICIT_VR_LE
        if not named and not can_serve(item, target) and item.transfer_syntax_uid in LOSSY_SYNTAXES:
            # Lossy pixel data (a video) nothing here decodes: as stored when
            # the client named no syntax (PS3.18 8.7.3.4), as WADO-RS does.
            target = item.transfer_syntax_uid
        if not can_serve(item, target):
            raise HTTPProblem(406, f"cannot provide transfer syntax {target}")
        # Converted (if it must be) before the 200 goes out: a failure is a 406.
        return ClosingStreamingResponse(prepared_bytes(pacs, item, target), media_type=_DICOM)
    if content_type in video_types(item):
        return video_response(request, item, content_type, PIXEL_DATA)
    if content_type not in _IMAGE_TYPES:
        return document_response(pacs, item)
    return _rendered(request, item, content_type)


def _rendered(request: Request, item: RetrieveItem, content_type: str) -> Response:
    q = request.query_params
    center, width = q.get("windowCenter"), q.get("windowWidth")
    if (center is None) != (width is None):
        raise HTTPProblem(400, "windowCenter and windowWidth go together")
    try:
        window = (float(center), float(width), "linear") if center is not None and width is not None else None
    except ValueError:
        raise HTTPProblem(400, "windowCenter and windowWidth must be numbers") from None
    rows, columns = _int_param(request, "rows"), _int_param(request, "columns")
    # One of the two is the returned image's size, the other side follows the
    # image's proportions; both are a box it fits in (PS3.18 WADO-URI).
    viewport = (columns or MAX_VIEWPORT_DIMENSION, rows or MAX_VIEWPORT_DIMENSION) if (rows or columns) else None
    quality = _int_param(request, "imageQuality") or 90
    frame = _int_param(request, "frameNumber") or 1
    check_frame_number(item, frame, "frameNumber")
    try:
        # RenderParams validates (viewport size, window width): inside the try,
        # or a bad rows/windowWidth was a 500.
        params = RenderParams(media_type=content_type, quality=quality, window=window, viewport=viewport)
        return Response(render_item(request, item, frame, params), media_type=content_type)
    except RenderError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
