"""Structured Reports read from the archive: one SR instance as a document
(:mod:`pacs.sr_content`) with its image references located in the index,
and the radiation dose summary of a study's dose reports (:mod:`pacs.sr_dose`).

An SR's content is its whole data set, so the object is read whole, not
its header: at most :data:`MAX_SR_BYTES` (a deflated one inflated to at
most that), which no real report comes near; a larger object is refused
(422) rather than parsed in the server's memory.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from sqlalchemy import select

from storage import ObjectDamaged, ObjectNotFound, StorageError

from .app import Pacs
from .errors import RefusedRequest
from .header import inflated_dataset
from .index.models import Instance, Series, Study
from .query import Level
from .retrieve import RetrieveItem, resolve
from .sr_content import DOSE_CLASSES, SR_CLASSES, SrDocument, SrUnreadable, is_sr_class, read_document
from .sr_dose import Quantity, add, dose_summary

log = logging.getLogger(__name__)

# The largest SR object read (its data set, inflated when deflated): a
# report of hundreds of irradiation events is a few hundred kilobytes.
MAX_SR_BYTES = 32 * 1024 * 1024
# SR objects of one study read for its dose summary per request at most (a
# study has one or two dose reports; an echo or CAD study may hold a hundred
# measurement SRs, read only for the dose report one of them might be).
MAX_DOSE_REPORTS = 20
# SR instances of a study listed for its dose summary at most.
MAX_LISTED = 2000
# SRs read once and found to hold no dose report are remembered on the app
# (Pacs.sr_without_dose): a page load does not read them again. The dose
# reports themselves (one or two a study, small) are read each time.
# Older CT scanners write their dose report as an Enhanced or Comprehensive SR
# (its root concept says what it is): read for a study's dose summary too,
# after the dose report classes, when no larger than a dose report gets.
_LEGACY_DOSE_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33")
MAX_LEGACY_DOSE_BYTES = 4 * 1024 * 1024
# SOP UIDs asked of the index per query when locating references.
_CHUNK = 500

instances_t = Instance.__table__
series_t = Series.__table__
studies_t = Study.__table__


def store_problem(exc: Exception) -> str:
    """What a lost or damaged object is, said as the HTTP API says it of a
    missing object (the administrator's to repair with ``pacs verify``);
    another store error by its kind (the store may give it next time)."""
    if isinstance(exc, ObjectNotFound):
        return "missing from the archive's store (pacs verify)"
    if isinstance(exc, ObjectDamaged):
        return "damaged in the archive's store (pacs verify)"
    return f"not readable from the store now ({exc.__class__.__name__})"


class SrError(RefusedRequest):
    """An SR read refused, with the HTTP status a client sees: 404 unknown
    instance, 409 not a Structured Report, 422 too large or unreadable."""


def find_instance(pacs: Pacs, sop_uid: str) -> RetrieveItem | None:
    """The stored instance *sop_uid* (None: not in the archive)."""
    items = resolve(pacs, Level.IMAGE, {"SOPInstanceUID": sop_uid}, limit=1)
    return items[0] if items else None


def instance_study(pacs: Pacs, sop_uid: str) -> str | None:
    """The Study Instance UID of the instance *sop_uid* (None: unknown),
    for the access check of a route that names an instance alone."""
    with pacs.engine.connect() as conn:
        return conn.execute(
            select(studies_t.c.study_uid)
            .join(series_t, series_t.c.study_pk == studies_t.c.pk)
            .join(instances_t, instances_t.c.series_pk == series_t.c.pk)
            .where(instances_t.c.sop_uid == sop_uid)
        ).scalar()


def locate(pacs: Pacs, sop_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Where each of *sop_uids* the archive holds is: (study, series)."""
    wanted = sorted({uid for uid in sop_uids if uid})
    found: dict[str, tuple[str, str]] = {}
    with pacs.engine.connect() as conn:
        for start in range(0, len(wanted), _CHUNK):
            rows = conn.execute(
                select(instances_t.c.sop_uid, series_t.c.series_uid, studies_t.c.study_uid)
                .join(series_t, series_t.c.pk == instances_t.c.series_pk)
                .join(studies_t, studies_t.c.pk == series_t.c.study_pk)
                .where(instances_t.c.sop_uid.in_(wanted[start:start + _CHUNK]))
            ).all()
            found.update({r.sop_uid: (r.study_uid, r.series_uid) for r in rows})
    return found


def _read_capped(pacs: Pacs, item: RetrieveItem) -> bytes:
    """The stored object's bytes, refused beyond :data:`MAX_SR_BYTES`
    whatever the index says its size is."""
    if item.size > MAX_SR_BYTES:
        raise _too_large(item)
    chunks: list[bytes] = []
    size = 0
    with pacs.store.open(item.storage_key) as stream:
        while size <= MAX_SR_BYTES:
            chunk = stream.read(min(1 << 20, MAX_SR_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > MAX_SR_BYTES:
        raise _too_large(item)
    return b"".join(chunks)


def _too_large(item: RetrieveItem) -> SrError:
    return SrError(f"the structured report {item.sop_uid} is larger than {MAX_SR_BYTES // (1 << 20)} MB: "
                   "not shown (retrieve it over DICOMweb)", 422)


def _dataset(data: bytes, item: RetrieveItem) -> Dataset:
    """The object's data set; a deflated one inflated within the cap (pydicom would inflate all of it)."""
    stream = io.BytesIO(data)
    inflated = inflated_dataset(stream, MAX_SR_BYTES)
    if inflated is None:
        stream.seek(0)
        return dcmread(stream, force=True)
    if len(inflated) > MAX_SR_BYTES:
        raise _too_large(item)
    return read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)


def read_sr(pacs: Pacs, item: RetrieveItem) -> SrDocument:
    """The SR document *item* holds. :class:`SrError` 409 when it is no
    Structured Report, 422 when too large or not readable as one."""
    if not is_sr_class(item.sop_class_uid):
        raise SrError(f"instance {item.sop_uid} is not a structured report (SOP class {item.sop_class_uid})", 409)
    data = _read_capped(pacs, item)
    try:
        return read_document(_dataset(data, item))
    except SrError:
        raise
    except SrUnreadable as exc:
        raise SrError(f"structured report {item.sop_uid} cannot be read: {exc}", 422) from None
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError, RecursionError) as exc:
        log.warning("structured report %s cannot be read: %s", item.sop_uid, exc)
        raise SrError(f"structured report {item.sop_uid} cannot be read: {exc.__class__.__name__}", 422) from None


def _located(content: dict[str, Any], places: dict[str, tuple[str, str]],
             may_see: Callable[[str], bool]) -> None:
    """Give each referenced object of the JSON tree *content* its place in
    the archive (``location``: study and series; null when not here, or in
    a study the reader may not see)."""
    stack = [content]
    while stack:
        node = stack.pop()
        value = node.get("value")
        if isinstance(value, dict) and "sop_uid" in value and "sop_class_uid" in value:
            place = places.get(value["sop_uid"])
            value["location"] = ({"study_uid": place[0], "series_uid": place[1]}
                                 if place is not None and may_see(place[0]) else None)
        stack.extend(node.get("children", ()))


def sr_json(pacs: Pacs, item: RetrieveItem, may_see: Callable[[str], bool]) -> dict[str, Any]:
    """The SR instance *item* as the JSON API gives it: where it is, the
    document (title, flags, observers, content tree) with its references
    located (*may_see*: whether the reader may see a study a reference is
    in), and the dose summary of a dose report."""
    document = read_sr(pacs, item)
    body = {"sop_uid": item.sop_uid, "study_uid": item.study_uid, "series_uid": item.series_uid,
            **document.as_json()}
    places = locate(pacs, (ref.sop_uid for ref in document.references()))
    _located(body["content"], places, lambda study: study == item.study_uid or may_see(study))
    dose = dose_summary(document)
    body["dose"] = dose.as_json() if dose else None
    return body


def study_exists(pacs: Pacs, study_uid: str) -> bool:
    with pacs.engine.connect() as conn:
        return conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).first() is not None


