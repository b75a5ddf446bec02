"""The Modality Worklist as a query on orders (PS3.4 K.6), answered from the
index with the same matching rules as C-FIND and QIDO-RS.

An item is one scheduled procedure step (a row of ``orders``): the steps of
a requested procedure are items of their own with its accession, Study
Instance UID and Requested Procedure ID, each matched on its own modality,
station, start and status (a station asking sees the steps scheduled for it).

Every match is returned, read from the database a page at a time (keyset on
the order of the answer), so a worklist of any length is answered whole in
bounded memory. Keys the worklist does not match on are ignored for matching
(PS3.4 C.2.2.1.3, K.2.2.1.1.2) and returned like any other requested key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, case, literal, or_, select

from .index.models import Order, Patient, PatientIdentifier
from .names import fold, fold_name, name_reading, name_words
from .query.attributes import QUALIFIERS, Kind
from .query.matching import (
    QueryError,
    check_characters,
    check_range,
    list_match,
    patient_id_match,
    pn_match,
    qualifying_issuer,
    range_match,
    universal,
)
from .query.results import dicom_id_type

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
    "ScheduledProcedureStepID": orders.c.step_id,
    "ScheduledStationName": orders.c.station_name,
    "ScheduledProcedureStepLocation": orders.c.location,
}
# Every key the worklist matches on; any other key with a value is ignored
# for matching and only returned.
MATCHED_KEYS = frozenset({"PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                          "ReferringPhysicianName", *_TEXT_KEYS})
MATCHED_STEP_KEYS = frozenset({"ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
                               "ScheduledPerformingPhysicianName", "ScheduledStationAETitle",
                               "ScheduledProcedureStepStatus", *_STEP_TEXT_KEYS})

# What is still to be done: the steps a query without a status asks for.
ACTIVE_STATUSES = ("SCHEDULED", "IN PROGRESS")
# Orders keep the MPPS word for a step being performed; Scheduled Procedure
# Step Status (0040,0020) says STARTED (PS3.3 C.4.10: "at least one Performed
# Procedure Step has been created that references this Scheduled Procedure
# Step"). A query for IN PROGRESS still finds them (it did before): the
# stored word is read as the DICOM term in a query too.
_SPS_STATUS = {"IN PROGRESS": "STARTED"}
_SPS_STATUS_COLUMN = case(
    *((orders.c.status == stored, literal(term)) for stored, term in _SPS_STATUS.items()),
    else_=orders.c.status,
)


def sps_status(stored: str) -> str:
    """The Scheduled Procedure Step Status answered for an order's status."""
    return _SPS_STATUS.get(stored, stored.replace(" ", "")[:16])


def ignored_keys(match: dict[str, str], step: dict[str, str]) -> list[str]:
    """Keys given a (non-universal) value that the worklist does not match
    on: optional keys, ignored for matching and returned (PS3.4 C.2.2.1.3).
    Qualifiers (Specific Character Set, Query/Retrieve Level...) are no
    matching keys at all and are not listed."""
    top = [k for k, v in match.items() if not universal(v) and k not in MATCHED_KEYS and k not in QUALIFIERS]
    inner = [k for k, v in step.items() if not universal(v) and k not in MATCHED_STEP_KEYS and k not in QUALIFIERS]
    return top + inner


RowFilter = Callable[[Mapping[str, Any]], bool]


def _pn_filter(column: str, value: str) -> RowFilter:
    """Person-name matching of an order column in Python, with the rules of
    :func:`pacs.query.matching.pn_match` (folded: no case, no diacritics;
    a value without "^" matched as words, in the order of the components or
    as the name is read). Orders keep physician names as the HIS sent them,
    without a folded column to search in SQL."""
    words = "^" not in value and "=" not in value
    wanted = " ".join(fold(value).split()) if words else fold_name(value)
    form = name_words if words else fold_name
    pattern = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted), re.DOTALL)

    def matches(row: Any) -> bool:
        stored = row[column] or ""
        if pattern.fullmatch(form(stored)) is not None:
            return True
        if words and (reading := name_reading(stored)) and pattern.fullmatch(reading) is not None:
            return True
        # A value without "=" is one group of the name (PS3.4 C.2.2.2.1), as in pn_match.
        return "=" not in value and "=" in stored and any(
            pattern.fullmatch(form(group)) is not None for group in stored.split("="))

    return matches


def _status_condition(value: str) -> Any:
    parts = [_SPS_STATUS.get(p.strip(), p) for p in value.split("\\")]
    return list_match(_SPS_STATUS_COLUMN, "\\".join(parts))


def expired_before(days: int, zone: tzinfo) -> str:
    """The first scheduled date (YYYYMMDD) still offered when steps expire
    *days* after it, in the hospital's *zone* ("" when they never do)."""
    if not days:
        return ""
    return (datetime.now(zone).date() - timedelta(days=days)).strftime("%Y%m%d")


