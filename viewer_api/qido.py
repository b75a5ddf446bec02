"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Query parameters become the same :class:`pacs.query.Query` that C-FIND uses:
attribute keyword or tag (``PatientName`` or ``00100010``) with DICOM
matching values, ``fuzzymatching``, ``includefield`` (``all``), ``limit`` and
``offset``. Answers are ``application/dicom+json`` built from the index.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.datadict import keyword_for_tag

from pacs.query import ATTRIBUTES, DEFAULT_RETURN, Level, Query, QueryError, run_query
from pacs.query.results import ResultShape

from .dicomjson import NotDirect, dumps, to_json, values_json
from .errors import require_uids
from .urls import base_url

router = APIRouter(prefix="/dicom-web", tags=["QIDO-RS"])
DICOM_JSON = "application/dicom+json"
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"}
# Without a limit a search is cut here and says so (Warning header, PS3.18 8.3.4.3).
MAX_RESULTS = 1000


def _keyword(name: str) -> str:
    """A query parameter name as a keyword: keyword itself or an 8-digit tag."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    return name


def parse_query(request: Request, level: Level, fixed: dict[str, str]) -> Query:
    """Translate QIDO query parameters (plus path UIDs) into a query."""
    params = request.query_params
    match: dict[str, str] = dict(fixed)
    includes: list[str] = []
    for name, value in params.multi_items():
        if name in _CONTROL:
            if name == "includefield":
                includes += [v.strip() for v in value.split(",") if v.strip()]
            continue
        keyword = _keyword(name)
        if keyword not in ATTRIBUTES:
            raise QueryError(f"{name} is not a supported search attribute")
        match[keyword] = value
    if "all" in includes:
        returns = [k for k, a in ATTRIBUTES.items() if a.level.depth <= level.depth]
    else:
        returns = list(DEFAULT_RETURN[level]) + [_keyword(i) for i in includes]
        unknown = [r for r in returns if r not in ATTRIBUTES]
        if unknown:
            raise QueryError(f"includefield names unknown attributes: {', '.join(unknown)}")
    try:
        limit = int(params["limit"]) if "limit" in params else None
        offset = int(params.get("offset", 0))
    except ValueError:
        raise QueryError("limit and offset must be integers") from None
    fuzzy = params.get("fuzzymatching", "false").lower() == "true"
    query = Query(level, match, returns, limit=limit, offset=offset, fuzzy=fuzzy, newest_first=True)
    query.validate()
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


def search(request: Request, level: Level, fixed: dict[str, str]) -> Response:
    pacs = request.app.state.pacs
    query = parse_query(request, level, fixed)
    cap = MAX_RESULTS if query.limit is None else min(query.limit, MAX_RESULTS)
    query.limit = cap + 1  # one more tells us whether the answer was cut
    base = base_url(request) + "/dicom-web"
    results = []
    shape = ResultShape(level, query.return_keys, pacs.settings.ae_title)
    for row in run_query(pacs.engine, query):
        results.append(_match_json(shape, row, _retrieve_url(base, level, row)))
    headers = {}
    if len(results) > cap:
        results = results[:cap]
        headers["Warning"] = '299 filmless-pacs: "There are additional results that can be requested"'
    # An empty match is 200 with an empty array (PS3.18 as amended by CP-2473).
    return Response(dumps(results), media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="Search for studies")
def search_studies(request: Request) -> Response:
    return search(request, Level.STUDY, {})


@router.get("/series", summary="Search for series")
def search_all_series(request: Request) -> Response:
    return search(request, Level.SERIES, {})


@router.get("/instances", summary="Search for instances")
def search_all_instances(request: Request) -> Response:
    return search(request, Level.IMAGE, {})


@router.get("/studies/{study}/series", summary="Search for series of a study")
def search_series(request: Request, study: str) -> Response:
    require_uids(study)
    return search(request, Level.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", summary="Search for instances of a study")
def search_study_instances(request: Request, study: str) -> Response:
    require_uids(study)
    return search(request, Level.IMAGE, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/instances", summary="Search for instances of a series")
def search_instances(request: Request, study: str, series: str) -> Response:
    require_uids(study, series)
    return search(request, Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": series})
