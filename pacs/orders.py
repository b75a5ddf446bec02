"""Orders from the HIS: the worklist, patient updates and merges, reconciliation.

Every entry point (HL7 v2 over MLLP, the JSON API, MPPS) maps its message
onto these models and calls :class:`OrderService`; each call is one
transaction, so a rejected message leaves no partial state.

An order is a requested procedure (one accession, one Study Instance UID)
with one or more scheduled procedure steps (IHE RAD-4), a row and a worklist
item each. MPPS moves steps; the procedure's status, which the HIS is told
and the API shows, follows from its steps' (:func:`procedure_status`). What
needs one row for the procedure (the link of a received study, the order
key of the HIS messages) uses its first step's. The HIS is the
source of truth for demographics: a received study that matches an order by
Study Instance UID or Accession Number is filed under the HIS patient, and
every value the index then holds differently from the received object is
recorded in ``corrections`` (the stored bytes are never changed; retrieval
applies the corrections).
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydicom.uid import generate_uid
from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from . import outbox
from .audit import patient_cx
from .errors import PacsError
from .header import valid_uid
from .index.db import ConcurrentChange, is_transient, retry_write, write_transaction
from .index.models import (
    PATIENT_HAS_ID,
    Correction,
    Order,
    OutboundMessage,
    Patient,
    PatientIdentifier,
    PerformedStep,
    ReceivedMessage,
    Report,
    Study,
    StudyOrderLink,
)
from .index.reconcile import (
    PATIENT_COLUMNS,
    accession_match_doubt,
    file_under_patient,
    lock_order_keys,
    order_keys,
    patient_correction,
    record_reconciliation,
    with_issuer,
)
from .index.name_words import set_name_words
from .index.prune import prune_patients
from .index.writer import MERGED_ID_TYPE, merged_patient, other_id_patient
from .index.writer_helpers import insert_ignore
from .names import fold_name, name_reading, name_words
from .prefetch.jobs import enqueue_for_order as enqueue_prefetch
from .query import READABLE
from .query.matching import is_date, is_time, like_literal
from .timezones import server_zone

log = logging.getLogger(__name__)
T = TypeVar("T")

orders_t = Order.__table__
patients_t = Patient.__table__
identifiers_t = PatientIdentifier.__table__
studies_t = Study.__table__
links_t = StudyOrderLink.__table__
corrections_t = Correction.__table__
steps_t = PerformedStep.__table__
outbox_t = OutboundMessage.__table__
received_t = ReceivedMessage.__table__
reports_t = Report.__table__

# How long an applied message is remembered to recognise its resend: HIS
# engines retry for minutes or hours, never for weeks.
KEEP_RECEIVED = timedelta(days=30)
# Readings of what a message names, each under the locks the previous one
# asked for, before it is reported as changing under it (see _find_procedure,
# record_step); a transaction that lost a race is run again by
# pacs.index.db.retry_transaction.
RACE_ATTEMPTS = 3
# How far back a study's last instance may lie for its images to start its
# order's scheduled step (OrderService.progress_from_images): the days within
# which an order placed after its images is linked to them by accession
# (pacs.index.reconcile.ACCESSION_MATCH_DAYS). Older scheduled steps with
# images are left alone (the backlog of an archive upgraded to this: its
# HIS is not sent months of IP and CM at once; they expire from the worklist).
IMAGES_LOOKBACK = timedelta(days=3)
# Modalities of objects that are no images of the exam: key objects,
# presentation states, structured reports, documents (a signed report's PDF).
NOT_IMAGES = frozenset({"KO", "PR", "SR", "DOC", "REG", "FID"})

STATUSES = ("SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED", "CANCELLED")
# CX-5 identifier type codes (HL7 table 0203) that name the hospital's own
# patient number; citizen ID (NI) and insurance numbers become other IDs.
PRIMARY_ID_TYPES = ("PI", "MR")


class OrderError(PacsError):
    """A request the order model refuses; ``code`` is the HL7 v2 error code
    (table 0357) an ACK reports, ``http_status`` what the JSON API answers."""

    def __init__(self, message: str, *, code: str = "207", http_status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


@dataclass(frozen=True)
class Receipt:
    """Who sent an inbound message and its control ID (HL7 MSH-3^MSH-4 and
    MSH-10): the identity a resend of the same message carries again."""

    sender: str
    control_id: str
    kind: str = ""
    # sha256 of the message without its date/time (MSH-7): a HIS that
    # restarted its counter reuses control IDs for other messages.
    digest: str = ""


@dataclass
class OtherIdentifier:
    value: str
    issuer: str = ""
    id_type: str = ""


@dataclass
class PatientInfo:
    """The HIS's view of a patient. A demographic that is None was not sent
    and keeps its stored value (HL7 v2.5 2.5.3, a key absent from JSON); an
    empty string was sent as null and deletes it."""

    patient_id: str
    issuer: str = ""
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    other_ids: list[OtherIdentifier] = field(default_factory=list)
    # The identifier type of patient_id (HL7 CX-5: PI, MR...; "" unknown).
    id_type: str = ""
    # Why these demographics change, as the corrections of the patient's
    # studies record it ("" for an HIS message: "HIS patient update").
    reason: str = ""

    def __post_init__(self) -> None:
        # A name padded as an HIS's fixed-width column holds it (JSON, the CLI) is the name HL7's reader
        # makes of it: kept padded, C-FIND by the exact name, or by its start without diacritics, missed
        # the patient that FHIR found, and every retrieved object carried the padding.
        if self.name is not None:
            self.name = tidy_person_name(self.name)

    def demographics(self) -> dict[str, str]:
        """The DICOM keywords this update sets (only what was sent)."""
        sent = {"PatientName": self.name, "PatientBirthDate": self.birth_date, "PatientSex": self.sex}
        return {k: v for k, v in sent.items() if v is not None}


@dataclass
class OrderInfo:
    """One scheduled step with its requested procedure, as the HIS sent it
    (a procedure of several steps is several OrderInfo of one accession)."""

    patient: PatientInfo
    accession_number: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    study_uid: str = ""
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    procedure_code: str = ""
    procedure_code_scheme: str = ""
    procedure_code_meaning: str = ""
    step_id: str = ""
    step_description: str = ""
    # The step's protocol (OMI IPC-6, a CE): Scheduled Protocol Code Sequence.
    protocol_code: str = ""
    protocol_code_scheme: str = ""
    protocol_code_meaning: str = ""
    modality: str = ""
    station_ae_title: str = ""
    station_name: str = ""
    location: str = ""
    start_date: str = ""
    start_time: str = ""
    performing_physician: str = ""
    referring_physician: str = ""
    priority: str = ""
    reason: str = ""


_ORDER_COLUMNS = [f for f in OrderInfo.__dataclass_fields__ if f != "patient"]
# The requested procedure's values, the same on each of its steps' rows
# (DICOM: Requested Procedure and Imaging Service Request modules)...
PROCEDURE_COLUMNS = ("placer_order_number", "filler_order_number", "accession_number", "study_uid",
                     "requested_procedure_id", "requested_procedure_description", "procedure_code",
                     "procedure_code_scheme", "procedure_code_meaning", "referring_physician", "priority", "reason")
# ...and each scheduled step's own (Scheduled Procedure Step Sequence item).
STEP_COLUMNS = ("step_id", "step_description", "protocol_code", "protocol_code_scheme", "protocol_code_meaning",
                "modality", "station_ae_title", "station_name", "location", "start_date", "start_time",
                "performing_physician")
assert set(PROCEDURE_COLUMNS) | set(STEP_COLUMNS) == set(_ORDER_COLUMNS)

# What the worklist returns these values as (PS3.5 table 6.2-1): a longer value
# would be an invalid DICOM response, so every entry point refuses it here.
# Keys and codes only: a modality matches and copies them into its images
# and MPPS, and a cut one would name another exam or station.
_VR_LIMITS: dict[str, tuple[str, str, int]] = {
    "accession_number": ("AccessionNumber", "SH", 16),
    "requested_procedure_id": ("RequestedProcedureID", "SH", 16),
    "step_id": ("ScheduledProcedureStepID", "SH", 16),
    "modality": ("Modality", "CS", 16),
    "station_ae_title": ("ScheduledStationAETitle", "AE", 16),
}
# Labels a modality only shows (HIS room names: "Phòng chụp cắt lớp vi tính
# số 1"), cut to their VR's length rather than the whole exam refused over
# them. Stored cut: they are matching keys (a station asking by its name
# must find what it is answered), unlike descriptions, kept whole and cut
# when served (worklist.scp).
_CUT_TO_VR: dict[str, tuple[str, str, int]] = {
    "station_name": ("ScheduledStationName", "SH", 16),
    "location": ("ScheduledProcedureStepLocation", "SH", 16),
}
_PATIENT_ID_LIMIT = 64  # PatientID and IssuerOfPatientID are LO
# The start time of a step scheduled for a day without a time (see OrderService._schedule_undated).
UNTIMED_START = "000000"


def fit_text(value: str, limit: int) -> str:
    """*value* cut to *limit* characters (PS3.5 6.2: SH, LO and the like
    count characters, not bytes). A value of odd length in UTF-8 bytes is
    padded with a space on the wire, which some readers (pydicom warns)
    count as a character too: such a value keeps *limit* - 1."""
    cut = value[:limit].rstrip()
    if len(cut) == limit and len(cut.encode("utf-8")) % 2:
        cut = cut[:limit - 1].rstrip()
    return cut


def fit_order(info: OrderInfo) -> OrderInfo:
    """*info* with the labels of :data:`_CUT_TO_VR` cut to their VR's
    length (logged by field name: a room name is no patient data, but the
    log names fields only)."""
    cut = {name: fit_text(getattr(info, name), limit) for name, (_, _, limit) in _CUT_TO_VR.items()
           if len(getattr(info, name)) > limit}
    for name in cut:
        keyword, vr, limit = _CUT_TO_VR[name]
        log.info("%s (%s, VR %s) of %d characters cut to %d for the worklist", name, keyword, vr,
                 len(getattr(info, name)), limit)
    return replace(info, **cut) if cut else info


def validate_order(info: OrderInfo) -> None:
    """Refuse values the worklist could not return (HL7: AE with ERR 102,
    JSON: 400 for a length, 422 for an impossible date or time). The message
    names the field, never its value (PHI) -- a date or time is no PHI and
    is quoted, so the HIS sees what it sent."""
    for name, (keyword, vr, limit) in _VR_LIMITS.items():
        length = len(getattr(info, name))
        if length > limit:
            raise OrderError(
                f"{name} ({keyword}, VR {vr}) has {length} characters; at most {limit} are allowed",
                code="102", http_status=400,
            )
    # A day that does not exist (20261399) or a time past 23:59:59 (250000,
    # or "123", no TM form) went to the modality as it was: a worklist
    # answer it cannot read, and an item no date or time range query finds.
    for name, keyword, valid, form in (("start_date", "ScheduledProcedureStepStartDate", is_date, "YYYYMMDD"),
                                       ("start_time", "ScheduledProcedureStepStartTime", is_time,
                                        "HH[MM[SS[.FFFFFF]]]")):
        value = getattr(info, name)
        if value and not valid(value):
            raise OrderError(f"{name} ({keyword}, VR {'DA' if name == 'start_date' else 'TM'}) {value[:20]!r} is "
                             f"not a valid {form}", code="102", http_status=422)


def _require_modality(info: OrderInfo) -> None:
    """A new scheduled step names its modality: Modality is a Type 1
    worklist return key (PS3.4 Table K.6-1), and every modality asks for its
    own -- a step without one was acknowledged AA and then offered to no
    console, while the HIS believed it scheduled. IHE SWF (RAD-4) maps it
    from OBR-24 (ORM) or IPC-5 (OMI). Refused (AE 101, JSON 400) rather than
    guessed: a procedure code says nothing reliable about the modality."""
    if not info.modality:
        raise OrderError("the scheduled step has no modality (OBR-24, IPC-5; JSON modality): Modality is a Type 1 "
                         "worklist key (PS3.4 K.6-1), no modality would ever be offered the exam",
                         code="101", http_status=400)


def _require_patient_name(conn: Connection, patient_pk: int) -> None:
    """An order's patient has a name: Patient's Name is a Type 1 worklist
    return key (PS3.4 Table K.6-1); an item without one was answered with an
    empty name, which the modality writes into the images. An order for a
    patient the HIS has not named (PID-5 empty, or "" deleting the name) is
    refused (AE 101, JSON 400); a PID-5 left out keeps the stored name."""
    name = conn.execute(select(patients_t.c.name).where(patients_t.c.pk == patient_pk)).scalar()
    if not (name or "").replace("^", "").replace("=", "").strip():
        raise OrderError("the patient has no name (PID-5; JSON patient.name): Patient's Name is a Type 1 worklist "
                         "key (PS3.4 K.6-1)", code="101", http_status=400)


def _patient_columns(p: PatientInfo) -> dict[str, Any]:
    """Patient row values for the demographics *p* carries (None: keep)."""
    values: dict[str, Any] = {}
    if p.name is not None:
        values.update(name=p.name, name_folded=fold_name(p.name), name_words=name_words(p.name),
                      name_reading=name_reading(p.name))
    if p.birth_date is not None:
        values["birth_date"] = p.birth_date
    if p.sex is not None:
        values["sex"] = p.sex
    return values


# PS3.5 6.2 PN: at most three component groups (alphabetic=ideographic=phonetic)
# of at most five components and 64 characters each.
_PN_GROUPS, _PN_COMPONENTS, _PN_GROUP_CHARS = 3, 5, 64


def _string_problem(value: str) -> str:
    """What no DICOM string value (PN, LO) may hold, or "": a backslash, the
    value separator, or a control character."""
    if "\\" in value:
        return "holds a backslash (a DICOM value separator)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "holds a control character"
    return ""


def tidy_person_name(name: str) -> str:
    """A DICOM PN as the HL7 reader makes one of an XPN (ris_bridge.hl7v2):
    each component without the spaces around it, and no empty trailing
    components or groups ("Trịnh ^ Văn Tư   " -> "Trịnh^Văn Tư"). Spaces
    inside a component are the name's."""
    groups = ["^".join(component.strip() for component in group.split("^")).rstrip("^")
              for group in name.split("=")]
    return "=".join(groups).rstrip("=")


def check_person_name(name: str) -> None:
    """Refuse (400) a patient's name that is no DICOM PN, as a person typed
    it for a correction (JSON, ``pacs patient update``): a backslash is
    DICOM's value separator (C-GET sent two names, QIDO-RS and WADO-RS the
    first word), a control character no PN holds, and a longer group or
    more components make an invalid PN in every retrieved object. HL7
    names are made PNs by their reader (ris_bridge.hl7v2). The message
    names the attribute, not the value (PHI)."""
    groups = name.split("=")
    shape = ""
    if len(groups) > _PN_GROUPS:
        shape = f"has {len(groups)} component groups (\"=\"); at most {_PN_GROUPS} are allowed"
    elif any(len(g.split("^")) > _PN_COMPONENTS for g in groups):
        shape = f"has a group of more than {_PN_COMPONENTS} components (\"^\")"
    elif any(len(g) > _PN_GROUP_CHARS for g in groups):
        shape = f"has a component group of more than {_PN_GROUP_CHARS} characters"
    problem = _string_problem(name) or shape
    if problem:
        raise OrderError(f"the name (PatientName, VR PN) {problem}", code="102", http_status=400)


