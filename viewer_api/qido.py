"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Query parameters become the same :class:`pacs.query.Query` that C-FIND uses:
attribute keyword or tag (``PatientName`` or ``00100010``) with DICOM
matching values, ``fuzzymatching``, ``includefield`` (``all``), ``limit`` and
``offset``. Answers are ``application/dicom+json`` built from the index.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, tzinfo
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.datadict import keyword_dict, keyword_for_tag

from pacs.audit import patient_cx
from pacs.query import ATTRIBUTES, DEFAULT_RETURN, Kind, Level, Query, QueryError, run_query
from pacs.query.attributes import QUALIFIERS, matchable
from pacs.query.matching import universal
from pacs.query.results import ResultShape
from pacs.timezones import hospital_zone, utc_offset

from . import negotiation
from .dicomjson import NotDirect, dumps, to_json, values_json
from .errors import require_uids
from .security import audit_patients
from .urls import base_url

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicom-web", tags=["QIDO-RS"])
# Empty Value Matching and Multiple Value Matching (PS3.18 8.3.4.5-6) are
# parameters every origin server takes (Table 8.3.4-1); we do not perform
# them, and say so when asked (search: a Warning, as for fuzzymatching).
_UNSUPPORTED = {
    "emptyvaluematching": "Empty Value Matching",
    "multiplevaluematching": "Multiple Value Matching",
}
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset", *_UNSUPPORTED}
# Without a limit a search is cut here and says so (Warning header, PS3.18 8.3.4.3).
MAX_RESULTS = 1000


def _keyword(name: str) -> str:
    """A query parameter name as a keyword: keyword itself or an 8-digit tag."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    return name


# Keys whose value may be a list (PS3.18 8.3.4.1): UIDs, comma-separated or
# the key repeated; ModalitiesInStudy likewise (a study "in MR or CT").
# Inside a Query a list is backslash-separated, as in C-FIND (PS3.4 C.2.2.2.2).
_LIST_KEYS = frozenset(k for k, a in ATTRIBUTES.items() if a.kind is Kind.UID) | {"ModalitiesInStudy"}


def _matching(params: list[tuple[str, str]], fixed: dict[str, str]) -> dict[str, str]:
    """The matching keys of the query parameters, lists joined, plus the path's UIDs."""
    given: dict[str, list[str]] = {}
    for name, value in params:
        keyword = _keyword(name)
        if keyword not in ATTRIBUTES and not _dicom_attribute(name):
            raise QueryError(f"{name} is not a DICOM attribute")
        if keyword in QUALIFIERS:
            # Timezone Offset From UTC qualifies the query's dates and times
            # (PS3.4 C.2.2.2.5); it is no matching key.
            log.info("QIDO-RS: %s qualifies the query, not used for matching", keyword)
            continue
        given.setdefault(keyword, []).append(value)
    match = dict(fixed)
    for keyword, values in given.items():
        if not matchable(keyword):
            # A DICOM attribute the archive does not match on: ignored for
            # matching (PS3.4 C.2.2.1.3, which QIDO-RS follows); the Query
            # lists it (Query.ignored) for the log and the Warning header.
            match[keyword] = values[-1]
            continue
        if keyword not in _LIST_KEYS:
            if len(values) > 1:
                raise QueryError(f"{keyword} is given {len(values)} times; only UID attributes and "
                                 "ModalitiesInStudy take a list of values")
            match[keyword] = values[0]
            continue
        items = [v.strip() for value in values for v in value.replace(",", "\\").split("\\") if v.strip()]
        if keyword in fixed:
            # The path names the entity: a query key may only repeat it.
            if items and fixed[keyword] not in items:
                raise QueryError(f"{keyword} in the query does not match the one in the path")
            continue
        match[keyword] = "\\".join(items)
    return match


_OFFSET = re.compile(r"[+-](\d\d)(\d\d)")
# Dates that are no moment of the day: never adjusted to a time zone.
_NOT_MOMENTS = frozenset({"PatientBirthDate", "PatientBirthTime"})


