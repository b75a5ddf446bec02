"""Writing instances into the index: upsert patient, study, series, instance.

All statements are SQLAlchemy Core on one connection inside the caller's
transaction, idempotent under concurrency: parents are inserted with
``ON CONFLICT DO NOTHING`` (two nodes may see a new study at once) and the
instance row decides duplicates through its unique SOP Instance UID.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Table, and_, case, func, select, update

from ..header import InstanceHeader
from ..names import fold_name, name_reading, name_words
from ..routing import create_jobs  # no cycle: pacs.routing imports only writer_helpers from here
from . import tombstones
from .models import (
    PATIENT_HAS_ID,
    Correction,
    Instance,
    Patient,
    PatientIdentifier,
    RejectedInstance,
    Series,
    Study,
    StudyOrderLink,
)
from .name_words import set_name_words
from .prune import MERGED_ID_TYPE, prune_after_delete, prune_patients
from .reconcile import (
    PATIENT_COLUMNS,
    STUDY_COLUMNS,
    find_order,
    lock_order_keys,
    order_keys,
    patient_correction,
    record_reconciliation,
)
from .writer_helpers import insert_ignore, insert_under_parent

patients: Table = Patient.__table__  # type: ignore[assignment]
identifiers: Table = PatientIdentifier.__table__  # type: ignore[assignment]
studies: Table = Study.__table__  # type: ignore[assignment]
series_t: Table = Series.__table__  # type: ignore[assignment]
instances: Table = Instance.__table__  # type: ignore[assignment]
corrections: Table = Correction.__table__  # type: ignore[assignment]
links: Table = StudyOrderLink.__table__  # type: ignore[assignment]
rejected_t: Table = RejectedInstance.__table__  # type: ignore[assignment]
log = logging.getLogger(__name__)
# Seconds a series' study and patient are trusted from the cache (see _series_study).
STUDY_PATIENT_TTL = 10.0


def merged_patient(conn: Connection, patient_id: str, issuer: str) -> int | None:
    """The patient *patient_id* was merged into, when exactly one holds it as
    a merged-away ID (an alias without issuer matches any issuer, an ID sent
    without issuer any alias) and no patient has that ID and issuer as its
    own; None otherwise. One indexed query."""
    condition = [identifiers.c.value == patient_id, identifiers.c.id_type == MERGED_ID_TYPE,
                 ~select(patients.c.pk).where(patients.c.patient_id == patient_id,
                                              patients.c.issuer == issuer).exists()]
    if issuer:
        condition.append(identifiers.c.issuer.in_((issuer, "")))
    found = conn.execute(select(identifiers.c.patient_pk).where(*condition).distinct().limit(2)).scalars().all()
    return int(found[0]) if len(found) == 1 else None


def other_id_patient(conn: Connection, patient_id: str, issuer: str) -> int | None:
    """The patient holding *patient_id* under *issuer* as another of its
    identifiers (a citizen ID, the key it had before the HIS gave its
    hospital number), when exactly one does and no patient has that ID and
    issuer as its own; None otherwise, and always without an issuer (an ID
    alone may be anyone's: insurance numbers are shared and mistyped). As
    the HL7 patient lookup resolves it (pacs.orders), and the C-FIND and
    FHIR searches by it find that patient. One indexed query."""
    if not issuer:
        return None
    found = conn.execute(select(identifiers.c.patient_pk).where(
        identifiers.c.value == patient_id, identifiers.c.issuer == issuer,
        ~select(patients.c.pk).where(patients.c.patient_id == patient_id, patients.c.issuer == issuer).exists(),
    ).distinct().limit(2)).scalars().all()
    return int(found[0]) if len(found) == 1 else None


# Why a study's patient attributes are corrected when it was received under
# another identifier of the patient than its Patient ID (see _find_patient).
MERGED_REASON = "received under a patient ID merged away by the HIS (ADT^A40)"
OTHER_ID_REASON = "received under another identifier of the patient (Patient ID with its issuer)"


def _referring_columns(name: str) -> dict[str, str]:
    """A study's Referring Physician's Name and the forms it is searched by
    (folded, as words, as read), as the patient's name is."""
    return {"referring_physician": name, "referring_physician_folded": fold_name(name),
            "referring_physician_words": name_words(name), "referring_physician_reading": name_reading(name)}


@dataclass
class IndexRecord:
    """One received object, ready to be indexed."""

    header: InstanceHeader
    size: int
    sha256: str
    storage_key: str
    received_at: datetime
    source: str = ""
    calling_ae: str = ""
    remote_host: str = ""
    # An examination arriving (see pacs.ingest.Origin.examination): only its
    # images' priority is the study's; old data (an import, our own retrieve,
    # pacs reindex) does not make a study urgent.
    examination: bool = True
    # Routing jobs to create in the same transaction (see pacs.routing).
    routes: list[Any] = field(default_factory=list)
    # Is the object still stored under storage_key? Asked in the index
    # transaction only after a deletion of that key (see pacs.index.tombstones).
    object_present: Callable[[], bool] | None = None
    # When the object was written (time.monotonic(); see tombstones.INGEST_GUARD).
    written: float = field(default_factory=time.monotonic)
    # A replacement prepared from a row read earlier (pacs compress): the
    # (storage key, sha256) that row must still hold, else nothing is written
    # (Outcome.STALE); the object it replaces is recorded for deletion under
    # *retire_as* in the same transaction (see pacs.index.tombstones), as is
    # the one an overwriting resend replaces under another key.
    replaces: tuple[str, str | None] | None = None
    retire_as: str = ""


class InstanceRejected(Exception):
    """The instance was withdrawn by a rejection note (see pacs.rejections):
    not indexed again. Raised inside the index transaction, which rolls
    back (the group committer then commits the batch's other records)."""

    def __init__(self, sop_uid: str, code: str, note_uid: str, rejected_by: str) -> None:
        super().__init__(f"{sop_uid} was rejected ({code}) by note {note_uid} from {rejected_by}")
        self.sop_uid, self.code, self.note_uid, self.rejected_by = sop_uid, code, note_uid, rejected_by


def rejection_among(conn: Connection, sop_uids: list[str]) -> InstanceRejected | None:
    """A rejection (not lifted) that bars one of *sop_uids* from the index, if any."""
    row = conn.execute(select(rejected_t.c.sop_uid, rejected_t.c.code, rejected_t.c.note_uid, rejected_t.c.rejected_by)
                       .where(rejected_t.c.sop_uid.in_(sop_uids), rejected_t.c.lifted_at.is_(None))
                       .limit(1)).first()
    return None if row is None else InstanceRejected(row.sop_uid, row.code, row.note_uid, row.rejected_by)


class Outcome(Enum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"
    # A conditional replacement (IndexRecord.replaces) whose row changed or
    # went meanwhile: nothing written.
    STALE = "stale"


@dataclass
class AddResult:
    outcome: Outcome
    instance_pk: int
    # The storage key the index no longer references (to delete after commit).
    obsolete_key: str | None = None
    # For a duplicate: where the instance kept in the index is stored, and its sha256.
    existing_key: str | None = None
    existing_sha256: str | None = None


def _received_patient(h: InstanceHeader) -> dict[str, str]:
    """The patient attributes an object arrived with, by DICOM keyword (the
    keys of :data:`PATIENT_COLUMNS`)."""
    return {"PatientName": h.patient_name, "PatientID": h.patient_id, "IssuerOfPatientID": h.issuer,
            "PatientBirthDate": h.birth_date, "PatientSex": h.sex}


def _received_study(h: InstanceHeader) -> dict[str, str]:
    """The study attributes an object arrived with, by DICOM keyword (the
    keys of :data:`STUDY_COLUMNS`)."""
    return {"StudyInstanceUID": h.study_uid, "AccessionNumber": h.accession_number, "StudyID": h.study_id,
            "StudyDate": h.study_date, "StudyTime": h.study_time, "StudyDescription": h.study_description,
            "ReferringPhysicianName": h.referring_physician}


# Study attributes a later series fills when the study has none: keyword -> studies column.
_FILLED = {k: c for k, c in STUDY_COLUMNS.items() if k != "StudyInstanceUID"}
# Patient attributes besides the identifiers.
_DEMOGRAPHICS = ("PatientName", "PatientBirthDate", "PatientSex")
# Why a new study of a registered patient is corrected (see Patient.registered).
REGISTERED_REASON = "received with other patient attributes than the patient's as registered (HIS or administrator)"


def _record_corrections(conn: Connection, study_pk: int, received: dict[str, str], kept: dict[str, str],
                        reason: str, now: datetime) -> None:
    """Corrections for the keywords whose *received* value differs from the
    *kept* one (the study's), unless the study has one already: retrieval
    then gives every object of the study the kept value. An empty kept value
    never replaces a received one (retrieval would blank it), nor is a
    received empty issuer corrected."""
    differing = {k: v or "" for k, v in received.items()
                 if (v or "") != kept[k] and kept[k] and not (k == "IssuerOfPatientID" and not v)}
    if not differing:
        return
    recorded = set(conn.execute(select(corrections.c.keyword).where(corrections.c.study_pk == study_pk)).scalars())
    rows = [{"study_pk": study_pk, "keyword": k, "received": v, "corrected": kept[k], "reason": reason,
             "created_at": now} for k, v in differing.items() if k not in recorded]
    if rows:
        conn.execute(corrections.insert(), rows)


def _patient_row(h: InstanceHeader, now: datetime) -> dict[str, Any]:
    """The patients row an object's patient starts as."""
    return {"patient_id": h.patient_id, "issuer": h.issuer, "name": h.patient_name,
            "name_folded": h.patient_name_folded, "name_words": h.patient_name_words,
            "name_reading": h.patient_name_reading,
            "birth_date": h.birth_date, "sex": h.sex, "created_at": now, "updated_at": now, "changed_at": now}


def _add_identifiers(conn: Connection, patient_pk: int, h: InstanceHeader) -> None:
    """The object's other patient IDs (citizen ID, insurance...), once each."""
    for other in h.other_ids:
        insert_ignore(conn, identifiers,
                      {"patient_pk": patient_pk, "value": other.value, "issuer": other.issuer, "id_type": other.id_type},
                      ["patient_pk", "value", "issuer"])


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


class _SeriesTaken(Exception):
    """Another writer inserted the series first (rolls back a savepoint)."""


class IndexWriter:
    """Upserts records; caches parent primary keys between calls.

    The cache only saves lookups, and a cached key is not trusted blindly:
    a patient merged or re-filed by the HIS (another connection, another
    process) is deleted, and SQLite gives the next new row the freed
    primary key, so a stale entry would file a study under a stranger.
    Patient and study keys are checked against their row when used (once
    per new study or series); a series key, used for every instance, is
    checked by the instance's INSERT itself (INSERT ... SELECT from the
    series row with that key and UID): a separate lookup per instance cost
    ~9 % of one association's ingest rate.
    """

    def __init__(self, overwrite: bool = False, cache_size: int = 20_000) -> None:
        self.overwrite = overwrite
        self._patients = _Lru(cache_size)
        self._studies = _Lru(cache_size)
        self._series = _Lru(cache_size)
        # (series pk, UID) -> (when read, (study pk, its UID and patient's attributes)), for _check_patient.
        self._series_studies = _Lru(cache_size)

    def clear_cache(self) -> None:
        self._patients.clear()
        self._studies.clear()
        self._series.clear()
        self._series_studies.clear()

    # -- parents ----------------------------------------------------------
    def _patient_pk(self, conn: Connection, h: InstanceHeader, now: datetime) -> tuple[int, str]:
        """(patient pk, why h's Patient ID is not that patient's own: ""
        when it is, else MERGED_REASON or OTHER_ID_REASON), with the
        object's other patient IDs added to that patient."""
        pk, alias = self._find_patient(conn, h, now)
        # On every path, not only when the row is made: a later study often
        # brings the citizen ID or insurance number the first one lacked.
        # Once per new study; no statement at all without other IDs.
        _add_identifiers(conn, pk, h)
        return pk, alias

    def _find_patient(self, conn: Connection, h: InstanceHeader, now: datetime) -> tuple[int, str]:
        """(patient pk, why not its own ID: see _patient_pk) of h's patient, made if new."""
        if not h.patient_id:
            return self._new_patient_without_id(conn, h, now), ""
        key = (h.patient_id, h.issuer)
        pk = self._patients.get(key)
        if pk is not None:
            row = conn.execute(select(patients.c.patient_id, patients.c.issuer, patients.c.name)
                               .where(patients.c.pk == pk)).first()
            if row is not None and row.patient_id == h.patient_id and (not h.issuer or row.issuer == h.issuer):
                self._fill_blank_name(conn, pk, row.name, h, now)
                return pk, ""
            del self._patients[key]
        if not h.issuer:
            # Modalities rarely send Issuer of Patient ID: an ID without issuer
            # is the patient the HIS registered under that ID with its issuer,
            # when there is exactly one.
            known = conn.execute(
                select(patients.c.pk, patients.c.name).where(patients.c.patient_id == h.patient_id).limit(2)
            ).all()
            if len(known) == 1:
                self._patients.put(key, known[0].pk)
                self._fill_blank_name(conn, known[0].pk, known[0].name, h, now)
                return int(known[0].pk), ""
        # Not cached: one query more, once per new study whose patient is
        # not in the cache (a merged-away ID is never cached).
        merged = merged_patient(conn, h.patient_id, h.issuer)
        if merged is not None:
            return merged, MERGED_REASON
        # An ID with its issuer that a patient holds as another of its IDs:
        # the key a patient had before the HIS gave its hospital number (the
        # modality's patient list, an old worklist entry), its citizen ID.
        # Made anew, it was a second patient, which the next studies under
        # that ID joined and whose FHIR id took the former one's place.
        holder = other_id_patient(conn, h.patient_id, h.issuer)
        if holder is not None:
            return holder, OTHER_ID_REASON
        pk = insert_ignore(conn, patients, _patient_row(h, now), ["patient_id", "issuer"], where=PATIENT_HAS_ID)
        if pk is not None:
            set_name_words(conn, pk, h.patient_name_words)
        else:
            row = conn.execute(
                select(patients.c.pk, patients.c.name).where(
                    patients.c.patient_id == h.patient_id, patients.c.issuer == h.issuer
                )
            ).one()
            pk = row.pk
            self._fill_blank_name(conn, pk, row.name, h, now)
        self._patients.put(key, pk)
        return pk, ""

    @staticmethod
    def _fill_blank_name(conn: Connection, pk: int, name: str, h: InstanceHeader, now: datetime) -> None:
        """The first object of the patient had no name: take the first real
        one (on every path to the patient, once per new study: a patient
        this writer had cached kept its blank name, unfindable by name)."""
        if name or not h.patient_name:
            return
        # Still blank: a name the HIS gave meanwhile (ADT^A08, committed
        # since *name* was read) is not overwritten by the modality's. A
        # birth date or sex the HIS registered without a name stays: the
        # modality's would become the patient's, and its studies would be
        # "corrected" to them (see Patient.registered).
        demographics = {c: case((and_(patients.c.registered, func.coalesce(patients.c[c], "") != ""), patients.c[c]),
                                else_=v) for c, v in (("birth_date", h.birth_date), ("sex", h.sex))}
        filled = conn.execute(
            update(patients)
            .where(patients.c.pk == pk, patients.c.name == "")
            .values(
                name=h.patient_name,
                name_folded=h.patient_name_folded,
                name_words=h.patient_name_words,
                name_reading=h.patient_name_reading,
                **demographics,
                updated_at=now,
            )
        ).rowcount
        if filled:
            set_name_words(conn, pk, h.patient_name_words)

    def _new_patient_without_id(self, conn: Connection, h: InstanceHeader, now: datetime) -> int:
        """A patient of its own for a new study received without a Patient
        ID: such objects of different people are not one patient."""
        pk = conn.execute(patients.insert().values(_patient_row(h, now)).returning(patients.c.pk)).scalar_one()
        set_name_words(conn, pk, h.patient_name_words)
        return int(pk)

    def _study_pk(self, conn: Connection, h: InstanceHeader, now: datetime, priority: str) -> tuple[int, bool]:
        """(study pk, whether this call made the study) of h's study."""
        pk = self._studies.get(h.study_uid)
        if pk is not None:
            if conn.execute(select(studies.c.study_uid).where(studies.c.pk == pk)).scalar() == h.study_uid:
                return pk, False
            del self._studies[h.study_uid]
        # A study already there keeps its own patient: none is made for what this object names. Made, it
        # stayed without a study (the mistyped patient a move of the study removed, back with every
        # later series still sent under that ID); without a Patient ID, its patient is made with the study.
        pk = conn.execute(select(studies.c.pk).where(studies.c.study_uid == h.study_uid)).scalar()
        if pk is not None:
            self._studies.put(h.study_uid, pk)
            return int(pk), False
        # A study the HIS ordered is filed under the HIS patient: the
        # modality's (possibly mistyped) patient is never created. The order
        # may be being placed right now, its transaction looking for stored
        # studies to reconcile: under its lock, one of the two sees the
        # other's committed row (each saw nothing of the other's, and the
        # study stayed unmatched). Once per study not in the cache.
        lock_order_keys(conn, order_keys(h.study_uid, h.accession_number))
        order = find_order(conn, h.study_uid, h.accession_number, h.patient_id, h.study_date)
        patient_pk, alias = (order.patient_pk, "") if order is not None else self._patient_pk(conn, h, now)
        pk = insert_ignore(
            conn,
            studies,
            {
                "patient_pk": patient_pk,
                "study_uid": h.study_uid,
                "study_date": h.study_date,
                "study_time": h.study_time,
                "accession_number": h.accession_number,
                "study_id": h.study_id,
                **_referring_columns(h.referring_physician),
                "description": h.study_description,
                "institution": h.institution,
                # An order linked below overrides it (triggers of migration 0032).
                "image_priority": priority,
                "priority": priority,
                "modalities": "",
                "num_series": 0,
                "num_instances": 0,
                "size_bytes": 0,
                "created_at": now,
                "updated_at": now,
                "changed_at": now,
            },
            ["study_uid"],
        )
        made = pk is not None
        if pk is None:
            pk = conn.execute(select(studies.c.pk).where(studies.c.study_uid == h.study_uid)).scalar_one()
            if order is None and not h.patient_id:
                # Another writer made the study meanwhile, with its own patient.
                conn.execute(patients.delete().where(patients.c.pk == patient_pk))
        elif order is not None:
            received = _received_patient(h)
            matched_by = "study uid" if order.study_uid == h.study_uid else "accession number"
            record_reconciliation(conn, pk, order, received, h.accession_number, matched_by, now)
        elif alias:
            # Filed under the patient the HIS merged this ID into, or that
            # holds it as another ID; what differs is corrected on retrieval.
            kept = conn.execute(select(patients).where(patients.c.pk == patient_pk)).one()
            received = _received_patient(h)
            rows = [{"study_pk": pk, "keyword": k, "received": received[k] or "", "corrected": getattr(kept, c) or "",
                     "reason": alias, "created_at": now}
                    for k, c in PATIENT_COLUMNS.items()
                    if patient_correction(k, received[k] or "", getattr(kept, c) or "")]
            if rows:
                conn.execute(corrections.insert(), rows)
        elif h.patient_id:
            self._correct_to_registered(conn, pk, patient_pk, h, now)
        self._studies.put(h.study_uid, pk)
        return pk, made

    @staticmethod
    def _correct_to_registered(conn: Connection, study_pk: int, patient_pk: int, h: InstanceHeader,
                               now: datetime) -> None:
        """A new study of a patient whose demographics the HIS or an
        administrator set (Patient.registered) is retrieved with those, as
        C-FIND shows them: a modality without worklist still sends the name
        typed there before the correction.

        PostgreSQL: the patient row is held (FOR SHARE) until commit. An HIS
        update of it (ADT^A08 registering or correcting the patient) then
        waits, and corrects this study with the others; unheld, it committed
        after this read, recorded corrections only for the studies it saw,
        and this one went out with the values it came with while C-FIND
        showed the new ones."""
        query = (select(patients.c.registered, *(patients.c[PATIENT_COLUMNS[k]] for k in _DEMOGRAPHICS))
                 .where(patients.c.pk == patient_pk))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(read=True)
        row = conn.execute(query).one()
        if row.registered:
            received = {k: v for k, v in _received_patient(h).items() if k in _DEMOGRAPHICS}
            _record_corrections(conn, study_pk, received, {k: getattr(row, PATIENT_COLUMNS[k]) or "" for k in received},
                                REGISTERED_REASON, now)

    def _join_study(self, conn: Connection, study_pk: int, h: InstanceHeader, now: datetime, priority: str) -> None:
        """A new series joins a study an earlier object made: the study takes
        what that object lacked and the series brings (once per series, not
        per instance). Its empty attributes are filled (an Accession Number
        that came only with the series picked from the worklist after the
        scout is then matched to its order, as at the study's creation); a
        study filed under the patient of objects received without a Patient
        ID is filed under the patient the series names; a differing name,
        birth date or sex under the same Patient ID is recorded as
        corrections: retrieval gives every object of a study one patient."""
        row = conn.execute(
            select(studies.c.patient_pk, studies.c.image_priority,
                   *(studies.c[column] for column in _FILLED.values()),
                   *(patients.c[column] for column in PATIENT_COLUMNS.values()),
                   select(links.c.study_pk).where(links.c.study_pk == studies.c.pk).exists().label("ordered"))
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .where(studies.c.pk == study_pk)
        ).one()
        earlier = {k: getattr(row, c) or "" for k, c in PATIENT_COLUMNS.items()}
        brought = _received_study(h)
        fill = {c: brought[k] for k, c in _FILLED.items() if brought[k] and not getattr(row, c)}
        if fill:
            if "referring_physician" in fill:
                # Every searched form, or a name search misses the physician.
                fill.update(_referring_columns(fill["referring_physician"]))
            conn.execute(update(studies).where(studies.c.pk == study_pk).values(**fill))
        if priority and not row.image_priority:
            # A priority the study's first series lacked; an order's stays the study's.
            conn.execute(update(studies).where(studies.c.pk == study_pk).values(
                image_priority=priority, priority=case((studies.c.priority == "", priority),
                                                         else_=studies.c.priority)))
        order = None
        if "accession_number" in fill and not row.ordered:
            lock_order_keys(conn, order_keys("", h.accession_number))  # as in _study_pk
            order = find_order(conn, h.study_uid, h.accession_number, h.patient_id, row.study_date or h.study_date)
        if order is not None:
            matched_by = "study uid" if order.study_uid == h.study_uid else "accession number"
            record_reconciliation(conn, study_pk, order, _received_patient(h), h.accession_number, matched_by, now)
            patient_pk, reason = order.patient_pk, f"reconciled with order {order.accession_number} ({matched_by})"
        elif not earlier["PatientID"] and h.patient_id and not row.ordered:
            patient_pk = self._patient_pk(conn, h, now)[0]
            conn.execute(update(studies).where(studies.c.pk == study_pk).values(patient_pk=patient_pk))
            reason = f"received without a Patient ID; series {h.series_uid} names the study's patient"
        else:
            if h.patient_id == earlier["PatientID"] and (not h.issuer or h.issuer == earlier["IssuerOfPatientID"]):
                received = {k: v for k, v in _received_patient(h).items() if k in _DEMOGRAPHICS}
                _record_corrections(conn, study_pk, received, earlier,
                                    f"series {h.series_uid} received with other patient attributes than its "
                                    "study's", now)
            return
        # The objects received before: corrected to the patient the study is filed under now.
        kept = conn.execute(select(*(patients.c[c] for c in PATIENT_COLUMNS.values()))
                            .where(patients.c.pk == patient_pk)).one()
        _record_corrections(conn, study_pk, earlier, {k: getattr(kept, c) or "" for k, c in PATIENT_COLUMNS.items()},
                            reason, now)
        if patient_pk != row.patient_pk:
            prune_patients(conn, {row.patient_pk})

    def _series_pk(self, conn: Connection, h: InstanceHeader, now: datetime, priority: str = "") -> int:
        """The series' row, made (with its study's, when new) for *h*; *priority*: the
        reading priority its images give the study ('' for old data, see IndexRecord.examination)."""
        pk = self._series.get(h.series_uid)
        if pk is not None:
            return pk  # checked by the instance's insert itself (see add)
        pk = conn.execute(select(series_t.c.pk).where(series_t.c.series_uid == h.series_uid)).scalar()
        if pk is not None:
            # Known series: filed where it is, even when this instance names
            # another study (see _check_patient); no study or patient row is
            # made for what it names.
            self._series.put(h.series_uid, pk)
            return int(pk)
        try:
            # In a savepoint: if another writer (node, worker) made the series
            # meanwhile, naming another study, the study and patient made
            # here for it are undone, not left empty in the study list.
            with conn.begin_nested():
                study_pk, made = self._study_pk(conn, h, now, priority)
                pk = insert_ignore(
                    conn,
                    series_t,
                    {
                        "study_pk": study_pk,
                        "series_uid": h.series_uid,
                        "modality": h.modality,
                        "series_number": h.series_number,
                        "description": h.series_description,
                        "body_part": h.body_part,
                        "station_name": h.station_name,
                        "series_date": h.series_date,
                        "series_time": h.series_time,
                        "num_instances": 0,
                        "size_bytes": 0,
                        "created_at": now,
                        "updated_at": now,
                    },
                    ["series_uid"],
                )
                if pk is None:
                    raise _SeriesTaken
                self._add_series_to_study(conn, study_pk, h.modality)
                if not made:
                    self._join_study(conn, study_pk, h, now, priority)
        except _SeriesTaken:
            self._studies.pop(h.study_uid, None)
            self._patients.pop((h.patient_id, h.issuer), None)
            pk = conn.execute(select(series_t.c.pk).where(series_t.c.series_uid == h.series_uid)).scalar_one()
        self._series.put(h.series_uid, pk)
        return pk

    @staticmethod
    def _add_series_to_study(conn: Connection, study_pk: int, modality: str) -> None:
        # Row lock on PostgreSQL so two nodes adding series don't lose a modality.
        current = conn.execute(
            select(studies.c.modalities).where(studies.c.pk == study_pk).with_for_update()
        ).scalar_one()
        mods = [m for m in current.split("\\") if m]
        if modality and modality not in mods:
            mods.append(modality)
        conn.execute(
            update(studies)
            .where(studies.c.pk == study_pk)
            .values(num_series=studies.c.num_series + 1, modalities="\\".join(sorted(mods)))
        )

    # -- instance -----------------------------------------------------------
    def _instance_values(self, rec: IndexRecord, series_pk: int) -> dict[str, Any]:
        h = rec.header
        return {
            "series_pk": series_pk,
            "sop_uid": h.sop_uid,
            "sop_class_uid": h.sop_class_uid,
            "transfer_syntax_uid": h.transfer_syntax_uid,
            "instance_number": h.instance_number,
            "rows": h.rows,
            "columns": h.columns,
            "frames": h.frames,
            "bits_allocated": h.bits_allocated,
            "photometric": h.photometric,
            "charset": h.charset,
            "content_date": h.content_date,
            "content_time": h.content_time,
            "size_bytes": rec.size,
            "sha256": rec.sha256,
            "storage_key": rec.storage_key,
            "pixel_offset": h.pixel_offset,
            "source": rec.source,
            "calling_ae": rec.calling_ae,
            "remote_host": rec.remote_host,
            "received_at": rec.received_at,
        }

    # -- one study, one patient ---------------------------------------------
    def _series_study(self, conn: Connection, series_pk: int, series_uid: str) -> tuple[int, dict[str, str]]:
        """(study pk, the study's UID and the patient attributes it is filed
        under, by DICOM keyword) of the series just inserted into."""
        # Keyed by pk *and* UID: the instance's INSERT has just checked that
        # this pk names this series, so a key SQLite gave to another series
        # after a purge cannot match a stale entry.
        cache_key = (series_pk, series_uid)
        cached = self._series_studies.get(cache_key)
        now = time.monotonic()
        # Short-lived: an HIS merge or ID change (another connection) moves
        # the study to another patient, and a stale entry would call the
        # next instance a conflict.
        if cached is not None and now - cached[0] < STUDY_PATIENT_TTL:
            return cached[1]
        row = conn.execute(
            select(studies.c.pk, *(studies.c[column] for column in STUDY_COLUMNS.values()),
                   *(patients.c[column] for column in PATIENT_COLUMNS.values()))
            .select_from(series_t)
            .join(studies, studies.c.pk == series_t.c.study_pk)
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .where(series_t.c.pk == series_pk)
        ).one()
        attributes = {k: getattr(row, c) or "" for k, c in (PATIENT_COLUMNS | STUDY_COLUMNS).items()}
        found = (int(row.pk), attributes)
        self._series_studies.put(cache_key, (now, found))
        return found

    def _check_patient(self, conn: Connection, rec: IndexRecord, series_pk: int) -> str:
        """An instance whose patient is not its study's (another Patient ID, or
        issuer) is filed with the study, as the first received instance decided,
        and the differing attributes are recorded as corrections: retrieval
        then gives every instance of the study one patient, and the operator
        sees it (a warning, `GET /api/studies/{uid}/corrections`). Likewise
        an instance of a known series naming another study is filed with its
        series, and its Study Instance UID is corrected."""
        h = rec.header
        study_pk, filed = self._series_study(conn, series_pk, h.series_uid)
        same_study = h.study_uid == filed["StudyInstanceUID"]
        if same_study and h.patient_id == filed["PatientID"] and (not h.issuer or h.issuer == filed["IssuerOfPatientID"]):
            return h.study_uid
        received = _received_patient(h)
        reason = f"instance {h.sop_uid} received with another patient than its study's"
        if not same_study:
            # The series is already filed in another study (a series copied
            # into an edited study, a modality's UID bug): the instance joins
            # its series, and retrieval gives it the study it is filed in,
            # accession and description included.
            received |= _received_study(h)
            reason = f"instance {h.sop_uid} received naming another study than its series'"
        recorded = set(conn.execute(
            select(corrections.c.keyword).where(corrections.c.study_pk == study_pk)).scalars())
        rows = [
            {"study_pk": study_pk, "keyword": k, "received": v or "", "corrected": filed[k],
             "reason": reason, "created_at": rec.received_at}
            for k, v in received.items()
            if (v or "") != filed[k] and k not in recorded and not (k == "IssuerOfPatientID" and not v)
            # The study's patient lacking a value the instance has: kept as
            # received, not blanked on retrieval.
            and (filed[k] or not v or k not in PATIENT_COLUMNS)
        ]
        if rows:
            conn.execute(corrections.insert(), rows)
            keywords = ", ".join(r["keyword"] for r in rows)
            if same_study:
                log.warning("instance %s of study %s names another patient than the study's; filed with the "
                            "study, %s recorded as corrections", h.sop_uid, h.study_uid, keywords)
            else:
                log.warning("instance %s of series %s names study %s, but the series is filed in study %s; "
                            "filed with its series, %s recorded as corrections", h.sop_uid, h.series_uid,
                            h.study_uid, filed["StudyInstanceUID"], keywords)
        return filed["StudyInstanceUID"]

    def _replace_if_unchanged(self, conn: Connection, rec: IndexRecord) -> AddResult:
        """The row of *rec*'s instance made to describe *rec*, only if it
        still holds the object the replacement was prepared from: a resend
        acknowledged meanwhile (overwrite policy) or a deletion wins, and a
        deleted instance is never indexed again."""
        old = conn.execute(
            select(instances.c.pk, instances.c.storage_key, instances.c.sha256, instances.c.series_pk)
            .where(instances.c.sop_uid == rec.header.sop_uid)
            .with_for_update()
        ).first()
        if old is None or (old.storage_key, old.sha256) != rec.replaces:
            return AddResult(Outcome.STALE, old.pk if old is not None else 0,
                             existing_key=old.storage_key if old is not None else None)
        conn.execute(update(instances).where(instances.c.pk == old.pk)
                     .values(**self._instance_values(rec, old.series_pk)))
        if old.storage_key == rec.storage_key:
            return AddResult(Outcome.REPLACED, old.pk)
        if rec.retire_as:
            tombstones.record(conn, [old.storage_key], rec.retire_as)
        return AddResult(Outcome.REPLACED, old.pk, old.storage_key)

    @staticmethod
    def _duplicate(conn: Connection, rec: IndexRecord, old: Any) -> AddResult:
        # Routed as this sender's objects are (see Ingestor._duplicate).
        if rec.routes:
            create_jobs(conn, rec.routes, rec.header.sop_uid, rec.header.study_uid, rec.received_at)
        return AddResult(Outcome.DUPLICATE, old.pk, existing_key=old.storage_key, existing_sha256=old.sha256)

    def add(self, conn: Connection, rec: IndexRecord) -> AddResult:
        """Index one record inside the caller's transaction.

        Series and study counters are kept by database triggers (migration
        0002), so a new instance of a known series costs one INSERT.
        """
        if rec.replaces is not None:
            return self._replace_if_unchanged(conn, rec)
        if not self.overwrite and self._series.get(rec.header.series_uid) is None:
            # The first instance of a series (as far as the cache knows) may
            # carry a UID the index already holds elsewhere: answered before
            # its study and series rows are made, which would stay empty.
            old = conn.execute(select(instances.c.pk, instances.c.storage_key, instances.c.sha256)
                               .where(instances.c.sop_uid == rec.header.sop_uid)).first()
            if old is not None:
                return self._duplicate(conn, rec, old)
        priority = rec.header.priority if rec.examination else ""
        series_pk = self._series_pk(conn, rec.header, rec.received_at, priority)
        values = self._instance_values(rec, series_pk)
        # Inserted only under the series the cached key still names, and
        # unless a rejection note withdrew the instance.
        pk = insert_under_parent(conn, instances, values, "sop_uid", series_t, "series_pk", "series_uid",
                                 rec.header.series_uid, barred=rejected_t, barred_unless="lifted_at")
        if pk is None and conn.execute(select(instances.c.pk).where(
                instances.c.sop_uid == rec.header.sop_uid)).first() is None:
            if (rejected := rejection_among(conn, [rec.header.sop_uid])) is not None:
                raise rejected
            # Not a duplicate: the cached series is gone (a purge while serving),
            # and SQLite may have given its key to another series. Look it up again.
            self._series.pop(rec.header.series_uid, None)
            values = self._instance_values(rec, self._series_pk(conn, rec.header, rec.received_at, priority))
            pk = insert_ignore(conn, instances, values, ["sop_uid"])
        if pk is not None:
            study_uid = self._check_patient(conn, rec, int(values["series_pk"]))
            if rec.routes:
                create_jobs(conn, rec.routes, rec.header.sop_uid, study_uid, rec.received_at)
            return AddResult(Outcome.INSERTED, pk)
        old = conn.execute(
            select(instances.c.pk, instances.c.storage_key, instances.c.sha256, instances.c.series_pk)
            .where(instances.c.sop_uid == rec.header.sop_uid)
            .with_for_update()
        ).one()
        if not self.overwrite:
            return self._duplicate(conn, rec, old)
        conn.execute(update(instances).where(instances.c.pk == old.pk).values(**values))
        if old.series_pk != values["series_pk"]:
            # Resent into another series (the modality corrected the patient
            # and sent the same UIDs in a new study): the series, study and
            # patient it leaves empty go, as after a deletion.
            prune_after_delete(conn, {old.series_pk}, set())
        obsolete = old.storage_key if old.storage_key != rec.storage_key else None
        if obsolete and rec.retire_as:
            # A resend written beside the copy it replaces: that copy goes
            # through a tombstone of this transaction, after its readers'
            # grace (see pacs.ingest), as compress's originals do.
            tombstones.record(conn, [obsolete], rec.retire_as)
        return AddResult(Outcome.REPLACED, old.pk, obsolete)
