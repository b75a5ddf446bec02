"""JSON API for HIS systems that prefer REST to HL7: create, change and cancel
orders (the same model the HL7 listener fills), update and merge patients
(ADT^A08 and ADT^A40 over JSON), and reconcile studies.

An order is a requested procedure with one scheduled step (the body's step
fields) or several (``steps``: each a worklist item of its own, sharing the
accession and Study Instance UID). GET answers the procedure: its first
step's fields, as before steps, ``status`` the procedure's, and ``steps``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, field_validator

from pacs.audit import Event, patient_cx
from pacs.auth import Principal
from pacs.orders import (
    OrderError, OrderInfo, OrderService, OtherIdentifier, PatientInfo, change_reason, check_person_name, order_subject,
    patients_named, tidy_person_name,
)
from pacs.timezones import hospital_zone

from .errors import HTTPProblem, JsonBody, require_uids
from .security import audit_patients, audit_studies, guard, requires

router = APIRouter(prefix="/api", tags=["orders"])


def _trimmed(value: Any) -> Any:
    """An issuer or other ID without its surrounding spaces (an HIS's
    fixed-width column pads them), as HL7's reader and DICOM (LO) read it:
    kept padded, "BVDK   " was another issuer than the registered
    patient's, and a PUT made a twin patient of it."""
    return value.strip(" ") if isinstance(value, str) else value


class OtherIdModel(JsonBody):
    value: str = Field(..., min_length=1, max_length=64)
    issuer: str = Field("", max_length=64)
    type: str = Field("", max_length=16)

    _trim = field_validator("value", "issuer", mode="before")(_trimmed)


def _person_name(value: str) -> str:
    """A name an order or a correction brings must be a DICOM PN: a backslash
    in it was retrieved by C-GET as two names (see check_person_name); its
    components' padding (an HIS's fixed-width column) goes first, as HL7's
    reader drops it (tidy_person_name)."""
    value = tidy_person_name(value)
    try:
        check_person_name(value)
    except OrderError as exc:
        raise ValueError(str(exc)) from None
    return value


class PatientModel(JsonBody):
    id: str = Field(..., min_length=1, max_length=64, description="Patient ID (e.g. the 12-digit citizen ID)")
    issuer: str = Field("", max_length=64, description="Issuer of the Patient ID, e.g. CCCD")
    name: str = Field("", description="DICOM PN: Family^Given, UTF-8 (Nguyễn^Văn An)")
    birth_date: str = Field("", pattern=r"^(\d{8})?$")
    sex: str = Field("", pattern=r"^[MFO]?$")
    other_ids: list[OtherIdModel] = []

    _name_is_a_pn = field_validator("name")(_person_name)
    _trim = field_validator("issuer", mode="before")(_trimmed)


def _patient_info(body: PatientModel | PatientUpdateModel, patient_id: str, reason: str = "") -> PatientInfo:
    """The patient a body describes: a demographic key absent from it is None
    (the stored value kept), an empty one deletes it."""
    sent = body.model_fields_set
    return PatientInfo(patient_id=patient_id, issuer=body.issuer,
                       name=body.name if "name" in sent else None,
                       birth_date=body.birth_date if "birth_date" in sent else None,
                       sex=body.sex if "sex" in sent else None,
                       other_ids=[OtherIdentifier(o.value, o.issuer, o.type) for o in body.other_ids],
                       reason=reason)


_DATE = r"^(\d{8})?$"
_TIME = r"^(\d{2,6}(\.\d+)?)?$"
# A requested procedure of more steps than this is a mistake, not an exam.
MAX_STEPS = 20


class StepModel(JsonBody):
    """One scheduled procedure step; a value left out is the order's (the top-level field)."""

    # Its length is checked by the core, which names the DICOM attribute (ScheduledProcedureStepID).
    step_id: str = Field("", description="Scheduled Procedure Step ID, unique within the order")
    step_description: str = ""
    # The Scheduled Protocol Code Sequence item (OMI IPC-6 over HL7).
    protocol_code: str = ""
    protocol_code_scheme: str = ""
    protocol_code_meaning: str = ""
    modality: str = Field("", max_length=16)
    station_ae_title: str = Field("", max_length=16)
    station_name: str = ""
    location: str = ""
    start_date: str = Field("", pattern=_DATE)
    start_time: str = Field("", pattern=_TIME)
    performing_physician: str = ""