def _dose_report(pacs: Pacs, item: RetrieveItem) -> dict[str, Any] | None:
    """The dose summary of the SR *item* as a report of :func:`study_dose`
    (None: no dose report); an unreadable dose report is named with its error."""
    try:
        document = read_sr(pacs, item)
    except SrError as exc:
        if item.sop_class_uid in DOSE_CLASSES:
            return {"sop_uid": item.sop_uid, "series_uid": item.series_uid, "error": str(exc)}
        return None
    summary = dose_summary(document)
    if summary is None:
        return None
    return {"sop_uid": item.sop_uid, "series_uid": item.series_uid,
            "sop_class": SR_CLASSES.get(item.sop_class_uid, ""), "content_date": document.content_date,
            "content_time": document.content_time, **summary.as_json()}


def _stored_as(item: RetrieveItem) -> tuple[str, str, str]:
    """An SR as stored: a copy replaced under its key or checksum is read again."""
    return (item.sop_uid, item.storage_key, item.sha256)


def _event_key(event: dict[str, Any]) -> str:
    """What names an irradiation event across reports: its UID, else (an
    older scanner) when it started with its protocol and figures; '' when
    nothing does."""
    if event.get("uid"):
        return str(event["uid"])
    if not event.get("started"):
        return ""
    return json.dumps([event.get(k) for k in ("started", "kind", "plane", "protocol", "dlp", "dap")])


