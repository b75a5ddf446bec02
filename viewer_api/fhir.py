"""FHIR R4 for the EMR: Patient, ImagingStudy and DiagnosticReport reads and
searches, and the Endpoint of our DICOMweb service. Patients are found by
any identifier, the citizen ID (CCCD) and insurance number included, and by
name without diacritics; studies by their patient (a Patient reference or
any identifier) and by accession number, ImagingStudy also by when it
started, modality, series, SOP Class and when it last changed
(meta.lastUpdated: an EMR's poll). JSON only (``application/fhir+json``)."""

from __future__ import annotations

import base64
import hashlib
import re
import string
import urllib.parse
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from email.utils import format_datetime
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import ImmutableMultiDict
from sqlalchemy import ColumnElement, Connection, String, and_, case, exists, false, func, or_, select

from pacs import __version__
from pacs.audit import patient_cx
from pacs.auth import Principal
from pacs.index.models import Instance, PatientIdentifier, Report, Series
from pacs.index.writer import MERGED_ID_TYPE
from pacs.names import fold, fold_name, name_words, same_person
from pacs.query import PATIENT_SHOWN, READABLE
from pacs.query.attributes import patients, studies
from pacs.query.matching import NameLookup, like_literal, name_word_lookup
from pacs.reports import ReportError, ReportService
from pacs.studylist import study_detail
from pacs.timezones import hospital_zone

from . import mediatypes
from .dicomjson import dumps
from .errors import HTTPProblem, control_character_refusal, register_format
from .negotiation import effective_accept
from .security import READERS, audit_patients, audit_studies, guard, may_see_study
from .urls import base_url

FHIR_JSON = "application/fhir+json"
identifiers = PatientIdentifier.__table__
reports_t = Report.__table__
series_t = Series.__table__
instances_t = Instance.__table__
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
# Identifier.system of patient IDs: this base for IDs without an issuer,
# followed by "/{issuer}" (percent-encoded) for those with one (BVDK, CCCD,
# BHYT...). A search by patient.identifier={system}|{value} takes it back.
PATIENT_ID_SYSTEM = "https://filmless-pacs.org/fhir/NamingSystem/patient-id"
# Search parameters applied (R4 search 3.1.1.3.4: others are ignored, or
# refused with Prefer: handling=strict): a search's own, each as often as
# given (AND), and _count and _offset once; _format is a general parameter.
# patient:Patient, subject:Patient: the reference [type] modifier naming the
# only type these refer to, the same search (R4 search 3.1.1.4.6).
_STUDY_PARAMETERS = ("patient", "subject", "patient:Patient", "subject:Patient", "patient.identifier",
                     "subject.identifier", "identifier")
# ImagingStudy's own besides (R4 imagingstudy.html#search), and _lastUpdated (meta.lastUpdated).
_IMAGING_STUDY_PARAMETERS = (*_STUDY_PARAMETERS, "started", "modality", "series", "dicom-class", "_lastUpdated")
# Patient's (R4 patient.html#search), and _lastUpdated (meta.lastUpdated) as ImagingStudy's.
_PATIENT_PARAMETERS = ("_id", "identifier", "name", "family", "given", "birthdate", "gender", "_lastUpdated")
_GENERAL_PARAMETERS = ("_format",)
UNIDENTIFIED = "unidentified patient"


def _fhir(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), media_type=FHIR_JSON, status_code=status)


# -- errors and formats (R4 http.html 3.1.0.1.9, 3.1.0.4) ---------------------------------
_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                406: "not-supported", 409: "conflict", 415: "not-supported", 422: "processing"}


def operation_outcome(status: int, message: str) -> Response:
    """An error as the OperationOutcome FHIR clients parse (any status)."""
    return _fhir({"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": _ISSUE_CODES.get(status, "exception"), "diagnostics": message}]}, status)


def install(app: FastAPI) -> None:
    """Errors under /fhir (401/403 of the guards, unknown resources, bad
    parameters) are OperationOutcome resources, not the app's JSON errors."""
    register_format(app, router.prefix, operation_outcome)


_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
# application/json+fhir: the DSTU2 name, which R4 lets servers go on accepting.
_JSON_OFFERS = [mediatypes.Offer(FHIR_JSON), mediatypes.Offer("application/json"),
                mediatypes.Offer("application/json+fhir")]


def check_format(wanted: str) -> None:
    """406 unless *wanted* (a _format value) names JSON. A ``+`` typed as
    is in a URL arrives as a space (form encoding), and a media type's
    parameters (``; fhirVersion=4.0``) do not change the format."""
    media_type = wanted.split(";", 1)[0].strip().lower().replace(" ", "+")
    if media_type not in _JSON_FORMATS:
        raise HTTPProblem(406, f"_format {wanted[:40]!r} is not supported: this server answers FHIR JSON only")


def json_only(request: Request) -> None:
    """406 for XML (or anything but JSON) asked by _format or Accept: this
    server speaks FHIR JSON only (R4 http.html 3.1.0.1.9)."""
    wanted = request.query_params.get("_format")
    if wanted is not None:
        check_format(wanted)
    else:
        try:
            mediatypes.negotiate(effective_accept(request), _JSON_OFFERS, default=_JSON_OFFERS[0])
        except mediatypes.NotAcceptable:
            raise HTTPProblem(406, f"{FHIR_JSON} is the only format of this server; "
                                   f"Accept {request.headers.get('accept', '')[:80]!r} cannot be met") from None


router = APIRouter(prefix="/fhir", tags=["FHIR R4"], dependencies=[Depends(json_only)])
FORM = "application/x-www-form-urlencoded"


def search_params(request: Request) -> ImmutableMultiDict[str, str]:
    """A search's parameters: the query string's, and those of the form
    body of a POST to [type]/_search (:func:`_posted_search`)."""
    posted = getattr(request.state, "fhir_search", None)
    return posted if posted is not None else request.query_params


async def _posted_search(request: Request) -> tuple[int, int]:
    """POST [type]/_search (R4 http.html "search"): the form body's
    parameters join the query string's, and the search runs as its GET
    would (the Bundle's links are GET links); its page (_count, _offset)."""
    body = await request.body()
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if body and media_type != FORM:
        raise HTTPProblem(415, f"a search body is {FORM}, not {media_type[:60] or 'untyped'}")
    refusal = control_character_refusal("", body)
    if refusal is not None:
        raise HTTPProblem(400, refusal.replace("a query parameter", "a form parameter"))
    try:
        form = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise HTTPProblem(400, "the form body is not UTF-8") from None
    params = ImmutableMultiDict([*request.query_params.multi_items(), *form])
    request.state.fhir_search = params
    if "_format" not in request.query_params and "_format" in params:
        check_format(params["_format"])
    try:
        return int(params.get("_count", "50")), int(params.get("_offset", "0"))
    except ValueError:
        raise HTTPProblem(400, "_count and _offset are whole numbers") from None


def _token_values(raw: str) -> list[tuple[str | None, str]]:
    """A FHIR token search value as (system, value) alternatives: commas
    separate values any of which may match (R4 search 3.1.1.5.5), ``|``
    separates the system, and ``\\,`` ``\\|`` ``\\$`` ``\\\\`` are those
    characters as data ("Escaping search parameters")."""
    alternatives: list[tuple[str | None, str]] = []
    for part in _unescaped_split(raw, ","):
        pieces = _unescaped_split(part, "|", maxsplit=1)
        value = _unescape(pieces[-1])
        system = _unescape(pieces[0]) if len(pieces) == 2 else None
        if system is not None and not value:
            # R4 "system|": every code of the system (a whole issuer's
            # patients). Not offered: answering nothing would hide them.
            raise HTTPProblem(400, f"token {part[:60]!r}: a system without a value is not supported; "
                                   "search system|value, or value alone for any system")
        if value:
            alternatives.append((system, value))
    return alternatives


def _unescaped_split(text: str, separator: str, maxsplit: int = -1) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator and maxsplit != len(parts):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", text)


def _study_conditions(conn: Connection, request: Request, values: dict[str, list[str]],
                      *, signed_only: bool) -> list[ColumnElement[bool]]:
    """The conditions on studies (joined with their patient where
    patient.identifier asks) of a study search's *values* (each parameter's
    non-empty values but dicom-class's, see :func:`_study_page`): a parameter given
    twice must match both times (R4 search 3.1.1.5.5: AND), a value's commas
    are alternatives (OR). Indexed columns only: no object is read."""
    conditions: list[ColumnElement[bool]] = []
    if signed_only:
        # A DiagnosticReport exists for a study with a signed version.
        conditions.append(exists(select(reports_t.c.pk).where(
            reports_t.c.study_pk == studies.c.pk, reports_t.c.status == "signed")))
    for raw in values.get("patient.identifier", []) + values.get("subject.identifier", []):
        conditions.append(or_(false(), *(_patient_matches(system, value) for system, value in _token_values(raw))))
    for raw in values.get("identifier", []):
        conditions.append(or_(false(), *(_study_matches(system, value) for system, value in _token_values(raw))))
    for name in ("patient", "subject", "patient:Patient", "subject:Patient"):
        for raw in values.get(name, []):
            # Ours to resolve (the id is derived, not stored): to the patients' keys first.
            # A former id (merged away, replaced by the hospital number) finds the patient it became.
            conditions.append(studies.c.patient_pk.in_(_patient_pks(conn, _reference_ids(raw), former=True)))
    zone = _zone(request)
    for raw in values.get("started", []):
        conditions.append(or_(false(), *(_started_matches(_date_value("started", value, zone), zone)
                                         for value in _unescaped_split(raw, ","))))
    for raw in values.get("_lastUpdated", []):
        conditions.append(_last_updated_matches(raw, studies.c.changed_at, zone))
    for raw in values.get("modality", []):
        conditions.append(_modality_matches(_token_values(raw)))
    for raw in values.get("series", []):
        conditions.append(_series_matches(_token_values(raw)))
    return conditions


# A search matching at most this many studies is paged from the matches
# (the planner starts from the index of its condition and sorts them); more
# by walking the Study Date index newest first, which stops at the page.
_FEW_MATCHES = 2000