class OrderModel(StepModel):
    """One requested procedure with its scheduled step (the step fields
    inherited from :class:`StepModel`), or its ``steps``."""

    patient: PatientModel
    accession_number: str = Field(..., min_length=1, max_length=16)
    placer_order_number: str = ""
    filler_order_number: str = ""
    study_uid: str = Field("", description="Study Instance UID to use (generated when empty)")
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    procedure_code: str = ""
    procedure_code_scheme: str = ""
    procedure_code_meaning: str = ""
    referring_physician: str = ""
    priority: str = ""
    reason: str = ""
    steps: list[StepModel] = Field([], max_length=MAX_STEPS,
                                   description="The scheduled steps, when several (each its own worklist item)")

    def to_info(self) -> OrderInfo:
        """The order with its top-level step fields (the one step, or the steps' defaults)."""
        data = self.model_dump(exclude={"patient", "steps"})
        return OrderInfo(patient=_patient_info(self.patient, self.patient.id), **data)

    def to_steps(self) -> list[OrderInfo]:
        """One OrderInfo per scheduled step: the top-level values with each
        step's own (what a step leaves empty is the order's)."""
        order = self.to_info()
        if not self.steps:
            return [order]
        return [replace(order, **{k: v for k, v in step.model_dump().items() if v}) for step in self.steps]


class PatientUpdateModel(JsonBody):
    """New demographics of the patient the path names (ADT^A08 over JSON). A
    key left out keeps the stored value; an empty one deletes it. An unknown
    key is refused: "birthdate" for "birth_date" would change nothing."""

    model_config = ConfigDict(extra="forbid")
    issuer: str = Field("", max_length=64, description="Issuer of the Patient ID in the path, e.g. CCCD")
    name: str = Field("", max_length=320, description="DICOM PN: Family^Given, UTF-8 (Nguyễn^Văn An)")
    birth_date: str = Field("", pattern=r"^(\d{8})?$")
    sex: str = Field("", pattern=r"^[MFO]?$")
    other_ids: list[OtherIdModel] = Field([], max_length=20)
    reason: str = Field("", max_length=200, description="Why (kept with the corrections of the patient's studies)")

    _trim = field_validator("issuer", mode="before")(_trimmed)


class PriorIdModel(JsonBody):
    id: str = Field(..., min_length=1, max_length=64)
    issuer: str = Field("", max_length=64)

    _trim = field_validator("issuer", mode="before")(_trimmed)


class MergeModel(JsonBody):
    """ADT^A40 over JSON: the prior patient (named by its identifiers, as
    MRG-1 names one patient) is merged into *patient*."""

    model_config = ConfigDict(extra="forbid")
    patient: PriorIdModel = Field(..., description="The surviving patient")
    prior: list[PriorIdModel] = Field(..., min_length=1, max_length=10,
                                      description="Identifiers of the ONE prior patient, the hospital number first")
    reason: str = Field("", max_length=200, description="Why (kept with the corrections of the moved studies)")


class MoveStudyModel(JsonBody):
    """The patient a study is filed under instead (its demographics make a
    new patient of a key not yet known; an existing patient's must match)."""

    model_config = ConfigDict(extra="forbid")
    patient: PatientModel
    reason: str = Field(..., min_length=1, max_length=200,
                        description="Why (audited, and kept with the study's corrections)")


class MatchModel(JsonBody):
    accession_number: str = Field(..., min_length=1)


def _service(request: Request) -> OrderService:
    pacs = request.app.state.pacs
    return OrderService(pacs.engine, hospital_zone(pacs.settings), order_status=pacs.settings.his_order_status,
                        prefetch=bool(pacs.settings.prefetch_sources))


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OrderError as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