def check_patient_id(patient_id: str) -> None:
    """Refuse (400) a Patient ID a correction names that no DICOM object can
    carry (LO), rather than create a patient of it while the one meant
    stays as it was: blank, with leading or trailing spaces (DICOM ignores
    them: the ingest's patient has none), a backslash (a value separator), a
    control character, or U+FFFD (bytes of another encoding than UTF-8 in
    the URL). The message does not quote the ID (PHI)."""
    if not patient_id.strip():
        problem = "is blank"
    elif patient_id != patient_id.strip(" "):
        problem = "has leading or trailing spaces"
    else:
        problem = _string_problem(patient_id) or (
            "holds U+FFFD: sent in another encoding than UTF-8?" if "\ufffd" in patient_id else "")
    if problem:
        raise OrderError(f"the patient ID (PatientID, VR LO) {problem}", code="102", http_status=400)


def change_reason(what: str, user: str, reason: str) -> str:
    """The reason the studies' corrections record for a patient update or
    merge made by *user* (an administrator, or an HIS over the JSON API)."""
    return f"{what} by {user}" + (f": {reason.strip()}" if reason.strip() else "")


def _now() -> datetime:
    return datetime.now(UTC)


# received_messages.kind holds "<type^trigger> sha256:<digest>": the digest
# rides in the existing column (no schema change); rows written before it
# carry none and count as the same message, as they did.
_DIGEST_MARK = " sha256:"


def _received_kind(receipt: Receipt) -> str:
    return f"{receipt.kind}{_DIGEST_MARK}{receipt.digest}" if receipt.digest else receipt.kind


def _same_message(stored_kind: str, receipt: Receipt) -> bool:
    """Whether the message remembered under this sender and control ID is
    *receipt*'s (a resend), not another one under a reused control ID."""
    _, mark, digest = (stored_kind or "").partition(_DIGEST_MARK)
    return not (mark and receipt.digest) or digest == receipt.digest


def _resolve_birth_date(sent: str | None, stored: str | None) -> str | None:
    """A birth date as the patient row can hold it (DICOM DA, 8 digits).
    A partial date (YYYY or YYYYMM, from HL7 PID-7) keeps a stored full date
    it agrees with -- "1990" says nothing new about 19900101 -- and otherwise
    leaves the date empty rather than inventing a day (a new patient, or a
    stored date the HIS now contradicts)."""
    if sent is None or len(sent) in (0, 8):
        return sent
    return stored if stored and len(stored) == 8 and stored.startswith(sent) else ""


# Steps the HIS withdrew (CA/OC, DC/OD). A scheduled step is DISCONTINUED by
# the HIS only: a discontinued performed step (MPPS) puts its step back to
# SCHEDULED (see OrderService._after_discontinued), never to DISCONTINUED.
WITHDRAWN_STATUSES = ("CANCELLED", "DISCONTINUED")
# Step statuses no performed step changes any more: withdrawn, or done.
FINAL_STATUSES = (*WITHDRAWN_STATUSES, "COMPLETED")
# Steps still to be done (offered on the worklist), and steps the HIS may no longer change.
ACTIVE_STATUSES = ("SCHEDULED", "IN PROGRESS")
CLOSED_STATUSES = ("CANCELLED", "DISCONTINUED", "COMPLETED")
_ORDER_ACTIONS = ("place", "change", "cancel", "discontinue")


def _procedure_key(info: OrderInfo) -> str:
    """What tells a change item's requested procedure apart within a message."""
    return info.accession_number or info.filler_order_number or info.placer_order_number


def _changes_per_procedure(actions: list[tuple[str, Any]]) -> dict[str, int]:
    """How many change items of *actions* name each requested procedure;
    AE 205 for a step named twice (a message must not say two things of one
    step, and the last must not silently win)."""
    counts: dict[str, int] = {}
    steps: set[tuple[str, str]] = set()
    for action, info in actions:
        if action != "change":
            continue
        key = _procedure_key(info)
        counts[key] = counts.get(key, 0) + 1
        if info.step_id:
            if (key, info.step_id) in steps:
                raise OrderError(f"step {info.step_id} of order {key} is named twice in one change",
                                 code="205", http_status=409)
            steps.add((key, info.step_id))
    return counts


def lock_patient_studies(conn: Connection, patient_pk: int) -> list[int]:
    """The patient's studies, locked (PostgreSQL) in Study Instance UID order
    before the patient row is changed or they are moved.

    Changing a patient's name, ID or issuer makes its trigger
    (``trg_patients_changed``, migration 0022) update every study of the
    patient after the patient row, in no particular order, while the ingest
    locks studies in Study Instance UID order (pacs.index.committer) and a
    deletion locks its study, then deletes the patient. Taking the studies
    first, in that order, and the patient after, this transaction waits for
    a running ingest or deletion holding nothing either wants (it was part
    of a deadlock with each: ADT^A08 answered AR). What is left (locks taken
    in other orders) is retried as a deadlock (pacs.index.db.retry_transaction).
    SQLite: the transaction holds the one write lock already."""
    query = select(studies_t.c.pk).where(studies_t.c.patient_pk == patient_pk).order_by(studies_t.c.study_uid)
    if conn.dialect.name == "postgresql":
        # FOR NO KEY UPDATE, as the trigger's UPDATE and the ingest's counters take.
        query = query.with_for_update(key_share=True)
    return [int(pk) for pk in conn.execute(query).scalars()]


def _raced(exc: BaseException) -> bool:
    """An inbound message's transaction lost a race with another writer, and
    is applied again (see OrderService.apply_message)."""
    return isinstance(exc, IntegrityError) or is_transient(exc)


def _patient_gone() -> ConcurrentChange:
    """The patient this transaction found was deleted meanwhile (its last
    study deleted, by a deletion that committed first): the message is
    applied again, and then makes the patient anew."""
    return ConcurrentChange("the patient was deleted meanwhile")


def procedure_status(statuses: Iterable[str]) -> str:
    """A requested procedure's status from its steps' -- what the HIS is
    told (ORC-5) and the API shows. A single step's status is the
    procedure's, as before steps. Of several: IN PROGRESS while one is
    being performed, or while some are done and others still wait (the
    exam is under way); COMPLETED once every step is completed or was
    withdrawn by the HIS (cancelled, discontinued) and one at least was
    performed; SCHEDULED while none has started; DISCONTINUED or CANCELLED
    when the HIS withdrew all of them."""
    seen = set(statuses)
    if "IN PROGRESS" in seen:
        return "IN PROGRESS"
    if "SCHEDULED" in seen:
        return "IN PROGRESS" if "COMPLETED" in seen else "SCHEDULED"
    for status in ("COMPLETED", "DISCONTINUED"):
        if status in seen:
            return status
    return "CANCELLED"


@dataclass
class _Batch:
    """One transaction of actions (one message): the accessions it placed (a
    later step of one joins its procedure), and each procedure's status
    before the transaction first touched it (None: placed by it), so that
    the HIS hears of the net change once."""

    placed: set[str] = field(default_factory=set)
    before: dict[str, str | None] = field(default_factory=dict)
    # Accessions a step of which the transaction changed, added or withdrew,
    # and the first refusal of an item naming a step it can no longer change:
    # raised at the end unless another item of the message did something to
    # that procedure (a HIS resends every step of an order with its change
    # or cancel, performed ones too; alone, the item is refused as before).
    changed: set[str] = field(default_factory=set)
    refusals: dict[str, OrderError] = field(default_factory=dict)

    def refuse(self, accession: str, error: OrderError) -> None:
        self.refusals.setdefault(accession, error)

    def check(self) -> None:
        """Raise the refusal of a procedure nothing else in the message changed."""
        for accession, error in self.refusals.items():
            if accession not in self.changed:
                raise error


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _status_order(procedure: dict[str, Any]) -> dict[str, Any]:
    """The order of an order_status message: the procedure as it was sent
    before steps (its first step's row). The HL7 status message is about the
    order, not a step; its pk keys in-order delivery (pacs.outbox.message_key)."""
    return {k: v for k, v in procedure.items() if k != "steps"}


def _fits(step: Any, modality: str, station_ae_title: str) -> bool:
    """Whether a scheduled step may be the one a performing station and
    modality did (a step without them fits any, as on the worklist)."""
    return ((not step.station_ae_title or not station_ae_title or step.station_ae_title == station_ae_title)
            and (not step.modality or not modality or step.modality == modality))


def split_end(value: str) -> tuple[str, str]:
    """A performed step's stored End Date and Time (DA + TM, one string) as
    (date, time). Unambiguous for valid values: a DA is exactly eight
    digits, and a TM of eight characters has its "." at the seventh."""
    return (value[:8], value[8:]) if is_date(value[:8]) else ("", value)