def _study_page(request: Request, principal: Principal, values: dict[str, list[str]], count: int, offset: int,
                *, signed_only: bool) -> tuple[list[str], int]:
    """The studies of one page of a search, newest first, and how many match
    in all (Bundle.total), of those the caller may see: counted and paged
    by the index, so that a search matching the whole archive (a poll by
    _lastUpdated after a reindex) costs one page, not every study."""
    with request.app.state.pacs.engine.connect() as conn:
        # A study holding nothing but Key Object Selections (every image withdrawn by a rejection
        # note) is not shown: the EMR listed an empty study in the wrong patient's history.
        conditions = [*_study_conditions(conn, request, values, signed_only=signed_only), READABLE]
        if principal.role == "referring":
            conditions.append(_study_referred_by(conn, principal))
        source: Any = studies
        if values.get("patient.identifier") or values.get("subject.identifier"):
            source = studies.join(patients, patients.c.pk == studies.c.patient_pk)  # their conditions' columns
        classes = [_token_values(raw) for raw in values.get("dicom-class", [])]
        if classes:
            # The plan for the SOP Classes follows from how many studies the rest leaves.
            narrowed = conditions and conn.execute(select(func.count()).select_from(source).where(
                *conditions)).scalar_one() <= _FEW_MATCHES
            conditions += [_sop_class_matches(tokens, narrowed=bool(narrowed)) for tokens in classes]
        total = conn.execute(select(func.count()).select_from(source).where(*conditions)).scalar_one()
        if not count or offset >= total:
            return [], int(total)
        # Without statistics (SQLite is never analyzed) the planner walks the
        # Study Date index for the ORDER BY and tests every study: 0.1 s at
        # 100,000 studies for the five a poll by _lastUpdated finds. An
        # expression of it is no index order: the matches are found first.
        newest = studies.c.study_date if total > _FEW_MATCHES else studies.c.study_date + ""
        uids = conn.execute(select(studies.c.study_uid).select_from(source).where(*conditions)
                            .order_by(newest.desc(), studies.c.pk.desc())
                            .limit(count).offset(offset)).scalars().all()
        return list(uids), int(total)


def _reference_ids(raw: str) -> list[str]:
    """The Patient ids a reference search value names (commas: any of them):
    ``{id}``, ``Patient/{id}`` or ``[base]/Patient/{id}`` (R4 search
    3.1.1.4.6); a reference to another type names no patient."""
    ids: list[str] = []
    for part in _unescaped_split(raw, ","):
        value = _unescape(part).strip()
        if "/" in value:
            kind, _, value = value.rpartition("/")
            if kind.rsplit("/", 1)[-1] != "Patient":
                continue
        if value:
            ids.append(value)
    return ids


def _patient_matches(system: str | None, value: str) -> ColumnElement[bool]:
    """Patients *value* identifies: their patient ID, or one of their other
    identifiers (citizen ID, insurance number), under *system*'s issuer
    (None: no system given, any issuer)."""
    own = patients.c.patient_id == value
    other = select(identifiers.c.patient_pk).where(identifiers.c.value == value)
    if system is not None:
        issuer = _issuer_of(system)
        if issuer is None:
            return false()
        own = own & (patients.c.issuer == issuer)
        other = other.where(identifiers.c.issuer == issuer)
    return or_(own, patients.c.pk.in_(other))


def _study_matches(system: str | None, value: str) -> ColumnElement[bool]:
    """The study a study identifier names: its UID, or its accession number.
    A ``urn:oid:`` value names the UID also without a system, or under the
    URI system (``urn:ietf:rfc:3986``) some EMRs give it: no accession
    number is written that way, and such a search found nothing."""
    if system == "urn:dicom:uid" or (system in (None, "urn:ietf:rfc:3986") and value.startswith("urn:oid:")):
        return studies.c.study_uid == value.removeprefix("urn:oid:")
    return studies.c.accession_number == value


# -- the ImagingStudy's own search parameters (R4 imagingstudy.html#search) -----------------
_MODALITY_SERIES = series_t.alias("modality_series")  # an alias: the outer query may not correlate series
_UID_SYSTEMS = (None, "urn:dicom:uid", "urn:ietf:rfc:3986")


def _modality_matches(tokens: list[tuple[str | None, str]]) -> ColumnElement[bool]:
    """modality: a study with a series of one of the codes (DCM, or no
    system), as ModalitiesInStudy matches; OT also finds a series without a
    modality, which the resource shows as OT."""
    codes = [code for system, code in tokens if system in (None, DCM)]
    if "OT" in codes:
        codes.append("")
    if not codes:
        return false()
    other = _MODALITY_SERIES
    return exists(select(other.c.pk).where(other.c.study_pk == studies.c.pk, other.c.modality.in_(codes)))


def _uids(tokens: list[tuple[str | None, str]]) -> list[str]:
    """The UIDs of token values (urn:oid: or bare; no system, urn:dicom:uid
    or urn:ietf:rfc:3986; another system names none)."""
    return [value.removeprefix("urn:oid:") for system, value in tokens if system in _UID_SYSTEMS]


def _series_matches(tokens: list[tuple[str | None, str]]) -> ColumnElement[bool]:
    """series: the study holding a series of one of these Series Instance UIDs (unique index)."""
    uids = _uids(tokens)
    if not uids:
        return false()
    return studies.c.pk.in_(select(series_t.c.study_pk).where(series_t.c.series_uid.in_(uids)))


_SOP_CLASS_SERIES, _SOP_CLASS_INSTANCES = series_t.alias("class_series"), instances_t.alias("class_instances")


def _sop_class_matches(tokens: list[tuple[str | None, str]], *, narrowed: bool) -> ColumnElement[bool]:
    """dicom-class: a study with an instance of one of these SOP Classes
    (urn:oid:{UID} as series.instance.sopClass shows it, or the UID).

    Two plans: among a few studies (*narrowed* by the other conditions to
    at most _FEW_MATCHES), the instances of each are read by series (the
    SOP Class compared as an expression, which no index serves: a planner
    without statistics otherwise reads every instance of the class for
    each study); among many, the studies holding the class are found from
    its index (few for a report or a presentation state, every instance of
    a modality's studies for an image class)."""
    uids = _uids(tokens)
    if not uids:
        return false()
    if narrowed:
        s, i = _SOP_CLASS_SERIES, _SOP_CLASS_INSTANCES
        return exists(select(i.c.pk).select_from(s.join(i, i.c.series_pk == s.c.pk))
                      .where(s.c.study_pk == studies.c.pk, (i.c.sop_class_uid + "").in_(uids)))
    return studies.c.pk.in_(select(series_t.c.study_pk)
                            .join(instances_t, instances_t.c.series_pk == series_t.c.pk)
                            .where(instances_t.c.sop_class_uid.in_(uids)))


_SEARCH_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_DATE_SEARCH = re.compile(
    r"(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?")
# Bounds kept a few days inside datetime's range: the comparisons below step a day either way.
_EARLIEST, _LATEST = datetime(1, 1, 3), datetime(9999, 12, 29)


class _Period:
    """A date search value (R4 search 3.1.1.5.8): its prefix and the range
    its precision gives, [low, high), aware."""

    def __init__(self, prefix: str, low: datetime, high: datetime) -> None:
        self.prefix, self.low, self.high = prefix, low, high


def _date_value(name: str, raw: str, zone: tzinfo) -> _Period:
    """A date parameter's value: ``[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.f*]][Z|+hh:mm]]]]``,
    the prefix eq by default; a value without zone is the hospital's time,
    as the resource's times are. 400 for anything else (ap included)."""
    # "+07:00" typed as is in a URL arrives as " 07:00" (form encoding).
    text = raw.strip().replace(" ", "+")
    prefix = text[:2] if text[:2].isalpha() else "eq"
    if prefix == "ap":
        raise HTTPProblem(400, f"{name}: the prefix ap (approximately) is not supported; "
                               f"use {', '.join(_SEARCH_PREFIXES)}")
    match = _DATE_SEARCH.fullmatch(text[2:] if text[:2].isalpha() else text)
    try:
        if prefix not in _SEARCH_PREFIXES or match is None:
            raise ValueError(text)
        low = datetime(int(match["year"]), int(match["month"] or 1), int(match["day"] or 1),
                       int(match["hour"] or 0), int(match["minute"] or 0))
        if match["second"] is not None:
            second = int(match["second"])
            if second > 60:  # 60: a leap second, the next minute's start
                raise ValueError(text)
            low += timedelta(seconds=second)
        fraction = (match["fraction"] or "")[:6]
        low += timedelta(microseconds=int(fraction.ljust(6, "0") or 0))
        high = _period_end(low, match, len(fraction))
        tz: tzinfo = zone
        if match["zone"] == "Z":
            tz = UTC
        elif match["zone"]:
            hours, minutes = int(match["zone"][1:3]), int(match["zone"][4:6])
            if minutes > 59 or hours * 60 + minutes > 14 * 60:
                raise ValueError(text)
            tz = timezone((-1 if match["zone"][0] == "-" else 1) * timedelta(hours=hours, minutes=minutes))
    except (ValueError, OverflowError):
        raise HTTPProblem(400, f"{name} {raw[:40]!r} is not a date search value: [prefix]YYYY[-MM[-DD"
                               "[Thh:mm[:ss][Z|+hh:mm]]]], prefix one of "
                               f"{', '.join(_SEARCH_PREFIXES)}") from None
    low, high = (max(_EARLIEST, min(moment, _LATEST)) for moment in (low, high))
    return _Period(prefix, low.replace(tzinfo=tz), high.replace(tzinfo=tz))


