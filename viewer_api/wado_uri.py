"""WADO-URI (PS3.18 chapter 9): the ``/wado?requestType=WADO&...`` links
many EMRs still embed. Rendered JPEG/PNG/GIF or the DICOM object itself."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from pacs.query import Level
from pacs.retrieve import resolve
from pacs.transcode import can_serve, instance_bytes

from .errors import HTTPProblem, require_uids
from .render import RenderError, RenderParams
from .rendering import render_item

router = APIRouter(tags=["WADO-URI"])
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif"}


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


@router.get("/wado", summary="WADO-URI retrieve")
def wado(request: Request) -> Response:
    q = request.query_params
    if q.get("requestType") != "WADO":
        raise HTTPProblem(400, "requestType=WADO is required")
    uids = {k: q.get(k) for k in ("studyUID", "seriesUID", "objectUID")}
    for name, uid in uids.items():
        if not uid:
            raise HTTPProblem(400, f"{name} is required")
        require_uids(uid, name=name)
    items = resolve(
        request.app.state.pacs,
        Level.IMAGE,
        {"StudyInstanceUID": uids["studyUID"], "SeriesInstanceUID": uids["seriesUID"],
         "SOPInstanceUID": uids["objectUID"]},
    )
    if not items:
        raise HTTPProblem(404, "no such object")
    item = items[0]
    # contentType may list several types; the first we can make wins.
    wanted = [t.strip().split(";")[0] for t in (q.get("contentType") or "image/jpeg").split(",")]
    content_type = next((t for t in wanted if t in _IMAGE_TYPES or t == "application/dicom"), None)
    if content_type is None:
        raise HTTPProblem(406, f"contentType {q.get('contentType')} is not supported")
    if content_type == "application/dicom":
        target = q.get("transferSyntax") or "1.2.840.10008.1.2.1"
        if not can_serve(item, target):
            raise HTTPProblem(406, f"cannot provide transfer syntax {target}")
        return StreamingResponse(
            instance_bytes(request.app.state.pacs, item, target), media_type="application/dicom"
        )
    center, width = q.get("windowCenter"), q.get("windowWidth")
    if (center is None) != (width is None):
        raise HTTPProblem(400, "windowCenter and windowWidth go together")
    try:
        window = (float(center), float(width), "linear") if center is not None and width is not None else None
    except ValueError:
        raise HTTPProblem(400, "windowCenter and windowWidth must be numbers") from None
    rows, columns = _int_param(request, "rows"), _int_param(request, "columns")
    viewport = (columns or rows or 0, rows or columns or 0) if (rows or columns) else None
    quality = _int_param(request, "imageQuality") or 90
    frame = _int_param(request, "frameNumber") or 1
    try:
        # RenderParams validates (viewport size, window width): inside the try,
        # or a bad rows/windowWidth was a 500.
        params = RenderParams(media_type=content_type, quality=min(quality, 100), window=window, viewport=viewport)
        return Response(render_item(request, item, frame, params), media_type=content_type)
    except RenderError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
