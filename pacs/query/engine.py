"""Run a query against the index: C-FIND, QIDO-RS and retrieval all call this.

A query names its level, its matching keys (keyword -> DICOM match value)
and the keys to return. Results stream from the database in pages (keyset on
the primary key), so a query never loads a whole table; answers come from
index columns only, no stored object is opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Select, and_, exists, func, or_, select

from ..index.models import PatientIdentifier, RejectedInstance
from .attributes import (
    ATTRIBUTES,
    DEFAULT_RETURN,
    UNIQUE_KEY,
    Kind,
    Level,
    instances,
    matchable,
    patients,
    series,
    studies,
)
from .matching import (
    QueryError,
    check_characters,
    combined_pairs,
    condition,
    datetime_range_match,
    name_word_lookup,
    qualifying_issuer,
    universal,
)

identifiers = PatientIdentifier.__table__
_rejected = RejectedInstance.__table__

_BASE = {
    Level.PATIENT: patients,
    Level.STUDY: studies,
    Level.SERIES: series,
    Level.IMAGE: instances,
}


_MAX_OFFSET = 2**31 - 1

# A study whose every image was withdrawn by rejection notes (pacs.rejections)
# has nothing to show: what is left is the notes (KO), and may be a dose report
# or measurements (SR) and presentation states (PR) about images no longer
# there, the wrong patient's too. Such a study is "KO" (nothing but notes), or
# holds nothing but KO, PR and SR and had instances rejected (a study of a
# report and key images, never rejected, stays). Not by the modalities alone:
# a series without a Modality (a scanned request, a secondary capture that
# leaves it out) adds none, so its images and a key image note made "KO" too;
# a series of another modality decides (looked up only for such studies).
_LEFTOVERS = ("KO", "PR", "SR")
_LEFT = ["\\".join(kept) for kept in (("KO",), ("KO", "PR"), ("KO", "SR"), ("KO", "PR", "SR"))]
def _readable(study: Any, study_series: Any) -> Any:
    """The condition that *study* (the studies table or an alias) is not
    withdrawn, its series looked up through the alias *study_series* (a
    series or instance search has series in its own FROM)."""
    # The series test is a scalar subquery with LIMIT 1, not EXISTS: PostgreSQL
    # made that a hashed subplan, reading the whole series table once a
    # withdrawn study was met (65-95 ms a newest-first page at 100,000 studies).
    return or_(study.c.modalities.not_in(_LEFT),
               select(study_series.c.pk)
               .where(study_series.c.study_pk == study.c.pk, study_series.c.modality.not_in(_LEFTOVERS))
               .limit(1).scalar_subquery().is_not(None),
               and_(study.c.modalities != "KO", ~exists().where(_rejected.c.study_uid == study.c.study_uid)))


READABLE = _readable(studies, series.alias("study_series"))
# An alias: at study level and below the outer query already selects from
# studies, and the per-patient counts must count all of the patient's studies.
# Made once, not per query (its column proxies cost ~0.5 ms to build).
_PATIENT_STUDIES = studies.alias("patient_studies")
_PATIENT_READABLE = _readable(_PATIENT_STUDIES, series.alias("patient_study_series"))
# A patient-level search (C-FIND; FHIR Patient, viewer_api.fhir) leaves out a
# patient all of whose studies were withdrawn (the wrong patient's images sent
# under their ID, then rejected): listed, their record showed studies that have
# nothing to read. A patient without studies (registered by the HIS) stays.
# LIMIT 1 scalar subqueries again: as EXISTS, PostgreSQL hashed them, reading
# every study (4.7 -> 135 ms a page of 100 patients at 100,000 studies).
PATIENT_SHOWN = or_(select(_PATIENT_STUDIES.c.pk)
                    .where(_PATIENT_STUDIES.c.patient_pk == patients.c.pk, _PATIENT_READABLE)
                    .limit(1).scalar_subquery().is_not(None),
                    select(_PATIENT_STUDIES.c.pk).where(_PATIENT_STUDIES.c.patient_pk == patients.c.pk)
                    .limit(1).scalar_subquery().is_(None))
# A search asks for withdrawn studies too when it names the study, a series or
# an instance, or asks for the notes' modality (ModalitiesInStudy or Modality
# with KO; not CT\SR, a viewer's filter that would list the wrong patient's
# dose report).
_NAMING = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_STUDY_PK = "_sop_classes_study_pk"


@dataclass
class Query:
    """A level, matching keys and return keys; optionally a page."""

    level: Level
    match: dict[str, str] = field(default_factory=dict)
    return_keys: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    # Newest studies first (QIDO, the worklist of a viewer); else index order.
    newest_first: bool = False
    # Patient ID also matches a patient's other IDs (citizen ID, insurance
    # number): for searching. A retrieve selects by the Patient ID itself
    # (PS3.4 C.4.2.2.1), so one patient's insurance number that happens to be
    # another's Patient ID never exports the wrong patient.
    other_ids: bool = True
    # A DA and a TM range of the same form (StudyDate with StudyTime...) are
    # one date-time range: QIDO-RS always (PS3.18 8.3.4.1.1); C-FIND only
    # with the extended negotiation we do not offer (PS3.4 C.2.2.2.5.4).
    combined_datetime: bool = False
    # Studies holding nothing but Key Object Selections (every image
    # withdrawn by a rejection note, see READABLE), their series and
    # instances, and a patient who has nothing else (PATIENT_SHOWN; the
    # per-patient counts likewise). None: left out of a search, as
    # dcm4chee's default view leaves rejected objects out (the wrong
    # patient's history listed an empty study), unless the search names the
    # study or the notes' modality (_shows_withdrawn); False: always left
    # out; True: always in (a retrieve, pacs.retrieve).
    withdrawn: bool | None = None

    @property
    def ignored(self) -> list[str]:
        """Keys given a value that are not used for matching: qualifiers
        (Timezone Offset From UTC...) and optional keys the archive does not
        match on. PS3.4 C.2.2.1.3: such a key is ignored for matching and
        processed as a return key; refusing the query (0xA900) is not
        conformant, nor was it consistent (sequence keys were ignored)."""
        return [k for k, v in self.match.items() if v and not universal(v) and not matchable(k)]

    def validate(self) -> None:
        """Raise :class:`QueryError` for a key of a level below the query's
        or a value that cannot be matched (a wildcard in a UID, a malformed
        date); keys not used for matching (:attr:`ignored`) pass."""
        for keyword, value in self.match.items():
            check_characters(keyword, value)
            attribute = ATTRIBUTES.get(keyword)
            if attribute is None or not value or universal(value):
                # "*" matches everything as an empty value does, also in a
                # number key or one of a lower level (viewers send it).
                continue
            if attribute.level.depth > self.level.depth:
                raise QueryError(
                    f"{keyword} is a {attribute.level.value}-level key and cannot be matched "
                    f"in a {self.level.value}-level query"
                )
            if matchable(keyword):
                condition(attribute, value, fuzzy=self.fuzzy, other_ids=self.other_ids)  # raises on values it cannot match
        if self.limit is not None and self.limit < 0 or self.offset < 0:
            raise QueryError("limit and offset must not be negative")
        # The database binds it as a 64-bit integer: a larger one was a 500.
        # (A limit is capped by the caller; QIDO answers at most 1000.)
        if self.offset > _MAX_OFFSET:
            raise QueryError(f"offset must not exceed {_MAX_OFFSET}")


def _from(level: Level, *, walk_dates: bool = False) -> Any:
    """The tables of *level*. *walk_dates* (SQLite): the studies are read
    first, so that a newest-first page walks the study date index."""
    joined: Any = patients
    if level.depth >= Level.STUDY.depth:
        # "+ 0": the studies of each patient cannot be found by that index, so
        # SQLite reads the studies first. It chose to read every patient and
        # sort all their matching studies: a list of the newest CT studies
        # took 250 ms at 100,000 studies (0.6 ms walking the dates).
        patient_pk = studies.c.patient_pk + 0 if walk_dates else studies.c.patient_pk
        joined = studies.join(patients, patients.c.pk == patient_pk)
    if level.depth >= Level.SERIES.depth:
        joined = series.join(joined, studies.c.pk == series.c.study_pk)
    if level.depth >= Level.IMAGE.depth:
        joined = instances.join(joined, series.c.pk == instances.c.series_pk)
    return joined


def _computed_columns(wanted: set[str], withdrawn: bool) -> list[Any]:
    """The per-patient counts asked for; without *withdrawn*, of the
    studies a search shows (see READABLE)."""
    patient_studies = _PATIENT_STUDIES
    shown = [] if withdrawn else [_PATIENT_READABLE]
    per_patient = {
        "NumberOfPatientRelatedStudies": func.count(patient_studies.c.pk),
        "NumberOfPatientRelatedSeries": func.coalesce(func.sum(patient_studies.c.num_series), 0),
        "NumberOfPatientRelatedInstances": func.coalesce(func.sum(patient_studies.c.num_instances), 0),
    }
    return [
        select(aggregate)
        .where(patient_studies.c.patient_pk == patients.c.pk, *shown)
        .scalar_subquery()
        .label(keyword)
        for keyword, aggregate in per_patient.items()
        if keyword in wanted
    ]


def build_select(query: Query, conn: Connection | None = None) -> tuple[Select[Any], list[str]]:
    """The SELECT for *query* and the keywords of its result columns. With
    *conn*, a fuzzy name search may look its words up there first
    (:func:`~pacs.query.matching.name_word_lookup`) and take its candidates
    from the name word index, and a newest-first query on SQLite that names
    no patient walks the study dates (:func:`_from`)."""
    query.validate()
    level = query.level
    base = _BASE[level]
    # The unique keys of the level and all above it are always returned:
    # responses and retrieve URLs need the whole path to an entity.
    wanted = set(query.return_keys) | set(DEFAULT_RETURN[level])
    wanted |= {UNIQUE_KEY[lv] for lv in Level if lv.depth <= level.depth}
    keywords = [
        k
        for k, a in ATTRIBUTES.items()
        if a.column is not None and a.level.depth <= level.depth and (k in wanted or a.level == level)
    ]
    columns = [ATTRIBUTES[k].column.label(k) for k in keywords]
    withdrawn = _shows_withdrawn(query)
    computed = _computed_columns(wanted, withdrawn)
    extra = []
    if "SOPClassesInStudy" in wanted and level.depth >= Level.STUDY.depth:
        # Filled per page of matches by _emit (one query for the page).
        extra.append(studies.c.pk.label(_STUDY_PK))
    # The patient's ID and issuer always (``_patient_id``, ``_issuer``): who
    # was shown goes in the audit trail.
    stmt = select(base.c.pk.label("_pk"), patients.c.pk.label("_patient_pk"),
                  patients.c.patient_id.label("_patient_id"), patients.c.issuer.label("_issuer"),
                  *columns, *computed, *extra)
    # An issuer given with a Patient ID qualifies that ID (the patient's own
    # or one of its other IDs), no condition of its own on the patient.
    issuer = qualifying_issuer(query.match)
    candidates: list[bool] = []
    lookup = _noting(name_word_lookup(conn), candidates) if conn is not None and query.fuzzy else None
    pairs = combined_pairs(query.match) if query.combined_datetime else []
    paired = {k for pair in pairs for k in pair}
    conditions = [
        condition(ATTRIBUTES[k], v, fuzzy=query.fuzzy, other_ids=query.other_ids, issuer=issuer, word_lookup=lookup)
        for k, v in query.match.items()
        if v and not universal(v) and matchable(k) and not (issuer and k == "IssuerOfPatientID") and k not in paired
    ]
    conditions += [datetime_range_match(ATTRIBUTES[d].column, ATTRIBUTES[t].column, query.match[d], query.match[t])
                   for d, t in pairs]
    if not withdrawn:
        conditions.append(READABLE if level.depth >= Level.STUDY.depth else PATIENT_SHOWN)
    walk = (query.newest_first and level is not Level.PATIENT and conn is not None and conn.dialect.name == "sqlite"
            and not any(candidates) and not _names_patients(query.match))
    stmt = stmt.select_from(_from(level, walk_dates=walk))
    if conditions:
        stmt = stmt.where(and_(*conditions))
    return stmt, keywords + [c.name for c in computed]


def _shows_withdrawn(query: Query) -> bool:
    if query.withdrawn is not None:
        return query.withdrawn
    if any((uid := query.match.get(k, "")) and not universal(uid) for k in _NAMING):
        return True
    modalities = "\\".join(query.match.get(k, "") for k in ("ModalitiesInStudy", "Modality"))
    return "KO" in {m.strip().upper() for m in modalities.replace(",", "\\").split("\\")}


# Keys that name patients: their studies are found from the patients.
_PATIENT_KEYS = ("PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate")


def _names_patients(match: dict[str, str]) -> bool:
    return any(match.get(k) and not universal(match[k]) for k in _PATIENT_KEYS)


def _noting(lookup: Any, found: list[bool]) -> Any:
    """*lookup*, noting in *found* whether it gave candidates."""
    def noted(folded: str) -> Any:
        result = lookup(folded)
        found.append(result is not None)
        return result

    return noted


def run_query(engine: Engine, query: Query, *, page: int = 500) -> Iterator[dict[str, Any]]:
    """Stream the matches of *query* as {keyword: value} dicts."""
    stmt, keywords = _select(engine, query)
    order_pk = _BASE[query.level].c.pk
    want = _Wanted(
        other_ids="OtherPatientIDsSequence" in query.return_keys or "OtherPatientIDs" in query.return_keys,
        sop_classes="SOPClassesInStudy" in query.return_keys and query.level is not Level.PATIENT,
    )
    remaining = query.limit
    if query.newest_first and query.level is not Level.PATIENT:
        # Date order cannot be paged by key; limit/offset pages it instead.
        stmt = stmt.order_by(studies.c.study_date.desc(), studies.c.study_time.desc(), order_pk.desc())
        offset = query.offset
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            with engine.connect() as conn:
                rows = conn.execute(stmt.limit(size).offset(offset)).mappings().all()
            yield from _emit(engine, rows, keywords, want)
            if len(rows) < size:
                return
            offset += len(rows)
            if remaining is not None:
                remaining -= len(rows)
        return
    # Keyset pagination on the primary key: each page is an index range scan.
    stmt = stmt.order_by(order_pk)
    last_pk: int | None = None
    skip = query.offset
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        paged = stmt if last_pk is None else stmt.where(order_pk > last_pk)
        with engine.connect() as conn:
            rows = conn.execute(paged.limit(size + skip).offset(0)).mappings().all()
        if not rows:
            return
        last_pk = rows[-1]["_pk"]
        emitted = rows[skip:]
        skip = max(0, skip - len(rows))
        yield from _emit(engine, emitted, keywords, want)
        if remaining is not None:
            remaining -= len(emitted)
        if len(rows) < size:
            return


@dataclass(frozen=True)
class _Wanted:
    """Return keys filled by a query per page of matches, not by a column."""

    other_ids: bool = False
    sop_classes: bool = False


def _sop_classes(engine: Engine, study_pks: set[int]) -> dict[int, list[str]]:
    """The SOP classes of each study's instances (SOPClassesInStudy): one
    query per page of matches, bounded by the page size."""
    classes: dict[int, list[str]] = {}
    if not study_pks:
        return classes
    with engine.connect() as conn:
        for row in conn.execute(
            select(series.c.study_pk, instances.c.sop_class_uid)
            .distinct()
            .select_from(instances.join(series, series.c.pk == instances.c.series_pk))
            .where(series.c.study_pk.in_(study_pks))
            .order_by(series.c.study_pk, instances.c.sop_class_uid)
        ):
            classes.setdefault(row.study_pk, []).append(row.sop_class_uid)
    return classes


def _emit(engine: Engine, rows: Any, keywords: list[str], want: _Wanted) -> Iterator[dict[str, Any]]:
    other_ids: dict[int, list[dict[str, str]]] = {}
    if want.other_ids and rows:
        patient_pks = {r["_patient_pk"] for r in rows}
        with engine.connect() as conn:
            for ident in conn.execute(
                select(identifiers.c.patient_pk, identifiers.c.value, identifiers.c.issuer, identifiers.c.id_type)
                .where(identifiers.c.patient_pk.in_(patient_pks))
                .order_by(identifiers.c.pk)
            ):
                other_ids.setdefault(ident.patient_pk, []).append(
                    {"PatientID": ident.value, "IssuerOfPatientID": ident.issuer, "TypeOfPatientID": ident.id_type}
                )
    sop_classes = _sop_classes(engine, {r[_STUDY_PK] for r in rows}) if want.sop_classes and rows else {}
    for row in rows:
        result = {k: row[k] for k in keywords}
        result["_pk"] = row["_pk"]
        result["_patient_id"] = row["_patient_id"]
        result["_issuer"] = row["_issuer"]
        if want.other_ids:
            others = other_ids.get(row["_patient_pk"], [])
            result["OtherPatientIDsSequence"] = others
            # Other Patient IDs (0010,1000): the same identifiers, values only.
            result["OtherPatientIDs"] = "\\".join(o["PatientID"] for o in others if o["PatientID"])
        if want.sop_classes:
            result["SOPClassesInStudy"] = "\\".join(sop_classes.get(row[_STUDY_PK], []))
        yield result


def count_query(engine: Engine, query: Query) -> int:
    """How many matches *query* has (without fetching them)."""
    counted = Query(query.level, query.match, fuzzy=query.fuzzy, other_ids=query.other_ids,
                    combined_datetime=query.combined_datetime, withdrawn=query.withdrawn)
    with engine.connect() as conn:
        stmt, _ = build_select(counted, conn)
        return int(conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one())


def _select(engine: Engine, query: Query) -> tuple[Select[Any], list[str]]:
    """:func:`build_select`, with a connection for a fuzzy query's name word
    lookup and a newest-first query's plan."""
    if not query.fuzzy and not query.newest_first:
        return build_select(query)
    with engine.connect() as conn:
        return build_select(query, conn)


__all__ = ["PATIENT_SHOWN", "READABLE", "Kind", "Level", "Query", "QueryError", "build_select", "count_query",
           "run_query"]