def _period_end(low: datetime, match: re.Match[str], fraction_digits: int) -> datetime:
    """The end of the period a date search value's precision gives (exclusive)."""
    try:
        if match["fraction"]:
            return low + timedelta(microseconds=10 ** (6 - fraction_digits))
        if match["second"] is not None:
            return low + timedelta(seconds=1)
        if match["hour"] is not None:
            return low + timedelta(minutes=1)
        if match["day"] is not None:
            return low + timedelta(days=1)
        if match["month"] is not None:
            return low.replace(year=low.year + low.month // 12, month=low.month % 12 + 1)
        return low.replace(year=low.year + 1)
    except (ValueError, OverflowError):
        return datetime.max


def _prefixed(period: _Period, starts_from: Any, ends_by: Any) -> ColumnElement[bool]:
    """The condition of *period*'s prefix on a resource value that is itself a
    range R (R4 search 3.1.1.5.8), from ``starts_from(x)``: R starts at or
    after x, and ``ends_by(x)``: R ends by x (each with ``negate=True``)."""
    low, high = period.low, period.high
    within = and_(starts_from(low), ends_by(high))  # the search range contains R
    return {
        "eq": lambda: within,
        "ne": lambda: or_(starts_from(low, negate=True), ends_by(high, negate=True)),
        "gt": lambda: ends_by(high, negate=True),  # the range above the value overlaps R
        "lt": lambda: starts_from(low, negate=True),  # the range below the value overlaps R
        "ge": lambda: or_(ends_by(high, negate=True), starts_from(low)),  # gt, or eq
        "le": lambda: or_(starts_from(low, negate=True), ends_by(high)),  # lt, or eq
        "sa": lambda: starts_from(high),
        "eb": lambda: ends_by(low),
    }[period.prefix]()


def _last_updated_matches(raw: str, changed: Any, zone: tzinfo) -> ColumnElement[bool]:
    """One _lastUpdated parameter (its commas: any of them) on *changed*,
    the column a resource's meta.lastUpdated shows."""
    return or_(false(), *(_changed_matches(_date_value("_lastUpdated", value, zone), changed)
                          for value in _unescaped_split(raw, ",")))


def _changed_matches(period: _Period, changed: Any) -> ColumnElement[bool]:
    """_lastUpdated: meta.lastUpdated (*changed*: studies.changed_at or
    patients.changed_at, shown to the microsecond: that microsecond is its
    range) in the range *period*'s prefix asks for (R4 search 3.1.1.5.8, as
    :func:`_prefixed` reads it: gt is "at or after the end of the value's
    range"), indexed."""
    low, high = period.low.astimezone(UTC), period.high.astimezone(UTC)
    return {
        "eq": lambda: and_(changed >= low, changed < high),
        "ne": lambda: or_(changed < low, changed >= high),
        "gt": lambda: changed >= high,
        "sa": lambda: changed >= high,
        "lt": lambda: changed < low,
        "eb": lambda: changed < low,
        "ge": lambda: changed >= low,
        "le": lambda: changed < high,
    }[period.prefix]()


_DIGITS = "0123456789"
_STUDY_TIME = func.trim(studies.c.study_time, type_=String)
_STUDY_TIME_HEAD = func.substr(_STUDY_TIME, 1, 6, type_=String)
_STUDY_HHMMSS = func.substr(_STUDY_TIME_HEAD + "0000", 1, 6, type_=String)
# _study_time in SQL: a time the resource shows.
_HAS_TIME = and_(or_(func.length(_STUDY_TIME).in_((2, 4, 6)),
                     and_(func.length(_STUDY_TIME) > 6, func.substr(_STUDY_TIME, 7, 1) == ".")),
                 func.ltrim(_STUDY_TIME_HEAD, _DIGITS) == "",
                 func.substr(_STUDY_HHMMSS, 1, 2) <= "23", func.substr(_STUDY_HHMMSS, 3, 2) <= "59",
                 func.substr(_STUDY_HHMMSS, 5, 2) <= "59")
# When the study starts: its time, or midnight for a date alone.
_START_TIME = case((_HAS_TIME, _STUDY_HHMMSS), else_="000000")
_MONTH = func.substr(studies.c.study_date, 5, 2, type_=String)
_DAY = func.substr(studies.c.study_date, 7, 2, type_=String)
_YY, _CC = func.substr(studies.c.study_date, 3, 2), func.substr(studies.c.study_date, 1, 2)
_FOURS = [f"{n:02d}" for n in range(0, 100, 4)]
# _study_day in SQL (text only: no CAST a junk value could break): the leap
# years from the digits, divisible by 4 and not by 100 unless by 400.
_LEAP = or_(and_(_YY.in_(_FOURS), _YY != "00"), and_(_YY == "00", _CC.in_(_FOURS)))
# No comparison of study_date itself: the planner would take it for the range to scan.
_HAS_DAY = and_(func.length(studies.c.study_date) == 8, func.ltrim(studies.c.study_date, _DIGITS) == "",
                func.substr(studies.c.study_date, 1, 4) != "0000", _MONTH >= "01", _MONTH <= "12", _DAY >= "01",
                _DAY <= case((_MONTH == "02", case((_LEAP, "29"), else_="28")),
                             (_MONTH.in_(("04", "06", "09", "11")), "30"), else_="31"))


def _started_matches(period: _Period, zone: tzinfo) -> ColumnElement[bool]:
    """started: the study's Study Date and Time, read on the hospital's
    clock as the resource shows them, in the range *period*'s prefix asks
    for. What the study shows is itself a range: a date alone its day, a
    time its second. Compared on the hospital's wall clock (a value with a
    zone is taken there first), the day by the Study Date index, the time
    within the days at the edges. A study without a (valid) Study Date has
    no started, and matches no started search."""

    def wall(moment: datetime) -> datetime:
        return moment.astimezone(zone).replace(tzinfo=None)

    def day(moment: datetime) -> str:
        return f"{moment.year:04d}{moment.month:02d}{moment.day:02d}"

    def at_or_after(moment: datetime, strictly: bool = False) -> ColumnElement[bool]:
        # (Study Date, start time) at or after (strictly: after) the second *moment*.
        d, t = day(moment), moment.strftime("%H%M%S")
        later = _START_TIME > t if strictly else _START_TIME >= t
        return and_(studies.c.study_date >= d, or_(studies.c.study_date > d, later))

    def at_or_before(moment: datetime, strictly: bool = False) -> ColumnElement[bool]:
        d, t = day(moment), moment.strftime("%H%M%S")
        earlier = _START_TIME < t if strictly else _START_TIME <= t
        return and_(studies.c.study_date <= d, or_(studies.c.study_date < d, earlier))

    def starts_from(moment: datetime, negate: bool = False) -> ColumnElement[bool]:
        # A start is a whole second: at or after the moment is at or after its next whole second.
        local = wall(moment)
        second = local.replace(microsecond=0) + (timedelta(seconds=1) if local.microsecond else timedelta(0))
        return at_or_before(second, strictly=True) if negate else at_or_after(second)

    def ends_by(moment: datetime, negate: bool = False) -> ColumnElement[bool]:
        # A time ends a second after it starts, a date alone a day after: a
        # study of a day before the moment's day ends by it whichever it
        # shows; one of the moment's day (or the day before, at midnight)
        # only if it shows a time, by the second before the moment.
        local = wall(moment)
        last = (local - timedelta(seconds=1)).replace(microsecond=0)  # the last start that ends by the moment
        whole_days = day(local - timedelta(days=1))  # the last date alone that ends by it
        if negate:
            return and_(studies.c.study_date > whole_days,
                        or_(studies.c.study_date > day(last), ~_HAS_TIME, at_or_after(last, strictly=True)))
        return and_(studies.c.study_date <= day(last),
                    or_(studies.c.study_date <= whole_days, and_(_HAS_TIME, at_or_before(last))))

    # The validity last: evaluated for the rows the range keeps only.
    return and_(_prefixed(period, starts_from, ends_by), _HAS_DAY)


def _issuer_of(system: str) -> str | None:
    """The issuer a patient identifier's system names: ours exactly, for
    IDs without an issuer (""), PATIENT_ID_SYSTEM/{issuer}, the issuer itself
    (CCCD, BHYT...) or a URI ending with it. None when it names none: an
    empty system (R4 ``|value``) asks for identifiers without a system, and
    every identifier of ours has one."""
    if system == PATIENT_ID_SYSTEM:
        return ""
    if system.startswith(PATIENT_ID_SYSTEM + "/"):
        return urllib.parse.unquote(system[len(PATIENT_ID_SYSTEM) + 1 :]) or None
    return system.rsplit("/", 1)[-1].rsplit(":", 1)[-1] or None


def patient_id_system(issuer: str) -> str:
    """The Identifier.system of a patient identifier under *issuer* (its
    Issuer of Patient ID, or an other ID's issuer: CCCD, BHYT...)."""
    return f"{PATIENT_ID_SYSTEM}/{urllib.parse.quote(issuer, safe='')}" if issuer else PATIENT_ID_SYSTEM


def _patient_ref(request: Request, detail: dict[str, Any]) -> dict[str, Any]:
    """Reference(Patient): the Patient resource, the patient ID with its
    system (EMRs that match patients by identifier keep working), and the
    name to display."""
    reference: dict[str, Any] = {}
    issuer, fhir_id = _subject_of(request, detail)
    if fhir_id:
        reference["reference"] = f"Patient/{fhir_id}"
    if detail["patient_id"]:
        reference["identifier"] = {"system": patient_id_system(issuer), "value": detail["patient_id"]}
    display = " ".join((detail["patient_name"] or "").replace("^", " ").split())
    if display:
        reference["display"] = display
    elif not detail["patient_id"]:
        # A study sent without patient ID or name (an unidentified emergency
        # patient): say so, rather than show a bare reference.
        reference["display"] = UNIDENTIFIED
    return reference


def _subject_of(request: Request, detail: dict[str, Any]) -> tuple[str, str | None]:
    """The issuer and Patient id of a study's patient (kept in *detail*)."""
    if "patient_fhir_id" not in detail:
        with request.app.state.pacs.engine.connect() as conn:
            row = conn.execute(
                select(patients.c.patient_id, patients.c.issuer, _ANCHOR_STUDY)
                .join(studies, studies.c.patient_pk == patients.c.pk)
                .where(studies.c.study_uid == detail["study_uid"])
            ).first()
        detail["issuer"] = (row.issuer if row else "") or ""
        detail["patient_fhir_id"] = patient_fhir_id(row.patient_id, row.issuer, row.anchor) if row else None
    return detail["issuer"], detail["patient_fhir_id"]


def _pruned(value: Any) -> Any:
    """FHIR JSON has no empty values (R4 json.html 2.6.2: no "", [], {} or
    null): a DICOM attribute that is absent or empty leaves its element out."""
    if isinstance(value, dict):
        kept = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in ("", None, [], {})}
    if isinstance(value, list):
        kept_items = [_pruned(v) for v in value]
        return [v for v in kept_items if v not in ("", None, [], {})]
    if isinstance(value, str) and not value.strip():
        return ""
    return value


def _datetime(date: str, time: str, zone: tzinfo) -> str | None:
    """A DICOM date and time as a FHIR dateTime. A dateTime with a time SHALL
    have a zone; DICOM's have none (TimezoneOffsetFromUTC is not indexed),
    and the modalities run on the hospital's clock: *zone*'s offset on that
    date (the ``timezone`` setting, not the server's, which is often UTC).
    The ``started`` search reads the same date and time by the same rules
    (:func:`_study_day`, :func:`_study_time` and their SQL forms)."""
    day = _study_day(date)
    if day is None:
        return None  # a bad date is dropped
    t = _study_time(time)
    if t is None:
        return day.isoformat()  # a date alone: no midnight, no zone invented; a bad time keeps the date
    moment = datetime(day.year, day.month, day.day, int(t[:2]), int(t[2:4]), int(t[4:6]))
    return moment.replace(tzinfo=zone).isoformat()