def _events_of(report: dict[str, Any]) -> frozenset[str] | None:
    """The keys of a report's events; None when it has none or one has no key (it cannot be compared)."""
    keys = [_event_key(e) for e in report.get("events") or []]
    return frozenset(keys) if keys and all(keys) else None


def _supersede(reports: list[dict[str, Any]]) -> None:
    """Mark each dose report whose irradiation events another report of the
    study holds too (an updated report the scanner sent after more scans, or
    the same report resent under a new SOP Instance UID) with
    ``superseded_by``: the report holding the most of them, the latest of
    equals (content date and time, then the order received)."""
    keyed = [(r, _events_of(r), (r.get("content_date", ""), r.get("content_time", ""), n))
             for n, r in enumerate(reports)]
    for report, events, order in keyed:
        report["superseded_by"] = None
        if events is None or "error" in report:
            continue
        holders = [(len(e), o, r["sop_uid"]) for r, e, o in keyed
                   if r is not report and e is not None and "error" not in r and r["modality"] == report["modality"]
                   and (events < e or (events == e and o > order))]
        if holders:
            report["superseded_by"] = max(holders)[2]


def _study_total(reports: list[dict[str, Any]], total: str, figure: str) -> dict[str, Any] | None:
    """The study's total of the *total* figure of *reports* (none superseded):
    their totals added; the events' *figure* added once each when two reports
    still share events (neither holds all of the other's); None when a figure
    is missing or units cannot be added."""
    if not reports:
        return None
    keys = [_events_of(r) for r in reports]
    shared = any(a is not None and b is not None and a & b for i, a in enumerate(keys) for b in keys[i + 1:])
    if not shared:
        values = [r.get(total) for r in reports]
    elif all(k is not None for k in keys):
        values = list({_event_key(e): e.get(figure) for r in reports for e in r.get("events") or []}.values())
    else:
        return None
    sum_ = add([Quantity(v["value"], v["unit"]) if v else None for v in values])
    return sum_.as_json() if sum_ else None


def study_dose(pacs: Pacs, study_uid: str) -> dict[str, Any] | None:
    """The radiation dose a study's dose reports give (None: no such
    study): each report's summary, and the CT DLP and projection DAP of all
    of them together, each irradiation counted once (a report another one
    repeats is marked ``superseded_by`` and left out of the totals). A
    report that cannot be read is named with its error, not left out
    silently.

    The dose report classes are read first, then the Enhanced and
    Comprehensive SRs that may hold an older scanner's report; at most
    :data:`MAX_DOSE_REPORTS` objects are read per request, and an SR once
    read and found no dose report is not read again (:data:`MAX_CACHED`): a
    study of 200 measurement SRs reads 20 per page load, not 200, and
    ``unread`` says how many were not read yet."""
    if not study_exists(pacs, study_uid):
        return None
    items = [item for classes in (sorted(DOSE_CLASSES), _LEGACY_DOSE_CLASSES)
             for item in resolve(pacs, Level.IMAGE, {"StudyInstanceUID": study_uid,
                                                     "SOPClassUID": "\\".join(classes)}, limit=MAX_LISTED)]
    reports: list[dict[str, Any]] = []
    reads = unread = 0
    for item in items:
        if item.sop_class_uid not in DOSE_CLASSES and item.size > MAX_LEGACY_DOSE_BYTES:
            continue  # a measurement report with its coordinates, a CAD report: not an older scanner's dose report
        if pacs.sr_without_dose.seen(_stored_as(item)):
            continue
        if reads >= MAX_DOSE_REPORTS:
            unread += 1
            continue
        reads += 1
        try:
            report = _dose_report(pacs, item)
        except (StorageError, OSError) as exc:
            # The store lost or cannot give the object: this report says so, the others are shown
            # (not remembered: the store may give it next time).
            log.warning("structured report %s of study %s is %s", item.sop_uid, study_uid, store_problem(exc))
            if item.sop_class_uid in DOSE_CLASSES:
                reports.append({"sop_uid": item.sop_uid, "series_uid": item.series_uid,
                                "error": f"structured report {item.sop_uid} is {store_problem(exc)}"})
            continue
        if report is None:
            pacs.sr_without_dose.add(_stored_as(item))
        else:
            reports.append(report)
    if unread:
        log.warning("study %s: %d SR documents not read for its dose summary (at most %d per request)",
                    study_uid, unread, MAX_DOSE_REPORTS)
    _supersede(reports)
    current = [r for r in reports if "error" not in r and r["superseded_by"] is None]
    return {"study_uid": study_uid, "reports": reports,
            "ct_dlp_total": _study_total([r for r in current if r["modality"] == "CT"], "dlp_total", "dlp"),
            "dap_total": _study_total([r for r in current if r["modality"] == "projection"], "dap_total", "dap"),
            "unread": unread}
