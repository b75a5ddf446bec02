"""The reading worklist and study details for the web viewer and the EMR.

Built on the one query model (names folded, newest first) plus each study's
report status (unread / draft / signed), reading priority (pacs.priority),
arrival and who is reading it (pacs.reading_claims).

The radiologist's default order puts the urgent studies not yet reported
first (STAT, then HIGH, each the longest waiting first: the department's
main risk is an emergency study left unreported), then every other study
newest first. "Waiting" puts the studies not yet reported first, the
longest waiting first. Either is two queries on indexes (the first group,
then the rest), never a sort of the whole archive (see :func:`study_list`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Select, and_, case, false, func, not_, select

from .index.db import db_now
from .index.models import Instance, ReadingClaim, Series
from .names import fold_name, same_person
from .priority import FILTERS as PRIORITY_FILTERS
from .priority import STAT, URGENT
from .query import READABLE, Level, Query, build_select
from .query.attributes import patients, studies
from .reading_claims import current as current_claims

series_t = Series.__table__
instances_t = Instance.__table__
claims_t = ReadingClaim.__table__

# The orders the worklist takes (see the module's docstring).
SORTS = ("priority", "date", "waiting")
# Report states of a study not yet reported: no report, or a first draft
# (an amendment's draft is over a signed report).
UNREPORTED = ("unread", "draft")


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
    priority: str = "",
    claimed_by: str = "",
    sort: str = "priority",
    viewer: str = "",
    count_urgent: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """Studies matching the reader's search in the order *sort* (:data:`SORTS`),
    with report status (of the newest signed version if *signed_only*),
    priority, arrival and running claim (``mine`` for *viewer*); *patient_pk*:
    only the studies of that index patient (:func:`patient_of`); *priority*:
    a key of :data:`pacs.priority.FILTERS`; *claimed_by*: the studies that
    user's running claims hold; *count_urgent*: also ``urgent_unread``, the
    urgent studies not yet reported this reader may see (whatever the search)."""
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
        now = db_now(conn)
        stmt, _ = build_select(Query(Level.STUDY, match, fuzzy=True, newest_first=True, withdrawn=False), conn)
        stmt = stmt.add_columns(studies.c.report_state, studies.c.num_series, studies.c.num_instances,
                                studies.c.priority, studies.c.created_at)
        states: tuple[str, ...] | None = None
        if status in _STATES[signed_only]:
            states = _STATES[signed_only][status]
            stmt = stmt.where(studies.c.report_state.in_(states) if states else false())
        if patient_pk is not None:
            stmt = stmt.where(studies.c.patient_pk == patient_pk)
        visible = _referring_condition(conn, referring)
        if visible is not None:
            stmt = stmt.where(visible)
        if priority in PRIORITY_FILTERS:
            taken = PRIORITY_FILTERS[priority]
            stmt = stmt.where(studies.c.priority.in_(taken) if taken else studies.c.priority.not_in(URGENT))
        if claimed_by:
            stmt = stmt.where(studies.c.pk.in_(select(claims_t.c.study_pk).where(
                claims_t.c.username == claimed_by, claims_t.c.expires_at > now)))
        # Counted up to COUNT_AHEAD past this page: counting every CT study of
        # the archive read each of them (190 ms at 100,000 studies), on every
        # load of a radiologist's worklist.
        counted = stmt.with_only_columns(studies.c.pk).limit(offset + limit + COUNT_AHEAD)  # any order: a count
        total = conn.execute(select(func.count()).select_from(counted.subquery())).scalar_one()
        rows = _page(conn, stmt, _first_group(sort, states), limit, offset)
        claims = current_claims(conn, (r["_pk"] for r in rows), now)
        urgent = _count_urgent(conn, visible) if count_urgent else None
    found: dict[str, Any] = {
        "total": int(total),
        # False: there are at least "total" studies, maybe more.
        "total_exact": total < offset + limit + COUNT_AHEAD,
        # The database's clock: waiting times are counted from it, not from a browser's.
        "now": now.isoformat(),
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
                "priority": r["priority"],
                # When its first object arrived: the turnaround clock of a study not yet reported.
                "received_at": r["created_at"].isoformat() if r["created_at"] else None,
                "claim": claims[r["_pk"]].as_json(viewer) if r["_pk"] in claims else None,
            }
            for r in rows
        ],
    }
    if urgent is not None:
        found["urgent_unread"] = urgent
    return found


def _referring_condition(conn: Connection, referring: str) -> ColumnElement[bool] | None:
    """A referring physician sees the studies they referred: the folded
    name finds the candidates (indexed), the exact spelling decides."""
    if not referring:
        return None
    return and_(studies.c.referring_physician_folded == fold_name(referring),
                studies.c.referring_physician.in_(_spellings_of(conn, referring)))


def _first_group(sort: str, states: tuple[str, ...] | None) -> tuple[ColumnElement[bool], list[Any]] | None:
    """The studies *sort* lists before all others, and their order; None
    for none (newest first throughout, or a status filter that leaves the
    group empty)."""
    unreported = UNREPORTED if states is None else tuple(s for s in UNREPORTED if s in states)
    if sort == "date" or not unreported:
        return None
    not_reported = studies.c.report_state.in_(unreported)
    if sort == "waiting":
        return not_reported, [studies.c.created_at, studies.c.pk]
    # Urgent and not reported: STAT first, then each the longest waiting (earliest received) first. Not by
    # Study Date: a study dated years ago (a modality's wrong clock, sent late) that arrived now came first.
    return (and_(studies.c.priority.in_(URGENT), not_reported),
            [case((studies.c.priority == STAT, 0), else_=1), studies.c.created_at, studies.c.pk])


def _page(conn: Connection, stmt: Select[Any], first: tuple[ColumnElement[bool], list[Any]] | None,
          limit: int, offset: int) -> list[Any]:
    """Rows *offset* to *offset* + *limit* of the first group in its order,
    then of the other studies newest first. The group is counted only as far
    as the page reaches; each part is read from its own index (the urgent
    studies from ix_studies_priority, the rest walking the study dates)."""
    newest_first = [studies.c.study_date.desc(), studies.c.study_time.desc(), studies.c.pk.desc()]
    if first is None:
        return list(conn.execute(stmt.order_by(*newest_first).limit(limit).offset(offset)).mappings())
    condition, order = first
    reach = stmt.where(condition).with_only_columns(studies.c.pk).limit(offset + limit)
    in_group = conn.execute(select(func.count()).select_from(reach.subquery())).scalar_one()
    rows: list[Any] = []
    if offset < in_group:
        rows = list(conn.execute(stmt.where(condition).order_by(*order).limit(limit).offset(offset)).mappings())
    if len(rows) < limit:
        rest = stmt.where(not_(condition)).order_by(*newest_first)
        rows += conn.execute(rest.limit(limit - len(rows)).offset(max(0, offset - in_group))).mappings()
    return rows


def _count_urgent(conn: Connection, visible: ColumnElement[bool] | None) -> int:
    """Urgent studies not yet reported, counted on the priority index."""
    stmt = select(func.count()).select_from(studies).where(studies.c.priority.in_(URGENT),
                                                           studies.c.report_state.in_(UNREPORTED), READABLE)
    return int(conn.execute(stmt.where(visible) if visible is not None else stmt).scalar_one())


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


def reading_of(engine: Engine, study_uid: str, *, signed_only: bool = False, viewer: str = "") -> dict[str, Any]:
    """A study's reading facts as the worklist gives them: report status,
    priority, arrival, the running claim (``mine`` for *viewer*); {} for no study."""
    with engine.connect() as conn:
        row = conn.execute(select(studies.c.pk, studies.c.report_state, studies.c.priority, studies.c.created_at)
                           .where(studies.c.study_uid == study_uid)).first()
        if row is None:
            return {}
        now = db_now(conn)
        claim = current_claims(conn, [row.pk], now).get(row.pk)
    return {
        "report_status": _SHOWN[signed_only].get(row.report_state, "unread"),
        "priority": row.priority,
        "received_at": row.created_at.isoformat() if row.created_at else None,
        "now": now.isoformat(),
        "claim": claim.as_json(viewer) if claim else None,
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
