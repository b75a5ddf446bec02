"""FHIR R4 for the EMR: ImagingStudy and DiagnosticReport searches, and the
Endpoint of our DICOMweb service. Patients are found by any identifier,
the citizen ID (CCCD) and insurance number included; studies also by
accession number. JSON only (``application/fhir+json``)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import or_, select

from pacs.auth import Principal
from pacs.index.models import PatientIdentifier
from pacs.query.attributes import patients, studies
from pacs.reports import ReportService
from pacs.studylist import study_detail

from .dicomjson import dumps
from .errors import HTTPProblem
from .security import READERS, guard, may_see_study
from .urls import base_url

router = APIRouter(prefix="/fhir", tags=["FHIR R4"])
FHIR_JSON = "application/fhir+json"
identifiers = PatientIdentifier.__table__
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def _fhir(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), media_type=FHIR_JSON, status_code=status)


def _split(token: str) -> tuple[str | None, str]:
    """A FHIR token search value: ``system|value`` or ``value``."""
    if "|" in token:
        system, value = token.split("|", 1)
        return system, value
    return None, token


def _study_uids(request: Request, patient_identifier: str, identifier: str, limit: int) -> list[str]:
    engine = request.app.state.pacs.engine
    stmt = select(studies.c.study_uid).join(patients, patients.c.pk == studies.c.patient_pk)
    if patient_identifier:
        system, value = _split(patient_identifier)
        # The system is the issuer (CCCD, BHYT...) or a URI ending with it.
        issuer = system.rsplit("/", 1)[-1].rsplit(":", 1)[-1] if system else None
        own = patients.c.patient_id == value
        if issuer:
            own = own & (patients.c.issuer == issuer)
        other = select(identifiers.c.patient_pk).where(identifiers.c.value == value)
        if issuer:
            other = other.where(identifiers.c.issuer == issuer)
        stmt = stmt.where(or_(own, patients.c.pk.in_(other)))
    if identifier:
        system, value = _split(identifier)
        if system == "urn:dicom:uid":
            stmt = stmt.where(studies.c.study_uid == value.removeprefix("urn:oid:"))
        else:
            stmt = stmt.where(studies.c.accession_number == value)
    if not patient_identifier and not identifier:
        raise HTTPProblem(400, "search by patient.identifier or identifier (accession or urn:dicom:uid)")
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(stmt.order_by(studies.c.study_date.desc()).limit(limit))]


def _patient_ref(detail: dict[str, Any]) -> dict[str, Any]:
    return {"identifier": {"value": detail["patient_id"]}, "display": (detail["patient_name"] or "").replace("^", " ")}


def _datetime(date: str, time: str) -> str | None:
    if len(date) != 8:
        return None
    t = (time or "000000").split(".")[0].ljust(6, "0")
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}T{t[:2]}:{t[2:4]}:{t[4:6]}"


def imaging_study(request: Request, detail: dict[str, Any]) -> dict[str, Any]:
    base = base_url(request)
    series = [s for s in detail["series"]]
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": detail["study_uid"],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{detail['study_uid']}"}],
        "status": "available",
        "subject": _patient_ref(detail),
        "numberOfSeries": len(series),
        "numberOfInstances": sum(s["num_instances"] for s in series),
        "modality": [{"system": DCM, "code": m} for m in detail["modalities"].split("\\") if m],
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
    started = _datetime(detail["study_date"], detail["study_time"])
    if started:
        resource["started"] = started
    return resource


def diagnostic_report(request: Request, detail: dict[str, Any], report: dict[str, Any]) -> dict[str, Any] | None:
    signed = report["versions"]
    if not signed:
        return None
    current = signed[-1]
    base = base_url(request)
    text = f"{current['findings']}\n\n{current['impression']}".strip()
    return {
        "resourceType": "DiagnosticReport",
        "id": f"{detail['study_uid']}-v{current['version']}",
        "status": "final" if current["version"] == 1 else "amended",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": _patient_ref(detail),
        "issued": current["signed_at"],
        "resultsInterpreter": [{"display": current["signed_by"]}],
        "imagingStudy": [{"reference": f"ImagingStudy/{detail['study_uid']}"}],
        "identifier": [{"type": ACSN, "value": detail["accession"]}] if detail["accession"] else [],
        "conclusion": current["impression"],
        "presentedForm": [
            {"contentType": "application/pdf", "url": f"{base}/api/studies/{detail['study_uid']}/report/pdf?version={current['version']}",
             "title": "Imaging report"},
            {"contentType": "text/plain; charset=utf-8", "data": base64.b64encode(text.encode()).decode()},
        ],
    }


def _bundle(request: Request, resources: list[dict[str, Any]]) -> dict[str, Any]:
    base = base_url(request) + "/fhir"
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                  for r in resources],
    }


def _details(request: Request, principal: Principal, patient_identifier: str, identifier: str,
             count: int) -> list[dict[str, Any]]:
    if not 1 <= count <= 200:
        raise HTTPProblem(400, "_count must be 1-200")
    engine = request.app.state.pacs.engine
    uids = [uid for uid in _study_uids(request, patient_identifier, identifier, count)
            if may_see_study(request, principal, uid)]
    found = [study_detail(engine, uid) for uid in uids]
    return [d for d in found if d is not None]


@router.get("/ImagingStudy", summary="Search ImagingStudy by patient.identifier or identifier")
def search_imaging_studies(request: Request, identifier: str = "", _count: int = 50,
                           principal: Principal = guard(*READERS, action="query")) -> Response:
    patient_identifier = request.query_params.get("patient.identifier", "") or request.query_params.get("subject.identifier", "")
    details = _details(request, principal, patient_identifier, identifier, _count)
    return _fhir(_bundle(request, [imaging_study(request, d) for d in details]))


@router.get("/ImagingStudy/{study}", summary="One ImagingStudy")
def read_imaging_study(request: Request, study: str, _: Any = guard(*READERS, action="view")) -> Response:
    detail = study_detail(request.app.state.pacs.engine, study)
    if detail is None:
        return _fhir({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found",
                                                                       "diagnostics": f"no study {study}"}]}, 404)
    return _fhir(imaging_study(request, detail))


@router.get("/DiagnosticReport", summary="Search signed reports by patient.identifier or identifier")
def search_reports(request: Request, identifier: str = "", _count: int = 50,
                   principal: Principal = guard(*READERS, action="query")) -> Response:
    patient_identifier = request.query_params.get("patient.identifier", "") or request.query_params.get("subject.identifier", "")
    service = ReportService(request.app.state.pacs, base_url(request))
    resources = []
    for detail in _details(request, principal, patient_identifier, identifier, _count):
        report = diagnostic_report(request, detail, service.get(detail["study_uid"], signed_only=True))
        if report is not None:
            resources.append(report)
    return _fhir(_bundle(request, resources))


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
