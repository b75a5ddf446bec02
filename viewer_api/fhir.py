"""FHIR R4 for the EMR: ImagingStudy and DiagnosticReport searches, and the
Endpoint of our DICOMweb service. Patients are found by any identifier,
the citizen ID (CCCD) and insurance number included; studies also by
accession number. JSON only (``application/fhir+json``)."""

from __future__ import annotations

import base64
import re
import urllib.parse
from datetime import UTC, datetime, tzinfo
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import ColumnElement, exists, false, or_, select

from pacs import __version__
from pacs.auth import Principal
from pacs.index.models import PatientIdentifier, Report
from pacs.query.attributes import patients, studies
from pacs.reports import ReportError, ReportService
from pacs.studylist import study_detail
from pacs.timezones import hospital_zone

from . import mediatypes
from .dicomjson import dumps
from .errors import HTTPProblem, register_format
from .negotiation import effective_accept
from .security import READERS, guard, may_see_study
from .urls import base_url

FHIR_JSON = "application/fhir+json"
identifiers = PatientIdentifier.__table__
reports_t = Report.__table__
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
# Identifier.system of patient IDs: this base for IDs without an issuer,
# followed by "/{issuer}" (percent-encoded) for those with one (BVDK, CCCD,
# BHYT...). A search by patient.identifier={system}|{value} takes it back.
PATIENT_ID_SYSTEM = "https://filmless-pacs.org/fhir/NamingSystem/patient-id"
# Search parameters applied (R4 search 3.1.1.3.4: others are ignored, or
# refused with Prefer: handling=strict): the identifiers, each as often as
# given, and _count and _offset once; _format is a general parameter.
_REPEATABLE = ("patient.identifier", "subject.identifier", "identifier")
_GENERAL_PARAMETERS = ("_format",)
UNIDENTIFIED = "unidentified patient"


def _fhir(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), media_type=FHIR_JSON, status_code=status)


# -- errors and formats (R4 http.html 3.1.0.1.9, 3.1.0.4) ---------------------------------
_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                406: "not-supported", 409: "conflict", 422: "processing"}


def operation_outcome(status: int, message: str) -> Response:
    """An error as the OperationOutcome FHIR clients parse (any status)."""
    return _fhir({"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": _ISSUE_CODES.get(status, "exception"), "diagnostics": message}]}, status)


def install(app: FastAPI) -> None:
    """Errors under /fhir (401/403 of the guards, unknown resources, bad
    parameters) are OperationOutcome resources, not the app's JSON errors."""
    register_format(app, router.prefix, operation_outcome)


_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_JSON_OFFERS = [mediatypes.Offer(FHIR_JSON), mediatypes.Offer("application/json")]


def json_only(request: Request) -> None:
    """406 for XML (or anything but JSON) asked by _format or Accept: this
    server speaks FHIR JSON only (R4 http.html 3.1.0.1.9)."""
    wanted = request.query_params.get("_format")
    if wanted is not None and wanted.strip().lower() not in _JSON_FORMATS:
        raise HTTPProblem(406, f"_format {wanted[:40]!r} is not supported: this server answers FHIR JSON only")
    if wanted is None:
        try:
            mediatypes.negotiate(effective_accept(request), _JSON_OFFERS, default=_JSON_OFFERS[0])
        except mediatypes.NotAcceptable:
            raise HTTPProblem(406, f"{FHIR_JSON} is the only format of this server; "
                                   f"Accept {request.headers.get('accept', '')[:80]!r} cannot be met") from None


router = APIRouter(prefix="/fhir", tags=["FHIR R4"], dependencies=[Depends(json_only)])


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