def _check_timezone(offsets: list[str], match: dict[str, str], zone: tzinfo) -> None:
    """Timezone Offset From UTC in a search (PS3.18 8.3.4.1, PS3.4 C.4.1.1.3.1):
    the zone the query's dates and times are in. The index holds them as the
    objects carry them, in the hospital's local time (``timezone``): the
    hospital's own offset needs nothing, nor does another one in a query
    without date or time keys; another one with them is refused (400 naming
    it), never ignored (the search would be hours off without saying so)."""
    # An empty one is universal matching (PS3.4 C.2.2.2.3): the attribute asked for, no offset given.
    offsets = [o for o in offsets if o.strip()]
    if not offsets:
        return
    if len(offsets) > 1:
        raise QueryError(f"TimezoneOffsetFromUTC is given {len(offsets)} times; it takes one offset")
    offset = offsets[0]
    if re.fullmatch(r" \d{4}", offset):
        # "+0700" written unencoded in the URL (as PS3.18 writes it): form decoding made the '+' a space.
        offset = "+" + offset[1:]
    offset = offset.strip()
    found = _OFFSET.fullmatch(offset)
    if found is None or int(found[2]) > 59 or not -12 * 60 <= _minutes(offset) <= 14 * 60:
        raise QueryError(f"TimezoneOffsetFromUTC {offset[:20]!r} is not an offset from UTC: "
                         "±HHMM, from -1200 to +1400 (e.g. +0700)")
    ours = _zone_offsets(zone)
    if _minutes(offset) in {_minutes(o) for o in ours}:
        return
    moments = [k for k, v in match.items() if v and not universal(v) and k not in _NOT_MOMENTS
               and (a := ATTRIBUTES.get(k)) is not None and a.kind in (Kind.DATE, Kind.TIME)]
    if moments:
        raise QueryError(
            f"TimezoneOffsetFromUTC {offset} differs from this archive's time zone ({' or '.join(ours)}, the "
            f"hospital's timezone setting), in which {', '.join(moments)} are matched: dates and times are not "
            f"adjusted to another zone; give them in {' or '.join(ours)}, or leave TimezoneOffsetFromUTC out")


def _zone_offsets(zone: tzinfo) -> list[str]:
    """The offsets *zone* takes this year, now's first: a zone with summer
    time has two (Europe/Berlin +0100 and +0200), both the hospital's. The
    index's dates and times are local whatever the season, so a client's
    offset of either season names the same local time; taking only now's
    refused half the year the offset of the other season (or of the dates
    searched)."""
    now = datetime.now(zone)
    moments = [now, *(datetime(now.year, month, 1, 12, tzinfo=UTC).astimezone(zone) for month in (1, 7))]
    return list(dict.fromkeys(utc_offset(moment) for moment in moments))


def _minutes(offset: str) -> int:
    """+0700 -> 420."""
    return (-1 if offset[0] == "-" else 1) * (int(offset[1:3]) * 60 + int(offset[3:5]))


def _dicom_attribute(name: str) -> bool:
    """A DICOM keyword or tag (8 hex digits), or a dotted path of them
    (``ReferencedSeriesSequence.SeriesInstanceUID``)."""
    return all(
        piece in keyword_dict or (len(piece) == 8 and all(c in "0123456789abcdefABCDEF" for c in piece))
        for piece in name.split(".")
    )


def _return_keys(level: Level, includes: list[str], upper: tuple[Level, ...]) -> list[str]:
    """The level's default attributes, those of the *upper* levels the target
    resource requires (PS3.18 10.6.3.3.2-3: all series carry the study's,
    instances the series' and, for all instances, the study's too) and
    includefield; attributes of a lower level are never returned (an
    instance's SOPInstanceUID has no value for a series)."""
    if "all" in includes:
        return [k for k, a in ATTRIBUTES.items() if a.level.depth <= level.depth]
    keys = [k for above in upper for k in DEFAULT_RETURN[above]] + list(DEFAULT_RETURN[level])
    asked = [_keyword(i) for i in includes]
    # PS3.18 8.3.4.3 (C-FIND return keys): an attribute the archive does not
    # index is simply not returned; only a name that is no DICOM keyword or
    # tag at all is an error.
    unknown = [r for r in asked if r not in ATTRIBUTES and not _dicom_attribute(r)]
    if unknown:
        raise QueryError(f"includefield names unknown attributes: {', '.join(unknown)}")
    keys += [k for k in asked if k in ATTRIBUTES and ATTRIBUTES[k].level.depth <= level.depth]
    return list(dict.fromkeys(keys))