def _audit_orders(request: Request, *orders: dict[str, Any] | None) -> None:
    """Name the study and patient of each order (:func:`pacs.orders.order_subject`)
    in the route's audit event, as an HL7 order message's event names its
    patient: the path names neither, and ``pacs audit --patient`` must find
    an order, a change of its patient's demographics, a read of it."""
    audit_studies(request, [order_subject(order) for order in orders if order])


def _audit_note(request: Request, note: str) -> None:
    """Add *note* to the route's audit event (what the path does not say)."""
    event = getattr(request.state, "audit", None)
    if isinstance(event, Event):
        event.detail = f"{event.detail}; {note}"[:500]


@router.post("/orders", status_code=201, summary="Create an order (it appears in the worklist)",
             dependencies=requires("his", "admin", action="order"))
def create_order(request: Request, order: OrderModel) -> dict[str, Any]:
    steps = order.to_steps()
    # Refused, the event still names whom the order was for.
    audit_patients(request, patients_named([("place", step) for step in steps]))
    placed = _call(_service(request).place_steps, steps, "json")
    _audit_orders(request, placed)
    return placed


# :path: an accession number may hold a "/" (legal in SH; "CT/2024/0153"), which arrives decoded
# (the share routes of an order, /api/orders/{accession}/shares, are matched first: see viewer_api.app).
@router.put("/orders/{accession:path}", summary="Change an order (the steps named by step_id; new ones are added)",
            dependencies=requires("his", "admin", action="order"))
def change_order(request: Request, accession: str, order: OrderModel) -> dict[str, Any]:
    if order.accession_number != accession:
        raise HTTPProblem(400, "accession number in the body differs from the URL")
    service = _service(request)
    steps = order.to_steps()
    before = service.get(accession)
    if before is not None:
        _audit_orders(request, before)
    else:
        audit_patients(request, patients_named([("change", step) for step in steps]))
    changed = _call(service.change_steps, steps, "json")
    # The patient it is for now, and the one it was moved away from.
    _audit_orders(request, changed, before)
    if before is not None and (before["patient_id"], before["issuer"]) == (changed["patient_id"], changed["issuer"]) \
            and before["name"] != changed["name"]:
        _audit_note(request, "the patient's name changed")
    return changed


@router.delete("/orders/{accession:path}", summary="Cancel an order, or one step of it (it leaves the worklist)",
               dependencies=requires("his", "admin", action="order"))
def cancel_order(request: Request, accession: str, step_id: str = "") -> dict[str, Any]:
    """Every step not performed yet is cancelled; with ``step_id``, that step only."""
    service = _service(request)
    _audit_orders(request, service.get(accession))
    info = OrderInfo(patient=PatientInfo(patient_id="-"), accession_number=accession, step_id=step_id)
    return _call(service.cancel, info)


@router.get("/orders/{accession:path}", summary="One order, its status and its steps",
            dependencies=requires("his", "admin", "radiologist", action="query"))
def get_order(request: Request, accession: str) -> dict[str, Any]:
    order = _service(request).get(accession)
    if order is None:
        raise HTTPProblem(404, f"no order {accession}")
    _audit_orders(request, order)
    return order


@router.get("/studies/unmatched", summary="Studies no HIS order explains",
            dependencies=requires("admin", action="query"))
def unmatched(request: Request, limit: int = 100) -> list[dict[str, Any]]:
    if not 1 <= limit <= 1000:
        raise HTTPProblem(400, "limit must be 1-1000")
    rows = _service(request).unmatched_studies(limit)
    audit_patients(request, [patient_cx(row["patient_id"], row["issuer"]) for row in rows])
    return rows


def _write_audit_first(request: Request) -> None:
    """Write the audit events queued so far before a study changes patient:
    an event names the patient its study is filed under when it is written
    (pacs.audit), and the signature made just before the move was written
    after it, naming the patient the report was not signed for."""
    request.app.state.pacs.audit.flush()


@router.post("/studies/{study}/match", summary="Link a study to an order by hand",
             dependencies=requires("admin", action="order"))
def match_study(request: Request, study: str, body: MatchModel) -> dict[str, Any]:
    service = _service(request)
    _write_audit_first(request)
    previous = service.study_patient(study)
    order = _call(service.match, study, body.accession_number)
    # The study, under its order's patient now, and the patient it left.
    audit_studies(request, [(study, order_subject(order)[1]), (study, previous)])
    _audit_note(request, f"linked to order {order['accession_number']}")
    return order