def _study_day(value: str | None) -> date | None:
    """A Study Date the resource shows (YYYYMMDD, a day of the calendar), else None."""
    text = value or ""
    if not re.fullmatch(r"[0-9]{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _study_time(value: str | None) -> str | None:
    """A Study Time the resource shows, as HHMMSS (HH and HHMM filled with
    zeros, a fraction dropped), else None (the study shows its date alone):
    HH, HHMM, HHMMSS or HHMMSS.F* in range, a leap second (60) not."""
    text = (value or "").strip()
    if not (len(text) in (2, 4, 6) or (len(text) > 6 and text[6] == ".")):
        return None
    head = text[:6]
    if not re.fullmatch(r"[0-9]+", head):
        return None
    t = (head + "0000")[:6]
    return t if t[:2] <= "23" and t[2:4] <= "59" and t[4:6] <= "59" else None


def _zone(request: Request) -> tzinfo:
    """The hospital's zone (the ``timezone`` setting, else the server's)."""
    return hospital_zone(request.app.state.pacs.settings)


def _instant(value: str | None) -> str | None:
    """A stored timestamp as a FHIR instant (zone required). Signing times
    are written in UTC; SQLite hands them back without their zone."""
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(moment: datetime) -> datetime:
    """An index timestamp, aware, in UTC (UTCDateTime hands them back so)."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _last_updated(moment: datetime) -> str:
    """studies.changed_at (patients.changed_at) as ImagingStudy's (Patient's)
    meta.lastUpdated: to the microsecond kept, so that _lastUpdated=gt{it}
    leaves out this version of the resource and finds the next change,
    however soon it comes."""
    return _utc(moment).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _study_modalities(detail: dict[str, Any], series: list[dict[str, Any]]) -> list[str]:
    """The study's modalities: those indexed, and each series' (OT for a
    series without one, as in ImagingStudy.series.modality)."""
    found = [m for m in (detail["modalities"] or "").split("\\") if m]
    found += [s["modality"] or "OT" for s in series]
    return list(dict.fromkeys(found))


def _unsigned(number: int | None) -> int | None:
    """A DICOM IS as an R4 unsignedInt: a negative Series or Instance Number
    (valid IS) is left out, or a strict client refuses the whole Bundle."""
    return number if number is not None and number >= 0 else None


def imaging_study(request: Request, detail: dict[str, Any]) -> dict[str, Any]:
    base = base_url(request)
    series = [s for s in detail["series"]]
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": detail["study_uid"],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{detail['study_uid']}"}],
        "status": "available",
        "subject": _patient_ref(request, detail),
        "numberOfSeries": len(series),
        "numberOfInstances": sum(s["num_instances"] for s in series),
        "modality": [{"system": DCM, "code": m} for m in _study_modalities(detail, series)],
        "description": detail["description"],
        "endpoint": [{"reference": "Endpoint/dicomweb"}],
        "extension": [{"url": "https://filmless-pacs.org/fhir/StructureDefinition/viewer-url",
                       "valueUrl": f"{base}/viewer/study/{detail['study_uid']}"}],
        "series": [
            {
                "uid": s["series_uid"],
                "number": _unsigned(s["series_number"]),
                "modality": {"system": DCM, "code": s["modality"] or "OT"},
                "description": s["description"],
                "numberOfInstances": s["num_instances"],
                "instance": [{"uid": i["sop_uid"], "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                 "code": f"urn:oid:{i['sop_class_uid']}"},
                              "number": _unsigned(i["instance_number"])} for i in s["instances"]],
            }
            for s in series
        ],
    }
    if detail.get("changed_at") is not None:
        resource["meta"] = {"lastUpdated": _last_updated(detail["changed_at"])}
    if detail["accession"]:
        resource["identifier"].append({"type": ACSN, "value": detail["accession"]})
    started = _datetime(detail["study_date"], detail["study_time"], _zone(request))
    if started:
        resource["started"] = started
    return _pruned(resource)


def diagnostic_report(request: Request, detail: dict[str, Any], report: dict[str, Any],
                      version: int | None = None) -> dict[str, Any] | None:
    """The DiagnosticReport of a signed version (the latest by default): one
    resource per study's report, each signed version a version of it
    (meta.versionId; an amendment is version 2 of the same id, so the EMR
    that kept the id reads the amendment)."""
    signed = [v for v in report["versions"] if version is None or v["version"] == version]
    if not signed:
        return None
    current = signed[-1]
    base = base_url(request)
    text = f"{current['findings']}\n\n{current['impression']}".strip()
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(detail["study_uid"]),
        "meta": {"versionId": str(current["version"]), "lastUpdated": _instant(current["signed_at"])},
        "status": "final" if current["version"] == 1 else "amended",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": _patient_ref(request, detail),
        "resultsInterpreter": [{"display": " ".join((current["signed_by"] or "").replace("^", " ").split())}],
        "imagingStudy": [{"reference": f"ImagingStudy/{detail['study_uid']}"}],
        "identifier": [{"type": ACSN, "value": detail["accession"]}] if detail["accession"] else [],
        "conclusion": current["impression"],
        "presentedForm": [
            {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode(text.encode()).decode()},
        ],
    }
    if current.get("critical"):
        # A critical result (pacs.critical_results): critically abnormal, as the ORU's OBX-8.
        resource["conclusionCode"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "AA",
            "display": "Critical abnormal"}], "text": current["critical"]["note"] or "Critical result"}]
    # The signed PDF prints the patient it was signed for: after the HIS refiled the study (an order
    # moved to another patient, a merge, a study moved) it is another person's name, ID and birth date,
    # which the EMR would file in this subject's chart. Left out until an amendment signs a new one.
    issuer, _ = _subject_of(request, detail)
    if ReportService(request.app.state.pacs).pdf_names_patient(current["pdf_sop_uid"], detail["patient_id"] or "",
                                                                 issuer):
        resource["presentedForm"].insert(0, {
            "contentType": "application/pdf", "title": "Imaging report",
            "url": f"{base}/api/studies/{detail['study_uid']}/report/pdf?version={current['version']}"})
    issued = _instant(current["signed_at"])
    if issued:
        resource["issued"] = issued
    # The clinically relevant time: the examination's (as ImagingStudy.started).
    effective = _datetime(detail["study_date"], detail["study_time"], _zone(request))
    if effective:
        resource["effectiveDateTime"] = effective
    return _pruned(resource)


def report_id(study_uid: str) -> str:
    """The logical id of a study's report: its StudyInstanceUID (a FHIR id
    holds 64 characters, as a UID does); a longer, malformed UID is written
    compactly, ``u{base62}``."""
    if len(study_uid) <= _ID_LENGTH:
        return study_uid
    return f"u{_uid_to_base62(study_uid)}"


def _parse_report_id(value: str) -> tuple[str, int | None]:
    """A report id -> (its study's UID, the version an id of earlier
    releases named); 404 otherwise. Those ids, one per signed version
    (``{uid}-v{n}``, ``u{base62}-v{n}``), name the same report now: an EMR
    that kept one reads the current version."""
    match = re.fullmatch(r"([0-9.]{1,64}|u[0-9A-Za-z]{1,40})(?:-v([1-9][0-9]{0,5}))?", value)
    study = match.group(1) if match else None
    if study and study.startswith("u"):
        study = _uid_from_base62(study[1:])
    if match is None or study is None:
        raise HTTPProblem(404, f"no DiagnosticReport {value[:80]!r}")
    return study, int(match.group(2)) if match.group(2) else None


_ID_LENGTH = 64  # R4 datatypes: id is [A-Za-z0-9\-\.]{1,64}
_UID_DIGITS = "0123456789."
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _uid_to_base62(uid: str) -> str:
    # The UID's characters as base-11 digits under a leading 1 (kept zeros),
    # that number in base 62: 64 characters become 38.
    number = 1
    for char in uid:
        number = number * 11 + _UID_DIGITS.index(char)
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return "".join(reversed(digits))


def _uid_from_base62(text: str) -> str | None:
    number = 0
    for char in text:
        number = number * 62 + _BASE62.index(char)
    chars = []
    while number > 1:
        number, rest = divmod(number, 11)
        chars.append(_UID_DIGITS[rest])
    if number != 1 or not chars:
        return None
    return "".join(reversed(chars))


def _page_url(request: Request, applied: list[tuple[str, str]], offset: int | None = None) -> str:
    """The search as it was applied (its parameters only), at *offset*."""
    params = [(k, v) for k, v in applied if offset is None or k != "_offset"]
    if offset is not None:
        params.append(("_offset", str(offset)))
    query = urllib.parse.urlencode(params)
    # A search POSTed to [type]/_search pages as the GET of [type].
    path = request.url.path.removesuffix("/_search")
    return f"{base_url(request)}{path}{'?' + query if query else ''}"


def _strict(request: Request) -> bool:
    """Prefer: handling=strict (R4 http.html 3.1.0.1.8, search 3.1.1.3.4)."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.strip().partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False


def _applied_parameters(request: Request, searched: Sequence[str] = _STUDY_PARAMETERS) -> list[tuple[str, str]]:
    """The search parameters this server applies (*searched*, the search's
    own), as given, in order; the others are ignored (and left out of the
    self link), or refused with 400 when the client asked Prefer: handling=strict."""
    params = search_params(request)
    applied: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in params.multi_items():
        if name in _GENERAL_PARAMETERS or not value:
            continue  # _format is honoured by json_only; an empty value means nothing
        # A search's own parameters may repeat (each must match); a page is given once.
        if name in searched or (name in ("_count", "_offset") and params.get(name) == value
                                and (name, value) not in applied):
            applied.append((name, value))
        elif ":" in name and name.split(":", 1)[0] in searched:
            # name:exact, gender:not...: ignoring the modifier would widen the
            # search (another patient's studies for the EMR), so refused even
            # without handling=strict (R4 search 3.1.1.5.5).
            raise HTTPProblem(400, f"search modifier of {name[:60]} not supported: search by "
                                   f"{name.split(':', 1)[0]} without it")
        else:
            ignored.append(name)
    if ignored and _strict(request):
        names = ", ".join(sorted({n[:40] for n in ignored}))
        raise HTTPProblem(400, f"search parameter(s) not supported or repeated: {names}; this server searches "
                               f"{request.url.path.removesuffix('/_search').rsplit('/', 1)[-1]} by "
                               f"{', '.join(searched)}, _count and _offset")
    return applied


# Far past any archive's matches, and within the index's integers (a larger one was a 500).
MAX_OFFSET = 1_000_000_000


MAX_COUNT = 200


