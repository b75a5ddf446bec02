"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related
application/dicom (streamed one chunk at a time), metadata as DICOM JSON,
frames, bulk data, and rendered images and thumbnails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from pydicom.uid import UID

from pacs import frames as framelib
from pacs.pixel_memory import CHUNK, PIXELS, held_pieces
from pacs.query import Level
from pacs.retrieve import RetrieveItem, apply_overrides, resolve
from pacs.transcode import TransferSyntaxError, instance_bytes, prepared_bytes, unservable_reason

from . import mediatypes, negotiation, rendering
from .dicomjson import dumps, is_binary, to_json
from .documents import document_media_type, document_response
from .errors import HTTPProblem, problem, require_uids
from .mediatypes import NotAcceptable
from .multipart import Body, Part, content_type_header, multipart_related_stream, new_boundary
from .streaming import ClosingStreamingResponse
from .urls import base_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["WADO-RS"])
DEFAULT_TS = "1.2.840.10008.1.2.1"



def items_for(request: Request, study: str, series: str | None = None, sop: str | None = None) -> list[RetrieveItem]:
    """The stored instances a WADO path names; 404 when there are none."""
    require_uids(study, series, sop)
    match = {"StudyInstanceUID": study}
    if series:
        match["SeriesInstanceUID"] = series
    if sop:
        match["SOPInstanceUID"] = sop
    items = resolve(request.app.state.pacs, Level.IMAGE, match)
    if not items:
        raise HTTPProblem(404, "no such " + ("instance" if sop else "series" if series else "study"))
    return items


def _content_location(request: Request, item: RetrieveItem) -> str:
    base = base_url(request)
    return f"{base}/dicom-web/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"


def retrieve(request: Request, items: list[RetrieveItem]) -> StreamingResponse:
    """Instances as multipart/related; type="application/dicom"."""
    try:
        # Only what every instance can be given in is offered: the client's
        # best choice among those (a JPEG Baseline first choice on a CT with
        # no encoder falls back to its next acceptable one, PS3.18 8.7.3).
        offer = negotiation.negotiate_instances(request, items)
    except NotAcceptable:
        # Nothing acceptable can be had: the 406 says why for the client's
        # first choice (below), or lists what could be had.
        offer = negotiation.negotiate_instances(request)
    target = offer.transfer_syntax or DEFAULT_TS
    # Instances that cannot be had in the target but that the client takes
    # as stored (a video when the default syntax was only implied).
    as_stored = negotiation.sent_as_stored(request, items, target)
    if target != "*":
        # Every instance is checked before the first byte, from the index
        # and the codecs installed (a stored syntax nothing here decodes, a
        # target nothing encodes): such a study is a 406, not a 200 whose
        # body breaks off at that instance.
        reasons = [r for r in (unservable_reason(i, target) for i in items if i.sop_uid not in as_stored) if r]
        if reasons:
            raise HTTPProblem(406, f"cannot provide {len(reasons)} instance(s) in transfer syntax {target}: "
                                   f"{reasons[0]}")
    pacs = request.app.state.pacs
    boundary = new_boundary()

    def wanted(item: RetrieveItem) -> str | None:
        return None if target == "*" or item.sop_uid in as_stored else target

    # The first object is prepared now (its header re-encoded, or converted
    # if its codec changes): a failure is a 406, not a 200 whose body breaks
    # off. Later ones are prepared as they are sent; only pixel data a codec
    # cannot read (found by decoding, the cost of the conversion itself) can
    # still fail there, and then the aborted chunked body tells the client.
    first = prepared_bytes(pacs, items[0], wanted(items[0]))

    def parts() -> Iterator[Part]:
        for n, item in enumerate(items):
            ts = wanted(item) or item.transfer_syntax_uid
            yield Part(
                content_type=f'application/dicom; transfer-syntax={ts}',
                headers={"Content-Location": _content_location(request, item)},
                body=first if n == 0 else instance_bytes(pacs, item, wanted(item)),
            )

    # The answer names one syntax only when every part is in it.
    overall = None if target == "*" or as_stored else target
    return ClosingStreamingResponse(
        multipart_related_stream(parts(), boundary),
        media_type=content_type_header("application/dicom", boundary, overall),
    )


