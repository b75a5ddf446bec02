"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related.

The body is streamed to temporary files part by part (never held whole in
memory); each part goes through the same ingest function as C-STORE. The
answer is the PS3.18 store response: ReferencedSOPSequence for stored
instances, FailedSOPSequence with a FailureReason for the others; 200 when
all were stored, 202 when some failed, 409 when none was stored.

Lack of space is the archive's failure, not the sender's: a declared
Content-Length that would take the spool's disk below ``min_free_bytes``
is refused before the body is read, a body that gets there (or fills the
disk) while spooling is cut off there; both answer FailureReason 0xA700
(Out of Resources), 503 when nothing was stored (202 when earlier parts were).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pacs.errors import HTTP_FOR_STATUS, IngestError, Status
from pacs.header import parse_header
from pacs.ingest import Origin
from pacs.key_objects import KOS_CLASS
from pacs.part10 import FileSource
from pacs.rejections import NOT_APPLIED, apply_or_report
from pacs.roles import REJECTING_ROLES

from . import negotiation
from .dicomjson import dumps, to_json
from .errors import HTTPProblem, require_uids
from .multipart import (
    MultipartError,
    SpoolFull,
    free_bytes,
    parse_multipart_content_type,
    parse_multipart_related,
)
from .security import audit_studies, http_event
from .urls import base_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["STOW-RS"])

# After a refusal for lack of space mid-body, at most this much of the rest
# of the body is read and thrown away so that the sender, still writing,
# gets to read the 503 instead of a reset connection (uvicorn closes without
# a lingering close). Larger remainders are cut off.
_DRAIN_LIMIT = 64 * 1024 * 1024


def _uids_of(path: str) -> tuple[str, str]:
    """Best-effort SOP Class/Instance UIDs of a part, for the failure report."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"], force=True)
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        return "", ""


def _store_part(request: Request, path: str, study: str | None) -> tuple[bool, dict[str, Any]]:
    pacs = request.app.state.pacs
    client = request.client.host if request.client else ""
    origin = Origin(source="stow", remote_host=client, user=getattr(request.state, "user", "") or "")
    try:
        source = FileSource(path)
        if study is not None and _study_of(source) != study:
            raise IngestError(Status.INVALID_DATASET, "StudyInstanceUID differs from the request's study")
        result = pacs.ingestor.ingest(source, origin)
    except IngestError as exc:
        sop_class, sop_uid = _uids_of(path)
        return False, {"class": sop_class, "uid": sop_uid, "reason": exc.status, "comment": exc.reason}
    h = result.header
    if h.mislabelled_utf8 and not getattr(request.state, "warned_charset", False):
        # Once per request; no value in the log (names are PHI).
        request.state.warned_charset = True
        log.warning("STOW-RS from %s: text declared ISO_IR 100 (Latin-1) is UTF-8; indexed as UTF-8 "
                    "(the sender should declare ISO_IR 192)", client)
    if result.conflict:
        # Not a resend: a different object under a UID already used. Saying
        # "stored" with a RetrieveURL of this study would point at nothing.
        return False, {"class": h.sop_class_uid, "uid": h.sop_uid, "reason": Status.DUPLICATE_SOP_INSTANCE,
                       "comment": result.conflict}
    if h.sop_class_uid == KOS_CLASS and _may_reject(request):
        _, failed = apply_or_report(pacs, result.storage_key, h.sop_uid, h.study_uid,
                                    lambda: http_event(request, "delete", request.state.principal))
        if failed:
            return False, {"class": h.sop_class_uid, "uid": h.sop_uid, "reason": Status.OUT_OF_RESOURCES,
                           "comment": NOT_APPLIED}
    base = base_url(request) + "/dicom-web"
    return True, {
        "class": h.sop_class_uid,
        "uid": h.sop_uid,
        "study": h.study_uid,
        "url": f"{base}/studies/{h.study_uid}/series/{h.series_uid}/instances/{h.sop_uid}",
    }


def _may_reject(request: Request) -> bool:
    """Whether a rejection note this caller stores withdraws what it lists:
    only an administrator's, as only an AE granted "reject" by name over
    DICOM (a modality's token deleting images would be an easy way to lose
    records)."""
    principal = getattr(request.state, "principal", None)
    return principal is not None and principal.role in REJECTING_ROLES


def _study_of(source: FileSource) -> str:
    """The part's StudyInstanceUID, read as ingest reads it: a part that is
    not a DICOM Part 10 object is refused as such (0xC000), one without a
    valid StudyInstanceUID with 0xA900, before the study is compared."""
    with source.open() as stream:
        return parse_header(stream, source.size).study_uid


# Request types PS3.18 10.5.1.2.2 defines that this archive does not take.
_METADATA_TYPES = {"application/dicom+json", "application/dicom+xml"}


def _all_ours(failed: list[dict[str, Any]]) -> bool:
    """Every part failed for want of storage or index, not for what it is:
    503 says "send it again later", where 409 would say "this is wrong"."""
    return all(HTTP_FOR_STATUS.get(f["reason"]) == 503 for f in failed)


async def store(request: Request, study: str | None) -> Response:
    content_type = request.headers.get("content-type", "")
    # Before any byte of the body: a 406 for a response type we cannot
    # write (PS3.18 10.5.3: DICOM JSON; XML is not implemented) ...
    media_type = negotiation.negotiate_json(request).media_type
    # ... and a 415 for the metadata + bulk data form of the request.
    try:
        request_type = (parse_multipart_content_type(content_type).type_param or "").strip().lower()
    except MultipartError:
        request_type = ""  # the parser below answers it
    if request_type in _METADATA_TYPES:
        raise HTTPProblem(415, f"STOW-RS of metadata and bulk data (type={request_type}) is not supported: "
                               'send Part 10 objects as multipart/related; type="application/dicom"')
    settings = request.app.state.pacs.settings
    spool = os.path.join(settings.data_dir, "stow-spool")
    os.makedirs(spool, exist_ok=True)
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    if (refusal := _no_room_for(request, spool, settings.min_free_bytes)) is not None:
        # Answered before the body is read: a sender that asked
        # "Expect: 100-continue" never sends it.
        failed.append({"class": "", "uid": "", "reason": Status.OUT_OF_RESOURCES, "comment": refusal})
        return Response(dumps(to_json(_response_dataset(request, study, stored, failed))),
                        status_code=HTTP_FOR_STATUS[Status.OUT_OF_RESOURCES], media_type=media_type)
    body = _stalling_stops(request.stream(), settings.dicom_timeout)
    try:
        async for part in parse_multipart_related(
            content_type, body, spool_dir=spool, max_part_bytes=settings.max_object_bytes,
            min_free_bytes=settings.min_free_bytes,
        ):
            try:
                media = part.content_type.split(";")[0].strip().lower()
                if media != "application/dicom":
                    failed.append({"class": "", "uid": "", "reason": Status.SOP_CLASS_NOT_SUPPORTED,
                                   "comment": f"part type {media} is not supported; send application/dicom"})
                    continue
                ok, info = await run_in_threadpool(_store_part, request, str(part.path), study)
                (stored if ok else failed).append(info)
            finally:
                try:
                    os.unlink(part.path)
                except OSError:
                    pass
    except ClientDisconnect:
        # The sender went away (a dropped link): nothing to answer; what was
        # stored before stays stored, the partial part is gone.
        log.info("STOW-RS sender disconnected after %d stored, %d failed parts", len(stored), len(failed))
        audit_studies(request, [(s["study"], "") for s in stored])
        return Response(status_code=400)
    except SpoolFull as exc:
        # The archive's shortage, not the sender's error: 0xA700 for the part
        # that could not be kept (PS3.18 10.5.3), 503 when nothing was stored.
        log.warning("STOW-RS refused after %d stored parts: %s", len(stored), exc.message)
        failed.append({"class": "", "uid": "", "reason": Status.OUT_OF_RESOURCES, "comment": exc.message})
        await _drain(body, _DRAIN_LIMIT)
    except MultipartError as exc:
        if not stored and not failed:
            raise HTTPProblem(exc.http_status, str(exc)) from None
        # Parts before the broken one were handled; report them and the break.
        failed.append({"class": "", "uid": "", "reason": Status.CANNOT_UNDERSTAND, "comment": str(exc)})
    # The audit event names each study stored into (one event per study, as
    # C-STORE writes one per study and association; the patient is filled
    # in from the index).
    audit_studies(request, [(s["study"], "") for s in stored])
    if not stored and not failed:
        raise HTTPProblem(400, "the request contained no parts")
    body = _response_dataset(request, study, stored, failed)
    status = 200 if not failed else 202 if stored else 503 if _all_ours(failed) else 409
    return Response(dumps(to_json(body)), status_code=status, media_type=media_type)


def _no_room_for(request: Request, spool: str, min_free_bytes: int) -> str | None:
    """Why a request whose declared Content-Length would take the spool's
    disk below the low-water mark is refused up front, or None."""
    if not min_free_bytes:
        return None
    try:
        declared = int(request.headers.get("content-length", ""))
    except ValueError:
        return None  # chunked: the spool checks as the body comes
    free = free_bytes(spool)
    if free is None or free - declared >= min_free_bytes:
        return None
    log.warning("STOW-RS of %d bytes refused: %d bytes free, %d kept free", declared, free, min_free_bytes)
    return (f"the archive cannot take {declared} bytes now: {free} bytes free and {min_free_bytes} are kept "
            "free (low-water mark); try again later")


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop what is left of the body, up to *limit* bytes."""
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > limit:
                return
    except (ClientDisconnect, MultipartError):
        return


