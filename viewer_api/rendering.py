"""Rendered images and thumbnails over HTTP, with a bounded cache.

The pixel work is in :mod:`viewer_api.render`; this module maps the PS3.18
rendered-resource query parameters (``window``, ``viewport``, ``quality``,
``accept``) onto it and caches the encoded outputs. Cache keys include the
stored object's sha256, so a replaced object never serves a stale image.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from pacs import frames as framelib
from pacs.pixel_memory import PIXELS, PixelMemoryBusy
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
from .streaming import ClosingStreamingResponse
from .urls import base_url

log = logging.getLogger(__name__)
T = TypeVar("T")

THUMBNAIL_SIZE = (128, 128)
# A thumbnail is small: a larger viewport asked of one is brought down to this.
MAX_THUMBNAIL = 512
# Renders running at once in this process (decoding and scaling use a CPU
# and tens of MB each): more requests wait their turn rather than all
# holding their images at once.
MAX_RENDERS = max(1, os.cpu_count() or 1)
_RENDERS = threading.BoundedSemaphore(MAX_RENDERS)


# What an entry costs beyond its image: the key tuple (UIDs, window,
# viewport...), the bytes object and the LRU's links. Counted so that many
# tiny images (1x1 GIFs, 43 bytes each) cannot grow memory 30x past the bound.
ENTRY_OVERHEAD = 1024


class RenderCache:
    """LRU of encoded images, bounded in bytes (each entry counted with its overhead)."""

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
                self._size -= len(old) + ENTRY_OVERHEAD
            self._items[key] = data
            self._size += len(data) + ENTRY_OVERHEAD
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped) + ENTRY_OVERHEAD


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
    elif thumbnail:
        # Each side capped; the image keeps its aspect inside the box.
        viewport = (min(viewport.vw, MAX_THUMBNAIL), min(viewport.vh, MAX_THUMBNAIL))
    return RenderParams(media_type=media_type, quality=quality, window=window, viewport=viewport)


def check_frame_number(item: RetrieveItem, number: int, name: str = "frame") -> None:
    """A 404 for a frame the instance does not have, worded in the 1-based
    number the client gave (*name*: its parameter), not the renderer's
    0-based index ("frame index 8 ... 0..2" answered frameNumber=9)."""
    count = item.frames or 1
    if not 1 <= number <= count:
        raise HTTPProblem(404, f"{name} {number} is out of range: the instance has {count} frame(s)")


def render_item(request: Request, item: RetrieveItem, frame: int, params: RenderParams,
                *, cache_result: bool = True) -> bytes:
    """Encoded image of one frame (1-based), from the cache when possible.

    *cache_result* False looks the cache up but does not fill it: the parts
    of a multipart answer (a whole study) are read once, and would only
    push the viewer's images out."""
    check_frame_number(item, frame)
    cache: RenderCache = request.app.state.render_cache
    key = (item.sop_uid, item.sha256, frame, params)
    cached = cache.get(key)
    if cached is not None:
        return cached
    data = frame_work(request, item, lambda f: render_dataset_bytes(f, frame - 1, params, hold=PIXELS.lease))
    if cache_result:
        cache.put(key, data)
    return data


def frame_work(request: Request, item: RetrieveItem, work: Callable[[BinaryIO], T]) -> T:
    """``work(file)`` on the stored object of *item*, as a render: one of
    the process's MAX_RENDERS at a time; a :class:`RenderError` is the HTTP
    answer it names. *work* decodes through :func:`render.with_frame` with
    ``hold=PIXELS.lease`` (from the file, only the frame asked for is read
    and decoded; its pixels count in the process's budget while in use)."""
    pacs = request.app.state.pacs
    with _RENDERS, framelib.local_object(pacs, item) as path, open(path, "rb") as f:
        try:
            return work(f)
        except RenderError as exc:
            raise HTTPProblem(exc.http_status, str(exc)) from None


def rendered_response(request: Request, item: RetrieveItem, frame: int) -> Response:
    if negotiation.negotiate_rendered(request).is_multipart:
        return rendered_multipart(request, [(item, frame)])
    params = params_from(request)
    return Response(render_item(request, item, frame, params), media_type=params.media_type)


def _known_unrenderable(item: RetrieveItem) -> str | None:
    """Why the index alone says *item* cannot be rendered (no Pixel Data,
    a compressed syntax no installed plugin decodes), or None: what
    rendering it would only confirm, after reading the object."""
    ts = UID(item.transfer_syntax_uid)
    if ts.is_deflated:
        return None  # the index has no pixel offset into a deflated dataset
    if item.pixel_offset is None:
        return "the object has no pixel data"
    if ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if not available:
            return f"no decoder for pixel data in transfer syntax {ts.name} ({ts})"
    return None


def _try_render(request: Request, item: RetrieveItem, frame: int, params: RenderParams,
                cache_result: bool) -> bytes | HTTPProblem:
    """The encoded part, or the error that leaves it out (logged)."""
    try:
        return render_item(request, item, frame, params, cache_result=cache_result)
    except HTTPProblem as exc:
        log.warning("rendered part left out (%s frame %d): %s", item.sop_uid, frame, exc.message)
        return exc
    except PixelMemoryBusy:
        raise  # the archive is busy, not this object broken: a 503 (or a body cut off)
    except Exception:  # one broken object does not take the others down
        log.exception("rendered part left out (%s frame %d)", item.sop_uid, frame)
        return HTTPProblem(500, "internal error while rendering")