@router.post("/studies/{study}/patient",
             summary="File a study under another patient (the wrong patient chosen or typed at the modality, "
                     "where no HIS order files it); retrieved with that patient's ID and demographics")
def move_study(request: Request, study: str, body: MoveStudyModel, dry_run: bool = False,
               principal: Principal = guard("his", "admin", action="study-move")) -> dict[str, Any]:
    # As the other /api/studies/{uid} routes: what is no UID is a bad request, not "no study".
    require_uids(study, name="Study Instance UID")
    service = _service(request)
    info = _patient_info(body.patient, body.patient.id,
                         change_reason("study moved to another patient", principal.username, body.reason))
    if not dry_run:
        _write_audit_first(request)
    moved = _call(lambda: service.move_study(study, info, dry_run=dry_run))
    # The study under the patient it now has, and the patient it left.
    audit_studies(request, [(study, patient_cx(moved["patient"]["id"], moved["patient"]["issuer"])),
                            (study, moved["previous"])])
    _audit_note(request, ("dry run: " if dry_run else "") + f"from {moved['previous']}: {body.reason}")
    return {**moved, "dry_run": dry_run}


@router.get("/studies/{study}/corrections", summary="What the index corrected for a study",
            dependencies=requires("admin", "radiologist", action="view"))
def corrections(request: Request, study: str) -> list[dict[str, Any]]:
    return _service(request).corrections(study)


# :path: a Patient ID may hold a "/" (legal in LO), which arrives decoded.
@router.put("/patients/{patient_id:path}",
            summary="Create a patient or change their demographics (ADT^A08 over JSON); the studies already "
                    "stored are retrieved with the new values")
def update_patient(request: Request, patient_id: str, body: PatientUpdateModel,
                   principal: Principal = guard("his", "admin", action="patient-update")) -> dict[str, Any]:
    named = patient_cx(patient_id, body.issuer)
    audit_patients(request, [named])
    updated = _call(_service(request).correct_patient,
                    _patient_info(body, patient_id, change_reason("patient update", principal.username, body.reason)))
    # The patient changed, as stored: an ID sent without issuer names the one patient holding it under one.
    audit_patients(request, dict.fromkeys([patient_cx(updated["id"], updated["issuer"]), named]))
    return updated


@router.post("/patients/merge",
             summary="Merge a prior patient (a duplicate registration) into this one (ADT^A40 over JSON): their "
                     "studies move here and are retrieved with this patient's demographics; cannot be undone")
def merge_patient(request: Request, body: MergeModel,
                  principal: Principal = guard("his", "admin", action="patient-merge")) -> dict[str, Any]:
    kept = body.patient
    named = [patient_cx(kept.id, kept.issuer)] + [patient_cx(p.id, p.issuer) for p in body.prior]
    audit_patients(request, named)
    surviving = PatientInfo(patient_id=kept.id, issuer=kept.issuer,
                            reason=change_reason("patient merge", principal.username, body.reason))
    moved, patient = _call(_service(request).merge_into, surviving, [(p.id, p.issuer) for p in body.prior])
    if patient:
        audit_patients(request, dict.fromkeys([patient_cx(patient["id"], patient["issuer"]), *named]))
    return {"moved_studies": moved, "patient": patient}


@router.get("/patients/{patient_id:path}", summary="A patient as the index holds them (demographics, other IDs)",
            dependencies=requires("his", "admin", action="query"))
def get_patient(request: Request, patient_id: str, issuer: str | None = None) -> dict[str, Any]:
    """Without ``?issuer=`` the patient a PUT without issuer changes (the
    one holding the ID under an issuer, when none holds it without)."""
    named = patient_cx(patient_id, issuer or "")
    audit_patients(request, [named])
    found = _service(request).patient(patient_id, issuer)
    if found is None:
        raise HTTPProblem(404, f"no patient {named}")
    audit_patients(request, dict.fromkeys([patient_cx(found["id"], found["issuer"]), named]))
    return found
