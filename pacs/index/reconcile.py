"""Reconciliation: a study that matches an HIS order is filed under the HIS
patient, and every value that differs from what the modality sent is
recorded as a correction (retrieval applies them; stored bytes never change).

At ingest this runs inside the index transaction that creates the study, so
a study is never visible under the modality's patient first and moved later.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, or_, select, text, update

from ..timezones import server_zone
from .models import Correction, Order, Patient, PatientIdentifier, Study, StudyOrderLink
from .writer_helpers import insert_ignore

orders_t = Order.__table__
patients_t = Patient.__table__
identifiers_t = PatientIdentifier.__table__
studies_t = Study.__table__

# How far (in days) a study's date may lie from its order's scheduled or
# placed date for the accession number alone to file it under the order's
# patient. An emergency exam under a temporary ID is ordered the same day or
# the next (the weekend's by Monday); an accession number shared with a
# study years old (migrated from an old PACS whose counter the new HIS
# repeats) is a collision, not the same exam.
ACCESSION_MATCH_DAYS = 3

# Patient attributes the HIS decides: keyword -> patients column.
PATIENT_COLUMNS = {
    "PatientName": "name",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
}
# The patient attributes besides its identifiers.
DEMOGRAPHICS = ("PatientName", "PatientBirthDate", "PatientSex")


def patient_correction(keyword: str, received: str, corrected: str) -> bool:
    """Whether a study received with the patient attribute *keyword* as
    *received*, now filed under a patient whose value is *corrected*, is
    corrected to it on retrieval. A demographic the patient lacks (an HIS
    order whose PID carries no birth date or sex, a merge into a
    registration without them) is unknown, not a deletion: the value the
    modality recorded is kept, as the later series and instances of a study
    keep theirs. The ID and its issuer always follow the patient (another
    ID's issuer would qualify the new one)."""
    return received != corrected and (bool(corrected) or keyword not in DEMOGRAPHICS)


def with_issuer(differing: dict[str, tuple[str, str]], issuers: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """*differing* (keyword -> (received, corrected)) with the Issuer of
    Patient ID beside a corrected Patient ID, *issuers* being (received,
    corrected), also where the two issuers are equal: an ID and its issuer
    are one key. The *received* issuer is the patient's, which an HIS message
    gave its issuer without a correction (the objects carry none, as
    modalities send): the new ID went out without issuer while C-FIND named
    it, where a study of another merged patient went out with it."""
    if "PatientID" in differing and "IssuerOfPatientID" not in differing:
        return {**differing, "IssuerOfPatientID": issuers}
    return differing


# Study attributes the index keeps per study: keyword -> studies column (an
# instance filed into a study it did not name is corrected to these).
STUDY_COLUMNS = {
    "StudyInstanceUID": "study_uid",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "description",
    "ReferringPhysicianName": "referring_physician",
}


def order_keys(study_uid: str, accession: str) -> set[str]:
    """The keys of :func:`lock_order_keys` that name a procedure with this
    Study Instance UID or Accession Number (an empty one names nothing)."""
    return {f"{kind}:{value}" for kind, value in (("accession", accession), ("study", study_uid)) if value}


def lock_order_keys(conn: Connection, keys: Iterable[str]) -> None:
    """PostgreSQL: take the transaction-scoped advisory locks of *keys*
    (:func:`order_keys`), in sorted order, so that two transactions taking
    several never wait for each other in a cycle; held until commit. The HIS
    messages take them before they look at a procedure (pacs.orders), the
    ingest before it looks for the order of a study it may create: of an
    order and the first image of its study arriving together, one then sees
    the other's committed row. SQLite writers queue already (BEGIN IMMEDIATE)."""
    ordered = sorted(set(keys))
    if conn.dialect.name != "postgresql" or not ordered:
        return
    # One statement (one round trip, once per new study at ingest): a select
    # list is evaluated from left to right, so the locks are taken in order.
    calls = ", ".join(f"pg_advisory_xact_lock(hashtextextended(:k{i}, 0))" for i in range(len(ordered)))
    conn.execute(text(f"SELECT {calls}"), {f"k{i}": f"filmless-pacs order {key}" for i, key in enumerate(ordered)})


def find_order(conn: Connection, study_uid: str, accession: str, patient_id: str = "",
               study_date: str = "") -> Any:
    """The order a new study belongs to: by Study Instance UID, else accession.

    An order (a requested procedure) has a row per scheduled step, all with
    its accession and study UID; the study is the procedure's, and is linked
    to its first step's row (lowest pk), the one row that stands for the
    procedure (pacs.orders): whichever step the modality performed, the
    link, the reports' order and the HIS messages' order key are the same.

    Found by the accession alone, the order is taken only when the match is
    plausible (:func:`accession_match_doubt`, with the received *patient_id*
    and *study_date*); otherwise None: the study keeps the patient it was
    sent with and is listed as unmatched, for a person to decide (IHE PIR)."""
    conditions = [orders_t.c.study_uid == study_uid]
    if accession:
        conditions.append(orders_t.c.accession_number == accession)
    # The study UID the worklist handed out is the stronger evidence.
    by_uid = case((orders_t.c.study_uid == study_uid, 0), else_=1)
    order = conn.execute(select(orders_t).where(or_(*conditions)).order_by(by_uid, orders_t.c.pk).limit(1)).first()
    if order is None or order.study_uid == study_uid:
        return order
    return None if accession_match_doubt(conn, order, patient_id, study_date, None) else order


def _day(value: str) -> date | None:
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        return None


def accession_match_doubt(conn: Connection, order: Any, patient_id: str, study_date: str,
                          received_at: datetime | None) -> str:
    """Why a study matching *order* by its Accession Number alone may be
    another exam ("" when the match is plausible). Plausible: the study's
    Patient ID is one of the order patient's identifiers (its Patient ID,
    other IDs, IDs merged into it), or the study was done within
    ACCESSION_MATCH_DAYS of the order's scheduled or placed date. A study
    without a Study Date counts by the day it was received (*received_at*;
    None: today): the emergency exam sent as it is done."""
    if patient_id and patient_id in _patient_identifiers(conn, order.patient_pk):
        return ""
    zone = server_zone()
    done = _day(study_date) or (received_at or datetime.now(zone)).astimezone(zone).date()
    ordered = [day for day in (_day(order.start_date or ""),
                               order.created_at.astimezone(zone).date() if order.created_at else None) if day]
    window = timedelta(days=ACCESSION_MATCH_DAYS)
    if any(abs(done - day) <= window for day in ordered):
        return ""
    when = " or ".join(sorted({day.strftime("%Y%m%d") for day in ordered}))
    return (f"order {order.accession_number} has this accession number, but its patient has none of the study's "
            f"Patient ID and it is dated {when}, more than {ACCESSION_MATCH_DAYS} days from the study "
            f"({done.strftime('%Y%m%d')}): not filed under it; `pacs orders match` if it is that exam")


def _patient_identifiers(conn: Connection, patient_pk: int) -> set[str]:
    """Every identifier of a patient: its Patient ID and its other (and merged-away) IDs."""
    ids = set(conn.execute(select(identifiers_t.c.value).where(identifiers_t.c.patient_pk == patient_pk)).scalars())
    ids.add(conn.execute(select(patients_t.c.patient_id).where(patients_t.c.pk == patient_pk)).scalar() or "")
    ids.discard("")
    return ids


def file_under_patient(conn: Connection, study_pk: int, patient_pk: int, received: dict[str, str], reason: str,
                       now: datetime, *, every_demographic: bool = False) -> None:
    """File the study *study_pk* under the patient *patient_pk*, and record
    as corrections (with *reason*) the patient attributes whose *received*
    value -- by DICOM keyword: what the objects were sent with, or the
    patient the study was filed under until now -- differs from that
    patient's (:func:`patient_correction`): every retrieval (C-FIND, C-MOVE,
    C-GET, WADO, FHIR, export) then presents the patient the study is filed
    under, while the stored bytes stay as received. What reconciliation
    with an order does (:func:`record_reconciliation`), and the prefetch of
    a prior the old PACS filed under the patient's citizen ID
    (pacs.prefetch.filing). *every_demographic*: the name, birth date and
    sex are corrected even where the patient lacks one (a study moved off
    another person: what its objects carry is that person's, not unknown)."""
    kept = conn.execute(select(patients_t).where(patients_t.c.pk == patient_pk)).one()
    differing = with_issuer(
        {keyword: (received.get(keyword) or "", getattr(kept, column) or "")
         for keyword, column in PATIENT_COLUMNS.items()
         if patient_correction(keyword, received.get(keyword) or "", getattr(kept, column) or "")
         or (every_demographic and keyword in DEMOGRAPHICS)},
        (received.get("IssuerOfPatientID") or "", kept.issuer or ""))
    rows = [
        {"study_pk": study_pk, "keyword": keyword, "received": old, "corrected": new, "reason": reason,
         "created_at": now}
        for keyword, (old, new) in differing.items()
    ]
    conn.execute(update(studies_t).where(studies_t.c.pk == study_pk).values(patient_pk=patient_pk))
    if rows:
        conn.execute(Correction.__table__.insert(), rows)


def record_reconciliation(
    conn: Connection,
    study_pk: int,
    order: Any,
    received: dict[str, str],
    received_accession: str,
    matched_by: str,
    now: datetime,
    *,
    every_demographic: bool = False,
) -> None:
    """Link the study to *order*, file it under the order's patient
    (:func:`file_under_patient`, with *every_demographic*); record where
    *received* values differ."""
    insert_ignore(
        conn,
        StudyOrderLink.__table__,
        {"study_pk": study_pk, "order_pk": order.pk, "matched_by": matched_by, "created_at": now},
        ["study_pk"],
    )
    reason = f"reconciled with order {order.accession_number} ({matched_by})"
    file_under_patient(conn, study_pk, order.patient_pk, received, reason, now, every_demographic=every_demographic)
    if received_accession != order.accession_number:
        conn.execute(update(studies_t).where(studies_t.c.pk == study_pk)
                     .values(accession_number=order.accession_number))
        conn.execute(Correction.__table__.insert().values(
            study_pk=study_pk, keyword="AccessionNumber", received=received_accession,
            corrected=order.accession_number, reason=reason, created_at=now))