def _page_bounds(count: int, offset: int) -> int:
    """The page size to give for *count*: at most :data:`MAX_COUNT` (R4
    search 3.1.1.5.6: the server may return fewer than asked, an EMR asking
    for more gets a page, not an error); 0 is a count alone (total, no
    entries). 400 for a page the search cannot give."""
    if count < 0:
        raise HTTPProblem(400, f"_count must be 0-{MAX_COUNT} (more is capped at {MAX_COUNT})")
    if not 0 <= offset <= MAX_OFFSET:
        raise HTTPProblem(400, f"_offset must be 0-{MAX_OFFSET}")
    return min(count, MAX_COUNT)


def _bundle(request: Request, resources: list[dict[str, Any]], total: int, offset: int, count: int,
            searched: Sequence[str] = _STUDY_PARAMETERS) -> dict[str, Any]:
    """A searchset page: total counts every match (R4 Bundle.total), a next
    link when more follow. The links carry the parameters applied only
    (R4 search 3.1.1.3.4): one the server ignored is not in the self link."""
    base = base_url(request) + "/fhir"
    # The page size given, not the one asked for (capped at MAX_COUNT).
    applied = [(k, str(count) if k == "_count" else v) for k, v in _applied_parameters(request, searched)]
    links = [{"relation": "self", "url": _page_url(request, applied)}]
    if count and offset + count < total:
        links.append({"relation": "next", "url": _page_url(request, applied, offset + count)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    if resources:  # no empty arrays in FHIR JSON: a page without hits has no "entry"
        bundle["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                            "search": {"mode": "match"}} for r in resources]
    return bundle


def _search(request: Request, principal: Principal, count: int, offset: int, *, signed_only: bool,
            searched: Sequence[str] = _STUDY_PARAMETERS) -> tuple[list[dict[str, Any]], int, int]:
    """One page of the studies a search by *searched* matches (those the
    caller may see), how many there are in all, and the page size given."""
    _applied_parameters(request, searched)  # Prefer: handling=strict refuses what would be ignored
    count = _page_bounds(count, offset)
    params = search_params(request)
    values = {name: [v for v in params.getlist(name) if v] for name in searched}
    if not any(values.values()):
        # A search names something: a patient, a study, a time; it does not list the archive.
        if searched is _STUDY_PARAMETERS:
            raise HTTPProblem(400, "search by patient (Patient/{id}), patient.identifier or identifier "
                                   "(accession or urn:dicom:uid)")
        raise HTTPProblem(400, "search by patient (Patient/{id}), patient.identifier, identifier (accession or "
                               "urn:dicom:uid), started, modality, series, dicom-class or _lastUpdated")
    uids, total = _study_page(request, principal, values, count, offset, signed_only=signed_only)
    engine = request.app.state.pacs.engine
    found = [study_detail(engine, uid) for uid in uids]
    return [d for d in found if d is not None], total, count


def _audit_studies_shown(request: Request, details: Iterable[dict[str, Any]]) -> None:
    """Name each study a search answer shows, with its patient, in the audit
    trail (one event per study: ``pacs audit --study UID`` finds the EMR's
    searches that showed it, as it finds the reads). The patient is left for
    the trail to fill in from the study, with its issuer, as for every
    event naming a study (pacs.audit.patient_cx)."""
    audit_studies(request, ((d["study_uid"], "") for d in details))


@router.get("/ImagingStudy", summary="Search ImagingStudy by patient, patient.identifier, identifier, started, "
                                    "modality, series, dicom-class or _lastUpdated")
def search_imaging_studies(request: Request, _count: int = 50, _offset: int = 0,
                           principal: Principal = guard(*READERS, action="query")) -> Response:
    return _imaging_study_bundle(request, principal, _count, _offset)


@router.post("/ImagingStudy/_search", summary="Search ImagingStudy with the parameters in a form body")
async def search_imaging_studies_posted(request: Request,
                                        principal: Principal = guard(*READERS, action="query")) -> Response:
    count, offset = await _posted_search(request)
    return await run_in_threadpool(_imaging_study_bundle, request, principal, count, offset)


def _imaging_study_bundle(request: Request, principal: Principal, count: int, offset: int) -> Response:
    details, total, count = _search(request, principal, count, offset, signed_only=False,
                                    searched=_IMAGING_STUDY_PARAMETERS)
    _audit_studies_shown(request, details)
    return _fhir(_bundle(request, [imaging_study(request, d) for d in details], total, offset, count,
                         _IMAGING_STUDY_PARAMETERS))


@router.get("/ImagingStudy/{study}", summary="One ImagingStudy")
def read_imaging_study(request: Request, study: str, _: Any = guard(*READERS, action="view")) -> Response:
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        raise HTTPProblem(404, f"no ImagingStudy {study[:80]!r}")
    return _with_last_modified(_fhir(imaging_study(request, detail)), detail.get("changed_at"))


def _with_last_modified(response: Response, changed: datetime | None) -> Response:
    """A read's *response* with Last-Modified, its meta.lastUpdated (R4 http 3.1.0.4)."""
    if changed is not None:
        response.headers["Last-Modified"] = format_datetime(_utc(changed), usegmt=True)
    return response


@router.get("/DiagnosticReport", summary="Search signed reports by patient, patient.identifier or identifier")
def search_reports(request: Request, _count: int = 50, _offset: int = 0,
                   principal: Principal = guard(*READERS, action="query")) -> Response:
    return _report_bundle(request, principal, _count, _offset)


@router.post("/DiagnosticReport/_search", summary="Search signed reports with the parameters in a form body")
async def search_reports_posted(request: Request, principal: Principal = guard(*READERS, action="query")) -> Response:
    count, offset = await _posted_search(request)
    return await run_in_threadpool(_report_bundle, request, principal, count, offset)


def _report_bundle(request: Request, principal: Principal, count: int, offset: int) -> Response:
    """The current version of each matching study's report, one page."""
    details, total, count = _search(request, principal, count, offset, signed_only=True)
    service = ReportService(request.app.state.pacs)
    resources = []
    shown = []
    for detail in details:
        report = diagnostic_report(request, detail, service.get(detail["study_uid"], signed_only=True))
        if report is not None:
            resources.append(report)
            shown.append(detail)
    _audit_studies_shown(request, shown)
    return _fhir(_bundle(request, resources, total, offset, count))


@router.get("/DiagnosticReport/{report}", summary="A study's report, its current signed version ({StudyInstanceUID})")
def read_report(request: Request, report: str, principal: Principal = guard(*READERS, action="view")) -> Response:
    return _report_version(request, principal, report, None)


@router.get("/DiagnosticReport/{report}/_history/{version}", summary="One signed version of a report (vread)")
def vread_report(request: Request, report: str, version: str,
                 principal: Principal = guard(*READERS, action="view")) -> Response:
    if not re.fullmatch(r"[1-9][0-9]{0,5}", version):
        raise HTTPProblem(404, f"no version {version[:20]!r} of DiagnosticReport {report[:80]!r}")
    return _report_version(request, principal, report, int(version))


def _report_version(request: Request, principal: Principal, report: str, version: int | None) -> Response:
    """A read (the current signed version) or vread (*version*) of a report,
    with its version as a weak ETag and its signing as Last-Modified (R4
    http.html "read")."""
    study, former_version = _parse_report_id(report)
    event = getattr(request.state, "audit", None)
    if event is not None:
        # The audit trail names the study read, a refused read too (before
        # the check below): `pacs audit --study` / `--patient` find the attempt.
        event.study_uid = study
    # The guard only sees a study named "study" in the path: check it here.
    if not may_see_study(request, principal, study):
        raise HTTPProblem(403, "this study was not referred by you")
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        raise HTTPProblem(404, f"no DiagnosticReport {report[:80]!r}")
    try:
        signed = ReportService(request.app.state.pacs).get(study, signed_only=True)
    except ReportError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    resource = diagnostic_report(request, detail, signed, version)
    if former_version is not None and former_version not in {v["version"] for v in signed["versions"]}:
        resource = None  # an old per-version id never given out (no such signed version)
    if resource is None:
        what = f"version {version} of " if version is not None else ""
        raise HTTPProblem(404, f"no {what}DiagnosticReport {report[:80]!r}")
    response = _fhir(resource)
    response.headers["ETag"] = f'W/"{resource["meta"]["versionId"]}"'
    if "lastUpdated" in resource["meta"]:
        signed_at = datetime.fromisoformat(resource["meta"]["lastUpdated"].replace("Z", "+00:00"))
        response.headers["Last-Modified"] = format_datetime(signed_at, usegmt=True)
    return response


@router.get("/Endpoint/dicomweb", summary="Our DICOMweb endpoint")
def dicomweb_endpoint(request: Request, _: Any = guard(*READERS, action="query")) -> Response:
    return _fhir({
        "resourceType": "Endpoint",
        "id": "dicomweb",
        "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs"},
        "name": "filmless-pacs DICOMweb",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": base_url(request) + "/dicom-web",
    })


# -- Patient (R4 patient.html) --------------------------------------------------------------
# The index stores no FHIR id: a patient's id is derived from its row (see
# patient_fhir_id), and a read finds the row back from the id.
_ID_PLAIN = frozenset(string.ascii_letters + string.digits)
_ID_HEX = frozenset("0123456789ABCDEF")
_ID_FORM = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_HASH_DIGITS = 20  # 80 bits of SHA-256: two patients sharing them would take ~10^12 long IDs
_LONG_HEAD = _ID_LENGTH - 2 - _HASH_DIGITS
# The first study of a patient (an alias: the query may select from studies too).
_ANCHOR = studies.alias("anchor_study")
_ANCHOR_STUDY = (select(func.min(_ANCHOR.c.study_uid)).where(_ANCHOR.c.patient_pk == patients.c.pk)
                 .scalar_subquery().label("anchor"))
_PATIENT_COLUMNS = (patients.c.pk, patients.c.patient_id, patients.c.issuer, patients.c.name,
                    patients.c.birth_date, patients.c.sex, patients.c.changed_at, _ANCHOR_STUDY)
# A patient without Patient ID is a Patient only through a study (its id names one).
_HAS_RESOURCE = or_(patients.c.patient_id != "",
                    exists(select(studies.c.pk).where(studies.c.patient_pk == patients.c.pk)))
ADMINISTRATIVE_GENDER = "http://hl7.org/fhir/administrative-gender"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_GENDER_OF = {"M": "male", "F": "female", "O": "other"}
_SEX_OF = {gender: sex for sex, gender in _GENDER_OF.items()}
# Type of Patient ID (0010,0022) terms: how a DICOM ID was read, not an HL7 v2-0203 type.
_DICOM_ID_TYPES = ("TEXT", "RFID", "BARCODE")


def patient_fhir_id(patient_id: str, issuer: str, anchor_study: str | None) -> str | None:
    """The Patient id of a patients row (None: no Patient resource).

    Derived from what identifies the patient, not the row number: ``pacs
    reindex`` renumbers every row, and a number the EMR kept would then name
    another person; an id derived from (Issuer of Patient ID, Patient ID)
    names the same patient after it, or none (404) when the patient no longer
    exists as such (merged by the HIS). The forms (R4 id: ``[A-Za-z0-9\\-.]{1,64}``):

    - ``{issuer}.{patient ID}`` (``CCCD.001085012345``), ``{patient ID}``
      without issuer: letters and digits as they are, any other character as
      ``-XX`` per UTF-8 byte (a space ``-20``, ``-`` ``-2D``, ``.`` ``-2E``).
      Reversible, so a read is one index lookup;
    - over 64 characters (long or non-Latin IDs and issuers):
      ``{start of the patient ID}--{20 hex digits of SHA-256(issuer NUL ID)}``,
      the start finds the candidates, the digest picks one;
    - a patient without Patient ID (each study received without one has its
      own): ``--{base 62 of its Study Instance UID}`` (*anchor_study*).

    ``--`` never occurs in the first form (its ``-`` always precedes two hex
    digits) and starts only the last, so no two forms meet; a read recomputes
    the id of the rows it finds and answers an exact match only.

    The id carries the patient ID, as every search by ``patient.identifier``
    already carries it in its URL: an EMR reads both over the same TLS link.
    """
    if not patient_id:
        return f"--{_uid_to_base62(anchor_study)}" if anchor_study else None
    readable = (f"{_id_text(issuer)}." if issuer else "") + _id_text(patient_id)
    if len(readable) <= _ID_LENGTH:
        return readable
    head = ""
    for char in patient_id:
        piece = _id_text(char)
        if len(head) + len(piece) > _LONG_HEAD:
            break
        head += piece
    digest = hashlib.sha256(f"{issuer}\0{patient_id}".encode()).hexdigest()[:_HASH_DIGITS]
    return f"{head}--{digest}"


def _id_text(text: str) -> str:
    """*text* in a Patient id: letters and digits, ``-XX`` for each other UTF-8 byte."""
    return "".join(c if c in _ID_PLAIN else "".join(f"-{b:02X}" for b in c.encode()) for c in text)


def _text_of_id(part: str) -> str | None:
    """The text :func:`_id_text` wrote as *part*; None if it wrote no such thing."""
    data = bytearray()
    i = 0
    while i < len(part):
        if part[i] == "-":
            digits = part[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _ID_HEX:
                return None
            data.append(int(digits, 16))
            i += 3
        elif part[i] in _ID_PLAIN:
            data += part[i].encode()
            i += 1
        else:
            return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _id_candidates(fhir_id: str) -> list[ColumnElement[bool]]:
    """Conditions on patients that hold the patient *fhir_id* names (tried
    in turn, narrowest first); none for an id this server never gives."""
    if not _ID_FORM.fullmatch(fhir_id):
        return []
    if fhir_id.startswith("--"):
        try:
            uid = _uid_from_base62(fhir_id[2:]) if fhir_id[2:] else None
        except ValueError:  # a character that is no base-62 digit
            uid = None
        if uid is None:
            return []
        return [and_(patients.c.patient_id == "",
                     patients.c.pk.in_(select(studies.c.patient_pk).where(studies.c.study_uid == uid)))]
    head, long_form, _ = fhir_id.partition("--")
    if long_form:
        start = _text_of_id(head)
        if not start:
            return []
        # The whole patient ID when a long issuer made the id long (an index
        # lookup), else its start.
        return [patients.c.patient_id == start, patients.c.patient_id.startswith(start, autoescape=True)]
    issuer_part, dot, id_part = fhir_id.rpartition(".")
    issuer = _text_of_id(issuer_part) if dot else ""
    patient_id = _text_of_id(id_part)
    if not patient_id or issuer is None or (dot and not issuer):
        return []
    return [and_(patients.c.patient_id == patient_id, patients.c.issuer == issuer)]


def _patient_pks(conn: Connection, fhir_ids: Iterable[str], *, former: bool = False) -> list[int]:
    """The patients (keys) the Patient ids name; an unknown id names none.
    With *former*, an id that names no patient any more names the one it
    became (:func:`_former_patient`)."""
    found: list[int] = []
    for fhir_id in fhir_ids:
        matched = _current_pks(conn, fhir_id)
        if not matched and former:
            replaced = _former_patient(conn, fhir_id)
            matched = [replaced[0]] if replaced else []
        found += matched
    return found


def _current_pks(conn: Connection, fhir_id: str) -> list[int]:
    """The patients rows whose own key *fhir_id* is."""
    for condition in _id_candidates(fhir_id):
        rows = conn.execute(select(patients.c.pk, patients.c.patient_id, patients.c.issuer, _ANCHOR_STUDY)
                            .where(condition)).all()
        matched = [r.pk for r in rows if patient_fhir_id(r.patient_id, r.issuer, r.anchor) == fhir_id]
        if matched:
            return matched
    return []


def _former_patient(conn: Connection, fhir_id: str) -> tuple[int, Any] | None:
    """The patient a former Patient id names now, with the identifier row
    that holds it: a key merged away by the HIS (ADT^A40, kept as a MERGED
    alias) or replaced by its hospital number (ADT^A08 with a PI: the old
    key became an other ID), as pacs.orders keeps them. Exactly one
    patient, else None (never a guess between two people). Indexed lookups
    on patient_identifiers.value only; the caller has found no patients
    row with this key."""
    condition = _former_key(fhir_id)
    if condition is None:
        return None
    rows = [r for r in conn.execute(select(identifiers).where(condition).order_by(identifiers.c.pk)).all()
            if patient_fhir_id(r.value, r.issuer, None) == fhir_id]
    if len({r.patient_pk for r in rows}) != 1:
        return None
    return int(rows[0].patient_pk), rows[0]


def _former_key(fhir_id: str) -> ColumnElement[bool] | None:
    """The condition on patient_identifiers for the (issuer, ID) *fhir_id*
    was derived from: the readable form, or a long one whose start is the
    whole ID (an ID-less patient's id names a study, never an identifier)."""
    if not _ID_FORM.fullmatch(fhir_id) or fhir_id.startswith("--"):
        return None
    head, long_form, _ = fhir_id.partition("--")
    if long_form:
        start = _text_of_id(head)
        return identifiers.c.value == start if start else None
    issuer_part, dot, id_part = fhir_id.rpartition(".")
    issuer = _text_of_id(issuer_part) if dot else ""
    patient_id = _text_of_id(id_part)
    if not patient_id or issuer is None or (dot and not issuer):
        return None
    return and_(identifiers.c.value == patient_id, identifiers.c.issuer == issuer)


def _replaced_ids(conn: Connection, others: Sequence[Any]) -> set[tuple[str, str]]:
    """Of the MERGED aliases in *others* (patient_identifiers rows), those no
    patient holds as its own key again: ids the patient replaces."""
    merged = {(o.value, o.issuer) for o in others if o.id_type == MERGED_ID_TYPE and o.value}
    if not merged:
        return set()
    taken = conn.execute(select(patients.c.patient_id, patients.c.issuer).where(or_(*(
        and_(patients.c.patient_id == value, patients.c.issuer == issuer) for value, issuer in merged)))).all()
    return merged - {(r.patient_id, r.issuer) for r in taken}


def patient_resource(row: Any, others: Sequence[Any],
                     replaced: Collection[tuple[str, str]] = ()) -> dict[str, Any]:
    """A patients row (with its anchor study) and its other identifiers
    (patient_identifiers rows) as a FHIR Patient; *replaced*: the (ID,
    issuer) of merged-away patients whose former ids it replaces."""
    identifier: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    if row.patient_id:
        identifier.append({"use": "usual", "system": patient_id_system(row.issuer), "value": row.patient_id})
    seen = {(row.patient_id, row.issuer)}
    for other in others:
        if (other.value, other.issuer) in seen:
            continue
        seen.add((other.value, other.issuer))
        entry: dict[str, Any] = {"system": patient_id_system(other.issuer), "value": other.value}
        if other.id_type == MERGED_ID_TYPE:
            # Merged away by the HIS (ADT^A40): still found by it, no longer in use.
            entry["use"] = "old"
            identifier.append(entry)
            former_id = patient_fhir_id(other.value, other.issuer, None)
            if (other.value, other.issuer) in replaced and former_id:
                links.append({"other": {"reference": f"Patient/{former_id}"}, "type": "replaces"})
            continue
        # The type an HL7 CX-5 gave (NI citizen ID, HC insurance...) is a
        # v2-0203 code; a DICOM Type of Patient ID is not.
        kind = other.id_type or ""
        if re.fullmatch(r"[A-Z]{2,5}", kind) and kind not in _DICOM_ID_TYPES:
            entry["type"] = {"coding": [{"system": V2_0203, "code": kind}]}
        identifier.append(entry)
    sex = (row.sex or "").strip().upper()
    return _pruned({
        "resourceType": "Patient",
        "id": patient_fhir_id(row.patient_id, row.issuer, row.anchor),
        "meta": {"lastUpdated": _last_updated(row.changed_at)},
        "identifier": identifier,
        "name": _human_names(row.name),
        "gender": _GENDER_OF.get(sex, "unknown") if sex else None,
        "birthDate": _birth_date(row.birth_date),
        "link": links,
    })


def _human_names(name: str | None) -> list[dict[str, Any]]:
    """A DICOM PN as HumanNames, one per representation it has (alphabetic,
    then ideographic, phonetic): family is the first component, given the
    words of the given and middle names, text the name as written (the
    diacritics kept), as subject.display shows it."""
    names: list[dict[str, Any]] = []
    for group in (name or "").split("="):
        family, given, middle, prefix, suffix = ([" ".join(p.split()) for p in group.split("^")] + [""] * 5)[:5]
        text = " ".join(group.replace("^", " ").split())
        if text:
            names.append({"text": text, "family": family, "given": f"{given} {middle}".split(),
                          "prefix": prefix.split(), "suffix": suffix.split()})
    return names


def _birth_date(value: str | None) -> str | None:
    """A DICOM DA as a FHIR date; None for an invalid one (left out)."""
    text = value or ""
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:])).isoformat()
    except ValueError:
        return None


