"""Removing the index rows that deleted or moved instances leave empty:
series without instances, studies without series (unless a report keeps
them), patients without studies and orders (unless registered). In the caller's transaction;
used by the deletions (pacs.maintenance) and by the writer when the
overwrite policy moves an instance to another series."""

from __future__ import annotations

from sqlalchemy import Connection, Table, delete, exists, func, select, update

from .models import Order, Patient, PatientIdentifier, Report, Series, Study

series_t: Table = Series.__table__  # type: ignore[assignment]
studies_t: Table = Study.__table__  # type: ignore[assignment]
patients_t: Table = Patient.__table__  # type: ignore[assignment]
orders_t: Table = Order.__table__  # type: ignore[assignment]
reports_t: Table = Report.__table__  # type: ignore[assignment]
identifiers_t: Table = PatientIdentifier.__table__  # type: ignore[assignment]
# patient_identifiers.id_type of a Patient ID merged away by the HIS (ADT^A40):
# an alias of the surviving patient (see pacs.orders.keep_alias).
MERGED_ID_TYPE = "MERGED"


def prune_after_delete(conn: Connection, series_pks: set[int], patient_pks: set[int]) -> dict[str, int]:
    """After instance or study rows were deleted: drop series left without
    instances, fix their studies' series counters and modalities, drop
    studies left without series (unless a report keeps them) and patients
    left without studies and orders. Counters of instances are kept by the
    database triggers; the series counter of a study is not, hence here."""
    removed = {"series": 0, "studies": 0, "patients": 0}
    study_pks: set[int] = set()
    if series_pks:
        empty = conn.execute(
            select(series_t.c.pk, series_t.c.study_pk).where(
                series_t.c.pk.in_(series_pks), series_t.c.num_instances <= 0
            )
        ).all()
        if empty:
            conn.execute(delete(series_t).where(series_t.c.pk.in_([r.pk for r in empty])))
            removed["series"] = len(empty)
            study_pks = {r.study_pk for r in empty}
    for study_pk in study_pks:
        mods = conn.execute(
            select(series_t.c.modality).where(series_t.c.study_pk == study_pk).distinct()
        ).scalars().all()
        remaining = conn.execute(
            select(func.count()).select_from(series_t).where(series_t.c.study_pk == study_pk)
        ).scalar_one()
        if remaining == 0 and not conn.execute(
            select(exists().where(reports_t.c.study_pk == study_pk))
        ).scalar():
            patient_pk = conn.execute(select(studies_t.c.patient_pk).where(studies_t.c.pk == study_pk)).scalar()
            conn.execute(delete(studies_t).where(studies_t.c.pk == study_pk))
            removed["studies"] += 1
            if patient_pk is not None:
                patient_pks.add(patient_pk)
        else:
            conn.execute(
                update(studies_t)
                .where(studies_t.c.pk == study_pk)
                .values(num_series=remaining, modalities="\\".join(sorted(m for m in mods if m)))
            )
    removed["patients"] = prune_patients(conn, patient_pks)
    return removed


def prune_patients(conn: Connection, patient_pks: set[int]) -> int:
    """Delete the patients of *patient_pks* no study and no order refers to,
    unless the HIS or an administrator registered them (Patient.registered)
    or merged another ID into them: their demographics, other IDs and
    merged-away IDs are the HIS's, not the deleted images' -- gone with the
    last study (one sent in error, deleted or moved away), the next study
    under that ID kept the name the technologist typed and one under a
    merged-away ID was a patient of its own. A patient only modalities made
    goes with its last study."""
    removed = 0
    for pk in patient_pks:
        used = conn.execute(
            select(
                exists().where(studies_t.c.patient_pk == pk) | exists().where(orders_t.c.patient_pk == pk)
                | exists().where(patients_t.c.pk == pk, patients_t.c.registered.is_(True))
                | exists().where(identifiers_t.c.patient_pk == pk, identifiers_t.c.id_type == MERGED_ID_TYPE)
            )
        ).scalar()
        if not used:
            removed += conn.execute(delete(patients_t).where(patients_t.c.pk == pk)).rowcount or 0
    return removed