async def _stalling_stops(stream: AsyncIterator[bytes], timeout: float) -> AsyncIterator[bytes]:
    """The request body, ended by a 408 when no byte comes for *timeout*
    seconds (dicom_timeout): a link that goes silent mid-upload otherwise
    held the connection and its spooled part until the server restarted."""
    chunks = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise MultipartError(408, f"no request data for {timeout:g} s: the upload stalled") from None
        yield chunk


def _response_dataset(request: Request, study: str | None, stored: list[dict[str, Any]], failed: list[dict[str, Any]]) -> Dataset:
    ds = Dataset()
    studies = {s["study"] for s in stored}
    # A RetrieveURL of the study only where something was stored in it.
    if stored and (study or len(studies) == 1):
        base = base_url(request) + "/dicom-web"
        ds.RetrieveURL = f"{base}/studies/{study or next(iter(studies))}"
    refs = []
    for s in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = s["class"]
        item.ReferencedSOPInstanceUID = s["uid"]
        item.RetrieveURL = s["url"]
        refs.append(item)
    fails = []
    for f in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = f["class"] or None
        item.ReferencedSOPInstanceUID = f["uid"] or None
        item.FailureReason = int(f["reason"])
        # A text reason helps the sender's operator more than a number.
        item.TextValue = str(f.get("comment", ""))[:1024]
        fails.append(item)
    if refs:
        ds.ReferencedSOPSequence = Sequence(refs)
    if fails:
        ds.FailedSOPSequence = Sequence(fails)
    return ds


@router.post("/studies", summary="Store instances")
async def store_instances(request: Request) -> Response:
    return await store(request, None)


@router.post("/studies/{study}", summary="Store instances into a study")
async def store_study_instances(request: Request, study: str) -> Response:
    require_uids(study)
    return await store(request, study)


__all__ = ["router"]