class OrderService:
    """Transactions on orders, patients, performed steps and the outbox."""

    def __init__(self, engine: Any, zone: tzinfo | None = None, *, order_status: bool = True,
                 prefetch: bool = False) -> None:
        """*order_status*: tell the HIS of status changes of its orders
        (ORM^O01; the ``his_order_status`` setting): a results-only HIS
        refuses them. *prefetch*: a new order queues the prefetch of its
        patient's prior studies from the old PACS (``prefetch_sources`` set;
        pacs.prefetch)."""
        self.engine = engine
        # The hospital's zone: the scheduled date and time of an order that
        # comes without one (see _place). None: the server's.
        self.zone = zone
        self.order_status = order_status
        self.prefetch = prefetch

    # -- patients ------------------------------------------------------------------
    def _upsert_patient(self, conn: Connection, p: PatientInfo, *, match_identifiers: bool = True) -> int:
        """The HIS patient, created or updated (the HIS wins on demographics,
        but only on those it sent: a value left out keeps the stored one)."""
        if not p.patient_id:
            raise OrderError("the patient has no identifier", code="101", http_status=400)
        # All LO (PS3.5), the other IDs too (C-FIND's Other Patient IDs Sequence): a longer value is
        # refused by every entry point (the JSON API's models too), never stored to be served as invalid DICOM.
        others = [(o.value, f"the other patient ID {o.value[:20]}... (PatientID in OtherPatientIDsSequence, VR LO; "
                            "HL7 PID-3)") for o in p.other_ids]
        others += [(o.issuer, f"the issuer of the other patient ID {o.value[:64]} (IssuerOfPatientID in "
                              "OtherPatientIDsSequence, VR LO; HL7 PID-3.4)") for o in p.other_ids]
        for value, what in ((p.patient_id, "the patient ID (PatientID, VR LO)"),
                            (p.issuer, "the issuer of the patient ID (IssuerOfPatientID, VR LO; HL7 PID-3.4)"),
                            *others):
            if len(value) > _PATIENT_ID_LIMIT:
                raise OrderError(f"{what} is longer than {_PATIENT_ID_LIMIT} characters", code="102", http_status=400)
        if p.birth_date and len(p.birth_date) == 8 and not is_date(p.birth_date):
            # 19851301 went to the worklist and the studies' corrections as it was: no DA reader takes it.
            raise OrderError(f"the birth date (PatientBirthDate, VR DA) {p.birth_date!r} is not a valid YYYYMMDD",
                             code="102", http_status=422)
        now = _now()
        pk, merged_away = self._existing_patient(conn, p, match_identifiers)
        if pk is not None and merged_away:
            # A message still naming the registration the HIS merged away (an
            # order queued before the merge, an interface that lags) is the
            # surviving patient's, as a study under that ID is; but what it
            # says of the patient is the discarded registration's (the
            # duplicate's misspelt name, another birth date): it overwrote
            # the surviving patient's, and every study of it was retrieved
            # so. The surviving registration's messages keep it up to date.
            log.info("patient %d: a message named a patient ID merged into it; its demographics are not applied", pk)
            return int(pk)
        if p.birth_date is not None and len(p.birth_date) not in (0, 8):
            stored = conn.execute(select(patients_t.c.birth_date).where(patients_t.c.pk == pk)).scalar() \
                if pk is not None else None
            p = replace(p, birth_date=_resolve_birth_date(p.birth_date, stored))
        if pk is None:
            blank = PatientInfo(p.patient_id, name="", birth_date="", sex="")
            sent = _patient_columns(p)
            pk = insert_ignore(
                conn,
                patients_t,
                {"patient_id": p.patient_id, "issuer": p.issuer, "created_at": now, "updated_at": now,
                 "changed_at": now, **_patient_columns(blank), **sent, "registered": bool(sent)},
                ["patient_id", "issuer"],
                where=PATIENT_HAS_ID,
            )
            if pk is not None:
                set_name_words(conn, pk, name_words(p.name or ""))
            else:  # created meanwhile by another writer
                pk = conn.execute(
                    select(patients_t.c.pk).where(patients_t.c.patient_id == p.patient_id,
                                                  patients_t.c.issuer == p.issuer)
                ).scalar()
                if pk is None:
                    raise ConcurrentChange("the patient was created and deleted meanwhile")
                self._update_demographics(conn, pk, p, now)
        else:
            self._update_demographics(conn, pk, p, now)
        # The patient's own key is no other ID of it: Other Patient IDs
        # repeated the Patient ID (a message listing the ID the patient was
        # found by, rows written before this check).
        key = conn.execute(select(patients_t.c.patient_id, patients_t.c.issuer).where(patients_t.c.pk == pk)).first()
        if key is None:
            raise _patient_gone()
        conn.execute(delete(identifiers_t).where(identifiers_t.c.patient_pk == pk,
                                                 identifiers_t.c.value == key.patient_id,
                                                 identifiers_t.c.issuer == key.issuer))
        for other in p.other_ids:
            if (other.value, other.issuer) != (key.patient_id, key.issuer):
                self._add_identifier(conn, pk, other)
        return int(pk)

    def _update_demographics(self, conn: Connection, pk: int, p: PatientInfo, now: datetime) -> None:
        values = _patient_columns(p)
        if not values:
            return
        changed = self._demographics_changed(conn, pk, p)
        if not changed:
            # The modality's values, confirmed: registered from now on (see Patient.registered).
            conn.execute(update(patients_t).where(patients_t.c.pk == pk, patients_t.c.registered.is_(False))
                         .values(registered=True))
        else:
            lock_patient_studies(conn, pk)
            if not conn.execute(update(patients_t).where(patients_t.c.pk == pk)
                                .values(**values, registered=True, updated_at=now)).rowcount:
                raise _patient_gone()
            if "name_words" in values:
                set_name_words(conn, pk, values["name_words"])
            # Only what really changed becomes a correction of the stored studies.
            self._record_patient_change(conn, pk, changed, p.reason or "HIS patient update")

    @staticmethod
    def _patient_pk(conn: Connection, patient_id: str, issuer: str) -> int | None:
        return conn.execute(
            select(patients_t.c.pk).where(patients_t.c.patient_id == patient_id, patients_t.c.issuer == issuer)
        ).scalar()

    def _existing_patient(self, conn: Connection, p: PatientInfo, match_identifiers: bool) -> tuple[int | None, bool]:
        """The stored patient *p* is, or None for a new one; and whether *p*
        names it by a Patient ID the HIS merged away (ADT^A40)."""
        if p.issuer:
            # The same ID received from a modality without an issuer is this
            # patient: give it the HIS's issuer instead of creating a twin.
            no_twin = ~select(patients_t.c.pk).where(patients_t.c.patient_id == p.patient_id,
                                                     patients_t.c.issuer == p.issuer).exists()
            blank = conn.execute(select(patients_t.c.pk).where(
                patients_t.c.patient_id == p.patient_id, patients_t.c.issuer == "", no_twin)).scalar()
            if blank is not None:
                lock_patient_studies(conn, blank)
                conn.execute(update(patients_t).where(patients_t.c.pk == blank, patients_t.c.issuer == "", no_twin)
                             .values(issuer=p.issuer))
        pk = self._patient_pk(conn, p.patient_id, p.issuer)
        if pk is None and not p.issuer:
            pk = self._single_patient_with_id(conn, p.patient_id)
        if pk is None:
            # An ID merged away (ADT^A40) names the patient it was merged into.
            pk = merged_patient(conn, p.patient_id, p.issuer)
            if pk is not None:
                return pk, True
        if pk is None and match_identifiers:
            pk = self._patient_by_identifier(conn, p)
        return pk, False

    @staticmethod
    def _patient_pk_any_issuer(conn: Connection, patient_id: str) -> int | None:
        return conn.execute(select(patients_t.c.pk).where(patients_t.c.patient_id == patient_id).limit(1)).scalar()

    @staticmethod
    def _single_patient_with_id(conn: Connection, patient_id: str) -> int | None:
        """A PID-3 without assigning authority names the patient registered
        under that ID with an issuer, when there is exactly one (as the DICOM
        ingest does for modalities): otherwise it would become a twin."""
        known = conn.execute(select(patients_t.c.pk).where(patients_t.c.patient_id == patient_id).limit(2)).scalars().all()
        return int(known[0]) if len(known) == 1 else None

    def _patient_by_identifier(self, conn: Connection, p: PatientInfo) -> int | None:
        """A patient first filed under another of the identifiers this message
        carries (e.g. created from the citizen ID before the HIS sent its
        hospital number): the one patient whose key is one of our other IDs,
        or who already holds our patient ID as an other ID. Only identifiers
        with an issuer count, and other IDs are never matched against other
        IDs (insurance numbers are mistyped and shared); an ambiguous match
        creates a new patient, for ADT^A40 to merge."""
        keys = [(o.value, o.issuer) for o in p.other_ids if o.value and o.issuer]
        candidates: set[int] = set()
        for value, issuer in keys:
            found = self._patient_pk(conn, value, issuer)
            if found is not None:
                candidates.add(int(found))
        if p.issuer:
            candidates.update(int(pk) for pk in conn.execute(
                select(identifiers_t.c.patient_pk).where(identifiers_t.c.value == p.patient_id,
                                                          identifiers_t.c.issuer == p.issuer)
            ).scalars())
        if len(candidates) != 1:
            return None
        pk = candidates.pop()
        if not self._promote_hospital_number(conn, pk, p):
            # Remember the ID we were given, so the next message finds the patient directly.
            self._add_identifier(conn, pk, OtherIdentifier(p.patient_id, p.issuer, ""))
        return pk

    def _promote_hospital_number(self, conn: Connection, pk: int, p: PatientInfo) -> bool:
        """A patient first registered by another ID (a citizen ID: the HIS
        sent no hospital number yet) gets the hospital's own number (PID-3 of
        type PI or MR) as its Patient ID once a message brings it, listing
        the old key as another ID of a non-primary type: the old key becomes
        an other ID, and the studies stored already get the new Patient ID
        and issuer as corrections (retrieval applies them; the worklist reads
        the patient row). Otherwise the modalities kept stamping the citizen
        ID, whatever the HIS sent. False when *p* does not say so."""
        if p.id_type not in PRIMARY_ID_TYPES:
            return False
        row = conn.execute(select(patients_t).where(patients_t.c.pk == pk)).one()
        demoted = next((o for o in p.other_ids
                        if (o.value, o.issuer) == (row.patient_id, row.issuer) and o.id_type not in PRIMARY_ID_TYPES),
                       None)
        if demoted is None:
            return False
        lock_patient_studies(conn, pk)
        conn.execute(delete(identifiers_t).where(identifiers_t.c.patient_pk == pk,
                                                 identifiers_t.c.value == p.patient_id,
                                                 identifiers_t.c.issuer == p.issuer))
        conn.execute(update(patients_t).where(patients_t.c.pk == pk)
                     .values(patient_id=p.patient_id, issuer=p.issuer, updated_at=_now()))
        self._add_identifier(conn, pk, demoted)
        changed = with_issuer({k: (old, new) for k, old, new in (("PatientID", row.patient_id, p.patient_id),
                                                                 ("IssuerOfPatientID", row.issuer, p.issuer))
                               if old != new}, (row.issuer, p.issuer))
        self._record_patient_change(conn, pk, changed, "HIS hospital number (PID-3 type PI/MR) became the patient ID")
        log.info("patient %d: the hospital number became the patient ID, the former one an other ID", pk)
        return True

    @staticmethod
    def _add_identifier(conn: Connection, patient_pk: int, other: OtherIdentifier) -> None:
        if other.value:
            insert_ignore(
                conn,
                identifiers_t,
                {"patient_pk": patient_pk, "value": other.value, "issuer": other.issuer, "id_type": other.id_type},
                ["patient_pk", "value", "issuer"],
            )

    @staticmethod
    def _demographics_changed(conn: Connection, pk: int, p: PatientInfo) -> dict[str, tuple[str, str]]:
        row = conn.execute(select(patients_t).where(patients_t.c.pk == pk)).first()
        if row is None:
            raise _patient_gone()
        return {
            k: (getattr(row, PATIENT_COLUMNS[k]), v)
            for k, v in p.demographics().items()
            if getattr(row, PATIENT_COLUMNS[k]) != v
        }

    @staticmethod
    def _record_patient_change(
        conn: Connection, patient_pk: int, changed: dict[str, tuple[str, str]], reason: str
    ) -> None:
        """Flag every study of the patient so retrieval applies the new values."""
        now = _now()
        study_pks = conn.execute(select(studies_t.c.pk).where(studies_t.c.patient_pk == patient_pk)).scalars()
        rows = [
            {"study_pk": s, "keyword": k, "received": old, "corrected": new, "reason": reason, "created_at": now}
            for s in study_pks
            for k, (old, new) in changed.items()
        ]
        if rows:
            conn.execute(corrections_t.insert(), rows)

    def apply(self, actions: list[tuple[str, Any]], source: str = "") -> list[Any]:
        """Several actions in ONE transaction: a message with three orders is
        applied whole or not at all. Actions: ("place"|"change"|"cancel"|
        "discontinue", OrderInfo), ("patient", PatientInfo),
        ("merge", (PatientInfo, [(prior id, issuer)])), and for corrections by
        a person ("correct", PatientInfo), ("merge_into", (PatientInfo, [(prior
        id, issuer)])): see :meth:`correct_patient`, :meth:`merge_into`. Several "place" of
        one accession are the scheduled steps of one new requested procedure."""
        return retry_write(self.engine, lambda conn: self._apply(conn, actions, source),
                           what="order service transaction")

    def apply_message(self, actions: list[tuple[str, Any]], receipt: Receipt, source: str = "") -> bool:
        """:meth:`apply` for an inbound message, recorded as applied in the
        same transaction. False (and nothing applied) when a message with the
        same sender and control ID was applied before: the sender resends
        when our acknowledgement was lost, and must not get an error
        ("order already exists") for what it already did.

        On PostgreSQL two messages about one patient or order (or one
        message sent twice at once over two connections) can both find
        nothing and both insert: the loser's transaction is refused by a
        unique key, and replayed, when it sees what the winner did. So is a
        transaction PostgreSQL chose as a deadlock's victim (the ingest or a
        deletion locking the patient's studies in another order), and one
        whose patient a deletion removed meanwhile (pacs.index.db.is_transient):
        the HIS gets AA, not AR for a conflict of our own making."""
        try:
            return retry_write(self.engine, lambda conn: self._apply_message_once(conn, actions, receipt, source),
                               what=f"message {receipt.control_id!r}", retry_on=_raced)
        except OrderError:
            # "Order already exists" because the same message, sent twice
            # at once, was applied by the other connection meanwhile.
            with self.engine.connect() as conn:
                if self._already_applied(conn, receipt):
                    return False
            raise

    @staticmethod
    def _already_applied(conn: Connection, receipt: Receipt) -> Any:
        """The receipt row of this sender's control ID, or None; False when
        that row records another message (the control ID was reused)."""
        seen = conn.execute(select(received_t.c.pk, received_t.c.kind).where(
            received_t.c.sender == receipt.sender, received_t.c.control_id == receipt.control_id)).first()
        return seen if seen is None or _same_message(seen.kind, receipt) else False

    def _apply_message_once(self, conn: Connection, actions: list[tuple[str, Any]], receipt: Receipt,
                            source: str) -> bool:
        seen = conn.execute(select(received_t.c.pk, received_t.c.kind).where(
            received_t.c.sender == receipt.sender, received_t.c.control_id == receipt.control_id)).first()
        if seen is not None and _same_message(seen.kind, receipt):
            return False
        self._apply(conn, actions, source)
        now = _now()
        conn.execute(delete(received_t).where(received_t.c.received_at < now - KEEP_RECEIVED))
        kind = _received_kind(receipt)
        if seen is None:
            conn.execute(received_t.insert().values(
                sender=receipt.sender, control_id=receipt.control_id, kind=kind, received_at=now))
        else:  # the control ID now names this message: its resend is the one to recognise
            conn.execute(update(received_t).where(received_t.c.pk == seen.pk).values(kind=kind, received_at=now))
        return True

    def _apply(self, conn: Connection, actions: list[tuple[str, Any]], source: str) -> list[Any]:
        results = []
        batch = _Batch()
        self._lock_procedures(conn, actions)
        changes = _changes_per_procedure(actions)
        for action, arg in actions:
            if action == "place":
                results.append(self._place(conn, arg, source, batch))
            elif action == "change":
                results.append(self._change(conn, arg, source, batch, alone=changes[_procedure_key(arg)] == 1))
            elif action in ("cancel", "discontinue"):
                results.append(self._cancel(conn, arg, "CANCELLED" if action == "cancel" else "DISCONTINUED", batch))
            elif action == "patient":
                results.append(self._upsert_patient(conn, arg))
            elif action == "merge":
                results.append(self._merge(conn, *arg))
            elif action == "correct":
                results.append(self._correct_patient(conn, arg))
            elif action == "merge_into":
                results.append(self._merge_into(conn, *arg))
            else:
                raise OrderError(f"unknown action {action!r}", code="207", http_status=400)
        batch.check()
        self._report_changes(conn, batch)
        for accession in sorted(batch.placed):
            self._adopt_performed_steps(conn, accession)
            if self.prefetch:
                # With the order: a new order always has its job; a refused message leaves none.
                enqueue_prefetch(conn, accession)
        return results

    def update_patient(self, p: PatientInfo) -> None:
        """ADT^A08 / A31: new demographics for an existing (or new) patient."""
        self.apply([("patient", p)])

    def correct_patient(self, p: PatientInfo) -> dict[str, Any]:
        """A correction of a patient's demographics by someone who waits for
        the answer (the administrator's ``pacs patient update``, an HIS over
        ``PUT /api/patients/{id}``): :meth:`update_patient`, but an ID the
        HIS merged away is refused (409) -- ADT^A08 of a lagging interface
        is acknowledged and its demographics ignored, and the caller here
        was answered as if corrected. Returns the patient as stored: found
        without issuer, the key with the issuer it has."""
        check_patient_id(p.patient_id)
        if p.name:
            check_person_name(p.name)
        pk = self.apply([("correct", p)])[0]
        with self.engine.connect() as conn:
            found = self._patient_dict(conn, pk)
        if found is None:  # deleted (its last study) right after
            raise OrderError(f"patient {patient_cx(p.patient_id, p.issuer)} was deleted meanwhile", code="204",
                             http_status=404)
        return found

    def _correct_patient(self, conn: Connection, p: PatientInfo) -> int:
        pk, merged_away = self._existing_patient(conn, p, match_identifiers=False)
        if pk is not None and merged_away:
            into = conn.execute(select(patients_t.c.patient_id, patients_t.c.issuer)
                                .where(patients_t.c.pk == pk)).one()
            raise OrderError(f"patient {patient_cx(p.patient_id, p.issuer)} was merged into "
                             f"{patient_cx(into.patient_id, into.issuer)}: correct that patient", code="205",
                             http_status=409)
        return self._upsert_patient(conn, p)

    def merge_into(self, surviving: PatientInfo, prior: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
        """A merge by someone who names the surviving patient by its key
        alone (``POST /api/patients/merge``): :meth:`merge_patients`, but
        the surviving patient must exist (404) -- made by the merge, it had
        neither name nor birth date (ADT^A40's PID brings them, this
        request does not), and C-FIND by the patient's name no longer found
        the moved studies -- and must not be an ID merged away (409).
        Returns how many studies moved, and the surviving patient."""
        moved, pk = self.apply([("merge_into", (surviving, prior))])[0]
        with self.engine.connect() as conn:
            return moved, self._patient_dict(conn, pk) or {}

    def merge_preview(self, surviving: PatientInfo, prior: list[tuple[str, str]]) -> int:
        """How many studies :meth:`merge_into` would move now, or the
        :class:`OrderError` it would raise: the merge itself, rolled back
        (a dry run that predicts what the merge will say)."""
        return self._rehearsed(lambda conn: self._merge_into(conn, surviving, prior)[0])

    def _rehearsed(self, work: Callable[[Connection], T]) -> T:
        """``work(conn)`` in a write transaction rolled back: what a change
        would do (or the refusal it would meet), nothing changed -- a dry
        run that cannot disagree with the change it predicts."""
        with write_transaction(self.engine) as conn:
            result = work(conn)
            conn.rollback()
        return result

    def _merge_into(self, conn: Connection, surviving: PatientInfo, prior: list[tuple[str, str]]) -> tuple[int, int]:
        pk, merged_away = self._existing_patient(conn, surviving, match_identifiers=False)
        who = patient_cx(surviving.patient_id, surviving.issuer)
        if pk is None:
            raise OrderError(f"no patient {who} to merge into: register them first (PUT /api/patients/{{id}} "
                             "with their name)", code="204", http_status=404)
        if merged_away:
            raise OrderError(f"patient {who} was merged away: merge into the patient it was merged into",
                             code="205", http_status=409)
        moved = self._merge(conn, surviving, prior)
        return moved, pk

    def patient(self, patient_id: str, issuer: str | None = "") -> dict[str, Any] | None:
        """The patient with that key as the index holds it (demographics,
        other IDs, how many studies), or None. *issuer* None: the patient
        without issuer, else the one patient holding the ID under an issuer
        -- the patient an update without issuer changes (HL7 PID-3 without
        assigning authority, ``PUT /api/patients/{id}``)."""
        with self.engine.connect() as conn:
            pk = self._patient_pk(conn, patient_id, issuer or "")
            if pk is None and issuer is None:
                pk = self._single_patient_with_id(conn, patient_id)
            return None if pk is None else self._patient_dict(conn, pk)

    def whereabouts(self, patient_id: str, issuer: str = "") -> tuple[list[str], str]:
        """Where a patient not found by that exact key is: the issuers the
        ID is held under, and the patient (as a CX) the ID was merged into
        (\"\" if none) -- for a message better than "no patient"."""
        with self.engine.connect() as conn:
            issuers = sorted(conn.execute(select(patients_t.c.issuer).where(
                patients_t.c.patient_id == patient_id, patients_t.c.issuer != issuer)).scalars())
            into = merged_patient(conn, patient_id, issuer)
            row = None if into is None else conn.execute(
                select(patients_t.c.patient_id, patients_t.c.issuer).where(patients_t.c.pk == into)).first()
        return issuers, "" if row is None else patient_cx(row.patient_id, row.issuer)

    @staticmethod
    def _patient_dict(conn: Connection, pk: int) -> dict[str, Any] | None:
        """The patient row *pk* as :meth:`patient` answers it, or None."""
        row = conn.execute(select(patients_t).where(patients_t.c.pk == pk)).first()
        if row is None:
            return None
        others = conn.execute(select(identifiers_t.c.value, identifiers_t.c.issuer, identifiers_t.c.id_type)
                              .where(identifiers_t.c.patient_pk == row.pk)
                              .order_by(identifiers_t.c.pk)).all()
        # The studies users see, as C-FIND, QIDO-RS and FHIR list them; those rejection
        # notes withdrew (nothing left to read) apart: a merge or move still takes them.
        studies, withdrawn = (conn.execute(select(func.count()).select_from(studies_t).where(
            studies_t.c.patient_pk == row.pk, shown)).scalar_one() for shown in (READABLE, ~READABLE))
        return {"id": row.patient_id, "issuer": row.issuer, "name": row.name or "",
                "birth_date": row.birth_date or "", "sex": row.sex or "",
                "other_ids": [{"value": o.value, "issuer": o.issuer, "type": o.id_type} for o in others],
                "studies": int(studies), "withdrawn": int(withdrawn)}

    def merge_patients(self, surviving: PatientInfo, prior: list[tuple[str, str]]) -> int:
        """ADT^A40: move everything of the prior patient (named by the
        identifiers *prior*, MRG-1) to the surviving one.

        Returns how many studies moved.
        """
        return int(self.apply([("merge", (surviving, prior))])[0])

    def _merge(self, conn: Connection, surviving: PatientInfo, prior: list[tuple[str, str]]) -> int:
        # No matching by other IDs here: the message may well list the prior
        # patient's IDs, and the merge must not collapse into that patient.
        target = self._upsert_patient(conn, surviving, match_identifiers=False)
        kept = conn.execute(select(patients_t).where(patients_t.c.pk == target)).one()
        moved = 0
        for old in self._prior_patient(conn, prior, target):
            study_pks = lock_patient_studies(conn, old.pk)
            now = _now()
            if study_pks:
                conn.execute(update(studies_t).where(studies_t.c.pk.in_(study_pks)).values(patient_pk=target))
                # Every patient attribute the moved studies now hold otherwise
                # (retrieval applies only corrected keywords: a PatientID alone
                # sent the new ID with the old patient's name, birth date, sex).
                differing = with_issuer(
                    {keyword: (getattr(old, column) or "", getattr(kept, column) or "")
                     for keyword, column in PATIENT_COLUMNS.items()
                     if patient_correction(keyword, getattr(old, column) or "", getattr(kept, column) or "")},
                    (old.issuer or "", kept.issuer or ""))
                if differing:
                    conn.execute(
                        corrections_t.insert(),
                        [
                            {"study_pk": s, "keyword": keyword, "received": received, "corrected": corrected,
                             "reason": surviving.reason or "patient merge (ADT^A40)", "created_at": now}
                            for s in study_pks
                            for keyword, (received, corrected) in differing.items()
                        ],
                    )
            absorb_patient(conn, target, kept, old)
            moved += len(study_pks)
        return moved

    def _prior_patient(self, conn: Connection, prior: list[tuple[str, str]], target: int) -> list[Any]:
        """The prior patient of an MRG-1: [its row], or [] when that is the
        surviving patient (merged already). MRG-1 lists the identifiers of ONE
        patient (HL7 v2.5 3.4.9.1), the hospital number first: they are
        resolved together. One that names the surviving patient, or several
        patients (a citizen ID shared by the very duplicates being merged),
        is passed over; refused (AE) when none names a patient, or two name
        different ones, or one is an ID merged into another patient already
        -- a merge into the wrong patient cannot be undone."""
        found: dict[int, Any] = {}
        ambiguous: list[OrderError] = []
        for prior_id, prior_issuer in prior:
            rows = self._patients_named(conn, prior_id, prior_issuer)
            if len(rows) > 1:
                ambiguous.append(OrderError(
                    f"prior patient {prior_id} is ambiguous: several patients hold it; send MRG-1 with "
                    + ("its assigning authority" if not prior_issuer else "the hospital number (type PI or MR)"),
                    code="204", http_status=409))
            elif rows:
                row = rows[0]
                if int(row.pk) != target and row.patient_id != prior_id \
                        and merged_patient(conn, prior_id, prior_issuer) == int(row.pk):
                    # The prior registration was merged into another patient already: found by that
                    # patient's alias, the whole of that patient (its own studies) would follow it.
                    raise OrderError(f"prior patient {patient_cx(prior_id, prior_issuer)} was merged into "
                                     f"{patient_cx(row.patient_id, row.issuer)} already: merge that patient, if "
                                     "it is the same person", code="205", http_status=409)
                found.setdefault(int(row.pk), row)
        others = [row for pk, row in found.items() if pk != target]
        if len(others) > 1:
            raise OrderError(f"MRG-1 names {len(others)} different patients: an ADT^A40 patient group merges one "
                             "prior patient (send a PID/MRG pair for each)", code="205", http_status=409)
        if found:
            return others
        if ambiguous:
            raise ambiguous[0]
        raise OrderError(f"prior patient {prior[0][0]} is unknown", code="204", http_status=404)

    def _patients_named(self, conn: Connection, value: str, issuer: str) -> list[Any]:
        """The patients an MRG-1 identifier can name (none, one, or two when
        several could): the patient with that key; without an issuer the
        patients with that ID under any (some HIS send the assigning
        authority only in PID); else those holding it as an other ID (MRG-1
        may name the prior patient by its citizen ID)."""
        row = conn.execute(select(patients_t).where(patients_t.c.patient_id == value,
                                                    patients_t.c.issuer == issuer)).first()
        if row is not None:
            return [row]
        if not issuer:
            rows = list(conn.execute(select(patients_t).where(patients_t.c.patient_id == value).limit(2)).all())
            if rows:
                return rows
        return self._patients_by_other_id(conn, value, issuer)

    @staticmethod
    def _patients_by_other_id(conn: Connection, value: str, issuer: str) -> list[Any]:
        """Up to two patients holding *value* as an other ID (with *issuer*, when given)."""
        condition = identifiers_t.c.value == value
        if issuer:
            condition = and_(condition, identifiers_t.c.issuer == issuer)
        pks = conn.execute(select(identifiers_t.c.patient_pk).where(condition).distinct().limit(2)).scalars().all()
        return list(conn.execute(select(patients_t).where(patients_t.c.pk.in_(pks))).all()) if pks else []

    # -- orders ----------------------------------------------------------------------
    # A requested procedure is the rows of its accession (one per scheduled
    # step), its first row first: see the Order model.
    @staticmethod
    def _procedure_rows(conn: Connection, accession: str) -> list[Any]:
        """The steps of the requested procedure *accession*, in the order they were placed."""
        if not accession:
            return []
        return list(conn.execute(
            select(orders_t).where(orders_t.c.accession_number == accession).order_by(orders_t.c.pk)
        ).all())

    def _find_procedure(self, conn: Connection, info: OrderInfo) -> list[Any]:
        """The requested procedure a change or cancel names: its steps (none
        when unknown). The accession number identifies a requested procedure;
        without one, the order numbers do (HL7 v2.5 4.5.1.2 / 4.5.1.3: ORC-2
        placer, ORC-3 filler; a CA of ORC alone sends no OBR-18): the stored
        filler order number first, then the filler number as an accession (a
        HIS whose filler number is the accession), then the placer number. A
        placer order number may be shared by several procedures (one HIS
        order, several procedures), so it decides only when it names one."""
        if info.accession_number:
            return self._procedure_rows(conn, info.accession_number)
        if not info.placer_order_number and not info.filler_order_number:
            raise OrderError("the order has neither an accession nor a placer or filler order number", code="101",
                             http_status=400)
        # Found by an order number, the procedure is locked like one named
        # by its accession (the MPPS and the other messages about it wait, or
        # are waited for), and read again under the lock: what it was before
        # the lock may have changed meanwhile. :meth:`_lock_procedures` took
        # the lock already (sorted with the message's others), unless the
        # number came to name this procedure since: then it is taken here,
        # and the name checked once more.
        accessions, number = self._numbered_accessions(conn, info)
        for _ in range(RACE_ATTEMPTS):
            if len(accessions) > 1:
                raise OrderError(f"{number} names several procedures; send the accession number of the one meant",
                                 code="205", http_status=409)
            if not accessions:
                return []
            lock_order_keys(conn, {f"accession:{accessions[0]}"})  # held already: no wait
            again, number = self._numbered_accessions(conn, info)
            if again == accessions:
                return self._procedure_rows(conn, accessions[0])
            accessions = again
        raise OrderError(f"the procedures of {number} kept changing; send the message again", code="207",
                         http_status=409)

    @staticmethod
    def _placer_accessions(conn: Connection, placer_order_number: str) -> list[str]:
        """The accessions of the procedures placed under *placer_order_number*
        (two at most: one, or "several")."""
        return list(conn.execute(
            select(orders_t.c.accession_number).where(orders_t.c.placer_order_number == placer_order_number)
            .distinct().order_by(orders_t.c.accession_number).limit(2)
        ).scalars().all())

    @classmethod
    def _numbered_accessions(cls, conn: Connection, info: OrderInfo) -> tuple[list[str], str]:
        """The accessions (two at most: one, or "several") the order numbers
        of *info* name, and which number named them (for the refusal)."""
        filler = info.filler_order_number
        if filler:
            found = list(conn.execute(
                select(orders_t.c.accession_number).where(orders_t.c.filler_order_number == filler)
                .distinct().order_by(orders_t.c.accession_number).limit(2)
            ).scalars().all())
            if found:
                return found, f"filler order number {filler}"
            if cls._procedure_rows(conn, filler):
                return [filler], f"filler order number {filler}"
        if info.placer_order_number:
            return (cls._placer_accessions(conn, info.placer_order_number),
                    f"placer order number {info.placer_order_number}")
        return [], f"filler order number {filler}"

    def place(self, info: OrderInfo, source: str = "") -> dict[str, Any]:
        """A new order (HL7 ORC-1 NW) of one scheduled step. Returns the stored
        requested procedure (:meth:`get`)."""
        return dict(self.apply([("place", info)], source)[0])

    def place_steps(self, steps: list[OrderInfo], source: str = "") -> dict[str, Any]:
        """A new requested procedure with several scheduled steps (one
        OrderInfo each, all of one accession), placed in one transaction."""
        if not steps:
            raise OrderError("the order has no scheduled step", code="101", http_status=400)
        return dict(self.apply([("place", step) for step in steps], source)[-1])

    def change(self, info: OrderInfo, source: str = "") -> dict[str, Any]:
        """An order change (ORC-1 XO): new values for an existing order, or
        a new step for it (see :meth:`_change`)."""
        return dict(self.apply([("change", info)], source)[0])

    def change_steps(self, steps: list[OrderInfo], source: str = "") -> dict[str, Any]:
        """Several steps of one requested procedure changed (or added) in one transaction."""
        if not steps:
            raise OrderError("the change names no scheduled step", code="101", http_status=400)
        return dict(self.apply([("change", step) for step in steps], source)[-1])

    def cancel(self, info: OrderInfo, status: str = "CANCELLED") -> dict[str, Any]:
        """Cancel (CA) or discontinue (DC) an order -- its steps not performed
        yet, or the one step *info* names: they leave the worklist."""
        action = "cancel" if status == "CANCELLED" else "discontinue"
        return dict(self.apply([(action, info)])[0])

    def _place(self, conn: Connection, info: OrderInfo, source: str, batch: _Batch) -> dict[str, Any]:
        if not info.accession_number:
            raise OrderError("the order has no accession number", code="101", http_status=400)
        info = fit_order(info)
        validate_order(info)  # the derived procedure and step IDs default to the accession
        if info.study_uid and not valid_uid(info.study_uid):
            raise OrderError(f"invalid Study Instance UID {info.study_uid!r}", code="102", http_status=400)
        rows = self._procedure_rows(conn, info.accession_number)
        if rows:
            # A new procedure is new by its accession alone: the placer order
            # number it may share with procedures placed before is no conflict.
            # Another step of a procedure this message placed joins it (IHE
            # RAD-4: several IPC, or ORC/OBR groups, under one accession); an
            # existing procedure gets new steps by a change (XO), never by NW.
            if info.accession_number not in batch.placed:
                raise OrderError(f"order {info.accession_number} already exists", code="205", http_status=409)
            step_id = info.step_id or info.accession_number
            if any(row.step_id == step_id for row in rows):
                if info.step_id:
                    raise OrderError(f"order {info.accession_number} has scheduled step {step_id} twice",
                                     code="205", http_status=409)
                raise OrderError(f"order {info.accession_number} has several scheduled steps: each needs its "
                                 "Scheduled Procedure Step ID (IPC-4, OBR-20)", code="101", http_status=400)
            return self._change(conn, replace(info, step_id=step_id), source, batch)
        self._check_study_uid_free(conn, info)
        _require_modality(info)
        patient_pk = self._upsert_patient(conn, info.patient)
        _require_patient_name(conn, patient_pk)
        now = _now()
        values = {c: getattr(info, c) for c in _ORDER_COLUMNS}
        values["study_uid"] = info.study_uid or generate_uid()
        values["requested_procedure_id"] = info.requested_procedure_id or info.accession_number
        values["step_id"] = info.step_id or info.accession_number
        self._schedule_undated(values)
        pk = conn.execute(
            orders_t.insert()
            .values(**values, patient_pk=patient_pk, status="SCHEDULED", source=source,
                    created_at=now, updated_at=now)
            .returning(orders_t.c.pk)
        ).scalar_one()
        batch.placed.add(info.accession_number)
        batch.before.setdefault(info.accession_number, None)  # new: nothing to tell the HIS
        self._reconcile_existing(conn, pk)
        return self._procedure_dict(conn, info.accession_number)

    def _schedule_undated(self, values: dict[str, Any]) -> None:
        """No scheduled date (no TQ1-7, OBR-27 or OBR-7: "as soon as
        possible"): scheduled for when it came, in the hospital's day. The
        start date and time are Type 1 return keys (PS3.4 K.6-1), and a
        modality asks for today's steps: an undated one was never offered.
        A date without a time (OBR-27.4 / TQ1-7 ``20261207``, JSON
        ``start_date`` alone) is due from the start of that day:
        UNTIMED_START (000000), so that the time is never empty and a time
        range query (0000-2359) finds the step. Only a new step: a change
        leaving the date empty keeps what is stored."""
        if not values["start_date"]:
            received = datetime.now(self.zone or server_zone())
            values["start_date"] = received.strftime("%Y%m%d")
            values["start_time"] = values["start_time"] or received.strftime("%H%M%S")
        elif not values["start_time"]:
            values["start_time"] = UNTIMED_START

    @staticmethod
    def _check_study_uid_free(conn: Connection, info: OrderInfo) -> None:
        """A Study Instance UID names one requested procedure: another order's
        UID is an error in the message (AE / 409), never a database failure
        the HIS would resend forever."""
        if not info.study_uid:
            return
        taken = conn.execute(
            select(orders_t.c.accession_number).where(orders_t.c.study_uid == info.study_uid).limit(1)
        ).scalar()
        if taken is not None:
            raise OrderError(f"Study Instance UID {info.study_uid} is already used by order {taken}",
                             code="205", http_status=409)

    def _change(self, conn: Connection, info: OrderInfo, source: str, batch: _Batch, *,
                alone: bool = False) -> dict[str, Any]:
        """New values for a requested procedure and the step *info* names by
        its step ID (HL7 IPC-4 / OBR-20), or a new step when it names none of
        the procedure's. Values of the requested procedure (patient, placer
        and filler numbers, procedure code, priority...) are kept the same on
        every step; the step's own (modality, station, start...) on its row.
        A change naming no step is the one step of a single-step procedure;
        for several steps it may change the procedure's values only. The
        only item of a message for a single-step procedure changes that step
        whatever step ID it sends (*alone*): an HIS that sent no SPS ID with
        its NW (the accession stood in) may send one with its XO, and means
        the same step, as before several steps existed."""
        info = fit_order(info)
        validate_order(info)
        rows = self._find_procedure(conn, info)
        if not rows:
            raise OrderError("no such order to change", code="204", http_status=404)
        first = rows[0]
        accession = first.accession_number
        self._note(conn, batch, accession)
        target, adding = self._step_to_change(rows, info, alone)
        if target is not None and target.status in CLOSED_STATUSES:
            what = "order" if len(rows) == 1 else f"step {target.step_id} of order {accession}"
            batch.refuse(accession, OrderError(f"{what} is {target.status.lower()} and cannot change", code="207",
                                               http_status=409))
            return self._procedure_dict(conn, accession)
        overall = procedure_status(row.status for row in rows)
        if target is None and overall in CLOSED_STATUSES:
            raise OrderError(f"order is {overall.lower()} and cannot change", code="207", http_status=409)
        if adding:
            self._check_same_procedure(first, info)
            _require_modality(info)
        patient_pk = self._upsert_patient(conn, info.patient)
        _require_patient_name(conn, patient_pk)
        now = _now()
        shared = {c: getattr(info, c) for c in PROCEDURE_COLUMNS if getattr(info, c)}
        shared.pop("study_uid", None)  # the study UID handed to modalities never changes
        shared.pop("accession_number", None)  # the key the procedure was found by
        conn.execute(
            update(orders_t)
            .where(orders_t.c.accession_number == accession)
            .values(**shared, patient_pk=patient_pk, source=source, updated_at=now)
        )
        own = {c: getattr(info, c) for c in STEP_COLUMNS if getattr(info, c)}
        if target is not None:
            if own:
                conn.execute(update(orders_t).where(orders_t.c.pk == target.pk).values(**own))
        elif adding:
            current = conn.execute(select(orders_t).where(orders_t.c.pk == first.pk)).one()
            values = {c: getattr(current, c) for c in PROCEDURE_COLUMNS}
            values.update({c: getattr(info, c) for c in STEP_COLUMNS})
            self._schedule_undated(values)
            conn.execute(orders_t.insert().values(**values, patient_pk=patient_pk, status="SCHEDULED",
                                                  source=source, created_at=now, updated_at=now))
        if patient_pk != first.patient_pk:
            self._move_linked_studies(conn, accession)
        batch.changed.add(accession)
        return self._procedure_dict(conn, accession)

    @staticmethod
    def _step_to_change(rows: list[Any], info: OrderInfo, alone: bool = False) -> tuple[Any, bool]:
        """(the step *info* changes, or None; whether it is a new step)."""
        if info.step_id:
            named = next((row for row in rows if row.step_id == info.step_id), None)
            if named is None and alone and len(rows) == 1:
                return rows[0], False  # the one step, its ID sent at last (or changed)
            return named, named is None
        if len(rows) == 1:
            return rows[0], False
        sent = [c for c in STEP_COLUMNS if getattr(info, c)]
        if sent:
            raise OrderError(f"order {rows[0].accession_number} has {len(rows)} scheduled steps: name the step "
                             f"to change ({', '.join(sent)} given without a Scheduled Procedure Step ID, IPC-4 or "
                             "OBR-20)", code="101", http_status=400)
        return None, False

    @staticmethod
    def _check_same_procedure(first: Any, info: OrderInfo) -> None:
        """A new step belongs to its accession's requested procedure: another
        Study Instance UID or Requested Procedure ID would be a second
        requested procedure under one accession (DICOM allows it, this
        archive's orders do not): refused, never half stored."""
        for name, sent, stored in (("Study Instance UID", info.study_uid, first.study_uid),
                                   ("Requested Procedure ID", info.requested_procedure_id,
                                    first.requested_procedure_id)):
            if sent and sent != stored:
                raise OrderError(f"{name} {sent} of a step of order {first.accession_number} differs from the "
                                 f"order's ({stored}): several requested procedures under one accession are not "
                                 "supported; send each with its own accession", code="205", http_status=409)

    def _move_linked_studies(self, conn: Connection, accession: str) -> None:
        """The HIS moved the order to another patient (ORC XO with another
        PID): its studies, and so their reports, follow, with the differences
        recorded as corrections -- what a study receives when its order comes
        late. The previous patient stays: the HIS registered it. Every
        demographic follows, also one the new patient lacks (goes out empty):
        the images carry the previous patient's (the worklist entry the
        technologist picked), another person's birth date and sex, not an
        unknown value to keep (as `pacs patient move-study`)."""
        order = self._procedure_rows(conn, accession)[0]
        now = _now()
        for study in conn.execute(
            select(studies_t).join(links_t, links_t.c.study_pk == studies_t.c.pk)
            .join(orders_t, orders_t.c.pk == links_t.c.order_pk).where(orders_t.c.accession_number == accession)
        ).all():
            previous = conn.execute(select(patients_t).where(patients_t.c.pk == study.patient_pk)).one()
            current = {k: getattr(previous, c) for k, c in PATIENT_COLUMNS.items()}
            record_reconciliation(conn, study.pk, order, current, study.accession_number,
                                  "order moved to another patient", now, every_demographic=True)

    def _cancel(self, conn: Connection, info: OrderInfo, status: str, batch: _Batch) -> dict[str, Any]:
        """CA / DC: the steps *info* names (one by its step ID, else all)
        that are not performed yet become *status*; completed ones stay."""
        rows = self._find_procedure(conn, info)
        if not rows:
            raise OrderError("no such order to cancel", code="204", http_status=404)
        accession = rows[0].accession_number
        self._note(conn, batch, accession)
        targets = self._steps_to_cancel(rows, info)
        verb = "cancel" if status == "CANCELLED" else "discontinue"
        what = f"order {accession}" + (f" step {targets[0].step_id}" if len(targets) < len(rows) else "")
        left = [row for row in targets if row.status != "COMPLETED"]
        # HL7 ORC-1 UC / UD: what was performed (or reported) cannot be
        # undone by the HIS, as an XO of a completed order is refused.
        if self._has_signed_report(conn, accession):
            state = procedure_status(row.status for row in targets).lower()
            raise OrderError(f"unable to {verb}: {what} is already performed ({state}, reported)",
                             code="207", http_status=409)
        active = [row.pk for row in left if row.status in ACTIVE_STATUSES]
        if not left or (not active and len(left) < len(targets)):
            # Nothing left to withdraw and something performed: the procedure
            # is completed (the HIS was told CM), as a single completed step.
            batch.refuse(accession, OrderError(f"unable to {verb}: {what} is already performed (completed)",
                                               code="207", http_status=409))
            return self._procedure_dict(conn, accession)
        # Steps still to be done; a repeated CA / DC of a withdrawn one is
        # applied again (the HIS gets AA, as before steps).
        conn.execute(update(orders_t).where(orders_t.c.pk.in_(active or [row.pk for row in left]))
                     .values(status=status, updated_at=_now()))
        batch.changed.add(accession)
        return self._procedure_dict(conn, accession)

    @staticmethod
    def _steps_to_cancel(rows: list[Any], info: OrderInfo) -> list[Any]:
        """The steps a CA / DC withdraws: the one its step ID names, else all.

        A step ID naming no step of the order is refused AE 204 (404 on
        ``DELETE /api/orders/{accession}?step_id=``) whatever the number of
        steps: the HIS means a step we do not have (one added by an XO that
        was refused or lost, another procedure's), and withdrawing the one
        we have instead would take an exam off the worklist that the HIS
        still wants done. (A change is lenient for a single-step order, see
        :meth:`_change`: it updates the step and so agrees with the HIS
        again; a withdrawal cannot be taken back.) A withdrawal without
        step ID withdraws every step not performed yet."""
        if not info.step_id:
            return rows
        named = [row for row in rows if row.step_id == info.step_id]
        if named:
            return named
        raise OrderError(f"order {rows[0].accession_number} has no scheduled step {info.step_id}",
                         code="204", http_status=404)

    @staticmethod
    def _has_signed_report(conn: Connection, accession: str) -> bool:
        return conn.execute(
            select(reports_t.c.pk)
            .join(links_t, links_t.c.study_pk == reports_t.c.study_pk)
            .join(orders_t, orders_t.c.pk == links_t.c.order_pk)
            .where(orders_t.c.accession_number == accession, reports_t.c.status == "signed")
            .limit(1)
        ).first() is not None

    def get(self, accession: str) -> dict[str, Any] | None:
        """The requested procedure *accession* (see :meth:`_procedure_dict`), or None."""
        with self.engine.connect() as conn:
            return self._procedure_dict(conn, accession) if self._procedure_rows(conn, accession) else None

    @staticmethod
    def _procedure_dict(conn: Connection, accession: str) -> dict[str, Any]:
        """A requested procedure as the API and the HIS messages show it: the
        columns of its first step (as one order was shown before steps) with
        the patient, ``status`` the procedure's (:func:`procedure_status`),
        and ``steps``, each step's own values and status."""
        rows = conn.execute(
            select(orders_t, patients_t.c.patient_id, patients_t.c.issuer, patients_t.c.name)
            .join(patients_t, patients_t.c.pk == orders_t.c.patient_pk)
            .where(orders_t.c.accession_number == accession)
            .order_by(orders_t.c.pk)
        ).all()
        data = dict(rows[0]._mapping)
        data["status"] = procedure_status(row.status for row in rows)
        data["created_at"] = _iso(data["created_at"])
        data["updated_at"] = _iso(max(row.updated_at for row in rows))
        data["steps"] = [
            {"pk": row.pk, **{c: getattr(row, c) for c in STEP_COLUMNS}, "status": row.status,
             "updated_at": _iso(row.updated_at)}
            for row in rows
        ]
        return data

    def _note(self, conn: Connection, batch: _Batch, accession: str) -> None:
        """Remember the procedure's status before this transaction changes it."""
        if accession not in batch.before:
            batch.before[accession] = procedure_status(row.status for row in self._procedure_rows(conn, accession))

    def _report_changes(self, conn: Connection, batch: _Batch) -> None:
        """Tell the HIS what its own message changed that it cannot know:
        cancelling the last open step of a partly performed procedure
        completes it (CM), cancelling the running step of one whose other
        step waits puts it back to scheduled (SC). The CANCELLED or
        DISCONTINUED it set itself is not echoed (as before steps), nor a
        new procedure; once per procedure and message (its net change)."""
        for accession, before in batch.before.items():
            if before is None:
                continue
            procedure = self._procedure_dict(conn, accession)
            after = procedure["status"]
            if after != before and after not in ("CANCELLED", "DISCONTINUED"):
                self._tell_status(conn, {"order": _status_order(procedure), "status": after})

    @classmethod
    def _lock_procedures(cls, conn: Connection, actions: list[tuple[str, Any]]) -> None:
        """PostgreSQL: serialise the messages about one accession or Study
        Instance UID. Their uniqueness is no database key any more (one
        procedure has a row per step): two connections placing one accession
        (or one UID under two accessions) at once would both see nothing and
        both insert. Locks are taken in one sorted go (no deadlock between
        messages) and released at commit. SQLite writers queue already
        (BEGIN IMMEDIATE).

        A change or withdrawal that names its order by its order numbers
        only (no accession: a CA of ORC alone) locks the procedures they
        name now; :meth:`_find_procedure` reads them again
        under the lock. It took no lock, and raced the MPPS: a CA read a
        step IN PROGRESS, waited on the row the N-SET was completing, then
        overwrote COMPLETED with CANCELLED (the HIS had been told CM)."""
        keys = {key for action, info in actions if action in _ORDER_ACTIONS
                for key in order_keys(info.study_uid, info.accession_number)}
        if conn.dialect.name == "postgresql":
            for action, info in actions:
                if action in _ORDER_ACTIONS and not info.accession_number and (info.placer_order_number
                                                                               or info.filler_order_number):
                    keys.update(f"accession:{a}" for a in cls._numbered_accessions(conn, info)[0])
        lock_order_keys(conn, keys)

    # -- status and performed steps -----------------------------------------------------
    def step_orders(self, sop_uid: str) -> list[dict[str, str]]:
        """The scheduled steps the performed step *sop_uid* (an MPPS
        instance) performs: accession number, Study Instance UID, step ID
        and the patient's ID and issuer of each, in its items' order; empty
        for a step not recorded or matching no order. What the audit trail
        names for an MPPS."""
        with self.engine.connect() as conn:
            step = conn.execute(select(steps_t).where(steps_t.c.sop_uid == sop_uid)).first()
            if step is None:
                return []
            pks = _step_orders(step)
            if not pks:
                return []
            rows = {row.pk: row for row in conn.execute(
                select(orders_t.c.pk, orders_t.c.accession_number, orders_t.c.study_uid, orders_t.c.step_id,
                       patients_t.c.patient_id, patients_t.c.issuer)
                .join(patients_t, patients_t.c.pk == orders_t.c.patient_pk)
                .where(orders_t.c.pk.in_(pks)))}
        return [{"accession_number": rows[pk].accession_number, "study_uid": rows[pk].study_uid,
                 "step_id": rows[pk].step_id, "patient_id": rows[pk].patient_id, "issuer": rows[pk].issuer}
                for pk in pks if pk in rows]

    def record_step(
        self,
        sop_uid: str,
        *,
        status: str,
        accession: str = "",
        study_uid: str = "",
        step_id: str = "",
        scheduled: list[tuple[str, str, str]] | None = None,
        modality: str = "",
        station_ae_title: str = "",
        start: str = "",
        end: str = "",
        end_date: str | None = None,
        end_time: str | None = None,
        performed_series: list[dict[str, Any]] | None = None,
        create: bool,
    ) -> dict[str, Any]:
        """MPPS N-CREATE (create=True) or N-SET: track the performed step and
        move the scheduled steps it performs (IN PROGRESS, COMPLETED; back to
        SCHEDULED when it is DISCONTINUED and no other performed step of the
        scheduled step is in progress or completed).

        *scheduled*: (accession, study UID, step ID) of each Scheduled Step
        Attributes item of the N-CREATE (default: the one given by *accession*,
        *study_uid*, *step_id*). Each item names one scheduled step (IHE RAD-6
        simple case); several items, several steps, of one requested
        procedure or of several (group case): each is performed, and the
        N-SET moves them all. Which step an item names: see
        :meth:`_steps_for_item`.

        *end*: the End Date and Time as one value; or *end_date* /
        *end_time*, each kept beside the other one stored (None: not sent),
        as a modality may send the date and the time in different N-SETs.

        The HIS is told the status of each requested procedure concerned
        when it changes (:func:`procedure_status`: COMPLETED once every step
        is completed or withdrawn). Returns the first requested procedure
        (empty when the step matches none)."""
        if status not in ("IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            raise OrderError(f"invalid performed procedure step status {status!r}", http_status=400)
        # Run again whole when PostgreSQL chose it as a deadlock's victim (an
        # HIS message or the ingest locking the order and its step in another
        # order): the modality was answered 0110H, and most never resend an
        # N-SET COMPLETED. Everything is read again; an N-CREATE refused by the
        # unique key (OrderError 409) is no transient error and is not retried.
        def once(conn: Connection) -> dict[str, Any]:
            now = _now()
            existing = conn.execute(select(steps_t).where(steps_t.c.sop_uid == sop_uid)).first()
            if create and existing is not None:
                raise OrderError("performed procedure step already exists", http_status=409)
            if not create and existing is None:
                raise OrderError("no such performed procedure step", http_status=404)
            if existing is not None and existing.status != "IN PROGRESS":
                raise OrderError(f"performed procedure step is already {existing.status}", http_status=409)
            stored_end = existing.end if existing is not None else ""
            new_end = end
            if end_date is not None or end_time is not None:
                date, time = split_end(stored_end)
                new_end = (date if end_date is None else end_date) + (time if end_time is None else end_time)
            if status in ("COMPLETED", "DISCONTINUED") and not all(split_end(new_end or stored_end)):
                # PS3.4 Table F.7.2-1, final state: End Date and End Time are Type 1.
                raise OrderError(f"a {status} step needs its End Date and End Time", http_status=422)
            # The HIS's messages about these procedures take the same locks
            # (sorted, so the two never deadlock), and the steps' statuses
            # read after them are the committed ones: an MPPS racing a cancel
            # does not put a cancelled step back IN PROGRESS.
            if existing is not None:
                order_pks = _step_orders(existing)
                lock_order_keys(conn, {f"accession:{a}" for a in _step_accessions(conn, order_pks)})
                # Read again under the locks, its row locked too (PostgreSQL;
                # SQLite writers queue already): of two N-SETs of one performed
                # step at once (a modality resending after a timeout, or
                # COMPLETED then DISCONTINUED), the second read IN PROGRESS
                # before the first committed, and then overwrote its final
                # status. Now it is refused as any N-SET of a final step.
                existing = conn.execute(select(steps_t).where(steps_t.c.pk == existing.pk).with_for_update()).one()
                if existing.status != "IN PROGRESS":
                    raise OrderError(f"performed procedure step is already {existing.status}", http_status=409)
            else:
                refs = scheduled if scheduled is not None else [(accession, study_uid, step_id)]
                order_pks = self._steps_for_refs(conn, refs, modality, station_ae_title)
                if conn.dialect.name == "postgresql":
                    # Which steps the items name, and whether the HIS withdrew
                    # them, is decided again under the locks: read before them,
                    # a CA committed meanwhile let the N-CREATE in (0110H is
                    # the answer), and the unscheduled case picked among stale
                    # statuses. A step the new reading adds (an order placed
                    # meanwhile) is locked too, then read once more.
                    locked: set[str] = set()
                    for _ in range(RACE_ATTEMPTS):
                        wanted = _step_accessions(conn, order_pks)
                        if wanted <= locked:
                            break
                        lock_order_keys(conn, {f"accession:{a}" for a in wanted - locked})
                        locked |= wanted
                        order_pks = self._steps_for_refs(conn, refs, modality, station_ae_title)
            values: dict[str, Any] = {"status": status, "updated_at": now}
            for key, value in (("modality", modality), ("station_ae_title", station_ae_title),
                               ("start", start), ("end", new_end)):
                if value:
                    values[key] = value
            if performed_series is not None:
                values["performed_series"] = json.dumps(performed_series)
            if existing is None:
                try:
                    conn.execute(steps_t.insert().values(
                        sop_uid=sop_uid, order_pk=order_pks[0] if order_pks else None,
                        order_pks=json.dumps(order_pks), scheduled=json.dumps([list(ref) for ref in refs]),
                        created_at=now, **values))
                except IntegrityError:
                    # PostgreSQL: an N-CREATE of the same instance on another
                    # association (a modality resending after a DIMSE timeout)
                    # committed after this one found none, and its unique key
                    # refused ours. The answer is the one a sequential resend
                    # gets, 0111H (Duplicate SOP Instance, PS3.4 F.7.2.1), not
                    # 0110H with a traceback; the transaction rolls back.
                    # (SQLite writers queue: the check above saw it.)
                    raise OrderError("performed procedure step already exists", http_status=409) from None
            else:
                conn.execute(update(steps_t).where(steps_t.c.pk == existing.pk).values(**values))
            # The requested procedures concerned, in the items' order.
            procedure_of = {row.pk: row.accession_number for row in conn.execute(
                select(orders_t.c.pk, orders_t.c.accession_number).where(orders_t.c.pk.in_(order_pks)))}
            accessions = list(dict.fromkeys(procedure_of[pk] for pk in order_pks if pk in procedure_of))
            before = {a: procedure_status(row.status for row in self._procedure_rows(conn, a)) for a in accessions}
            for pk in order_pks:
                self._move_step(conn, pk, status, sop_uid, now)
            procedures = [self._procedure_dict(conn, a) for a in accessions]
            for procedure in procedures:
                if procedure["status"] != before[procedure["accession_number"]]:
                    # The HIS hears of a change of the requested procedure only:
                    # a second step of one IN PROGRESS tells it nothing, nor does
                    # the first of two steps completing. A step discontinued:
                    # ORC-5 SC (HL7 table 0038 "in process, scheduled") -- the
                    # order is open and waits to be performed, which is the
                    # truth. DC would tell the HIS the order itself was stopped
                    # (many close or bill it then, and we would refuse its XO),
                    # CA that it was withdrawn, IP that it is being performed.
                    # The outbound renderer maps SCHEDULED to SC; step_status
                    # says why it came back.
                    self._tell_status(conn, {"order": _status_order(procedure), "status": procedure["status"],
                                             "step": sop_uid, "step_status": status})
            if not procedures:
                log.info("performed procedure step %s matches no order", sop_uid)
            return procedures[0] if procedures else {}

        return retry_write(self.engine, once, what=f"performed procedure step {sop_uid}")

    def _adopt_performed_steps(self, conn: Connection, accession: str) -> None:
        """A new requested procedure takes the performed steps done before it
        was ordered (an emergency exam: the MPPS named the accession typed at
        the console and matched no order). Each such step whose Scheduled
        Step Attributes items name this procedure -- by its Study Instance
        UID, or by its accession when the step started within
        ACCESSION_MATCH_DAYS of the order's date (an old step under a
        repeated accession number is not the same exam) -- performs the
        scheduled step(s) those items name (:meth:`_steps_for_item`), which
        move as if the MPPS had come after the order: a completed exam
        leaves the worklist (it was offered for imaging again, a repeat
        exposure). The HIS is told IP, then CM when the step is completed,
        the messages an N-CREATE and N-SET after the order would have sent;
        a discontinued step changes nothing (the order stays scheduled)."""
        first = self._procedure_rows(conn, accession)[0]
        candidates = conn.execute(
            select(steps_t).where(steps_t.c.order_pk.is_(None),
                                  or_(*(steps_t.c.scheduled.like(f"%{_json_like(value)}%", escape="\\")
                                        for value in (accession, first.study_uid))))
            .order_by(steps_t.c.pk)
        ).all()
        now = _now()
        for step in candidates:
            items = [tuple(item) for item in json.loads(step.scheduled or "[]")]
            mine = [(a, uid, sps) for a, uid, sps in items
                    if uid == first.study_uid or (a == accession and self._step_date_fits(conn, first, step))]
            order_pks = self._steps_of_items(conn, mine, step.modality, step.station_ae_title)
            if not order_pks:
                continue
            conn.execute(update(steps_t).where(steps_t.c.pk == step.pk)
                         .values(order_pk=order_pks[0], order_pks=json.dumps(order_pks), updated_at=now))
            log.info("performed procedure step %s, done before its order, is now the order's", step.sop_uid)
            told = procedure_status(row.status for row in self._procedure_rows(conn, accession))
            for status in ("IN PROGRESS", "COMPLETED") if step.status == "COMPLETED" else (step.status,):
                for pk in order_pks:
                    self._move_step(conn, pk, status, step.sop_uid, now)
                procedure = self._procedure_dict(conn, accession)
                if procedure["status"] != told:
                    told = procedure["status"]
                    self._tell_status(conn, {"order": _status_order(procedure), "status": told,
                                             "step": step.sop_uid, "step_status": status})

    @staticmethod
    def _step_date_fits(conn: Connection, order: Any, step: Any) -> bool:
        """Whether a performed step started close enough to *order* for its
        accession alone to make it the order's (see :meth:`_adopt_performed_steps`)."""
        return not accession_match_doubt(conn, order, "", (step.start or "")[:8], step.created_at)

    def _steps_of_items(self, conn: Connection, refs: list[tuple[str, str, str]], modality: str,
                        station_ae_title: str) -> list[int]:
        """The scheduled steps (pks) the (accession, study UID, step ID)
        items of a performed step name, each once, in the items' order."""
        step_pks: list[int] = []
        for accession, study_uid, step_id in refs:
            for pk in self._steps_for_item(conn, accession, study_uid, step_id, modality, station_ae_title):
                if pk not in step_pks:
                    step_pks.append(pk)
        return step_pks

    def _steps_for_refs(self, conn: Connection, refs: list[tuple[str, str, str]], modality: str,
                        station_ae_title: str) -> list[int]:
        """The scheduled steps a new performed step performs, each once, in
        the items' order. A cancelled one refuses the performed step: the HIS
        withdrew it, and an MPPS must not bring it back to the worklist (the
        modality shows the reason)."""
        step_pks = self._steps_of_items(conn, refs, modality, station_ae_title)
        for pk in step_pks:
            row = conn.execute(select(orders_t.c.accession_number, orders_t.c.step_id, orders_t.c.status)
                               .where(orders_t.c.pk == pk)).one()
            if row.status in WITHDRAWN_STATUSES:
                # Discontinued by the HIS (DC) is withdrawn as much as
                # cancelled (CA): it was let in, put the step back IN
                # PROGRESS and on the worklist (STARTED), and its N-SET
                # COMPLETED told the HIS CM for an order it had stopped.
                several = len(self._procedure_rows(conn, row.accession_number)) > 1
                step = f" (step {row.step_id})" if several else ""
                raise OrderError(f"order {row.accession_number}{step} was {row.status.lower()} by the HIS",
                                 http_status=422)
        return step_pks

    def _move_step(self, conn: Connection, step_pk: int, status: str, sop_uid: str, now: datetime) -> None:
        """A scheduled step follows its performed step -- except one the HIS
        withdrew meanwhile, and a completed one, which a later performed step
        (a repeat acquisition, one discontinued after the exam was done) does
        not move back: the HIS would read the finished exam as running
        again, and could then cancel it.

        Withdrawn meanwhile: the HIS cancelled (CA) or discontinued (DC) the
        step while its MPPS was in progress, which it may (a step is
        withdrawable until it is completed; AE 207 only once nothing is left
        to withdraw, or the order is reported). The examination did happen:
        the performed step is kept and completes (or is discontinued), and
        the images stay filed under the order. But the scheduled step keeps
        the status the HIS gave it, CANCELLED or DISCONTINUED alike: it does
        not come back on the worklist, and the HIS is not told IP or CM for
        a procedure it withdrew -- what it hears follows from the steps'
        statuses (:func:`procedure_status`) as for any other message: a
        withdrawn step of an order whose other step is completed still
        makes that order COMPLETED, as the withdrawal itself did. (Only a
        CA was kept before: after a DC the N-SET COMPLETED completed the
        discontinued step and told the HIS CM -- or IP, another step
        waiting -- and an N-SET IN PROGRESS put it back on the worklist.)

        A DISCONTINUED performed step puts its scheduled step back on the
        worklist (see :meth:`_after_discontinued`)."""
        current, source = conn.execute(select(orders_t.c.status, orders_t.c.progress_source)
                                       .where(orders_t.c.pk == step_pk)).one()
        if source != "mpps":
            # From now on the MPPS decides: images (a step they started, see
            # progress_from_images) no longer complete it, nor start it again
            # once a discontinued MPPS put it back to SCHEDULED.
            conn.execute(update(orders_t).where(orders_t.c.pk == step_pk).values(progress_source="mpps"))
        if current in WITHDRAWN_STATUSES and status != "IN PROGRESS":
            # No patient data in the log: the performed step's UID says which.
            log.info("performed procedure step %s is %s; its scheduled step, %s by the HIS meanwhile, stays so",
                     sop_uid, status, current.lower())
        target: str | None = None if current in FINAL_STATUSES else status
        if status == "DISCONTINUED" and target is not None:
            target = self._after_discontinued(conn, step_pk, current, sop_uid)
        if target is not None and target != current:
            conn.execute(update(orders_t).where(orders_t.c.pk == step_pk).values(status=target, updated_at=now))

    @staticmethod
    def _after_discontinued(conn: Connection, order_pk: int, current: str, sop_uid: str) -> str | None:
        """A scheduled step's status after one of its performed steps was
        discontinued (None: unchanged).

        IHE RAD-7 (Modality PPS Discontinued): a discontinued performed step
        is void for the scheduled step, which is still to be done -- the
        modality picked the wrong worklist entry (110514), the patient could
        not go on. So a step it had put IN PROGRESS goes back to SCHEDULED,
        on the worklist again and changeable by the HIS; unless another
        performed step of the scheduled step is in progress (it stays IN
        PROGRESS: no IP, SC, IP flapping at the HIS) or completed (the step
        is then COMPLETED and final). A step in any other state (the HIS
        discontinued or cancelled it) stays as it is."""
        if current != "IN PROGRESS":
            return None
        # order_pk covers the step's first order; a group step (IHE group
        # case) lists the others in order_pks, JSON without an index: this
        # LIKE scans performed_steps, once per discontinued step (rare), and
        # _step_orders confirms each candidate (%12% also finds 112).
        candidates = conn.execute(
            select(steps_t.c.order_pk, steps_t.c.order_pks).where(
                steps_t.c.sop_uid != sop_uid,
                steps_t.c.status.in_(("IN PROGRESS", "COMPLETED")),
                or_(steps_t.c.order_pk == order_pk, steps_t.c.order_pks.like(f"%{order_pk}%")),
            )
        ).all()
        if any(order_pk in _step_orders(step) for step in candidates):
            return None
        return "SCHEDULED"

    def _steps_for_item(self, conn: Connection, accession: str, study_uid: str, step_id: str, modality: str,
                        station_ae_title: str) -> list[int]:
        """The scheduled step(s) one Scheduled Step Attributes item names.

        The requested procedure is found by the Study Instance UID the
        worklist handed out (the stronger evidence), else the accession, else
        (neither sent) by the step ID alone when one step has it. Within it:

        - the step whose ID the item gives (IHE RAD-6: the modality copies the
          SPS ID of the worklist item it performs);
        - the one step of a single-step procedure, whatever the item says (as
          before steps);
        - without a step ID, or with one the procedure does not know (the
          unscheduled case: the accession typed or scanned at the console):
          the first of these that is not empty decides, when it holds one
          step -- the steps not started yet that are scheduled for this
          station AE and modality (a step without them fits any), those in
          progress there (a repeat), the steps not started yet anywhere (a
          room change), those in progress anywhere. When it holds several,
          the item does not say which was performed and none is guessed: an
          MPPS that performs several steps lists them (the group case), and
          completing a step that was not done would tell the HIS an exam
          happened. The performed step is then kept without a scheduled
          step (logged), the steps stay on the worklist for the modality to
          pick;
        - when no step is left to do (an acquisition appended to a finished
          exam), the first completed step, which it does not move back; all
          withdrawn: the first, whose withdrawal (CA or DC) refuses the MPPS.
        """
        rows: list[Any] = []
        if study_uid:
            rows = list(conn.execute(
                select(orders_t).where(orders_t.c.study_uid == study_uid).order_by(orders_t.c.pk)).all())
        if not rows and accession:
            rows = self._procedure_rows(conn, accession)
        if not rows:
            if accession or study_uid or not step_id:
                return []
            alone = conn.execute(select(orders_t.c.pk).where(orders_t.c.step_id == step_id).limit(2)).scalars().all()
            return [int(alone[0])] if len(alone) == 1 else []
        named = [row for row in rows if step_id and row.step_id == step_id]
        if named or len(rows) == 1:
            return [int((named or rows)[0].pk)]
        active = [row for row in rows if row.status in ACTIVE_STATUSES]
        here = [row for row in active if _fits(row, modality, station_ae_title)]
        for candidates in ([row for row in here if row.status == "SCHEDULED"], here,
                           [row for row in active if row.status == "SCHEDULED"], active):
            if len(candidates) == 1:
                return [int(candidates[0].pk)]
            if candidates:
                # No accession in the log (patient data): the station and the counts say enough.
                log.warning("a performed procedure step names a requested procedure of %d steps but none of "
                            "them: %d fit station %s and modality %s; none is taken as performed", len(rows),
                            len(candidates), station_ae_title or "-", modality or "-")
                return []
        done = [row for row in rows if row.status == "COMPLETED"]
        return [int((done or rows)[0].pk)]

    # -- images without MPPS -----------------------------------------------------------------
    def progress_from_images(self, stable_seconds: float, *, lookback: timedelta = IMAGES_LOOKBACK) -> tuple[int, int]:
        """Move the scheduled steps of modalities that send no MPPS (most
        ultrasound, older X-ray) by the images linked to their order: they
        stayed SCHEDULED for ever, the HIS never heard of the exam, and the
        worklist kept offering it. One round of the worklist progress worker
        (:mod:`pacs.worklist_progress`); returns (steps started, completed).

        IHE SWF has the Order Filler learn of performed work from MPPS; without
        it, as dcm4chee-arc and others do, the images stand in for it. A step
        still SCHEDULED becomes IN PROGRESS (STARTED on the worklist) once a
        study linked to its order (by Study Instance UID or accession, at
        ingest or when the order came, :mod:`pacs.index.reconcile`) has
        images for it, received within *lookback*; it is COMPLETED once
        every study of the order has been stable (no new instance, the
        studies' last-received time, which routing's "study stable" rules
        follow too) for *stable_seconds*: it leaves the worklist as any
        completed step does. The HIS is told what an MPPS would have told it
        (ORM^O01 ORC-5 IP, then CM), when the order's status changes.

        Which steps images perform: the one step of a single-step order
        (whatever modality the HIS wrote: "CR" ordered, "DX" sent); of
        several, those of a modality the images have. Objects that are no
        images (KO, PR, SR, a report's PDF) start nothing. An MPPS decides
        alone once it names a step (``progress_source`` "mpps", see
        :meth:`_move_step`): images never start or complete such a step,
        nor a step of a modality that sent an MPPS for this order (its
        images are that MPPS's); an MPPS that comes after the images took
        the step over, and one that comes after they completed it finds a
        completed step, which no performed step moves back."""
        now = _now()
        with self.engine.connect() as conn:
            accessions = self._image_candidates(conn, now - lookback, now - timedelta(seconds=stable_seconds))
        started = completed = 0
        for accession in accessions:
            one, done = self._progress_procedure(accession, now - timedelta(seconds=stable_seconds))
            started += one
            completed += done
        return started, completed

    @staticmethod
    def _image_candidates(conn: Connection, since: datetime, stable_before: datetime) -> list[str]:
        """The accessions with a step images may move: a SCHEDULED step
        never moved, of an order whose study received an instance since
        *since* (an index range on studies.updated_at), and a step images
        started whose studies are all stable since *stable_before*."""
        step = orders_t.alias("step")
        linked = orders_t.alias("linked")
        starting = set(conn.execute(
            select(step.c.accession_number).distinct()
            .select_from(studies_t.join(links_t, links_t.c.study_pk == studies_t.c.pk)
                         .join(linked, linked.c.pk == links_t.c.order_pk)
                         .join(step, step.c.accession_number == linked.c.accession_number))
            .where(studies_t.c.updated_at >= since, step.c.status == "SCHEDULED", step.c.progress_source == "")
        ).scalars())
        finishing = set(conn.execute(
            select(step.c.accession_number)
            .select_from(step.join(linked, linked.c.accession_number == step.c.accession_number)
                         .join(links_t, links_t.c.order_pk == linked.c.pk)
                         .join(studies_t, studies_t.c.pk == links_t.c.study_pk))
            .where(step.c.status == "IN PROGRESS", step.c.progress_source == "images")
            .group_by(step.c.accession_number)
            .having(func.max(studies_t.c.updated_at) <= stable_before)
        ).scalars())
        return sorted(starting | finishing)

    def _progress_procedure(self, accession: str, stable_before: datetime) -> tuple[int, int]:
        """One requested procedure's steps moved by its images (see
        :meth:`progress_from_images`): decided on a read first (a step that
        waits for another modality's images is a candidate every round, and
        must not take the write lock each time), then under the procedure's
        lock, read again there: an MPPS, a HIS message or another node's
        round may have come first."""
        with self.engine.connect() as conn:
            start, finish = self._images_plan(conn, accession, stable_before)
        if not start and not finish:
            return 0, 0
        with write_transaction(self.engine) as conn:
            lock_order_keys(conn, {f"accession:{accession}"})
            start, _ = self._images_plan(conn, accession, stable_before)
            rows = self._procedure_rows(conn, accession)
            started = completed = 0
            if start:
                started = self._images_move(conn, accession, start, "IN PROGRESS",
                                            procedure_status(row.status for row in rows))
            _, finish = self._images_plan(conn, accession, stable_before)
            if finish:
                completed = self._images_move(conn, accession, finish, "COMPLETED", procedure_status(
                    row.status for row in self._procedure_rows(conn, accession)))
            if started or completed:
                # No accession or patient data in the log: the order's key says which.
                log.info("order %d: %d step(s) started and %d completed by their images (no MPPS)",
                         rows[0].pk, started, completed)
            return started, completed

    def _images_plan(self, conn: Connection, accession: str, stable_before: datetime) -> tuple[list[int], list[int]]:
        """(the steps of *accession* its images start, those they complete)
        as things stand: see :meth:`progress_from_images` for which."""
        rows = self._procedure_rows(conn, accession)
        if not rows:
            return [], []
        studies = conn.execute(
            select(studies_t.c.modalities, studies_t.c.updated_at)
            .join(links_t, links_t.c.study_pk == studies_t.c.pk)
            .where(links_t.c.order_pk.in_([row.pk for row in rows]))
        ).all()
        imaged = {m for study in studies for m in (study.modalities or "").split("\\") if m} - NOT_IMAGES
        if not imaged:
            return [], []
        by_mpps = {row.modality for row in rows if row.progress_source == "mpps"}
        start = [int(row.pk) for row in rows if row.status == "SCHEDULED" and row.progress_source == ""
                 and (len(rows) == 1 or (row.modality in imaged and row.modality not in by_mpps))]
        stable = max(study.updated_at for study in studies) <= stable_before
        finish = [int(row.pk) for row in rows if stable and row.status == "IN PROGRESS"
                  and row.progress_source == "images"]
        return start, finish

    def _images_move(self, conn: Connection, accession: str, pks: list[int], status: str, told: str) -> int:
        """Steps *pks* of *accession* moved to *status* by their images; the
        HIS told when the order's status (*told* before) changes, as an MPPS
        N-CREATE (IP) or N-SET COMPLETED (CM) would have told it."""
        conn.execute(update(orders_t).where(orders_t.c.pk.in_(pks))
                     .values(status=status, progress_source="images", updated_at=_now()))
        procedure = self._procedure_dict(conn, accession)
        if procedure["status"] != told:
            self._tell_status(conn, {"order": _status_order(procedure), "status": procedure["status"],
                                     "step_status": status, "performed_by": "images"})
        return len(pks)

    # -- the outbox --------------------------------------------------------------------------
    @staticmethod
    def enqueue(conn: Connection, destination: str, kind: str, data: dict[str, Any]) -> None:
        """Queue a message in the same transaction as the change it reports.
        An HL7 message to the HIS gets its MSH-10 here, kept with it so that
        every resend repeats it: random (80 bits, CONTROL_ID_LENGTH hex
        digits), never derived from the outbox row, whose numbers start
        again after a restore or a new install -- a HIS that deduplicates
        by MSH-10 dropped the next report as one it already had."""
        if destination == "his" and not data.get("control_id"):
            data = {**data, "control_id": secrets.token_hex(10)}
        outbox.enqueue(conn, destination, kind, data)

    def _tell_status(self, conn: Connection, data: dict[str, Any]) -> None:
        """Queue an order status message (ORM^O01) for the HIS, unless it is
        not to be told (``his_order_status`` off)."""
        if self.order_status:
            self.enqueue(conn, "his", "order_status", data)

    # -- reconciliation ---------------------------------------------------------------------
    def _reconcile_existing(self, conn: Connection, order_pk: int) -> None:
        """A new order may match studies that arrived before it. A study is
        linked to its requested procedure's first step (*order_pk*), one link
        per study as before steps: the study is the procedure's (IHE RAD-4:
        one Study Instance UID for all its steps).

        A study found by its Accession Number alone is linked only when that
        is plausible (:func:`pacs.index.reconcile.accession_match_doubt`: the
        patient's identifiers, or the study date close to the order's): an
        old study whose accession the HIS's counter repeats (migrated from
        the old PACS) stays under its own patient and is listed unmatched
        with the reason, for a person to decide (IHE PIR)."""
        order = conn.execute(select(orders_t).where(orders_t.c.pk == order_pk)).one()
        matches = conn.execute(
            select(studies_t.c.pk, studies_t.c.study_uid, studies_t.c.study_date, studies_t.c.created_at,
                   patients_t.c.patient_id)
            .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
            .outerjoin(links_t, links_t.c.study_pk == studies_t.c.pk)
            .where(
                links_t.c.study_pk.is_(None),
                or_(studies_t.c.study_uid == order.study_uid,
                    and_(studies_t.c.accession_number == order.accession_number,
                         studies_t.c.accession_number != "")),
            )
        ).all()
        for study in matches:
            if study.study_uid != order.study_uid and accession_match_doubt(
                    conn, order, study.patient_id, study.study_date or "", study.created_at):
                # No accession or patient data in the log: the study key says which.
                log.warning("study %d shares its accession number with a new order but neither its patient nor "
                            "its date fits: not reconciled, listed as unmatched", study.pk)
                continue
            link_study(conn, study.pk, order_pk, "order placed after the study")

    def unmatched_studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """Studies no order explains, newest first (for the admin to match).
        ``reason``: why one whose accession names an order was not linked to
        it (:func:`pacs.index.reconcile.accession_match_doubt`), else ""."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(studies_t.c.study_uid, studies_t.c.accession_number, studies_t.c.study_date,
                       studies_t.c.modalities, patients_t.c.patient_id, patients_t.c.issuer, patients_t.c.name,
                       studies_t.c.created_at)
                .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
                .outerjoin(links_t, links_t.c.study_pk == studies_t.c.pk)
                .where(links_t.c.study_pk.is_(None))
                .order_by(studies_t.c.created_at.desc())
                .limit(limit)
            ).mappings().all()
            found = []
            for row in rows:
                data = dict(row)
                received_at = data.pop("created_at")
                order = self._procedure_rows(conn, row["accession_number"])[:1]
                data["reason"] = accession_match_doubt(conn, order[0], row["patient_id"], row["study_date"] or "",
                                                       received_at) if order else ""
                found.append(data)
        return found

    def match(self, study_uid: str, accession: str) -> dict[str, Any]:
        """Link a study to an order by hand; the HIS demographics then apply.
        Run again whole when it loses a deadlock (the study refiled under the
        order's patient meets an ingest or an HIS update of either patient)."""
        def once(conn: Connection) -> dict[str, Any]:
            study_pk = conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).scalar()
            if study_pk is None:
                raise OrderError(f"no study {study_uid}", http_status=404)
            rows = self._procedure_rows(conn, accession)
            if not rows:
                raise OrderError(f"no order {accession}", http_status=404)
            conn.execute(delete(links_t).where(links_t.c.study_pk == study_pk))
            link_study(conn, study_pk, rows[0].pk, "matched by hand")  # the procedure's first step
            return self._procedure_dict(conn, accession)

        return retry_write(self.engine, once, what="match of a study to an order")

    def move_study(self, study_uid: str, p: PatientInfo, *, dry_run: bool = False) -> dict[str, Any]:
        """File one study under another patient where no HIS order decides
        its patient (the technologist chose the wrong patient, or typed
        another's ID): the study is found and retrieved with that patient's
        ID and demographics from now on (corrections; the stored bytes stay),
        and the patient it leaves goes when it has no study or order left,
        unless registered (by the HIS or an administrator, or holding an ID
        merged into it). A new key makes a new patient of the name (and
        birth date, sex) *p* gives. Refused (:class:`OrderError`): an
        unknown study or, without a name, patient (404); a study an HIS
        order files (409: link it to the right order, or the HIS corrects
        the order), the patient it is filed under, demographics that differ
        from an existing patient's (409: that is a patient update), an ID
        without issuer that several patients hold under issuers (409).
        A signed report the HIS was sent under the patient it leaves is
        posted there as wrong, then sent for the new patient
        (:func:`report_to_moved_patient`). Returns {"study_uid", "previous"
        (the patient it left, ID^^^issuer), "patient", "report_resent"
        (whether the HIS is told so)}; *dry_run*: rolled back."""
        check_patient_id(p.patient_id)
        if p.name:
            check_person_name(p.name)

        def once(conn: Connection) -> tuple[str, dict[str, Any] | None, bool]:
            previous, pk, resent = self._move_study(conn, study_uid, p)
            # Read in the move's transaction: read after it, a patient merged or pruned meanwhile
            # answered {} and the caller's event naming it failed (a 500 for a move done).
            return previous, self._patient_dict(conn, pk), resent

        if dry_run:  # rolled back: nothing queued for the HIS either
            previous, patient, resent = self._rehearsed(once)
        else:
            previous, patient, resent = retry_write(self.engine, once, what="move of a study to another patient")
        return {"study_uid": study_uid, "previous": previous, "patient": patient or {}, "report_resent": resent}

    def _move_study(self, conn: Connection, study_uid: str, p: PatientInfo) -> tuple[str, int, bool]:
        study = conn.execute(select(studies_t.c.pk, studies_t.c.patient_pk)
                             .where(studies_t.c.study_uid == study_uid)).first()
        if study is None:
            raise OrderError(f"no study {study_uid}", code="204", http_status=404)
        order = conn.execute(select(orders_t.c.accession_number).join(links_t, links_t.c.order_pk == orders_t.c.pk)
                             .where(links_t.c.study_pk == study.pk)).first()
        if order is not None:
            raise OrderError(f"study {study_uid} is filed by the HIS order {order.accession_number}: link it to the "
                             "order of the right patient (pacs orders match), or have the HIS correct the order",
                             code="205", http_status=409)
        who = patient_cx(p.patient_id, p.issuer)
        pk, _ = self._existing_patient(conn, p, match_identifiers=False)
        if pk is None:
            # An ID with its issuer a patient holds as another of its IDs (the citizen ID of a patient the
            # HIS knows by the hospital number) is that patient, as a study received under it is filed:
            # made anew, it was a twin of them, holding the study.
            pk = other_id_patient(conn, p.patient_id, p.issuer)
        if pk is None and not p.issuer and self._patient_pk_any_issuer(conn, p.patient_id):
            # Held under several issuers (two hospitals' numbers, two people): naming neither, a name
            # given made a third patient of that ID without issuer, of the stranger's study.
            raise OrderError(f"several patients have the ID {p.patient_id}, each under an issuer: give the issuer "
                             "of the patient the study belongs to", code="205", http_status=409)
        if pk is None:
            if not p.name:
                raise OrderError(f"no patient {who}: give their name to register them with the study", code="204",
                                 http_status=404)
            pk = self._upsert_patient(conn, p, match_identifiers=False)
        elif changed := self._demographics_changed(conn, pk, p):
            raise OrderError(f"patient {who} is registered with another {', '.join(sorted(changed))}: correct the "
                             "patient (pacs patient update), then move the study", code="205", http_status=409)
        if pk == study.patient_pk:
            raise OrderError(f"study {study_uid} is filed under {who} already", code="205", http_status=409)
        old = conn.execute(select(patients_t).where(patients_t.c.pk == study.patient_pk)).one()
        lock_patient_studies(conn, old.pk)
        received = {keyword: getattr(old, column) or "" for keyword, column in PATIENT_COLUMNS.items()}
        # Every demographic: a birth date or sex the patient lacks is no leave to go out with the other person's.
        file_under_patient(conn, study.pk, pk, received, p.reason or "study moved to another patient", _now(),
                           every_demographic=True)
        resent = report_to_moved_patient(conn, study_uid, study.pk, old, pk)
        # The patient a mistyped ID made goes with its last study; one the HIS or an administrator
        # registered stays (prune_patients), as an order keeps its patient.
        prune_patients(conn, {old.pk})
        return patient_cx(old.patient_id, old.issuer), pk, resent

    def study_patient(self, study_uid: str) -> str:
        """The patient *study_uid* is filed under now, as an audit event names
        it (``ID^^^issuer``); '' for an unknown study. A match files the
        study under its order's patient: its event names the one it left."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(patients_t.c.patient_id, patients_t.c.issuer)
                .join(studies_t, studies_t.c.patient_pk == patients_t.c.pk)
                .where(studies_t.c.study_uid == study_uid)
            ).first()
        return patient_cx(row.patient_id, row.issuer) if row is not None else ""

    def corrections(self, study_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(corrections_t.c.keyword, corrections_t.c.received, corrections_t.c.corrected,
                       corrections_t.c.reason, corrections_t.c.created_at)
                .join(studies_t, studies_t.c.pk == corrections_t.c.study_pk)
                .where(studies_t.c.study_uid == study_uid)
                .order_by(corrections_t.c.pk)
            ).mappings().all()
        return [dict(r) for r in rows]

    def count_pending(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outbox_t).where(outbox_t.c.state == "pending")).scalar_one())


def _json_like(value: str) -> str:
    """*value* as a JSON string's text holds it, escaped as a LIKE pattern's
    literal text (escape character backslash)."""
    return like_literal(json.dumps(value)[1:-1])


def _step_accessions(conn: Connection, order_pks: list[int]) -> set[str]:
    """The accessions (requested procedures) of the scheduled steps *order_pks*."""
    if not order_pks:
        return set()
    return set(conn.execute(select(orders_t.c.accession_number).where(orders_t.c.pk.in_(order_pks))).scalars())


def _step_orders(step: Any) -> list[int]:
    """The orders a stored step performs (steps recorded before order_pks
    existed have their single order_pk only)."""
    pks = [int(pk) for pk in json.loads(step.order_pks or "[]")]
    if not pks and step.order_pk is not None:
        pks = [int(step.order_pk)]
    return pks


def patients_named(actions: list[tuple[str, Any]]) -> list[str]:
    """The patient IDs :meth:`OrderService.apply` *actions* name (a merge:
    the kept one first), as the request gave them: what the audit event of
    an order message or request names, also when it is refused before
    anything is stored (HL7 ORM/OMI/ADT, ``/api/orders``)."""
    found: list[str] = []
    for kind, value in actions:
        if kind == "merge":
            patient, prior = value
            ids = [patient.patient_id, *(pid for pid, _ in prior)]
        elif kind == "patient":
            ids = [value.patient_id]
        else:
            ids = [value.patient.patient_id]
        found.extend(i for i in ids if i and i not in found)
    return found


def order_subject(order: dict[str, Any]) -> tuple[str, str]:
    """(Study Instance UID, patient) an audit event names for a stored
    requested procedure (:meth:`OrderService.get`): the study UID the order
    gives modalities, the patient it is filed under as ``ID^^^issuer``
    (:func:`pacs.audit.patient_cx`), the form the study's events name it in."""
    return str(order.get("study_uid") or ""), patient_cx(str(order.get("patient_id") or ""),
                                                         str(order.get("issuer") or ""))


def absorb_patient(conn: Connection, target: int, kept: Any, old: Any, *, former_key: bool = True) -> None:
    """Remove the patient *old* (a patients row) into the patient *target*
    (its row *kept*), as a merge (ADT^A40) does once the studies were moved:
    its orders and other identifiers become *target*'s, the row is deleted,
    and its Patient ID stays an alias of *target* (:func:`keep_alias`;
    *former_key* as there). The caller moved *old*'s studies first."""
    conn.execute(update(orders_t).where(orders_t.c.patient_pk == old.pk).values(patient_pk=target))
    for ident in conn.execute(select(identifiers_t).where(identifiers_t.c.patient_pk == old.pk)).all():
        if (ident.value, ident.issuer) != (kept.patient_id, kept.issuer):
            insert_ignore(
                conn,
                identifiers_t,
                {"patient_pk": target, "value": ident.value, "issuer": ident.issuer, "id_type": ident.id_type},
                ["patient_pk", "value", "issuer"],
            )
    conn.execute(delete(identifiers_t).where(identifiers_t.c.patient_pk == old.pk))
    if old.registered:
        # The HIS's registration (its orders move here) stays the patient's: a new study under the
        # surviving ID is corrected to its values, as migration 0034 registers a patient with orders.
        conn.execute(update(patients_t).where(patients_t.c.pk == target, patients_t.c.registered.is_(False))
                     .values(registered=True))
    conn.execute(delete(patients_t).where(patients_t.c.pk == old.pk))
    keep_alias(conn, target, kept, old, former_key=former_key)


def keep_alias(conn: Connection, target: int, kept: Any, old: Any, *, former_key: bool = True) -> None:
    """The merged-away Patient ID (with its issuer) stays an identifier of
    the surviving patient, of type MERGED_ID_TYPE: a modality or HIS that
    still uses it (an old worklist entry, a printed label) reaches the
    surviving patient instead of creating the merged one anew -- the HL7
    patient lookup and the ingest's (pacs.index.writer.merged_patient)
    resolve it. It is an Other Patient ID too: a query by it finds the
    patient. Already an identifier of the surviving patient, it becomes a
    former key (MERGED) when *former_key*; otherwise it keeps its type (a
    record the old PACS made under the citizen ID, removed by the prefetch:
    the citizen ID is still the patient's, not a former key)."""
    if not old.patient_id or (old.patient_id, old.issuer) == (kept.patient_id, kept.issuer):
        return
    alias = {"patient_pk": target, "value": old.patient_id, "issuer": old.issuer}
    if insert_ignore(conn, identifiers_t, {**alias, "id_type": MERGED_ID_TYPE},
                     ["patient_pk", "value", "issuer"]) is None and former_key:
        # Listed before (the HIS sent it as another ID): it is a former key now.
        conn.execute(update(identifiers_t).where(*(identifiers_t.c[k] == v for k, v in alias.items()))
                     .values(id_type=MERGED_ID_TYPE))


def report_to_moved_patient(conn: Connection, study_uid: str, study_pk: int, old: Any, patient_pk: int,
                            order: Any = None) -> bool:
    """In the transaction refiling *study_uid* from the patient *old* (its
    row) to *patient_pk* (`move-study`; a study linked to another patient's
    order, :func:`link_study`): when the HIS holds the study's signed report
    under *old* (an ORU^R01 of it delivered, or on its way, since the study
    was last filed there), queue it posted as wrong for *old*
    (ris_bridge.outbound: OBX-11 W), then the same report for the new
    patient -- else another person's findings stay in *old*'s record at the
    HIS. The first is a copy of the last message the HIS holds (its
    version, with its status: F, or C once amended), the second of the
    report's last message (an amendment still waiting for the HIS, which
    names the new patient when it goes, is not copied, but for an order),
    in its order after it;
    *order* (the orders row the study is linked to now): the report answers
    that order from now on, the copy for the new patient names its numbers,
    and both go in that order's turn, before its later amendments. Nothing
    when the report is not signed, or its messages wait still (the HIS down)
    or were refused: sent later, they name the patient the study is filed
    under then. Whether queued. Not for a merge (ADT^A40, `pacs patient
    merge`: one person) nor an order the HIS moves to another patient (XO):
    the HIS moved its own records, results with them."""
    if conn.execute(select(reports_t.c.pk).where(reports_t.c.study_pk == study_pk,
                                                 reports_t.c.status == "signed").limit(1)).first() is None:
        return False
    rows = conn.execute(
        select(outbox_t.c.pk, outbox_t.c.state, outbox_t.c.last_error, outbox_t.c.payload)
        .where(outbox_t.c.destination == "his", outbox_t.c.kind == "report",
               outbox_t.c.payload.like(f"%{_json_like(study_uid)}%", escape="\\"))
        .order_by(outbox_t.c.pk)
        # Locked until the move commits (PostgreSQL; SQLite's writer holds the whole index): a sender
        # claiming a report read here as waiting would otherwise send it naming the patient the study leaves,
        # with no retraction queued for it.
        .with_for_update()
    ).all()
    # Held by the HIS: delivered, being sent, or taken by a HIS that sent no ACK (retried; it may
    # hold it all the same).
    messages = [(row.pk, row.state in ("sent", "sending") or (row.last_error or "").startswith(outbox.NO_ACK),
                 row.state == "pending", data)
                for row in rows if (data := json.loads(row.payload)).get("study_uid") == study_uid]
    wrong = outbox.REPORT_WRONG_PATIENT
    # A move posts it as wrong and sends it anew: what was delivered before the last of those
    # went to a patient the HIS was told of already.
    since = max((pk for pk, _, _, data in messages if data.get("status") == wrong), default=0)
    held = [(pk, data) for pk, is_held, _, data in messages if pk > since and is_held]
    if not held:
        return False

    def copy(data: dict[str, Any]) -> dict[str, Any]:
        report = {k: v for k, v in data.items() if k != "control_id"}  # a new MSH-10 for each
        if ordered:
            report["key"] = f"order:{ordered['order_pk']}"
        return report

    def naming(report: dict[str, Any], patient: Any, **more: Any) -> dict[str, Any]:
        return {**report.get("order", {}), **more, "patient_id": patient.patient_id or "",
                "issuer": patient.issuer or "", "name": patient.name or ""}

    ordered = report_order(order) if order is not None else {}
    # The version the HIS holds (an amendment signed since may wait still), with the order numbers it was
    # sent with.
    retracted = copy(held[-1][1])
    OrderService.enqueue(conn, "his", "report", {**retracted, "status": wrong, "order": naming(retracted, old)})
    # A later version waiting for the HIS goes when it is back, naming the patient the study is filed under
    # then: the new one. A copy of it was a second delivery -- unless the study answers another order now,
    # whose numbers only the copy names.
    if not ordered and any(waiting for pk, _, waiting, _ in messages if pk > held[-1][0]):
        return True
    # The latest version, with the status it was signed with (F; C for an amended version). The new patient
    # is written here too: a study deleted before it goes out is sent as queued (ris_bridge.outbound _as_sent).
    latest = copy(messages[-1][3])
    new = conn.execute(select(patients_t).where(patients_t.c.pk == patient_pk)).one()
    OrderService.enqueue(conn, "his", "report", {**latest, "order": naming(latest, new, **ordered)})
    return True


def report_order(row: Any) -> dict[str, Any]:
    """What a report (ORU^R01: ORC, OBR) names of the order it answers,
    from the orders row of its requested procedure (the first step): its
    accession too (OBR-18; OBR-3 of an order without placer and filler
    numbers), which a study linked to it takes -- a report resent for the
    order's patient named the accession the study came with."""
    return {"order_pk": row.pk, **{k: getattr(row, k) for k in (
        "accession_number", "placer_order_number", "filler_order_number", "procedure_code",
        "procedure_code_scheme", "requested_procedure_description")}}


def link_study(conn: Connection, study_pk: int, order_pk: int, matched_by: str) -> None:
    """File an existing study under its order's patient, recording corrections."""
    order = conn.execute(select(orders_t).where(orders_t.c.pk == order_pk)).one()
    study = conn.execute(select(studies_t).where(studies_t.c.pk == study_pk)).one()
    received_patient = conn.execute(select(patients_t).where(patients_t.c.pk == study.patient_pk)).one()
    received = {k: getattr(received_patient, c) for k, c in PATIENT_COLUMNS.items()}
    record_reconciliation(conn, study_pk, order, received, study.accession_number, matched_by, _now())
    if received_patient.pk != order.patient_pk:
        report_to_moved_patient(conn, study.study_uid, study_pk, received_patient, order.patient_pk, order)
        # The patient the modality typed may exist only through this study.
        left = conn.execute(
            select(func.count()).select_from(studies_t).where(studies_t.c.patient_pk == received_patient.pk)
        ).scalar_one()
        ordered = conn.execute(
            select(func.count()).select_from(orders_t).where(orders_t.c.patient_pk == received_patient.pk)
        ).scalar_one()
        if not left and not ordered:
            conn.execute(delete(identifiers_t).where(identifiers_t.c.patient_pk == received_patient.pk))
            conn.execute(delete(patients_t).where(patients_t.c.pk == received_patient.pk))


__all__ = ["OrderError", "OrderInfo", "OrderService", "OtherIdentifier", "PatientInfo", "STATUSES", "asdict",
           "order_subject", "patients_named", "procedure_status", "report_order", "report_to_moved_patient",
           "validate_order"]