def _study_uids(request: Request, patient_identifier: list[str], identifier: list[str], *,
                signed_only: bool) -> list[str]:
    """Every study the search names, newest first (a patient's or an
    accession's: few). All of them, so that Bundle.total counts matches.
    A parameter given twice must match both times (R4 search 3.1.1.5.5: AND)."""
    engine = request.app.state.pacs.engine
    stmt = select(studies.c.study_uid).join(patients, patients.c.pk == studies.c.patient_pk)
    if signed_only:
        # A DiagnosticReport exists for a study with a signed version.
        stmt = stmt.where(exists(select(reports_t.c.pk).where(
            reports_t.c.study_pk == studies.c.pk, reports_t.c.status == "signed")))
    for raw in patient_identifier:
        stmt = stmt.where(or_(false(), *(_patient_matches(system, value) for system, value in _token_values(raw))))
    for raw in identifier:
        stmt = stmt.where(or_(false(), *(_study_matches(system, value) for system, value in _token_values(raw))))
    if not patient_identifier and not identifier:
        raise HTTPProblem(400, "search by patient.identifier or identifier (accession or urn:dicom:uid)")
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(stmt.order_by(studies.c.study_date.desc(), studies.c.pk.desc()))]


def _patient_matches(system: str | None, value: str) -> ColumnElement[bool]:
    """Studies of the patient *value* identifies: its patient ID, or one of
    its other identifiers (citizen ID, insurance number), under *system*'s issuer."""
    issuer = _issuer_of(system)
    own = patients.c.patient_id == value
    if issuer:
        own = own & (patients.c.issuer == issuer)
    other = select(identifiers.c.patient_pk).where(identifiers.c.value == value)
    if issuer:
        other = other.where(identifiers.c.issuer == issuer)
    return or_(own, patients.c.pk.in_(other))


def _study_matches(system: str | None, value: str) -> ColumnElement[bool]:
    """The study a study identifier names: its UID, or its accession number."""
    if system == "urn:dicom:uid":
        return studies.c.study_uid == value.removeprefix("urn:oid:")
    return studies.c.accession_number == value


def _issuer_of(system: str | None) -> str | None:
    """The issuer a patient.identifier system names (None: any). Ours
    (PATIENT_ID_SYSTEM[/issuer]), the issuer itself (CCCD, BHYT...) or a URI
    ending with it."""
    if not system:
        return None
    if system == PATIENT_ID_SYSTEM:
        return None
    if system.startswith(PATIENT_ID_SYSTEM + "/"):
        return urllib.parse.unquote(system[len(PATIENT_ID_SYSTEM) + 1 :]) or None
    return system.rsplit("/", 1)[-1].rsplit(":", 1)[-1] or None


def patient_id_system(issuer: str) -> str:
    return f"{PATIENT_ID_SYSTEM}/{urllib.parse.quote(issuer, safe='')}" if issuer else PATIENT_ID_SYSTEM


def _patient_ref(request: Request, detail: dict[str, Any]) -> dict[str, Any]:
    """Reference(Patient) by identifier (there is no Patient resource here):
    the patient ID with its system, and the name to display."""
    reference: dict[str, Any] = {}
    if detail["patient_id"]:
        reference["identifier"] = {"system": patient_id_system(_patient_issuer(request, detail)),
                                   "value": detail["patient_id"]}
    display = " ".join((detail["patient_name"] or "").replace("^", " ").split())
    if display:
        reference["display"] = display
    elif not reference:
        # ImagingStudy.subject is 1..1: a study sent without patient ID or
        # name (an unidentified emergency patient) still names someone.
        reference["display"] = UNIDENTIFIED
    return reference


