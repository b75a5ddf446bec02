"""The reading worklist and study details for the web viewer and the EMR.

Built on the one query model (names folded, newest first) plus each study's
report status (unread / draft / signed).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, false, func, select

from .index.models import Instance, Series
from .names import fold_name, same_person
from .query import Level, Query, build_select
from .query.attributes import patients, studies

series_t = Series.__table__
instances_t = Instance.__table__


# The report states (studies.report_state, migration 0026) a status filter
# takes, and the status each state shows: to all readers, and to the roles
# that read signed reports only. Those see the newest signed version: an
# amendment in progress is not theirs to see (the report API shows them the
# signed one), a first draft not yet a report.
_STATES = {
    False: {"unread": ("unread",), "draft": ("draft", "amending"), "signed": ("signed",)},
    True: {"unread": ("unread", "draft"), "draft": (), "signed": ("signed", "amending")},
}
_SHOWN = {
    False: {"unread": "unread", "draft": "draft", "amending": "draft", "signed": "signed"},
    True: {"unread": "unread", "draft": "unread", "amending": "signed", "signed": "signed"},
}


# How many matches past the page asked for the study list counts at most.
COUNT_AHEAD = 1000


def study_list(
    engine: Engine,
    *,
    name: str = "",
    patient_id: str = "",
    date_from: str = "",
    date_to: str = "",
    modality: str = "",
    status: str = "",
    accession: str = "",
    referring: str = "",
    signed_only: bool = False,
    patient_pk: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """Studies matching the reader's search, newest first, with report status
    (of the newest signed version if *signed_only*); *patient_pk*: only the
    studies of that index patient (:func:`patient_of`)."""
    match: dict[str, str] = {}
    if name:
        match["PatientName"] = name
    if patient_id:
        match["PatientID"] = patient_id
    if date_from or date_to:
        match["StudyDate"] = f"{date_from}-{date_to}"
    if modality:
        match["ModalitiesInStudy"] = modality
    if accession:
        match["AccessionNumber"] = accession
    with engine.connect() as conn:
        stmt, _ = build_select(Query(Level.STUDY, match, fuzzy=True, newest_first=True), conn)
        stmt = stmt.add_columns(studies.c.report_state, studies.c.num_series, studies.c.num_instances)
        if status in _STATES[signed_only]:
            states = _STATES[signed_only][status]
            stmt = stmt.where(studies.c.report_state.in_(states) if states else false())
        if patient_pk is not None:
            stmt = stmt.where(studies.c.patient_pk == patient_pk)
        if referring:
            # A referring physician sees the studies they referred: the folded
            # name finds the candidates (indexed), the exact spelling decides.
            stmt = stmt.where(studies.c.referring_physician_folded == fold_name(referring),
                              studies.c.referring_physician.in_(_spellings_of(conn, referring)))
        newest_first = stmt.order_by(studies.c.study_date.desc(), studies.c.study_time.desc(), studies.c.pk.desc())
        # Counted up to COUNT_AHEAD past this page: counting every CT study of
        # the archive read each of them (190 ms at 100,000 studies), on every
        # load of a radiologist's worklist.
        counted = stmt.with_only_columns(studies.c.pk).limit(offset + limit + COUNT_AHEAD)  # any order: a count
        total = conn.execute(select(func.count()).select_from(counted.subquery())).scalar_one()
        rows = conn.execute(newest_first.limit(limit).offset(offset)).mappings().all()
    return {
        "total": int(total),
        # False: there are at least "total" studies, maybe more.
        "total_exact": total < offset + limit + COUNT_AHEAD,
        "items": [
            {
                "study_uid": r["StudyInstanceUID"],
                "patient_name": r["PatientName"],
                "patient_id": r["PatientID"],
                "issuer": r["_issuer"],
                "birth_date": r["PatientBirthDate"],
                "sex": r["PatientSex"],
                "study_date": r["StudyDate"],
                "study_time": r["StudyTime"],
                "accession": r["AccessionNumber"],
                "modalities": r["ModalitiesInStudy"],
                "description": r["StudyDescription"],
                "num_series": r["num_series"],
                "num_instances": r["num_instances"],
                "report_status": _SHOWN[signed_only].get(r["report_state"], "unread"),
            }
            for r in rows
        ],
    }


def study_detail(engine: Engine, study_uid: str) -> dict[str, Any] | None:
    """A study with its series and their instances in reading order."""
    with engine.connect() as conn:
        study = conn.execute(
            select(studies, patients.c.name, patients.c.patient_id, patients.c.birth_date, patients.c.sex)
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .where(studies.c.study_uid == study_uid)
        ).first()
        if study is None:
            return None
        series_rows = conn.execute(
            select(series_t).where(series_t.c.study_pk == study.pk).order_by(series_t.c.series_number, series_t.c.pk)
        ).all()
        instance_rows = conn.execute(
            select(instances_t.c.series_pk, instances_t.c.sop_uid, instances_t.c.instance_number, instances_t.c.frames,
                   instances_t.c.rows, instances_t.c.columns, instances_t.c.sop_class_uid,
                   instances_t.c.transfer_syntax_uid)
            .where(instances_t.c.series_pk.in_([s.pk for s in series_rows]))
            .order_by(instances_t.c.series_pk, instances_t.c.instance_number, instances_t.c.pk)
        ).all()
    by_series: dict[int, list[dict[str, Any]]] = {}
    for i in instance_rows:
        by_series.setdefault(i.series_pk, []).append(
            {"sop_uid": i.sop_uid, "instance_number": i.instance_number, "frames": i.frames or 1,
             "rows": i.rows, "columns": i.columns, "sop_class_uid": i.sop_class_uid,
             "transfer_syntax_uid": i.transfer_syntax_uid}
        )
    return {
        "study_uid": study.study_uid,
        "patient_name": study.name,
        "patient_id": study.patient_id,
        "birth_date": study.birth_date,
        "sex": study.sex,
        "study_date": study.study_date,
        "study_time": study.study_time,
        "accession": study.accession_number,
        "description": study.description,
        "modalities": study.modalities,
        "referring_physician": study.referring_physician,
        "changed_at": study.changed_at,
        "series": [
            {
                "series_uid": s.series_uid,
                "modality": s.modality,
                # The viewer's template picker offers the templates of this body part first.
                "body_part": s.body_part,
                "series_number": s.series_number,
                "description": s.description,
                "num_instances": s.num_instances,
                "has_pixels": any(i["rows"] for i in by_series.get(s.pk, [])),
                "instances": by_series.get(s.pk, []),
            }
            for s in series_rows
        ],
    }


def _spellings_of(conn: Connection, name: str) -> list[str]:
    """The Referring Physician's Name values in the index that are *name*
    (:func:`~pacs.names.same_person`), among those that fold alike."""
    candidates = conn.execute(select(studies.c.referring_physician).distinct()
                              .where(studies.c.referring_physician_folded == fold_name(name))).scalars()
    return [value for value in candidates if same_person(value, name)]


def patient_of(engine: Engine, study_uid: str) -> int | None:
    """The index patient of a study (None: no such study): the person, where
    a Patient ID alone may be another issuer's patient's too."""
    with engine.connect() as conn:
        return conn.execute(select(studies.c.patient_pk).where(studies.c.study_uid == study_uid)).scalar()


def referring_of(engine: Engine, study_uid: str) -> str | None:
    """The referring physician of a study as stored (access checks)."""
    with engine.connect() as conn:
        return conn.execute(
            select(studies.c.referring_physician).where(studies.c.study_uid == study_uid)
        ).scalar()
