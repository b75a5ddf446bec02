"""A prior found at the old PACS only by the patient's citizen ID, filed
under the order's patient once it is complete here.

The old PACS often filed a patient's visits under the citizen ID alone
(PatientID 079185000042, no issuer). The ingest files such a study under a
patient of its own, (079185000042, ""): on purpose, it never takes an ID
without issuer for another patient's other identifier (pacs.index.writer;
an insurance number or a mistyped ID would file a stranger's study there).
The prefetch knows more: the HIS named this citizen ID as the patient's
(an identifier ``prefetch_other_ids`` trusts) and the old PACS answered the
search by it. So the study is filed under the job's patient as the HIS
reconciliation files a study under its order's patient
(:func:`pacs.index.reconcile.file_under_patient`: the study's patient
changes, the patient attributes it held are recorded as corrections, every
retrieval presents the HIS patient, the stored bytes stay as received); the
study is not linked to the order (it is a prior, not the ordered exam).

Only when the study's patient record is nothing but that identifier: keyed
by exactly that value with no issuer (or the trusted identifier's issuer),
without an order of its own and not registered otherwise (Patient.registered:
the HIS registered it, only an ADT^A40 merge may join it), holding no other identifier the job's patient lacks (its
objects' Other Patient IDs naming another patient: the desk typed this
citizen ID into someone else's visit), and no other patient here holds the
value (which of two is this person is not known). Otherwise the study is left where it is and the
job's progress says why. A record left without studies is removed as a
merge removes the merged-away patient (:func:`pacs.orders.absorb_patient`):
its ID stays an alias of the job's patient (a citizen ID the patient holds
with that issuer keeps its type: it is still in use).

One transaction per study, under the job's claim (:func:`.jobs.still_held`):
a node whose claim passed to another writes nothing. A study already under
the job's patient is left as it is: a rerun files nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, or_, select
from sqlalchemy.exc import IntegrityError

from ..app import Pacs
from ..audit import Event, patient_cx
from ..index.db import ConcurrentChange, is_transient, retry_write
from ..index.models import Order, Patient, PatientIdentifier, Study
from ..index.reconcile import PATIENT_COLUMNS, file_under_patient
from ..index.writer import MERGED_ID_TYPE
from ..orders import absorb_patient, lock_patient_studies
from . import jobs
from .jobs import Job

log = logging.getLogger(__name__)

patients_t = Patient.__table__
identifiers_t = PatientIdentifier.__table__
studies_t = Study.__table__
orders_t = Order.__table__

# Identifier types and issuers of a national ID (HL7 NI, NN; Vietnamese CCCD, CMND).
CITIZEN = ("NI", "NN", "CCCD", "CMND")


@dataclass(frozen=True)
class Filing:
    """What became of one prior: "filed" (under the job's patient now),
    "here" (it was already), "left" (*detail* says why), "lost" (the
    job's claim passed to another node: nothing written)."""

    state: str
    detail: str = ""
    # The patient the study was filed under before, as events name it.
    previous: str = ""


def kind_of(identifier: tuple[str, str, str]) -> str:
    """How an event names an identifier (value, issuer, type): "citizen ID", ..."""
    _value, issuer, id_type = identifier
    if id_type.upper() == MERGED_ID_TYPE:
        return "merged-away ID"
    if {id_type.upper(), issuer.upper()} & set(CITIZEN):
        return "citizen ID"
    return f"other ID ({id_type or issuer or 'no type'})"


def _foreign_ids(conn: Connection, pk: int, target: Any, value: str) -> list[str]:
    """The other identifiers of the record *pk* (its objects' Other Patient
    IDs) that the patient row *target* does not hold (one without issuer is
    held when *target* has that value under any), as events name them: the
    record names someone else (BN0077^^^BVDK, the desk typed this citizen
    ID into another patient's visit). Removed into *target*, they would be
    its own: the next order or study of that other patient would be filed
    under *target* (the HL7 and ingest lookups by another identifier), a
    C-FIND by them would answer its studies."""
    held = {(target.patient_id, target.issuer)}
    held.update((v, i) for v, i in conn.execute(select(identifiers_t.c.value, identifiers_t.c.issuer)
                                                .where(identifiers_t.c.patient_pk == target.pk)))
    values = {held_value for held_value, _issuer in held}
    rows = conn.execute(select(identifiers_t.c.value, identifiers_t.c.issuer)
                        .where(identifiers_t.c.patient_pk == pk).order_by(identifiers_t.c.pk))
    # The value filed by (under any issuer) names the same person: no other patient holds it (checked after).
    return [patient_cx(v, i) for v, i in rows if v != value and (v, i) not in held and (i or v not in values)]


def _why_not(conn: Connection, current: Any, target: Any, value: str, issuers: set[str]) -> str:
    """Why the study under the patient row *current* may not be filed under
    the patient row *target* ("" when it may); see the module docstring."""
    cx = patient_cx(current.patient_id, current.issuer)
    pk = current.pk
    if current.patient_id != value or current.issuer not in issuers:
        return f"filed here under patient {cx}, not a record of {value} alone"
    if conn.execute(select(func.count()).select_from(orders_t).where(orders_t.c.patient_pk == pk)).scalar_one():
        return f"patient {cx} has orders of its own (the HIS registered it): only a merge (ADT^A40) joins it"
    if current.registered:
        # Registered without an order (ADT^A04, PUT /api/patients/{id}, pacs patient update): the HIS's too.
        return (f"patient {cx} was registered by the HIS or an administrator: only a merge (ADT^A40) "
                "joins it")
    foreign = _foreign_ids(conn, pk, target, value)
    if foreign:
        return (f"patient {cx} also holds {', '.join(foreign[:3])}, not identifiers of "
                f"{patient_cx(target.patient_id, target.issuer)}: it may be another person")
    others = conn.execute(select(func.count()).select_from(patients_t).where(
        patients_t.c.pk.notin_((pk, target.pk)),
        or_(patients_t.c.patient_id == value,
            patients_t.c.pk.in_(select(identifiers_t.c.patient_pk).where(identifiers_t.c.value == value))),
    )).scalar_one()
    if others:
        return f"{others} other patient(s) here hold {value} too: which is this person is not known"
    return ""


def _file(conn: Connection, job: Job, uid: str, value: str, issuers: set[str], reason: str) -> Filing:
    """The filing of one prior in *conn*'s transaction (see file_prior)."""
    if not jobs.still_held(conn, job):
        return Filing("lost")
    target = conn.execute(select(patients_t).where(patients_t.c.patient_id == job.patient_id,
                                                   patients_t.c.issuer == job.issuer)).first()
    if target is None:
        return Filing("left", f"the job's patient {patient_cx(job.patient_id, job.issuer)} is not in the index")
    read = conn.execute(select(studies_t.c.pk, studies_t.c.patient_pk).where(studies_t.c.study_uid == uid)).first()
    if read is None:
        return Filing("left", "not in the index (deleted since it came?)")
    if read.patient_pk == target.pk:
        return Filing("here")
    # Its patient's studies, then the patient (as a merge takes them), then read again: what was read
    # before the locks may have changed (PostgreSQL; SQLite holds the one write lock already).
    lock_patient_studies(conn, read.patient_pk)
    locked = select(patients_t).where(patients_t.c.pk == read.patient_pk)
    current = conn.execute(locked.with_for_update() if conn.dialect.name == "postgresql" else locked).first()
    if current is None or conn.execute(select(studies_t.c.patient_pk).where(
            studies_t.c.pk == read.pk)).scalar() != read.patient_pk:
        raise ConcurrentChange("the prior was filed elsewhere meanwhile")
    # The patient filed under, held until commit (PostgreSQL; FOR SHARE): an HIS update of it (ADT^A08: its
    # sex, birth date, ID) waits, then corrects this study too. Unheld, the filing compared the record with
    # values about to change and the update corrected only the studies it saw: the prior went out with the
    # old values under the corrected patient.
    held = select(patients_t).where(patients_t.c.pk == target.pk)
    target = conn.execute(held.with_for_update(read=True) if conn.dialect.name == "postgresql" else held).first()
    if target is None:
        raise ConcurrentChange("the job's patient was merged meanwhile")
    previous = patient_cx(current.patient_id, current.issuer)
    why = _why_not(conn, current, target, value, issuers)
    if why:
        return Filing("left", why, previous)
    received = {keyword: getattr(current, column) or "" for keyword, column in PATIENT_COLUMNS.items()}
    file_under_patient(conn, read.pk, target.pk, received, reason, datetime.now(UTC))
    if not conn.execute(select(func.count()).select_from(studies_t)
                        .where(studies_t.c.patient_pk == current.pk)).scalar_one():
        # Nothing of it left here (no study; no order, checked above): removed as a merge removes the
        # merged-away patient. A citizen ID the patient holds keeps its type (former_key=False).
        absorb_patient(conn, target.pk, target, current, former_key=False)
        return Filing("filed", f"record {previous} removed", previous)
    return Filing("filed", "", previous)


def file_prior(pacs: Pacs, job: Job, uid: str, identifier: tuple[str, str, str], source: str, *,
               user: str, role: str) -> Filing:
    """File the prior *uid*, complete here and found at *source* only by the
    trusted other *identifier* (value, issuer, type) of the job's patient,
    under that patient (see the module docstring); audited as the
    reconciliation of a study with an order is (action ``order``, one event
    naming the patient it is filed under now, one the patient it left)."""
    # Trimmed, as the old PACS was searched by it (Job.identifiers) and the ingest keys the record: a HIS
    # may send the ID padded ("079185000042   ", a CHAR column), and the record never matched it.
    value = identifier[0].strip()
    issuers = {"", *(issuer for v, issuer, _type in job.other_ids if v.strip() == value)}
    what = f"order {job.accession}" if job.accession else "a run by hand"
    cx = patient_cx(job.patient_id, job.issuer)
    kind = kind_of(identifier)
    reason = f"prior fetched from {source} by the patient's {kind} (prefetch job {job.pk}, {what})"

    def once(conn: Connection) -> Filing:
        return _file(conn, job, uid, value, issuers, reason)

    # A study or order the record gained meanwhile (a concurrent ingest, an HIS order) makes the
    # deletion fail on its foreign key: run again, the record is then kept.
    filing = retry_write(pacs.engine, once, what="prefetch filing of a prior",
                         retry_on=lambda exc: is_transient(exc) or isinstance(exc, IntegrityError))
    if filing.state in ("filed", "left"):
        # No patient data in the log: the job's progress and the audit trail say whose.
        log.info("prefetch job %d: prior %s %s", job.pk, uid, "filed under the order's patient"
                 if filing.state == "filed" else "left under its own record (see pacs prefetch list --json)")
    if filing.state == "filed":
        detail = f"prefetch: filed under {cx}, found at {source} by {kind} {value} (job {job.pk}, {what})"
        if filing.detail:
            detail += f"; {filing.detail}"
        for patient in dict.fromkeys((cx, filing.previous)):
            pacs.audit.record(Event("order", user=user, role=role, protocol="dicom", client=source[:200],
                                    study_uid=uid, patient_id=patient, detail=detail[:500]))
    return filing