def _plan(match: dict[str, str], step: dict[str, str]) -> tuple[list[Any], list[RowFilter]]:
    """SQL conditions and Python row filters for the keys; QueryError for a
    value that cannot be matched (a malformed date or time, a control
    character, as in Q/R C-FIND: one shared check)."""
    for keyword, value in (*match.items(), *step.items()):
        check_characters(keyword, value)
    conditions: list[Any] = []
    filters: list[RowFilter] = []
    # An issuer given with a Patient ID qualifies that ID (see patient_id_match).
    issuer = qualifying_issuer(match)
    for keyword, value in match.items():
        if universal(value) or keyword not in MATCHED_KEYS or (issuer and keyword == "IssuerOfPatientID"):
            continue
        if keyword == "PatientName":
            conditions.append(pn_match(value, patients.c.name_folded, patients.c.name_words, patients.c.name_reading))
        elif keyword == "PatientID":
            conditions.append(patient_id_match(value, issuer=issuer))
        elif keyword == "PatientBirthDate":
            check_range(keyword, value, Kind.DATE)
            conditions.append(range_match(patients.c.birth_date, value))
        elif keyword == "StudyInstanceUID":
            conditions.append(orders.c.study_uid.in_([u for u in value.split("\\") if u]))
        elif keyword == "ReferringPhysicianName":
            filters.append(_pn_filter("referring_physician", value))
        else:
            conditions.append(list_match(_TEXT_KEYS[keyword], value))
    for keyword, value in step.items():
        if universal(value) or keyword not in MATCHED_STEP_KEYS:
            continue
        if keyword == "ScheduledProcedureStepStartDate":
            check_range(keyword, value, Kind.DATE)
            conditions.append(range_match(orders.c.start_date, value))
        elif keyword == "ScheduledProcedureStepStartTime":
            check_range(keyword, value, Kind.TIME)
            conditions.append(range_match(orders.c.start_time, value, is_time=True))
        elif keyword == "ScheduledPerformingPhysicianName":
            filters.append(_pn_filter("performing_physician", value))
        elif keyword == "ScheduledStationAETitle":
            # A step the HIS did not assign to a station is offered to every
            # station that asks (most HIS send no AE title in ORM^O01).
            conditions.append(or_(list_match(orders.c.station_ae_title, value), orders.c.station_ae_title == ""))
        elif keyword == "ScheduledProcedureStepStatus":
            conditions.append(_status_condition(value))
        else:
            conditions.append(list_match(_STEP_TEXT_KEYS[keyword], value))
    if universal(step.get("ScheduledProcedureStepStatus", "")):
        # What is still to be done: finished or cancelled steps leave the list
        # (also for "*", which is universal matching, not "every status").
        conditions.append(orders.c.status.in_(ACTIVE_STATUSES))
    return conditions, filters


def worklist_conditions(match: dict[str, str], step: dict[str, str]) -> list[Any]:
    """SQL conditions for the top-level and Scheduled Procedure Step keys
    (person names of physicians are matched on the rows, see :func:`run_worklist`)."""
    return _plan(match, step)[0]


def run_worklist(engine: Engine, match: dict[str, str], step: dict[str, str], *,
                 page: int = 500, expired: str = "") -> Iterator[dict[str, Any]]:
    """Every scheduled procedure step matching the keys, soonest first
    (each step of a requested procedure on its own).

    *expired* (:func:`expired_before`): a step still SCHEDULED whose date
    is before it is not offered any more (``worklist_expire_days``): a
    modality without MPPS, or an exam never done nor cancelled, left it on
    the list for ever, and a console asking without a date range (common on
    ultrasound) got an ever longer worklist. A date condition on the
    indexed start date; the order itself stays (reports, the HIS).

    Raises :class:`QueryError` at once, before any row is read, for a key
    it cannot match. The rows are then read *page* at a time as the
    caller consumes them, no connection held in between.
    """
    conditions, filters = _plan(match, step)
    if expired:
        conditions.append(or_(orders.c.status != "SCHEDULED", orders.c.start_date >= expired))
    stmt = (
        select(orders, patients.c.name.label("patient_name"), patients.c.patient_id,
               patients.c.issuer, patients.c.birth_date, patients.c.sex, patients.c.pk.label("ppk"))
        .join(patients, patients.c.pk == orders.c.patient_pk)
        .where(*conditions)
        .order_by(orders.c.start_date, orders.c.start_time, orders.c.pk)
    )
    return _pages(engine, stmt, filters, page)


def _after(start_date: str, start_time: str, pk: int) -> Any:
    """Rows after (start_date, start_time, pk) in the answer's order: the
    keyset of the next page (an index range, not an ever larger OFFSET)."""
    return or_(
        orders.c.start_date > start_date,
        and_(orders.c.start_date == start_date, orders.c.start_time > start_time),
        and_(orders.c.start_date == start_date, orders.c.start_time == start_time, orders.c.pk > pk),
    )


def _pages(engine: Engine, stmt: Select[Any], filters: list[RowFilter], page: int) -> Iterator[dict[str, Any]]:
    last: tuple[str, str, int] | None = None
    while True:
        paged = stmt if last is None else stmt.where(_after(*last))
        with engine.connect() as conn:
            rows = conn.execute(paged.limit(page)).mappings().all()
            wanted = [r for r in rows if all(f(r) for f in filters)]
            others = _other_ids(conn, {r["ppk"] for r in wanted})
        for row in wanted:
            item = dict(row)
            item["other_ids"] = others.get(row["ppk"], [])
            yield item
        if len(rows) < page:
            return
        last = (rows[-1]["start_date"], rows[-1]["start_time"], rows[-1]["pk"])


def _other_ids(conn: Connection, patient_pks: set[int]) -> dict[int, list[dict[str, str]]]:
    others: dict[int, list[dict[str, str]]] = {}
    if patient_pks:
        for ident in conn.execute(select(identifiers).where(identifiers.c.patient_pk.in_(patient_pks))
                                  .order_by(identifiers.c.pk)):
            others.setdefault(ident.patient_pk, []).append(
                {"PatientID": ident.value, "IssuerOfPatientID": ident.issuer,
                 "TypeOfPatientID": dicom_id_type(ident.id_type)}
            )
    return others


__all__ = ["ACTIVE_STATUSES", "MATCHED_KEYS", "MATCHED_STEP_KEYS", "QueryError", "expired_before", "ignored_keys",
           "run_worklist", "sps_status", "universal", "worklist_conditions"]