def _patient_issuer(request: Request, detail: dict[str, Any]) -> str:
    if "issuer" in detail:
        return detail["issuer"] or ""
    with request.app.state.pacs.engine.connect() as conn:
        issuer = conn.execute(
            select(patients.c.issuer).join(studies, studies.c.patient_pk == patients.c.pk)
            .where(studies.c.study_uid == detail["study_uid"])
        ).scalar()
    detail["issuer"] = issuer or ""
    return detail["issuer"]


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
    date (the ``timezone`` setting, not the server's, which is often UTC)."""
    if not re.fullmatch(r"\d{8}", date or ""):
        return None
    try:
        day = datetime(int(date[:4]), int(date[4:6]), int(date[6:8]))
    except ValueError:
        return None  # a bad date is dropped
    t = (time or "").strip().split(".")[0]
    if not t:
        return day.date().isoformat()  # a date alone: no midnight, no zone invented
    t = t.ljust(6, "0")
    try:
        moment = day.replace(hour=int(t[:2]), minute=int(t[2:4]), second=int(t[4:6]))
    except ValueError:
        return day.date().isoformat()  # a bad time keeps the date (a dateTime may be a date alone)
    return moment.replace(tzinfo=zone).isoformat()


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


def _study_modalities(detail: dict[str, Any], series: list[dict[str, Any]]) -> list[str]:
    """The study's modalities: those indexed, and each series' (OT for a
    series without one, as in ImagingStudy.series.modality)."""
    found = [m for m in (detail["modalities"] or "").split("\\") if m]
    found += [s["modality"] or "OT" for s in series]
    return list(dict.fromkeys(found))


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
                "number": s["series_number"],
                "modality": {"system": DCM, "code": s["modality"] or "OT"},
                "description": s["description"],
                "numberOfInstances": s["num_instances"],
                "instance": [{"uid": i["sop_uid"], "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                 "code": f"urn:oid:{i['sop_class_uid']}"},
                              "number": i["instance_number"]} for i in s["instances"]],
            }
            for s in series
        ],
    }
    if detail["accession"]:
        resource["identifier"].append({"type": ACSN, "value": detail["accession"]})
    started = _datetime(detail["study_date"], detail["study_time"], _zone(request))
    if started:
        resource["started"] = started
    return _pruned(resource)


def diagnostic_report(request: Request, detail: dict[str, Any], report: dict[str, Any],
                      version: int | None = None) -> dict[str, Any] | None:
    """The DiagnosticReport of a signed version (the latest by default)."""
    signed = [v for v in report["versions"] if version is None or v["version"] == version]
    if not signed:
        return None
    current = signed[-1]
    base = base_url(request)
    text = f"{current['findings']}\n\n{current['impression']}".strip()
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(detail["study_uid"], current["version"]),
        "status": "final" if current["version"] == 1 else "amended",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": _patient_ref(request, detail),
        "resultsInterpreter": [{"display": " ".join((current["signed_by"] or "").replace("^", " ").split())}],
        "imagingStudy": [{"reference": f"ImagingStudy/{detail['study_uid']}"}],
        "identifier": [{"type": ACSN, "value": detail["accession"]}] if detail["accession"] else [],
        "conclusion": current["impression"],
        "presentedForm": [
            {"contentType": "application/pdf", "url": f"{base}/api/studies/{detail['study_uid']}/report/pdf?version={current['version']}",
             "title": "Imaging report"},
            {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode(text.encode()).decode()},
        ],
    }
    issued = _instant(current["signed_at"])
    if issued:
        resource["issued"] = issued
    # The clinically relevant time: the examination's (as ImagingStudy.started).
    effective = _datetime(detail["study_date"], detail["study_time"], _zone(request))
    if effective:
        resource["effectiveDateTime"] = effective
    return _pruned(resource)


def report_id(study_uid: str, version: int) -> str:
    """``{StudyInstanceUID}-v{version}``; a UID too long for that to fit a
    FHIR id (64 characters: UIDs of 62-64) is written compactly, ``u{base62}``."""
    plain = f"{study_uid}-v{version}"
    if len(plain) <= _ID_LENGTH:
        return plain
    return f"u{_uid_to_base62(study_uid)}-v{version}"