def rendered_multipart(request: Request, targets: list[tuple[RetrieveItem, int]]) -> StreamingResponse:
    """Rendered frames as multipart/related, each part with a Content-Location
    naming what it shows (the instance's ``/rendered``, or ``/frames/{n}/rendered``
    of a multi-frame instance).

    Rendered as sent, so that memory holds one image and the first byte
    does not wait for the last image (a 2,500-instance study took 7-16 s
    and up to 8 MB per request before it started):

    - Before the answer starts, what the index shows cannot be rendered (no
      pixel data, no decoder) is left out without reading it, and targets
      are rendered in order until one succeeds. The left-out ones are
      counted and named in a ``Warning: 299`` header. If nothing can be
      rendered, every target is tried and the first error in request order
      is the answer's status, as before.
    - The rest are rendered one at a time as the client reads. One that
      fails then (a corrupt or unreadable object) is left out too, but the
      headers are gone: the server's log names it, and a closing line
      counts what was left out after the start. The body stays a valid
      multipart answer of the parts that could be rendered.
    - A client that goes away closes the stream: rendering stops there
      (the part being rendered is finished), logged with the count sent.

    Parts of a multipart answer of several frames are not put in the
    render cache: a study read once would fill it and push out the
    viewer's images."""
    params = params_from(request)
    boundary = new_boundary()
    if not targets:
        raise HTTPProblem(404, "nothing to render")
    base = base_url(request)
    cache_result = len(targets) == 1
    skipped: list[tuple[int, RetrieveItem, int, HTTPProblem]] = []  # (position in targets, item, frame, error)
    known_bad: list[tuple[int, RetrieveItem, int, HTTPProblem]] = []
    for position, (item, frame) in enumerate(targets):
        reason = _known_unrenderable(item)
        if reason is not None:
            known_bad.append((position, item, frame, HTTPProblem(422, reason)))
    ruled_out = {position for position, *_ in known_bad}
    first: tuple[int, bytes] | None = None
    for position, (item, frame) in enumerate(targets):
        if position in ruled_out:
            continue
        result = _try_render(request, item, frame, params, cache_result)
        if isinstance(result, HTTPProblem):
            skipped.append((position, item, frame, result))
            continue
        first = (position, result)
        break
    if first is None:
        # Nothing rendered: the ones the index ruled out are tried too, so
        # the status is the first target's own error, as rendering says it.
        for position, item, frame, _ in known_bad:
            result = _try_render(request, item, frame, params, cache_result)
            if isinstance(result, HTTPProblem):
                skipped.append((position, item, frame, result))
                continue
            first = (position, result)  # the index was wrong: send it
            break
        if first is None:
            raise min(skipped, key=lambda s: s[0])[3]
    else:
        for _, item, frame, exc in known_bad:
            log.warning("rendered part left out (%s frame %d): %s", item.sop_uid, frame, exc.message)
        skipped += known_bad
    first_position, first_data = first
    left_out = {position for position, *_ in skipped}
    headers: dict[str, str] = {}
    if skipped:
        named = sorted(skipped, key=lambda s: s[0])
        names = ", ".join(f"{item.sop_uid}" + (f" frame {frame}" if (item.frames or 1) > 1 else "")
                          for _, item, frame, _ in named[:10])
        more = f" and {len(named) - 10} more" if len(named) > 10 else ""
        text = (f"{len(named)} of {len(targets)} requested frame(s) could not be rendered and are left out "
                f"(the server's log says why): {names}{more}")
        headers["Warning"] = f'299 filmless-pacs: "{text}"'

    def parts() -> Iterator[Part]:
        sent, late = 0, 0
        try:
            for position, (item, frame) in enumerate(targets):
                if position < first_position or position in left_out:
                    continue
                if position == first_position:
                    data: bytes | HTTPProblem = first_data
                else:
                    data = _try_render(request, item, frame, params, cache_result)
                if isinstance(data, HTTPProblem):
                    late += 1  # said in the log by _try_render; the headers are sent
                    continue
                sent += 1
                yield Part(params.media_type, {"Content-Location": _rendered_location(base, item, frame)}, data)
        except GeneratorExit:
            # The client is gone: Starlette cancels the stream and the
            # multipart writer closes this generator; nothing more is rendered.
            log.info("rendered multipart stopped, client gone: %d of %d part(s) sent", sent, len(targets))
            raise
        if late:
            log.warning("rendered multipart: %d part(s) left out after the answer started "
                        "(not in its Warning header; see above)", late)

    return ClosingStreamingResponse(
        multipart_related_stream(parts(), boundary), media_type=content_type_header(params.media_type, boundary),
        headers=headers,
    )


def _rendered_location(base: str, item: RetrieveItem, frame: int) -> str:
    url = f"{base}/dicom-web/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
    return f"{url}/frames/{frame}/rendered" if (item.frames or 1) > 1 else f"{url}/rendered"


def thumbnail_response(request: Request, items: list[RetrieveItem], frame: int | None = None,
                       params: RenderParams | None = None) -> Response:
    """A small image of the representative instance: the middle one of
    those the index shows can be rendered. An ultrasound or endoscopy
    series mixes stills with cine clips stored as MPEG-4 / H.264, which
    nothing here decodes: when the middle one was a clip, the series' and
    the study's thumbnail was a 415 beside renderable stills. *params*:
    the rendering, else the request's rendered-resource parameters."""
    params = params or params_from(request, thumbnail=True)
    images = ([i for i in items if _known_unrenderable(i) is None]
              or [i for i in items if i.pixel_offset is not None] or items)
    item = images[len(images) // 2]
    number = frame if frame is not None else max(1, ((item.frames or 1) + 1) // 2)
    data = render_item(request, item, number, params)
    return Response(data, media_type=params.media_type)