def _patient_resources(conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The Patient resources of patients rows (selected with _PATIENT_COLUMNS), in order."""
    others: dict[int, list[Any]] = {}
    if rows:
        for ident in conn.execute(select(identifiers).where(identifiers.c.patient_pk.in_([r.pk for r in rows]))
                                  .order_by(identifiers.c.pk)):
            others.setdefault(ident.patient_pk, []).append(ident)
    replaced = _replaced_ids(conn, [o for found in others.values() for o in found])
    return [patient_resource(r, others.get(r.pk, []), replaced) for r in rows]


def replaced_patient(fhir_id: str, former: Any, current: dict[str, Any]) -> dict[str, Any]:
    """The Patient a former id (*former*: the identifier row its key became)
    reads as: no longer in use, replaced by the *current* one (R4 Patient
    "Linking Patients", ``replaced-by``), so that a reference the EMR kept
    leads to the patient and their studies. Its meta.lastUpdated is the
    current one's: the identifier row that makes it moved that."""
    return _pruned({
        "resourceType": "Patient",
        "id": fhir_id,
        "meta": current.get("meta"),
        "active": False,
        "identifier": [{"use": "old", "system": patient_id_system(former.issuer), "value": former.value}],
        "link": [{"other": {"reference": f"Patient/{current['id']}"}, "type": "replaced-by"}],
    })


def _study_referred_by(conn: Connection, principal: Principal) -> ColumnElement[bool]:
    """Studies *principal* (a referring physician) referred: may_see_study's
    rule for a search (the folded name finds the candidate spellings, the
    exact one decides, diacritics included)."""
    name = principal.display_name
    folded = fold_name(name)
    spellings = [value for value in conn.execute(select(studies.c.referring_physician).distinct()
                                                 .where(studies.c.referring_physician_folded == folded)).scalars()
                 if same_person(value, name)]
    return and_(studies.c.referring_physician_folded == folded, studies.c.referring_physician.in_(spellings))


def _referred_by(conn: Connection, principal: Principal) -> ColumnElement[bool]:
    """Patients with a study *principal* (a referring physician) referred."""
    return exists(select(studies.c.pk).where(studies.c.patient_pk == patients.c.pk,
                                             _study_referred_by(conn, principal)))


def _string_values(raw: str) -> list[str]:
    """A string search value's alternatives (commas: any of them)."""
    return [v for v in (_unescape(p).strip() for p in _unescaped_split(raw, ",")) if v]


def _folded_words(value: str) -> str:
    # What people type: no diacritics, any case, a PN's separators as spaces.
    return " ".join(fold(value.replace("^", " ").replace("=", " ")).split())


def _name_matches(value: str, lookup: NameLookup) -> ColumnElement[bool]:
    """name: a word of the name (any part) starts with *value*, case and
    diacritics ignored (R4 string search): nguyen, Nguyễn and NGUY find
    Nguyễn^Văn An, and so does "van an"; a name stored Family^Given^Middle
    is found in the order it is read too ("trinh van binh"). A selective
    term takes its candidates from the name word index (*lookup*,
    :func:`~pacs.query.matching.name_word_lookup`)."""
    folded = name_words(value)
    words = like_literal(folded)
    if not words:
        return false()
    return _among_candidates(lookup(folded), or_(*(column.like(pattern, escape="\\")
                                                   for column in (patients.c.name_words, patients.c.name_reading)
                                                   for pattern in (words + "%", "% " + words + "%"))))


def _among_candidates(candidates: ColumnElement[bool] | None, matches: ColumnElement[bool]) -> ColumnElement[bool]:
    return matches if candidates is None else and_(candidates, matches)


def _family_matches(value: str) -> ColumnElement[bool]:
    """family: the family name (first PN component) starts with *value*."""
    words = like_literal(_folded_words(value))
    if not words:
        return false()
    return patients.c.name_folded.like(words + "%", escape="\\")


def _given_matches(value: str, lookup: NameLookup) -> ColumnElement[bool]:
    """given: a word of a later PN component starts with *value* (selective:
    among the candidates of the name word index, as for name)."""
    folded = _folded_words(value)
    words = like_literal(folded)
    if not words:
        return false()
    return _among_candidates(lookup(folded), or_(patients.c.name_folded.like("%^" + words + "%", escape="\\"),
                                                 patients.c.name_folded.like("%^% " + words + "%", escape="\\")))


_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


def _birthdate_matches(value: str) -> ColumnElement[bool]:
    """birthdate: equality with a day (YYYY-MM-DD), or within a month or a
    year (YYYY-MM, YYYY: a date search value is its period, R4 search
    3.1.1.5.8); 400 for anything else, comparisons included."""
    prefix = value[:2] if value[:2] in _DATE_PREFIXES else ""
    if prefix not in ("", "eq"):
        raise HTTPProblem(400, f"birthdate: only equality is supported, not the prefix {prefix!r}")
    text = value[len(prefix):]
    match = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", text)
    try:
        if match is None:
            raise ValueError(text)
        date(int(match[1]), int(match[2] or 1), int(match[3] or 1))
    except ValueError:
        raise HTTPProblem(400, f"birthdate {value[:40]!r} is not a date: YYYY-MM-DD (or YYYY-MM, YYYY)") from None
    digits = text.replace("-", "")
    if match[3]:
        return patients.c.birth_date == digits
    return patients.c.birth_date.like(digits + "%")


def _gender_matches(system: str | None, code: str) -> ColumnElement[bool]:
    """gender: male, female, other or unknown (administrative-gender); 400
    for another code, a typo the EMR should hear about rather than get nothing."""
    if code not in _SEX_OF and code != "unknown":
        raise HTTPProblem(400, f"gender {code[:40]!r}: male, female, other or unknown")
    if system is not None and system != ADMINISTRATIVE_GENDER:
        return false()
    sex = func.upper(patients.c.sex)
    if code == "unknown":  # a Patient Sex that says something else (an empty one: no gender)
        return and_(patients.c.sex != "", sex.not_in(list(_GENDER_OF)))
    return sex == _SEX_OF[code]


def _patient_search(request: Request, principal: Principal, count: int,
                    offset: int) -> tuple[list[dict[str, Any]], list[str], int, int]:
    """One page of the patients a search matches (those the caller may
    see), those patients as the audit trail names them (ID^^^issuer), how
    many there are in all, and the page size given."""
    _applied_parameters(request, _PATIENT_PARAMETERS)  # Prefer: handling=strict refuses what would be ignored
    count = _page_bounds(count, offset)
    params = search_params(request)
    values = {name: [v for v in params.getlist(name) if v] for name in _PATIENT_PARAMETERS}
    if not any(values.values()):
        # As the study searches: a search names someone, it does not list the archive.
        raise HTTPProblem(400, f"search Patient by {', '.join(_PATIENT_PARAMETERS)}")
    # A patient whose every study was withdrawn (the wrong patient's ID typed, the images rejected) is
    # left out, as from a patient-level C-FIND: found by name, their record had nothing to read.
    # *shown*: whether the caller may be shown the patient, which a former id's resource (replaced_patient)
    # depends on too, as its meta does; *own*: what the resource of the patient's current id holds.
    shown: list[ColumnElement[bool]] = [_HAS_RESOURCE, PATIENT_SHOWN]
    own: list[ColumnElement[bool]] = []
    # Each parameter as often as given (AND), each value's commas OR.
    for raw in values["identifier"]:
        own.append(or_(false(), *(_patient_matches(system, value) for system, value in _token_values(raw))))
    with request.app.state.pacs.engine.connect() as conn:
        lookup = name_word_lookup(conn)
        for key, matches in (("name", partial(_name_matches, lookup=lookup)), ("family", _family_matches),
                             ("given", partial(_given_matches, lookup=lookup)), ("birthdate", _birthdate_matches)):
            for raw in values[key]:
                own.append(or_(false(), *(matches(value) for value in _string_values(raw))))
        for raw in values["gender"]:
            own.append(or_(false(), *(_gender_matches(system, value) for system, value in _token_values(raw))))
        for raw in values["_lastUpdated"]:
            shown.append(_last_updated_matches(raw, patients.c.changed_at, _zone(request)))
        for raw in values["_id"]:
            own.append(patients.c.pk.in_(_patient_pks(conn, (value for _, value in _token_values(raw)))))
        if principal.role == "referring":
            shown.append(_referred_by(conn, principal))
        current = conn.execute(select(func.count()).select_from(patients).where(*shown, *own)).scalar_one()
        rows = conn.execute(select(*_PATIENT_COLUMNS).where(*shown, *own)
                            .order_by(patients.c.name_words, patients.c.patient_id, patients.c.pk)
                            .limit(count).offset(offset)).all()
        resources = _patient_resources(conn, rows)
        named = [patient_cx(r.patient_id, r.issuer) for r in rows]
        # The former ids after the current patients, in the order the search named them.
        replaced = _replaced_matches(conn, values, shown)
        start = max(0, offset - current)
        page = replaced[start:start + count - len(rows)]
        became = {r.pk: r for r in conn.execute(select(*_PATIENT_COLUMNS)
                                                .where(patients.c.pk.in_({pk for _, _, pk in page}))).all()}
        for (fhir_id, former, pk), resource in zip(page, _patient_resources(conn, [became[pk] for _, _, pk in page]),
                                                   strict=True):
            resources.append(replaced_patient(fhir_id, former, resource))
            named.append(patient_cx(became[pk].patient_id, became[pk].issuer))
        return resources, named, int(current) + len(replaced), count


# What a former id's resource (replaced_patient) lacks: a search by any of them never finds it.
_NOT_IN_REPLACED = ("name", "family", "given", "birthdate", "gender")


def _replaced_matches(conn: Connection, values: dict[str, list[str]],
                      shown: list[ColumnElement[bool]]) -> list[tuple[str, Any, int]]:
    """The former Patient ids (:func:`_former_patient`) a search by ``_id``
    finds, as (id, identifier row, key of the patient it became): what
    their read answers, so the search answers it too (R4 search: ``_id``
    matches the resource a read of that id gives). Every ``_id`` parameter
    names the id, each ``identifier`` one matches its old identifier, no
    parameter asks for what it does not hold (a name...), and the patient
    it became is one *shown* lets the caller see."""
    if not values["_id"] or any(values[key] for key in _NOT_IN_REPLACED):
        return []
    named = [[value for _, value in _token_values(raw)] for raw in values["_id"]]
    found: list[tuple[str, Any, int]] = []
    for fhir_id in dict.fromkeys(named[0]):
        if any(fhir_id not in ids for ids in named[1:]) or _current_pks(conn, fhir_id):
            continue
        if (former := _former_patient(conn, fhir_id)) is None:
            continue
        pk, identifier = former
        if not all(any(value == identifier.value and (system is None or _issuer_of(system) == identifier.issuer)
                       for system, value in _token_values(raw)) for raw in values["identifier"]):
            continue
        if conn.execute(select(patients.c.pk).where(patients.c.pk == pk, *shown)).first() is not None:
            found.append((fhir_id, identifier, pk))
    return found


def _audit_patients(request: Request, patient_ids: Iterable[str]) -> None:
    """Name the patients an answer shows in its audit event ("who saw which
    patient"; study routes get theirs from the study), backslash-separated
    and bounded (:func:`security.audit_patients`)."""
    audit_patients(request, patient_ids)


@router.get("/Patient", summary="Search Patient by identifier, name, family, given, birthdate, gender, _id or "
                                 "_lastUpdated")
def search_patients(request: Request, _count: int = 50, _offset: int = 0,
                    principal: Principal = guard(*READERS, action="query")) -> Response:
    return _patient_bundle(request, principal, _count, _offset)


@router.post("/Patient/_search", summary="Search Patient with the parameters in a form body")
async def search_patients_posted(request: Request, principal: Principal = guard(*READERS, action="query")) -> Response:
    count, offset = await _posted_search(request)
    return await run_in_threadpool(_patient_bundle, request, principal, count, offset)


def _patient_bundle(request: Request, principal: Principal, count: int, offset: int) -> Response:
    resources, patient_ids, total, count = _patient_search(request, principal, count, offset)
    _audit_patients(request, patient_ids)
    return _fhir(_bundle(request, resources, total, offset, count, _PATIENT_PARAMETERS))


@router.get("/Patient/{patient}", summary="One Patient (id: {issuer}.{patient ID}, see the CapabilityStatement)")
def read_patient(request: Request, patient: str, principal: Principal = guard(*READERS, action="view")) -> Response:
    with request.app.state.pacs.engine.connect() as conn:
        pks = _current_pks(conn, patient)
        former = None if pks else _former_patient(conn, patient)
        if former is not None:
            pks = [former[0]]
        stmt = select(*_PATIENT_COLUMNS).where(patients.c.pk.in_(pks), _HAS_RESOURCE)
        if principal.role == "referring":
            stmt = stmt.where(_referred_by(conn, principal))
        rows = conn.execute(stmt).all()
        resources = _patient_resources(conn, rows[:1])
        named = conn.execute(select(patients.c.patient_id, patients.c.issuer).where(patients.c.pk.in_(pks))).all()
    _audit_patients(request, (patient_cx(r.patient_id, r.issuer) for r in named))  # a refusal names them too
    if resources and former is not None:
        # The id the EMR kept: inactive, pointing at the patient it became.
        resources = [replaced_patient(patient, former[1], resources[0])]
    if not resources:
        if principal.role == "referring":
            # Whether or not the patient exists, as for studies: a referring
            # physician does not learn who else is in the archive.
            raise HTTPProblem(403, "no study of this patient was referred by you")
        raise HTTPProblem(404, f"no Patient {patient[:80]!r}")
    return _with_last_modified(_fhir(resources[0]), rows[0].changed_at)


# -- capabilities (R4 http.html 3.1.0.13: GET [base]/metadata) ------------------------------
_PAGE_PARAMS = [
    {"name": "_count", "type": "number", "documentation": "page size (default 50); more than 200 gives 200, 0 the total alone"},
    {"name": "_offset", "type": "number", "documentation": "matches to skip (the next links use it)"},
]
_SEARCH_PARAMS = [
    {"name": "identifier", "type": "token",
     "documentation": "accession number, or urn:dicom:uid|urn:oid:{StudyInstanceUID} (also without a system)"},
    {"name": "patient", "type": "reference",
     "documentation": "Patient/{id} or {id} (a Patient of this server), or chained: "
                      "patient.identifier={system|}value (any patient identifier: patient ID, citizen ID CCCD, "
                      "insurance number BHYT); values separated by commas match any"},
    {"name": "subject", "type": "reference",
     "documentation": "as patient: subject=Patient/{id}, subject.identifier"},
    *_PAGE_PARAMS,
]
_DATE_PREFIX_DOCS = ("prefixes eq (default), ne, gt, lt, ge, le, sa, eb (not ap); YYYY, YYYY-MM, YYYY-MM-DD or "
                     "YYYY-MM-DDThh:mm[:ss[.f]][Z|+hh:mm], each the period of its precision; without a zone the "
                     "hospital's time; given twice, both apply (a range: ge2026-01-01&started=lt2026-02-01)")
_LAST_UPDATED_PARAM = {
    "name": "_lastUpdated", "type": "date",
    "documentation": "meta.lastUpdated: when what the resource shows last changed (ImagingStudy: an instance or "
                     "series added or deleted, the study or its patient corrected or merged; Patient: its name, "
                     "birth date, sex, ID or identifiers corrected, a patient merged into it), to the microsecond; "
                     "a deleted resource is no longer found; a change is found once its transaction commits, "
                     "a moment after that time: poll with a margin (_lastUpdated=ge{last poll minus a minute}); "
                     + _DATE_PREFIX_DOCS.replace("ge2026-01-01&started=", "ge2026-01-01&_lastUpdated=")}
_IMAGING_STUDY_SEARCH_PARAMS = [
    *_SEARCH_PARAMS[:-len(_PAGE_PARAMS)],
    {"name": "started", "type": "date",
     "documentation": "Study Date and Time on the hospital's clock, as started shows them (a date alone: its "
                      "day; a time: its second); a study without Study Date matches none; " + _DATE_PREFIX_DOCS},
    {"name": "modality", "type": "token",
     "documentation": "CT or http://dicom.nema.org/resources/ontology/DCM|CT: a series of the study has it "
                      "(ModalitiesInStudy); OT also a series without modality; commas: any"},
    {"name": "series", "type": "token", "documentation": "a Series Instance UID of the study; commas: any"},
    {"name": "dicom-class", "type": "token",
     "documentation": "an SOP Class UID of an instance of the study (urn:oid:{UID} as sopClass shows it, "
                      "or the UID); commas: any"},
    _LAST_UPDATED_PARAM,
    *_PAGE_PARAMS,
]
_PATIENT_SEARCH_PARAMS = [
    {"name": "_id", "type": "token",
     "documentation": "Patient ids; an id a merge or a new hospital number replaced finds what its read gives, "
                      "the inactive Patient linked replaced-by the current one"},
    {"name": "identifier", "type": "token",
     "documentation": "{system|}value: the patient ID or any other (citizen ID CCCD, insurance number BHYT); "
                      "the system is ours, " + PATIENT_ID_SYSTEM + "/{issuer} (" + PATIENT_ID_SYSTEM
                      + " alone: an ID without issuer), or the issuer alone (CCCD|...); value alone: any "
                        "issuer; |value (no system) matches nothing, every identifier has one; system| "
                        "(a whole issuer) is refused (400)"},
    {"name": "name", "type": "string",
     "documentation": "a word of the name starts with it, case and diacritics ignored (nguyen finds Nguyễn)"},
    {"name": "family", "type": "string", "documentation": "the family name starts with it (as name)"},
    {"name": "given", "type": "string", "documentation": "a given or middle name starts with it (as name)"},
    {"name": "birthdate", "type": "date", "documentation": "equality only: YYYY-MM-DD, or YYYY-MM, YYYY"},
    {"name": "gender", "type": "token", "documentation": "male, female, other, unknown"},
    _LAST_UPDATED_PARAM,
    *_PAGE_PARAMS,
]


def _resource(kind: str, *, search: bool, read: bool, documentation: str,
              params: list[dict[str, str]] = _SEARCH_PARAMS, vread: bool = False) -> dict[str, Any]:
    interactions = [{"code": code} for code, offered in (("read", read), ("vread", vread), ("search-type", search))
                    if offered]
    resource: dict[str, Any] = {"type": kind, "interaction": interactions, "documentation": documentation}
    if vread:
        resource["versioning"] = "versioned"
    if search:
        resource["searchParam"] = params
    return resource


def capability_statement(request: Request) -> dict[str, Any]:
    """What this server does: the resources, interactions and search
    parameters the routes above implement, JSON only."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": "filmless-pacs",
        "kind": "instance",
        "software": {"name": "filmless-pacs", "version": __version__},
        "implementation": {"description": "filmless-pacs FHIR R4 facade of the imaging archive",
                           "url": base_url(request) + "/fhir"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Authorization: Bearer <API token> or a session cookie; roles "
                                        + ", ".join(f"{role} (referred studies only)" if role == "referring"
                                                    else role for role in READERS)},
            "resource": [
                _resource("Patient", search=True, read=True, params=_PATIENT_SEARCH_PARAMS,
                          documentation="id = {issuer}.{patient ID} ({patient ID} without issuer; characters "
                                        "other than letters and digits as -XX per UTF-8 byte; longer ones "
                                        "{start of the ID}--{digest}; a patient without ID --{Study UID in "
                                        "base 62}): derived, so it outlives a reindex; identifiers: the patient "
                                        "ID and every other ID (CCCD, BHYT), system " + PATIENT_ID_SYSTEM
                                        + "/{issuer}; a referring physician sees the patients of the studies "
                                          "they referred; a former id (merged away by ADT^A40, or a key "
                                          "replaced by the hospital number) reads as an inactive Patient with "
                                          "link replaced-by the current one, and patient= finds its studies; "
                                          "meta.lastUpdated (and Last-Modified) = when what it shows last changed"),
                _resource("ImagingStudy", search=True, read=True, params=_IMAGING_STUDY_SEARCH_PARAMS,
                          documentation="id = StudyInstanceUID; subject Patient/{id}; endpoint Endpoint/dicomweb; "
                                        "meta.lastUpdated (and Last-Modified) = when what it shows last changed"),
                _resource("DiagnosticReport", search=True, read=True, vread=True,
                          documentation="signed reports, one per study: id = {StudyInstanceUID}; each signed "
                                        "version (an amendment) is a version of it, meta.versionId = the "
                                        "version, meta.lastUpdated = its signing, ETag W/\"{version}\"; a read "
                                        "gives the current version, a vread (_history/{version}) that one; "
                                        "a search gives the current ones; the ids of earlier releases, "
                                        "{StudyInstanceUID}-v{version}, read the current version"),
                _resource("Endpoint", search=False, read=True, documentation="only Endpoint/dicomweb"),
            ],
        }],
    }


@router.get("/metadata", summary="FHIR CapabilityStatement (public)")
def metadata(request: Request) -> Response:
    # Public, like /health: clients read the capabilities before they
    # authenticate (the statement says how), and it holds no patient data.
    return _fhir(capability_statement(request))