def _parse_report_id(value: str) -> tuple[str, int]:
    """A report id -> (study UID, version); 404 otherwise."""
    match = re.fullmatch(r"([0-9.]{1,64}|u[0-9A-Za-z]{1,40})-v([1-9][0-9]{0,5})", value)
    study = match.group(1) if match else None
    if study and study.startswith("u"):
        study = _uid_from_base62(study[1:])
    if match is None or study is None:
        raise HTTPProblem(404, f"no DiagnosticReport {value[:80]!r}")
    return study, int(match.group(2))


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
    return f"{base_url(request)}{request.url.path}{'?' + query if query else ''}"


def _strict(request: Request) -> bool:
    """Prefer: handling=strict (R4 http.html 3.1.0.1.8, search 3.1.1.3.4)."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.strip().partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False


def _applied_parameters(request: Request) -> list[tuple[str, str]]:
    """The search parameters this server applies, as given, in order; the
    others are ignored (and left out of the self link), or refused with 400
    when the client asked Prefer: handling=strict."""
    params = request.query_params
    applied: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in params.multi_items():
        if name in _GENERAL_PARAMETERS or not value:
            continue  # _format is honoured by json_only; an empty value means nothing
        # Identifiers may repeat (each must match); a page is given once.
        if name in _REPEATABLE or (name in ("_count", "_offset") and params.get(name) == value
                                   and (name, value) not in applied):
            applied.append((name, value))
        else:
            ignored.append(name)
    if ignored and _strict(request):
        names = ", ".join(sorted({n[:40] for n in ignored}))
        raise HTTPProblem(400, f"search parameter(s) not supported or repeated: {names}; this server searches by "
                               "patient.identifier (or subject.identifier), identifier, _count and _offset")
    return applied


def _bundle(request: Request, resources: list[dict[str, Any]], total: int, offset: int, count: int) -> dict[str, Any]:
    """A searchset page: total counts every match (R4 Bundle.total), a next
    link when more follow. The links carry the parameters applied only
    (R4 search 3.1.1.3.4): one the server ignored is not in the self link."""
    base = base_url(request) + "/fhir"
    applied = _applied_parameters(request)
    links = [{"relation": "self", "url": _page_url(request, applied)}]
    if offset + count < total:
        links.append({"relation": "next", "url": _page_url(request, applied, offset + count)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    if resources:  # no empty arrays in FHIR JSON: a page without hits has no "entry"
        bundle["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                            "search": {"mode": "match"}} for r in resources]
    return bundle


def _search(request: Request, principal: Principal, count: int, offset: int, *,
            signed_only: bool) -> tuple[list[dict[str, Any]], int]:
    """One page of the studies a search matches (those the caller may see)
    and how many there are in all."""
    _applied_parameters(request)  # Prefer: handling=strict refuses what would be ignored
    if not 1 <= count <= 200:
        raise HTTPProblem(400, "_count must be 1-200")
    if offset < 0:
        raise HTTPProblem(400, "_offset must not be negative")
    params = request.query_params
    patient_identifier = [v for v in params.getlist("patient.identifier") + params.getlist("subject.identifier") if v]
    identifier = [v for v in params.getlist("identifier") if v]
    engine = request.app.state.pacs.engine
    uids = [uid for uid in _study_uids(request, patient_identifier, identifier, signed_only=signed_only)
            if may_see_study(request, principal, uid)]
    found = [study_detail(engine, uid) for uid in uids[offset:offset + count]]
    return [d for d in found if d is not None], len(uids)


@router.get("/ImagingStudy", summary="Search ImagingStudy by patient.identifier or identifier")
def search_imaging_studies(request: Request, _count: int = 50, _offset: int = 0,
                           principal: Principal = guard(*READERS, action="query")) -> Response:
    details, total = _search(request, principal, _count, _offset, signed_only=False)
    return _fhir(_bundle(request, [imaging_study(request, d) for d in details], total, _offset, _count))


@router.get("/ImagingStudy/{study}", summary="One ImagingStudy")
def read_imaging_study(request: Request, study: str, _: Any = guard(*READERS, action="view")) -> Response:
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        raise HTTPProblem(404, f"no ImagingStudy {study[:80]!r}")
    return _fhir(imaging_study(request, detail))


@router.get("/DiagnosticReport", summary="Search signed reports by patient.identifier or identifier")
def search_reports(request: Request, _count: int = 50, _offset: int = 0,
                   principal: Principal = guard(*READERS, action="query")) -> Response:
    details, total = _search(request, principal, _count, _offset, signed_only=True)
    service = ReportService(request.app.state.pacs, base_url(request))
    resources = []
    for detail in details:
        report = diagnostic_report(request, detail, service.get(detail["study_uid"], signed_only=True))
        if report is not None:
            resources.append(report)
    return _fhir(_bundle(request, resources, total, _offset, _count))


@router.get("/DiagnosticReport/{report}", summary="One signed report version ({StudyInstanceUID}-v{version})")
def read_report(request: Request, report: str, principal: Principal = guard(*READERS, action="view")) -> Response:
    study, version = _parse_report_id(report)
    # The guard only sees a study named "study" in the path: check it here.
    if not may_see_study(request, principal, study):
        raise HTTPProblem(403, "this study was not referred by you")
    event = getattr(request.state, "audit", None)
    if event is not None:
        event.study_uid = study  # the audit trail names the study read
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        raise HTTPProblem(404, f"no DiagnosticReport {report[:80]!r}")
    try:
        signed = ReportService(request.app.state.pacs, base_url(request)).get(study, signed_only=True)
    except ReportError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None
    resource = diagnostic_report(request, detail, signed, version)
    if resource is None:
        raise HTTPProblem(404, f"no DiagnosticReport {report[:80]!r}")
    return _fhir(resource)


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


# -- capabilities (R4 http.html 3.1.0.13: GET [base]/metadata) ------------------------------
_SEARCH_PARAMS = [
    {"name": "identifier", "type": "token",
     "documentation": "accession number, or urn:dicom:uid|{StudyInstanceUID}"},
    {"name": "patient", "type": "reference",
     "documentation": "chained only: patient.identifier={system|}value (any patient identifier: "
                      "patient ID, citizen ID CCCD, insurance number BHYT); values separated by commas "
                      "match any"},
    {"name": "subject", "type": "reference",
     "documentation": "chained only: subject.identifier, as patient.identifier"},
    {"name": "_count", "type": "number", "documentation": "page size, 1-200 (default 50)"},
    {"name": "_offset", "type": "number", "documentation": "matches to skip (the next links use it)"},
]


def _resource(kind: str, *, search: bool, read: bool, documentation: str) -> dict[str, Any]:
    interactions = ([{"code": "read"}] if read else []) + ([{"code": "search-type"}] if search else [])
    resource: dict[str, Any] = {"type": kind, "interaction": interactions, "documentation": documentation}
    if search:
        resource["searchParam"] = _SEARCH_PARAMS
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
            "security": {"description": "Authorization: Bearer <API token> or a session cookie; "
                                        "roles radiologist, referring (referred studies only), emr, his, admin"},
            "resource": [
                _resource("ImagingStudy", search=True, read=True,
                          documentation="id = StudyInstanceUID; endpoint Endpoint/dicomweb"),
                _resource("DiagnosticReport", search=True, read=True,
                          documentation="signed reports; id = {StudyInstanceUID}-v{version} "
                                        "(u{UID in base 62}-v{version} for UIDs over 61 characters)"),
                _resource("Endpoint", search=False, read=True, documentation="only Endpoint/dicomweb"),
            ],
        }],
    }


@router.get("/metadata", summary="FHIR CapabilityStatement (public)")
def metadata(request: Request) -> Response:
    # Public, like /health: clients read the capabilities before they
    # authenticate (the statement says how), and it holds no patient data.
    return _fhir(capability_statement(request))
