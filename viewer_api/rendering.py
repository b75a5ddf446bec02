"""Rendered images and thumbnails over HTTP, with a bounded cache.

The pixel work is in :mod:`viewer_api.render`; this module maps the PS3.18
rendered-resource query parameters (``window``, ``viewport``, ``quality``,
``accept``) onto it and caches the encoded outputs. Cache keys include the
stored object's sha256, so a replaced object never serves a stale image.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pacs import frames as framelib
from pacs.retrieve import RetrieveItem

from . import negotiation
from .errors import HTTPProblem
from .multipart import Part, content_type_header, multipart_related_stream, new_boundary
from .render import (
    RenderError,
    RenderParams,
    parse_quality,
    parse_viewport,
    parse_window,
    render_dataset_bytes,
)
from .urls import base_url

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = (128, 128)
# Rendered parts of a multipart answer held in memory up to this; a file beyond.
SPOOL_IN_MEMORY = 8 << 20


class RenderCache:
    """LRU of encoded images, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[object, ...], data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return  # one huge image must not flush everything else
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


def params_from(request: Request, *, thumbnail: bool = False) -> RenderParams:
    """The rendered-resource parameters of PS3.18 8.3.5.1 (annotation ignored)."""
    query = request.query_params
    media_type = negotiation.negotiate_rendered(request).part_type
    try:
        window = parse_window(query["window"]) if "window" in query else None
        # PS3.18: a thumbnail's viewport is only "vw,vh" (no source region).
        viewport = parse_viewport(query["viewport"], allow_region=not thumbnail) if "viewport" in query else None
        quality = parse_quality(query["quality"]) if "quality" in query else 90
    except ValueError as exc:
        raise HTTPProblem(getattr(exc, "http_status", 400), str(exc)) from None
    if thumbnail and viewport is None:
        viewport = THUMBNAIL_SIZE
    return RenderParams(media_type=media_type, quality=quality, window=window, viewport=viewport)


def render_item(request: Request, item: RetrieveItem, frame: int, params: RenderParams) -> bytes:
    """Encoded image of one frame (1-based), from the cache when possible."""
    cache: RenderCache = request.app.state.render_cache
    key = (item.sop_uid, item.sha256, frame, params)
    cached = cache.get(key)
    if cached is not None:
        return cached
    pacs = request.app.state.pacs
    with framelib.local_object(pacs, item) as path, open(path, "rb") as f:
        # From the file, only the frame asked for is read and decoded.
        try:
            data = render_dataset_bytes(f, frame - 1, params)
        except RenderError as exc:
            raise HTTPProblem(exc.http_status, str(exc)) from None
    cache.put(key, data)
    return data


def rendered_response(request: Request, item: RetrieveItem, frame: int) -> Response:
    if negotiation.negotiate_rendered(request).is_multipart:
        return rendered_multipart(request, [(item, frame)])
    params = params_from(request)
    return Response(render_item(request, item, frame, params), media_type=params.media_type)


def rendered_multipart(request: Request, targets: list[tuple[RetrieveItem, int]]) -> StreamingResponse:
    """Rendered frames as multipart/related, each part with a Content-Location
    naming what it shows (the instance's ``/rendered``, or ``/frames/{n}/rendered``
    of a multi-frame instance).

    Every part is rendered before the response starts, so that what cannot
    be rendered (no pixel data, a codec missing) is said in the answer: a
    ``Warning: 299`` header counts and names the instances left out. If
    nothing can be rendered, the first error is the answer's status. The
    encoded images wait in a temporary file beyond a few MB, not in memory."""
    params = params_from(request)
    boundary = new_boundary()
    if not targets:
        raise HTTPProblem(404, "nothing to render")
    base = base_url(request)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by the stream
    rendered: list[tuple[str, int, int]] = []  # (Content-Location, offset, length)
    skipped: list[tuple[RetrieveItem, int, HTTPProblem]] = []
    try:
        for item, frame in targets:
            try:
                data = render_item(request, item, frame, params)
            except HTTPProblem as exc:
                log.warning("rendered part left out (%s frame %d): %s", item.sop_uid, frame, exc.message)
                skipped.append((item, frame, exc))
                continue
            except Exception:  # one broken object does not take the others down
                log.exception("rendered part left out (%s frame %d)", item.sop_uid, frame)
                skipped.append((item, frame, HTTPProblem(500, "internal error while rendering")))
                continue
            rendered.append((_rendered_location(base, item, frame), spool.tell(), len(data)))
            spool.write(data)
    except BaseException:
        spool.close()
        raise
    if not rendered:
        spool.close()
        raise skipped[0][2]
    headers = {}
    if skipped:
        names = ", ".join(f"{item.sop_uid}" + (f" frame {frame}" if (item.frames or 1) > 1 else "")
                          for item, frame, _ in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        text = (f"{len(skipped)} of {len(targets)} requested frame(s) could not be rendered and are left out "
                f"(the server's log says why): {names}{more}")
        headers["Warning"] = f'299 filmless-pacs: "{text}"'

    def parts() -> Iterator[Part]:
        with spool:
            for location, offset, length in rendered:
                spool.seek(offset)
                yield Part(params.media_type, {"Content-Location": location}, spool.read(length))

    return StreamingResponse(
        multipart_related_stream(parts(), boundary), media_type=content_type_header(params.media_type, boundary),
        headers=headers,
    )


def _rendered_location(base: str, item: RetrieveItem, frame: int) -> str:
    url = f"{base}/dicom-web/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
    return f"{url}/frames/{frame}/rendered" if (item.frames or 1) > 1 else f"{url}/rendered"


def thumbnail_response(request: Request, items: list[RetrieveItem], frame: int | None = None) -> Response:
    """A small image of the representative instance: the middle one."""
    params = params_from(request, thumbnail=True)
    images = [i for i in items if i.pixel_offset is not None] or items
    item = images[len(images) // 2]
    number = frame if frame is not None else max(1, ((item.frames or 1) + 1) // 2)
    data = render_item(request, item, number, params)
    return Response(data, media_type=params.media_type)
