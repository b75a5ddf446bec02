"""Reconciliation: a study that matches an HIS order is filed under the HIS
patient, and every value that differs from what the modality sent is
recorded as a correction (retrieval applies them; stored bytes never change).

At ingest this runs inside the index transaction that creates the study, so
a study is never visible under the modality's patient first and moved later.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, or_, select, update

from .models import Correction, Order, Patient, Study, StudyOrderLink
from .writer_helpers import insert_ignore

orders_t = Order.__table__
patients_t = Patient.__table__
studies_t = Study.__table__

# Patient attributes the HIS decides: keyword -> patients column.
PATIENT_COLUMNS = {
    "PatientName": "name",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
}


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


def find_order(conn: Connection, study_uid: str, accession: str) -> Any:
    """The order a new study belongs to: by Study Instance UID, else accession.

    An order (a requested procedure) has a row per scheduled step, all with
    its accession and study UID; the study is the procedure's, and is linked
    to its first step's row (lowest pk), the one row that stands for the
    procedure (pacs.orders): whichever step the modality performed, the
    link, the reports' order and the HIS messages' order key are the same."""
    conditions = [orders_t.c.study_uid == study_uid]
    if accession:
        conditions.append(orders_t.c.accession_number == accession)
    # The study UID the worklist handed out is the stronger evidence.
    by_uid = case((orders_t.c.study_uid == study_uid, 0), else_=1)
    return conn.execute(select(orders_t).where(or_(*conditions)).order_by(by_uid, orders_t.c.pk).limit(1)).first()


def record_reconciliation(
    conn: Connection,
    study_pk: int,
    order: Any,
    received: dict[str, str],
    received_accession: str,
    matched_by: str,
    now: datetime,
) -> None:
    """Link the study to *order*; record where *received* values differ."""
    insert_ignore(
        conn,
        StudyOrderLink.__table__,
        {"study_pk": study_pk, "order_pk": order.pk, "matched_by": matched_by, "created_at": now},
        ["study_pk"],
    )
    his = conn.execute(select(patients_t).where(patients_t.c.pk == order.patient_pk)).one()
    reason = f"reconciled with order {order.accession_number} ({matched_by})"
    rows = [
        {"study_pk": study_pk, "keyword": keyword, "received": received.get(keyword, ""),
         "corrected": getattr(his, column), "reason": reason, "created_at": now}
        for keyword, column in PATIENT_COLUMNS.items()
        if (received.get(keyword) or "") != (getattr(his, column) or "")
    ]
    values: dict[str, Any] = {"patient_pk": order.patient_pk}
    if received_accession != order.accession_number:
        rows.append({"study_pk": study_pk, "keyword": "AccessionNumber", "received": received_accession,
                     "corrected": order.accession_number, "reason": reason, "created_at": now})
        values["accession_number"] = order.accession_number
    conn.execute(update(studies_t).where(studies_t.c.pk == study_pk).values(**values))
    if rows:
        conn.execute(Correction.__table__.insert(), rows)
