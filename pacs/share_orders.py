"""Share links bound to an order (pacs.shares): what the index says of it.

In Vietnamese hospitals the receipt with the QR code is printed when the
patient registers and pays, before the scan: the HIS knows the order (its
accession number), not a Study Instance UID. A link made then names the
order, and shows the studies linked to it later, whenever they come.

Which studies those are is decided by reconciliation alone (pacs.orders,
pacs.index.reconcile): the rows of ``study_orders`` that name one of the
order's steps, written when a study arrives with the order's Study Instance
UID or (plausibly) its accession, when the order comes after its study, or
when a person matches it by hand. A study that merely carries the same
Accession Number but was not linked (an old PACS's study whose accession
the HIS counter repeats: another patient) is never shown, and a study
matched away to another order leaves the link at once.

An order is a requested procedure: the rows of one accession number, one
per scheduled step, its first row standing for it (pacs.index.models.Order).
The accession alone names it, whatever the patient's issuer: placing a
procedure under an accession that exists is refused (409, AE 205), and the
steps of one procedure share its Study Instance UID, Requested Procedure ID
and patient. Rows of one accession that disagree on those (an index edited
by hand, or filled by another tool) would be several orders under one
accession; :func:`order_target` counts them, and the caller refuses (409).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, select

from .audit import patient_cx
from .index.models import Order, Patient, Study, StudyOrderLink
from .orders import procedure_status

orders_t = Order.__table__
patients_t = Patient.__table__
studies_t = Study.__table__
links_t = StudyOrderLink.__table__

# Procedure statuses of an order the HIS withdrew (HL7 ORC-1 CA, DC;
# DELETE /api/orders/{accession}): its link shows nothing more (410).
WITHDRAWN = ("CANCELLED", "DISCONTINUED")


@dataclass(frozen=True)
class OrderTarget:
    """An order as a share link needs it: the row that stands for it
    (*pk*), its Study Instance UID, referring physician (the access check
    of the referring role), status, patient (as audit events name it) and
    what the patient's page says of it before the images come."""

    pk: int
    accession: str
    study_uid: str
    referring_physician: str
    status: str
    patient: str
    # How many requested procedures the accession's rows make (1; more: ambiguous).
    procedures: int = 1
    start_date: str = ""
    start_time: str = ""
    procedure: str = ""
    modalities: str = ""
    patient_name: str = ""


def _procedure_key(row: Any) -> tuple[str, str, int]:
    """What the rows of one requested procedure share besides the accession."""
    return (row.study_uid, row.requested_procedure_id, row.patient_pk)


def _procedure_name(row: Any) -> str:
    """What the exam is called, as the patient's receipt names it."""
    return str(row.requested_procedure_description or row.procedure_code_meaning or row.step_description or "")


def _rows(conn: Connection, accession: str) -> list[Any]:
    return list(conn.execute(
        select(orders_t, patients_t.c.patient_id, patients_t.c.issuer, patients_t.c.name.label("patient_name"))
        .join(patients_t, patients_t.c.pk == orders_t.c.patient_pk)
        .where(orders_t.c.accession_number == accession).order_by(orders_t.c.pk)
    ).all())


def _target(rows: list[Any], procedures: int) -> OrderTarget:
    """The order the steps *rows* make, its first row standing for it."""
    first = rows[0]
    modalities = list(dict.fromkeys(row.modality for row in rows if row.modality))
    return OrderTarget(
        pk=first.pk, accession=first.accession_number, study_uid=first.study_uid,
        referring_physician=first.referring_physician or "", status=procedure_status(row.status for row in rows),
        patient=patient_cx(first.patient_id, first.issuer), procedures=procedures,
        start_date=first.start_date or "", start_time=first.start_time or "", procedure=_procedure_name(first),
        modalities="/".join(modalities), patient_name=first.patient_name or "",
    )


def order_target(conn: Connection, accession: str) -> OrderTarget | None:
    """The order *accession* (None: there is none), with the number of
    orders its rows make (:attr:`OrderTarget.procedures`, 1 unless the
    index holds rows of one accession that disagree)."""
    rows = _rows(conn, accession)
    if not rows:
        return None
    key = _procedure_key(rows[0])
    return _target([row for row in rows if _procedure_key(row) == key], len({_procedure_key(r) for r in rows}))


def _procedure_rows(conn: Connection, order_pk: int) -> list[Any]:
    """The steps of the order whose first row is *order_pk*: its accession's
    rows of the same procedure (all of them, in an index that holds one
    order per accession, as the model makes it)."""
    accession = conn.execute(select(orders_t.c.accession_number).where(orders_t.c.pk == order_pk)).scalar()
    rows = _rows(conn, accession) if accession is not None else []
    bound = next((row for row in rows if row.pk == order_pk), None)
    return [row for row in rows if _procedure_key(row) == _procedure_key(bound)] if bound is not None else []


def bound_order(conn: Connection, order_pk: int) -> OrderTarget | None:
    """The order a link names by its row *order_pk* (None: no such row)."""
    rows = _procedure_rows(conn, order_pk)
    return _target(rows, 1) if rows else None


def order_statuses(conn: Connection, order_pks: set[int]) -> dict[int, str]:
    """The procedure status of the order of each row of *order_pks* (one
    query, whatever their number: a listing of a thousand links)."""
    if not order_pks:
        return {}
    # The rows of the links' accessions, the links' own among them, in one statement: read in two, an
    # HIS XO committed between them (PostgreSQL reads each at its own moment) moved every row to
    # another patient, and the first read's procedure key was in none of the second's (a 500).
    rows = conn.execute(select(orders_t).where(orders_t.c.accession_number.in_(
        select(orders_t.c.accession_number).where(orders_t.c.pk.in_(order_pks))))).all()
    bound = {row.pk: row for row in rows if row.pk in order_pks}
    statuses: dict[tuple[str, tuple[str, str, int]], list[str]] = {}
    for row in rows:
        statuses.setdefault((row.accession_number, _procedure_key(row)), []).append(row.status)
    return {pk: procedure_status(statuses[(row.accession_number, _procedure_key(row))]) for pk, row in bound.items()}


def order_studies(conn: Connection, order_pk: int) -> list[str]:
    """The Study Instance UIDs linked now to the order whose row is
    *order_pk* (to any of its steps' rows), oldest exam first."""
    pks = [row.pk for row in _procedure_rows(conn, order_pk)]
    if not pks:
        return []
    return list(dict.fromkeys(conn.execute(
        select(studies_t.c.study_uid)
        .join(links_t, links_t.c.study_pk == studies_t.c.pk)
        .where(links_t.c.order_pk.in_(pks))
        .order_by(studies_t.c.study_date, studies_t.c.study_time, studies_t.c.pk)
    ).scalars()))


def orders_of_study(study_uid: str) -> Select[Any]:
    """A subquery: the accessions of the orders *study_uid* is linked to
    (the order links that may show it)."""
    orders = orders_t.alias("shown_orders")
    studies = studies_t.alias("shown_studies")
    return (select(orders.c.accession_number)
            .join(links_t, links_t.c.order_pk == orders.c.pk)
            .join(studies, studies.c.pk == links_t.c.study_pk)
            .where(studies.c.study_uid == study_uid))