@router.get("/studies/{study}", summary="Retrieve a study")
def retrieve_study(request: Request, study: str) -> StreamingResponse:
    return retrieve(request, items_for(request, study))


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
def retrieve_series(request: Request, study: str, series: str) -> StreamingResponse:
    return retrieve(request, items_for(request, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="Retrieve an instance")
def retrieve_instance(request: Request, study: str, series: str, sop: str) -> StreamingResponse:
    return retrieve(request, items_for(request, study, series, sop))


# -- metadata ---------------------------------------------------------------------------
def bulk_path(path: tuple[int, ...]) -> str:
    """An element path (sequence tag, item index, ..., tag) as the end of a
    BulkDataURI: ``54000100/1/54001010``; :func:`retrieve_bulk` resolves it."""
    return "/".join(f"{v:08X}" if n % 2 == 0 else str(v) for n, v in enumerate(path))


# Metadata is sent in chunks of about this size: a study of thousands of
# instances is megabytes of JSON (and ten times that as Python dicts), so
# neither the list nor the text is built whole; one instance at a time is.
METADATA_CHUNK = 64 * 1024


def _instance_json(request: Request, item: RetrieveItem, base: str | None = None) -> bytes | None:
    """One instance's DICOM JSON object (PS3.18 F.2), UTF-8 encoded: its
    header with the index's corrections, BulkDataURIs for binary values and
    the pixel data's frames, and its transfer syntax. None (logged) when
    the stored header cannot be read or written as JSON: one such instance
    must not take its whole study's metadata down with it."""
    pacs = request.app.state.pacs
    root = base if base is not None else base_url(request)
    location = f"{root}/dicom-web/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"

    def bulk_uri(elem: Any, where: tuple[int, ...]) -> str:
        # Path-addressed: two WaveformData values in two items of one
        # sequence are two URIs, each retrievable (PS3.18 F.2.6).
        return f"{location}/bulk/{bulk_path(where)}"

    with framelib.local_object(pacs, item) as path:
        try:
            ds = apply_overrides(framelib.header(path), item.overrides)
            pixels = framelib.pixel_element(path, item)
            meta = to_json(ds, bulk_uri=bulk_uri)
        except OSError:
            raise  # the store's trouble, not the object's: a 500 as before
        except Exception as exc:
            # E.g. sequences nested hundreds deep, stored before ingest
            # refused them: pydicom's reader recurses once per level.
            log.error("metadata: instance %s left out, its header cannot be read as DICOM JSON: %s",
                      item.sop_uid, type(exc).__name__)
            return None
    if pixels is not None:
        # Keyed by the object's own pixel attribute (Float / Double Float
        # Pixel Data of a Parametric Map are not Pixel Data OW, PS3.18 F.2),
        # and a URI whose length does not grow with the frame count (a list
        # of 6,000 frame numbers was 29 KB, past a proxy's URL limit).
        # bulk/{tag} is the whole pixel data: a video's one stream, which
        # players (OHIF) fetch there, or every frame.
        tag, vr = pixels
        meta[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{location}/bulk/{tag:08X}"}
    meta.setdefault("00083002", {"vr": "UI", "Value": [item.transfer_syntax_uid]})
    return dumps(meta)


def metadata(request: Request, items: list[RetrieveItem]) -> Response:
    """The instances' metadata as one DICOM JSON array, streamed.

    The bytes are those of ``dumps([...every instance...])``, written an
    instance at a time so that memory holds one instance's JSON and a
    chunk, not the whole study's (3.5 MB of JSON for 2,500 instances took
    ~50 MB per request, and the first byte waited for the last instance).
    The first instance is built before the answer starts, so what fails
    for it (an object missing from storage: a 500) is still the status;
    a later instance that fails so ends the body early (the connection is
    dropped, which tells the client the JSON is incomplete), as in
    :func:`retrieve`. An instance whose stored header cannot be read or
    written as JSON is left out (logged); a 422 when that is all of them."""
    media_type = negotiation.negotiate_json(request).media_type
    base = base_url(request)
    first, rest = None, iter(items)
    for item in rest:
        first = _instance_json(request, item, base)
        if first is not None:
            break
    if first is None:
        raise HTTPProblem(422, f"the header of {'this instance' if len(items) == 1 else 'every instance'} "
                               "cannot be read as DICOM JSON")
    opening: bytes = first

    def body() -> Iterator[bytes]:
        chunk = bytearray(b"[")
        chunk += opening
        for item in rest:
            if len(chunk) >= METADATA_CHUNK:
                yield bytes(chunk)
                chunk.clear()
            written = _instance_json(request, item, base)
            if written is not None:  # an unreadable one is left out (logged)
                chunk += b","
                chunk += written
        chunk += b"]"
        yield bytes(chunk)

    return ClosingStreamingResponse(body(), media_type=media_type)


@router.get("/studies/{study}/metadata", summary="Study metadata")
def study_metadata(request: Request, study: str) -> Response:
    return metadata(request, items_for(request, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="Series metadata")
def series_metadata(request: Request, study: str, series: str) -> Response:
    return metadata(request, items_for(request, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", summary="Instance metadata")
def instance_metadata(request: Request, study: str, series: str, sop: str) -> Response:
    return metadata(request, items_for(request, study, series, sop))


# -- frames and bulk data ------------------------------------------------------------------
def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise HTTPProblem(400, f"frame list must be comma-separated integers, not {text!r}") from None
    return numbers


# Older PS3.18 names of frame media types that clients still send: the
# answer uses the name the client asked for, else the current one.
_OLD_NAMES = {"image/dicom-rle": "image/x-dicom-rle", "image/jls": "image/x-jls"}


def _as_asked(request: Request, media_type: str | None) -> str | None:
    old = _OLD_NAMES.get(media_type or "")
    accept = (negotiation.effective_accept(request) or "").lower()
    if old and old in accept and media_type not in accept.replace(old, ""):
        return old
    return media_type


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}", summary="Retrieve frames")
def retrieve_frames(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
    numbers = _frame_numbers(frame_list)
    item = items_for(request, study, series, sop)[0]
    refuse_video_frames(item)
    return frames_response(request, item, numbers)


def _sent_in_pieces(data: bytes | memoryview) -> Body:
    """A frame as a part's body: as it is up to ``CHUNK`` bytes (a CT slice:
    no thread hop per piece), else in pieces, so that the HTTP layer copies
    one piece at a time rather than the whole frame."""
    if isinstance(data, bytes) and len(data) <= CHUNK:
        return data
    return held_pieces(data)


def _require_pixel_tag(info: framelib.PixelInfo, pixel_tag: int) -> None:
    """bulk/{tag} of a pixel attribute the object does not hold is a 404 naming the one it holds."""
    if info.tag != pixel_tag:
        raise HTTPProblem(404, f"no element {pixel_tag:08X} in this instance: its pixel data is {info.tag:08X}")


def frames_response(request: Request, item: RetrieveItem, numbers: list[int] | None,
                    pixel_tag: int | None = None) -> Response:
    """Frames *numbers* (every frame when None) as multipart/related, one
    part each. With *pixel_tag*, the object's pixel attribute must be that
    one (bulk/{tag} of a tag it does not hold is a 404)."""
    pacs = request.app.state.pacs
    stored_type = framelib.FRAME_MEDIA_TYPE.get(item.transfer_syntax_uid)
    offer = negotiation.negotiate_frames(request, item.transfer_syntax_uid)
    # Uncompressed octet-stream unless the client takes the stored encoding.
    decode = offer.part_type == "application/octet-stream" and offer.transfer_syntax != "*"
    boundary = new_boundary()
    # The object stays open (a local copy of a remote one) while the frames
    # are sent, one frame in memory at a time; the numbers are checked first.
    # The first frame is read (decoded) now, so that a frame the codecs
    # cannot decode is an error status, not a body that breaks off; it is
    # let go once sent, not kept to the end of the response.
    opened = ExitStack()
    try:
        path = opened.enter_context(framelib.local_object(pacs, item))
        info = framelib.pixel_info(path, item)
        if pixel_tag is not None:
            _require_pixel_tag(info, pixel_tag)
        wanted = numbers if numbers is not None else list(range(1, info.frames + 1))
        framelib.check_numbers(info, wanted)
        # Encapsulated frames are located once for the request (offset
        # tables or one pass over the fragment headers), then read by offset.
        reader = framelib.FrameReader(path, info)
        decoding = decode and info.encapsulated

        def frame(n: int) -> Body:
            if not decoding:
                return _sent_in_pieces(reader.decoded(n) if decode else reader.stored(n))
            # A decoded frame holds its share of the process's pixel budget
            # from its decode until its last piece is handed to the
            # connection, or the response ends (a client gone midway).
            lease = PIXELS.lease(info.frame_bytes)
            try:
                data = reader.decoded(n)
            except BaseException:
                lease.release()
                raise
            return held_pieces(data, lease)

        held: list[Body] = [frame(wanted[0])]
    except BaseException:
        opened.close()
        raise
    if not info.encapsulated or decode:
        part_type = "application/octet-stream"
    else:
        part_type = f"{_as_asked(request, stored_type)}; transfer-syntax={item.transfer_syntax_uid}"
    location = _content_location(request, item)

    def parts() -> Iterator[Part]:
        with opened:
            for i, n in enumerate(wanted):
                body = held.pop() if i == 0 else frame(n)
                yield Part(content_type=part_type, headers={"Content-Location": f"{location}/frames/{n}"},
                           body=body)
                del body

    return ClosingStreamingResponse(
        multipart_related_stream(parts(), boundary),
        media_type=content_type_header(part_type.split(";")[0], boundary),
        background=BackgroundTask(opened.close),
    )


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulk/{tag:path}", summary="Retrieve bulk data")
def retrieve_bulk(request: Request, study: str, series: str, sop: str, tag: str) -> Response:
    """The value a BulkDataURI of the metadata names: ``bulk/{tag}`` at the
    top level, ``bulk/{sequence}/{item}/.../{tag}`` inside sequences (item
    indexes from 0, as the metadata's Value arrays)."""
    path = _bulk_path(tag)
    item = items_for(request, study, series, sop)[0]
    if len(path) == 1 and path[0] in framelib.PIXEL_TAGS:
        # The Pixel Data resource (PS3.18 10.4.3.3.6): a video's stream
        # whole, else every frame, one part each.
        if video_types(item):
            return video_bulk(request, item, path[0])
        return frames_response(request, item, None, pixel_tag=path[0])
    negotiation.negotiate_bulk(request)
    with framelib.local_object(request.app.state.pacs, item) as local:
        ds = framelib.header(local)
    data = _bulk_value(ds, path, tag)
    boundary = new_boundary()
    return ClosingStreamingResponse(
        multipart_related_stream(iter([Part("application/octet-stream", {}, data)]), boundary),
        media_type=content_type_header("application/octet-stream", boundary),
    )


def _bulk_path(text: str) -> tuple[int, ...]:
    pieces = text.strip("/").split("/")
    values: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2 == 0:
            if len(piece) != 8 or any(c not in "0123456789abcdefABCDEF" for c in piece):
                raise HTTPProblem(400, f"bulk data tag must be 8 hex digits, not {piece[:20]!r}")
            values.append(int(piece, 16))
        else:
            if not piece.isdigit() or len(piece) > 9:
                raise HTTPProblem(400, f"bulk data item index must be a number from 0, not {piece[:20]!r}")
            values.append(int(piece))
    if len(values) % 2 == 0:
        raise HTTPProblem(400, "a bulk data path ends with a tag (sequence/item/.../tag)")
    return tuple(values)


def _bulk_value(ds: Any, path: tuple[int, ...], text: str) -> bytes:
    """The binary value at *path* of *ds*; 404 for anything else (missing,
    a sequence, a text or number value: never their printed form)."""
    for n in range(0, len(path) - 1, 2):
        seq, index = path[n], path[n + 1]
        elem = ds.get(seq) if seq in ds else None
        if elem is None or elem.VR != "SQ" or not 0 <= index < len(elem.value or []):
            raise HTTPProblem(404, f"no sequence item {bulk_path(path[:n + 2])} in this instance")
        ds = elem.value[index]
    last = path[-1]
    if last not in ds:
        raise HTTPProblem(404, f"no element {text} in this instance")
    elem = ds[last]
    if elem.VR == "SQ" or not isinstance(elem.value, bytes) or not (is_binary(elem) or " or " in str(elem.VR)):
        raise HTTPProblem(404, f"element {text} ({elem.VR}) is not bulk data")
    return elem.value


# -- rendered and thumbnails -------------------------------------------------------------
@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered", summary="Rendered instance")
def rendered_instance(request: Request, study: str, series: str, sop: str) -> Response:
    item = items_for(request, study, series, sop)[0]
    if document_media_type(item) is not None:
        return rendered_document(request, item)
    if video_types(item):
        return rendered_video(request, item)
    return rendering.rendered_response(request, item, 1)


def rendered_document(request: Request, item: RetrieveItem) -> Response:
    """An encapsulated document rendered is the document itself (PS3.18
    Table 8.7.4-1: application/pdf for Encapsulated PDF, text/xml for CDA);
    an image type asked of it is a 406. Only a PDF is shown inline; the
    others are attachments (:func:`~.documents.document_response`)."""
    media_type = document_media_type(item) or "application/pdf"
    negotiation.negotiate_document(request, media_type)
    return document_response(request.app.state.pacs, item)


# -- video -------------------------------------------------------------------------------
def video_types(item: RetrieveItem) -> tuple[str, ...]:
    """The media types of *item*'s video stream, its own first; empty when
    it is not stored as video (MPEG-2, MPEG-4 AVC/H.264, HEVC)."""
    return mediatypes.video_media_types(item.transfer_syntax_uid)


def _video_refusal(item: RetrieveItem) -> str:
    return (f"this instance is a video ({UID(item.transfer_syntax_uid).name}): its frames are one "
            "compressed stream and cannot be had one by one (PS3.5 8.2); retrieve the whole stream at "
            f".../bulk/7FE00010 or .../rendered (Accept: {' or '.join(video_types(item))})")


def refuse_video_frames(item: RetrieveItem) -> None:
    """Frames of a video: a 422 that says why and where the stream is (a
    422 after trying to cut one fragment into 75 frames said neither)."""
    if video_types(item):
        raise HTTPProblem(422, _video_refusal(item))


def _video_offers(item: RetrieveItem, *, multipart: bool) -> list[mediatypes.Offer]:
    """What a video's stream can be sent as: the single-part video types
    (what a player's <video> and OHIF ask for), and for bulk data
    (*multipart*) first PS3.18's multipart/related form, a part typed
    application/octet-stream taken as stored (transfer-syntax=*) too."""
    ts = item.transfer_syntax_uid
    single = [mediatypes.Offer(t) for t in video_types(item)]
    if not multipart:
        return single
    parts = [mediatypes.Offer(mediatypes.MULTIPART_RELATED, t, ts, substitutes_default=True)
             for t in video_types(item)]
    as_stored = mediatypes.Offer(mediatypes.MULTIPART_RELATED, "application/octet-stream", "*")
    return [*parts, as_stored, *single]


def _negotiate_video(request: Request, item: RetrieveItem, *, multipart: bool) -> mediatypes.Offer:
    offers = _video_offers(item, multipart=multipart)
    try:
        return mediatypes.negotiate(negotiation.effective_accept(request), offers, default=offers[0])
    except mediatypes.NotAcceptable:
        types = ", ".join(video_types(item))
        forms = (f"{types}, or multipart/related of one part of those (type=\"application/octet-stream\" "
                 "only with transfer-syntax=*)") if multipart else types
        raise HTTPProblem(406, f"this instance is a video ({UID(item.transfer_syntax_uid).name}), sent only as "
                               f"its stored stream, never decoded: acceptable media types {forms}") from None


def _spelled(item: RetrieveItem, media_type: str) -> str:
    """PS3.18's spelling of a (lowercased) video media type."""
    return next((t for t in video_types(item) if t.lower() == media_type.lower()), media_type)


def video_bulk(request: Request, item: RetrieveItem, pixel_tag: int) -> Response:
    """A video's Pixel Data as bulk data: the stream, all fragments
    concatenated, as the one part of multipart/related (PS3.18 8.7.3.3) or
    single part when asked (Accept: video/mp4, what OHIF sends)."""
    offer = _negotiate_video(request, item, multipart=True)
    if not offer.is_multipart:
        return video_response(request, item, _spelled(item, offer.media_type), pixel_tag)
    part_type = _spelled(item, video_types(item)[0] if offer.part_type == "application/octet-stream"
                         else offer.part_type)
    location = f"{_content_location(request, item)}/bulk/{pixel_tag:08X}"
    return video_response(request, item, part_type, pixel_tag, multipart_location=location)


def rendered_video(request: Request, item: RetrieveItem) -> Response:
    """A video rendered is its stream as stored (PS3.18 Table 8.7.4-1 lists
    the video types for rendered resources); not transcoded, so an image
    type asked of it is a 406 naming what can be had."""
    offer = _negotiate_video(request, item, multipart=False)
    return video_response(request, item, _spelled(item, offer.media_type), framelib.PIXEL_DATA)


def video_response(request: Request, item: RetrieveItem, media_type: str, pixel_tag: int,
                   multipart_location: str | None = None) -> Response:
    """The video stream of *item* streamed from storage, a chunk at a time.

    Single part, it honours one byte range (RFC 9110 14: a browser's
    <video> seeks with Range, and Safari plays nothing without it); with
    *multipart_location*, it is the one part of a multipart/related body
    (no ranges there: a range of a multipart body means nothing to a
    DICOMweb client)."""
    opened = ExitStack()
    try:
        path = opened.enter_context(framelib.local_object(request.app.state.pacs, item))
        info = framelib.pixel_info(path, item)
        _require_pixel_tag(info, pixel_tag)
        pieces = framelib.fragments(path, info)
    except BaseException:
        opened.close()
        raise
    total = sum(length for _, length in pieces)
    close = BackgroundTask(opened.close)
    if multipart_location is not None:
        boundary = new_boundary()
        part_type = f"{media_type}; transfer-syntax={item.transfer_syntax_uid}"
        part = Part(part_type, {"Content-Location": multipart_location}, framelib.read_span(path, pieces, 0, total))
        return ClosingStreamingResponse(multipart_related_stream(iter([part]), boundary),
                                        media_type=content_type_header(media_type, boundary), background=close)
    headers = {"Accept-Ranges": "bytes"}
    try:
        span = byte_range(request.headers.get("range"), total)
    except RangeNotSatisfiable as exc:
        opened.close()
        refusal = problem(416, str(exc))
        refusal.headers["Content-Range"] = f"bytes */{total}"
        return refusal
    start, end = span or (0, total)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    headers["Content-Length"] = str(end - start)
    return ClosingStreamingResponse(framelib.read_span(path, pieces, start, end), status_code=206 if span else 200,
                                    media_type=media_type, headers=headers, background=close)


class RangeNotSatisfiable(Exception):
    """A Range wholly past the end of the stream: 416 (RFC 9110 15.5.17)."""


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The one byte range *header* asks of *total* bytes, as (start, end
    exclusive); None to send everything (no Range, one this does not read,
    or several ranges: RFC 9110 14.2 lets a server ignore Range). A range
    wholly past the end is :class:`RangeNotSatisfiable`."""
    if not header or not header.strip().lower().startswith("bytes=") or "," in header:
        return None
    first, dash, last = header.strip()[6:].strip().partition("-")
    if not dash or not (first or last) or not all(v.isdigit() for v in (first, last) if v):
        return None
    if not first:  # the last N bytes
        return (max(0, total - int(last)), total) if int(last) > 0 and total else None
    start = int(first)
    if start >= total:
        raise RangeNotSatisfiable(f"range {header.strip()[:60]} is past the end of the {total}-byte stream")
    end = min(total, int(last) + 1) if last else total
    return (start, end) if end > start else None


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}/rendered", summary="Rendered frames")
def rendered_frames(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
    numbers = _frame_numbers(frame_list)
    item = items_for(request, study, series, sop)[0]
    refuse_video_frames(item)
    # All checked before a multipart response starts (it cannot change its status later).
    count = item.frames or 1
    outside = [n for n in numbers if not 1 <= n <= count]
    if outside:
        raise HTTPProblem(404, f"frame {outside[0]} is out of range: the instance has {count} frame(s)")
    if len(numbers) == 1:
        return rendering.rendered_response(request, item, numbers[0])
    return rendering.rendered_multipart(request, [(item, n) for n in numbers])


@router.get("/studies/{study}/series/{series}/rendered", summary="Rendered series")
def rendered_series(request: Request, study: str, series: str) -> Response:
    return rendering.rendered_multipart(request, [(i, 1) for i in items_for(request, study, series)])


@router.get("/studies/{study}/rendered", summary="Rendered study")
def rendered_study(request: Request, study: str) -> Response:
    return rendering.rendered_multipart(request, [(i, 1) for i in items_for(request, study)])


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail", summary="Instance thumbnail")
def thumbnail_instance(request: Request, study: str, series: str, sop: str) -> Response:
    return rendering.thumbnail_response(request, items_for(request, study, series, sop))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}/thumbnail", summary="Frame thumbnail")
def thumbnail_frame(request: Request, study: str, series: str, sop: str, frame_list: str) -> Response:
    numbers = _frame_numbers(frame_list)
    return rendering.thumbnail_response(request, items_for(request, study, series, sop), numbers[0])


@router.get("/studies/{study}/series/{series}/thumbnail", summary="Series thumbnail")
def thumbnail_series(request: Request, study: str, series: str) -> Response:
    return rendering.thumbnail_response(request, items_for(request, study, series))


@router.get("/studies/{study}/thumbnail", summary="Study thumbnail")
def thumbnail_study(request: Request, study: str) -> Response:
    return rendering.thumbnail_response(request, items_for(request, study))


__all__ = ["router", "TransferSyntaxError"]