def parse_query(request: Request, level: Level, fixed: dict[str, str], upper: tuple[Level, ...] = ()) -> Query:
    """Translate QIDO query parameters (plus path UIDs) into a query."""
    params = request.query_params
    includes: list[str] = []
    matching: list[tuple[str, str]] = []
    for name, value in params.multi_items():
        if name == "includefield":
            includes += [v.strip() for v in value.split(",") if v.strip()]
        elif name not in _CONTROL:
            matching.append((name, value))
    match = _matching(matching, fixed)
    _check_timezone([v for n, v in matching if _keyword(n) == "TimezoneOffsetFromUTC"], match,
                    hospital_zone(request.app.state.pacs.settings))
    # The keys matched on are returned too (PS3.18 10.6.3.3: "all other ...
    # Attributes passed as match or includefield parameters"), as C-FIND
    # returns every key of its identifier: InstitutionName=X answered
    # studies without their Institution Name.
    returns = _return_keys(level, includes + [k for k in match if k not in fixed], upper)
    try:
        limit = int(params["limit"]) if "limit" in params else None
        offset = int(params.get("offset", 0))
    except ValueError:
        raise QueryError("limit and offset must be integers") from None
    fuzzy = params.get("fuzzymatching", "false").lower() == "true"
    if limit == 0:
        # PS3.18 8.3.4.4: limit is the most results wanted; 0 asks for no
        # page size at all and was answered [] with "there are additional
        # results". Taken as no limit: the server's maximum applies, with
        # its Warning when the answer is cut.
        limit = None
    query = Query(level, match, returns, limit=limit, offset=offset, fuzzy=fuzzy, newest_first=True,
                  combined_datetime=True)
    query.validate()
    if query.ignored:
        log.info("QIDO-RS %s search: not used for matching: %s", level.value, ", ".join(query.ignored))
    return query


def _retrieve_url(base: str, level: Level, row: dict[str, Any]) -> str:
    url = f"{base}/studies/{row['StudyInstanceUID']}"
    if level.depth >= Level.SERIES.depth:
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


_QUERY_LEVEL = 0x00080052
_RETRIEVE_URL = 0x00081190


def _match_json(shape: ResultShape, row: dict[str, Any], url: str) -> dict[str, Any]:
    """One match as DICOM JSON: written straight from the index values, or
    through a pydicom Dataset for values that need its conversions."""
    values = [(f.tag, f.vr, v) for f, v in shape.values(row) if f.tag != _QUERY_LEVEL]
    values.append((_RETRIEVE_URL, "UR", url))
    values.sort(key=lambda t: t[0])
    try:
        return values_json(values)
    except NotDirect:
        ds = shape.dataset(row)
        ds.RetrieveURL = url
        return to_json(ds, drop=("QueryRetrieveLevel",))


def search(request: Request, level: Level, fixed: dict[str, str], upper: tuple[Level, ...] = ()) -> Response:
    # Before any work: 406 for an Accept we cannot answer (PS3.18 8.7.5:
    # DICOM JSON; XML is not implemented).
    media_type = negotiation.negotiate_json(request).media_type
    pacs = request.app.state.pacs
    query = parse_query(request, level, fixed, upper)
    cap = MAX_RESULTS if query.limit is None else min(query.limit, MAX_RESULTS)
    query.limit = cap + 1  # one more tells us whether the answer was cut
    base = base_url(request) + "/dicom-web"
    results = []
    shown: list[str] = []
    shape = ResultShape(level, query.return_keys, pacs.settings.ae_title)
    for row in run_query(pacs.engine, query):
        results.append(_match_json(shape, row, _retrieve_url(base, level, row)))
        shown.append(patient_cx(row["_patient_id"] or "", row["_issuer"] or ""))
    warnings = []
    if len(results) > cap:
        results = results[:cap]
        shown = shown[:cap]
        warnings.append('299 filmless-pacs: "There are additional results that can be requested"')
    audit_patients(request, shown)  # who was shown (bounded by the page)
    for name, matching in _UNSUPPORTED.items():
        if request.query_params.get(name, "false").lower() == "true":
            warnings.append(f'299 filmless-pacs: "The {name} parameter is not supported. {matching} has not been '
                            'performed."')
    if query.ignored:
        warnings.append('299 filmless-pacs: "The following attributes are not supported as matching keys '
                        f'and were ignored: {", ".join(query.ignored)}"')
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    # An empty match is 200 with an empty array (PS3.18 as amended by CP-2473).
    return Response(dumps(results), media_type=media_type, headers=headers)


@router.get("/studies", summary="Search for studies")
def search_studies(request: Request) -> Response:
    return search(request, Level.STUDY, {})


@router.get("/series", summary="Search for series")
def search_all_series(request: Request) -> Response:
    return search(request, Level.SERIES, {}, upper=(Level.STUDY,))


@router.get("/instances", summary="Search for instances")
def search_all_instances(request: Request) -> Response:
    return search(request, Level.IMAGE, {}, upper=(Level.STUDY, Level.SERIES))


@router.get("/studies/{study}/series", summary="Search for series of a study")
def search_series(request: Request, study: str) -> Response:
    require_uids(study)
    return search(request, Level.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", summary="Search for instances of a study")
def search_study_instances(request: Request, study: str) -> Response:
    require_uids(study)
    return search(request, Level.IMAGE, {"StudyInstanceUID": study}, upper=(Level.SERIES,))


@router.get("/studies/{study}/series/{series}/instances", summary="Search for instances of a series")
def search_instances(request: Request, study: str, series: str) -> Response:
    require_uids(study, series)
    return search(request, Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": series})
