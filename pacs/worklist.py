"""The Modality Worklist as a query on orders (PS3.4 K.6), answered from the
index with the same matching rules as C-FIND and QIDO-RS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, and_, or_, select

from .index.models import Order, Patient, PatientIdentifier
from .query.results import dicom_id_type
from .query.matching import (
    QueryError,
    list_match,
    patient_id_match,
    pn_match,
    range_match,
    text_match,
)

orders = Order.__table__
patients = Patient.__table__
identifiers = PatientIdentifier.__table__

# Matching keys: top-level keyword -> order/patient column (text matching).
_TEXT_KEYS = {
    "AccessionNumber": orders.c.accession_number,
    "RequestedProcedureID": orders.c.requested_procedure_id,
    "IssuerOfPatientID": patients.c.issuer,
    "PatientSex": patients.c.sex,
    "RequestedProcedurePriority": orders.c.priority,
}
_STEP_TEXT_KEYS = {
    "Modality": orders.c.modality,
    "ScheduledStationAETitle": orders.c.station_ae_title,
    "ScheduledProcedureStepID": orders.c.step_id,
    "ScheduledStationName": orders.c.station_name,
    "ScheduledProcedureStepLocation": orders.c.location,
    "ScheduledProcedureStepStatus": orders.c.status,
}


def worklist_conditions(match: dict[str, str], step: dict[str, str]) -> list[Any]:
    """SQL conditions for the top-level and Scheduled Procedure Step keys."""
    conditions: list[Any] = []
    for keyword, value in match.items():
        if not value:
            continue
        if keyword == "PatientName":
            conditions.append(pn_match(value, patients.c.name_folded, patients.c.name_words))
        elif keyword == "PatientID":
            conditions.append(patient_id_match(value))
        elif keyword == "PatientBirthDate":
            conditions.append(range_match(patients.c.birth_date, value))
        elif keyword == "StudyInstanceUID":
            conditions.append(orders.c.study_uid.in_([u for u in value.split("\\") if u]))
        elif keyword == "ReferringPhysicianName":
            conditions.append(text_match(orders.c.referring_physician, value))
        elif keyword in _TEXT_KEYS:
            conditions.append(list_match(_TEXT_KEYS[keyword], value))
        else:
            raise QueryError(f"matching on {keyword} is not supported in the worklist")
    for keyword, value in step.items():
        if not value:
            continue
        if keyword == "ScheduledProcedureStepStartDate":
            conditions.append(range_match(orders.c.start_date, value))
        elif keyword == "ScheduledProcedureStepStartTime":
            conditions.append(range_match(orders.c.start_time, value, is_time=True))
        elif keyword == "ScheduledPerformingPhysicianName":
            conditions.append(text_match(orders.c.performing_physician, value))
        elif keyword == "ScheduledStationAETitle":
            # A step the HIS did not assign to a station is offered to every
            # station that asks (most HIS send no AE title in ORM^O01).
            conditions.append(or_(list_match(orders.c.station_ae_title, value), orders.c.station_ae_title == ""))
        elif keyword in _STEP_TEXT_KEYS:
            conditions.append(list_match(_STEP_TEXT_KEYS[keyword], value))
        else:
            raise QueryError(f"matching on {keyword} in the Scheduled Procedure Step is not supported")
    if not step.get("ScheduledProcedureStepStatus"):
        # What is still to be done: finished or cancelled steps leave the list.
        conditions.append(orders.c.status.in_(["SCHEDULED", "IN PROGRESS"]))
    return conditions


def run_worklist(engine: Engine, match: dict[str, str], step: dict[str, str], *, limit: int = 1000) -> Iterator[dict[str, Any]]:
    """Scheduled procedure steps matching the keys, soonest first."""
    stmt = (
        select(orders, patients.c.name.label("patient_name"), patients.c.patient_id,
               patients.c.issuer, patients.c.birth_date, patients.c.sex, patients.c.pk.label("ppk"))
        .join(patients, patients.c.pk == orders.c.patient_pk)
        .where(and_(*worklist_conditions(match, step)))
        .order_by(orders.c.start_date, orders.c.start_time, orders.c.pk)
        .limit(limit)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
        patient_pks = {r["ppk"] for r in rows}
        others: dict[int, list[dict[str, str]]] = {}
        if patient_pks:
            for ident in conn.execute(select(identifiers).where(identifiers.c.patient_pk.in_(patient_pks))):
                others.setdefault(ident.patient_pk, []).append(
                    {"PatientID": ident.value, "IssuerOfPatientID": ident.issuer,
                     "TypeOfPatientID": dicom_id_type(ident.id_type)}
                )
    for row in rows:
        item = dict(row)
        item["other_ids"] = others.get(row["ppk"], [])
        yield item
