"""Orders from the HIS: the worklist, patient updates and merges, reconciliation.

Every entry point (HL7 v2 over MLLP, the JSON API, MPPS) maps its message
onto these models and calls :class:`OrderService`; each call is one
transaction, so a rejected message leaves no partial state. The HIS is the
source of truth for demographics: a received study that matches an order by
Study Instance UID or Accession Number is filed under the HIS patient, and
every value the index then holds differently from the received object is
recorded in ``corrections`` (the stored bytes are never changed; retrieval
applies the corrections).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from . import outbox
from .errors import PacsError
from .header import valid_uid
from .index.db import write_transaction
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
from .index.reconcile import PATIENT_COLUMNS, record_reconciliation
from .index.writer_helpers import insert_ignore
from .names import fold_name, name_words
from .timezones import server_zone

log = logging.getLogger(__name__)

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
# Transactions of one inbound message before a lost race is reported (see apply_message).
RACE_ATTEMPTS = 3

STATUSES = ("SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED", "CANCELLED")


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

    def demographics(self) -> dict[str, str]:
        """The DICOM keywords this update sets (only what was sent)."""
        sent = {"PatientName": self.name, "PatientBirthDate": self.birth_date, "PatientSex": self.sex}
        return {k: v for k, v in sent.items() if v is not None}


@dataclass
class OrderInfo:
    """One requested procedure with its scheduled step, as the HIS sent it."""

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

# What the worklist returns these values as (PS3.5 table 6.2-1): a longer value
# would be an invalid DICOM response, so every entry point refuses it here.
_VR_LIMITS: dict[str, tuple[str, str, int]] = {
    "accession_number": ("AccessionNumber", "SH", 16),
    "requested_procedure_id": ("RequestedProcedureID", "SH", 16),
    "step_id": ("ScheduledProcedureStepID", "SH", 16),
    "modality": ("Modality", "CS", 16),
    "station_ae_title": ("ScheduledStationAETitle", "AE", 16),
    "station_name": ("ScheduledStationName", "SH", 16),
    "location": ("ScheduledProcedureStepLocation", "SH", 16),
}
_PATIENT_ID_LIMIT = 64  # PatientID is LO


def validate_order(info: OrderInfo) -> None:
    """Refuse values the worklist could not return (HL7: AE with ERR 102,
    JSON: 400). The message names the field, never its value (PHI)."""
    for name, (keyword, vr, limit) in _VR_LIMITS.items():
        length = len(getattr(info, name))
        if length > limit:
            raise OrderError(
                f"{name} ({keyword}, VR {vr}) has {length} characters; at most {limit} are allowed",
                code="102", http_status=400,
            )


def _patient_columns(p: PatientInfo) -> dict[str, Any]:
    """Patient row values for the demographics *p* carries (None: keep)."""
    values: dict[str, Any] = {}
    if p.name is not None:
        values.update(name=p.name, name_folded=fold_name(p.name), name_words=name_words(p.name))
    if p.birth_date is not None:
        values["birth_date"] = p.birth_date
    if p.sex is not None:
        values["sex"] = p.sex
    return values


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


# Order statuses no performed step changes any more.
FINAL_STATUSES = ("CANCELLED", "COMPLETED")


class OrderService:
    """Transactions on orders, patients, performed steps and the outbox."""

    def __init__(self, engine: Any, zone: tzinfo | None = None) -> None:
        self.engine = engine
        # The hospital's zone: the scheduled date and time of an order that
        # comes without one (see _place). None: the server's.
        self.zone = zone

    # -- patients ------------------------------------------------------------------
    def _upsert_patient(self, conn: Connection, p: PatientInfo, *, match_identifiers: bool = True) -> int:
        """The HIS patient, created or updated (the HIS wins on demographics,
        but only on those it sent: a value left out keeps the stored one)."""
        if not p.patient_id:
            raise OrderError("the patient has no identifier", code="101", http_status=400)
        if len(p.patient_id) > _PATIENT_ID_LIMIT:
            raise OrderError(f"the patient ID (PatientID, VR LO) is longer than {_PATIENT_ID_LIMIT} characters",
                             code="102", http_status=400)
        now = _now()
        pk = self._existing_patient(conn, p, match_identifiers)
        if p.birth_date is not None and len(p.birth_date) not in (0, 8):
            stored = conn.execute(select(patients_t.c.birth_date).where(patients_t.c.pk == pk)).scalar() \
                if pk is not None else None
            p = replace(p, birth_date=_resolve_birth_date(p.birth_date, stored))
        if pk is None:
            blank = PatientInfo(p.patient_id, name="", birth_date="", sex="")
            pk = insert_ignore(
                conn,
                patients_t,
                {"patient_id": p.patient_id, "issuer": p.issuer, "created_at": now, "updated_at": now,
                 **_patient_columns(blank), **_patient_columns(p)},
                ["patient_id", "issuer"],
                where=PATIENT_HAS_ID,
            )
            if pk is None:  # created meanwhile by another writer
                pk = conn.execute(
                    select(patients_t.c.pk).where(patients_t.c.patient_id == p.patient_id,
                                                  patients_t.c.issuer == p.issuer)
                ).scalar_one()
                self._update_demographics(conn, pk, p, now)
        else:
            self._update_demographics(conn, pk, p, now)
        for other in p.other_ids:
            self._add_identifier(conn, pk, other)
        return int(pk)

    def _update_demographics(self, conn: Connection, pk: int, p: PatientInfo, now: datetime) -> None:
        values = _patient_columns(p)
        if not values:
            return
        changed = self._demographics_changed(conn, pk, p)
        if changed:
            conn.execute(update(patients_t).where(patients_t.c.pk == pk).values(**values, updated_at=now))
            # Only what really changed becomes a correction of the stored studies.
            self._record_patient_change(conn, pk, changed, "HIS patient update")

    @staticmethod
    def _patient_pk(conn: Connection, patient_id: str, issuer: str) -> int | None:
        return conn.execute(
            select(patients_t.c.pk).where(patients_t.c.patient_id == patient_id, patients_t.c.issuer == issuer)
        ).scalar()

    def _existing_patient(self, conn: Connection, p: PatientInfo, match_identifiers: bool) -> int | None:
        """The stored patient *p* is, or None for a new one."""
        if p.issuer:
            # The same ID received from a modality without an issuer is this
            # patient: give it the HIS's issuer instead of creating a twin.
            conn.execute(
                update(patients_t)
                .where(patients_t.c.patient_id == p.patient_id, patients_t.c.issuer == "",
                       ~select(patients_t.c.pk).where(patients_t.c.patient_id == p.patient_id,
                                                      patients_t.c.issuer == p.issuer).exists())
                .values(issuer=p.issuer)
            )
        pk = self._patient_pk(conn, p.patient_id, p.issuer)
        if pk is None and not p.issuer:
            pk = self._single_patient_with_id(conn, p.patient_id)
        if pk is None and match_identifiers:
            pk = self._patient_by_identifier(conn, p)
        return pk

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
        # Remember the ID we were given, so the next message finds the patient directly.
        self._add_identifier(conn, pk, OtherIdentifier(p.patient_id, p.issuer, ""))
        return pk

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
        row = conn.execute(select(patients_t).where(patients_t.c.pk == pk)).one()
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
        ("merge", (PatientInfo, [(prior id, issuer)]))."""
        with write_transaction(self.engine) as conn:
            return self._apply(conn, actions, source)

    def apply_message(self, actions: list[tuple[str, Any]], receipt: Receipt, source: str = "") -> bool:
        """:meth:`apply` for an inbound message, recorded as applied in the
        same transaction. False (and nothing applied) when a message with the
        same sender and control ID was applied before: the sender resends
        when our acknowledgement was lost, and must not get an error
        ("order already exists") for what it already did.

        On PostgreSQL two messages about one patient or order (or one
        message sent twice at once over two connections) can both find
        nothing and both insert: the loser's transaction is refused by a
        unique key, and replayed, when it sees what the winner did."""
        for attempt in range(RACE_ATTEMPTS):
            try:
                return self._apply_message_once(actions, receipt, source)
            except IntegrityError:
                if attempt == RACE_ATTEMPTS - 1:
                    raise
                log.info("message %s raced another writer; applied again", receipt.control_id)
            except OrderError:
                # "Order already exists" because the same message, sent twice
                # at once, was applied by the other connection meanwhile.
                with self.engine.connect() as conn:
                    if self._already_applied(conn, receipt):
                        return False
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _already_applied(conn: Connection, receipt: Receipt) -> Any:
        """The receipt row of this sender's control ID, or None; False when
        that row records another message (the control ID was reused)."""
        seen = conn.execute(select(received_t.c.pk, received_t.c.kind).where(
            received_t.c.sender == receipt.sender, received_t.c.control_id == receipt.control_id)).first()
        return seen if seen is None or _same_message(seen.kind, receipt) else False

    def _apply_message_once(self, actions: list[tuple[str, Any]], receipt: Receipt, source: str) -> bool:
        with write_transaction(self.engine) as conn:
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
        for action, arg in actions:
            if action == "place":
                results.append(self._place(conn, arg, source))
            elif action == "change":
                results.append(self._change(conn, arg, source))
            elif action in ("cancel", "discontinue"):
                results.append(self._cancel(conn, arg, "CANCELLED" if action == "cancel" else "DISCONTINUED"))
            elif action == "patient":
                results.append(self._upsert_patient(conn, arg))
            elif action == "merge":
                results.append(self._merge(conn, *arg))
            else:
                raise OrderError(f"unknown action {action!r}", code="207", http_status=400)
        return results

    def update_patient(self, p: PatientInfo) -> None:
        """ADT^A08 / A31: new demographics for an existing (or new) patient."""
        self.apply([("patient", p)])

    def merge_patients(self, surviving: PatientInfo, prior: list[tuple[str, str]]) -> int:
        """ADT^A40: move everything of the prior patient IDs to the surviving one.

        Returns how many studies moved.
        """
        return int(self.apply([("merge", (surviving, prior))])[0])

    def _merge(self, conn: Connection, surviving: PatientInfo, prior: list[tuple[str, str]]) -> int:
        # No matching by other IDs here: the message may well list the prior
        # patient's IDs, and the merge must not collapse into that patient.
        target = self._upsert_patient(conn, surviving, match_identifiers=False)
        moved = 0
        for prior_id, prior_issuer in prior:
            old = conn.execute(
                select(patients_t).where(
                    patients_t.c.patient_id == prior_id, patients_t.c.issuer == prior_issuer
                )
            ).first()
            if old is None and not prior_issuer:
                # Some HIS send the assigning authority only in PID: an MRG-1
                # without one names the patient holding that ID, if only one does
                # (a merge into the wrong one of two cannot be undone).
                found = conn.execute(
                    select(patients_t).where(patients_t.c.patient_id == prior_id).limit(2)
                ).all()
                if len(found) > 1:
                    raise OrderError(f"prior patient {prior_id} is ambiguous: several assigning authorities hold "
                                     "it; send MRG-1 with its assigning authority", code="204", http_status=409)
                old = found[0] if found else None
            if old is None:
                old = self._patient_by_other_id(conn, prior_id, prior_issuer)
            if old is None:
                raise OrderError(f"prior patient {prior_id} is unknown", code="204", http_status=404)
            if old.pk == target:
                continue
            study_pks = list(conn.execute(select(studies_t.c.pk).where(studies_t.c.patient_pk == old.pk)).scalars())
            now = _now()
            if study_pks:
                conn.execute(update(studies_t).where(studies_t.c.pk.in_(study_pks)).values(patient_pk=target))
                conn.execute(
                    corrections_t.insert(),
                    [
                        {"study_pk": s, "keyword": "PatientID", "received": old.patient_id,
                         "corrected": surviving.patient_id, "reason": "patient merge (ADT^A40)",
                         "created_at": now}
                        for s in study_pks
                    ],
                )
            conn.execute(update(orders_t).where(orders_t.c.patient_pk == old.pk).values(patient_pk=target))
            for ident in conn.execute(select(identifiers_t).where(identifiers_t.c.patient_pk == old.pk)).all():
                insert_ignore(
                    conn,
                    identifiers_t,
                    {"patient_pk": target, "value": ident.value, "issuer": ident.issuer, "id_type": ident.id_type},
                    ["patient_pk", "value", "issuer"],
                )
            conn.execute(delete(identifiers_t).where(identifiers_t.c.patient_pk == old.pk))
            conn.execute(delete(patients_t).where(patients_t.c.pk == old.pk))
            moved += len(study_pks)
        return moved

    @staticmethod
    def _patient_by_other_id(conn: Connection, value: str, issuer: str) -> Any:
        """The one patient holding *value* as an other ID (MRG-1 may name the
        prior patient by its citizen ID); None when none or several do."""
        condition = identifiers_t.c.value == value
        if issuer:
            condition = and_(condition, identifiers_t.c.issuer == issuer)
        pks = conn.execute(select(identifiers_t.c.patient_pk).where(condition).distinct().limit(2)).scalars().all()
        if len(pks) != 1:
            return None
        return conn.execute(select(patients_t).where(patients_t.c.pk == pks[0])).first()

    # -- orders ----------------------------------------------------------------------
    def _find_order(self, conn: Connection, info: OrderInfo) -> Any:
        """The order a change or cancel names. The accession number identifies
        a requested procedure; a placer order number may be shared by several
        (one HIS order, several procedures), so it decides only when the
        message sends no accession, and only when it names one order."""
        if info.accession_number:
            return self._order_by_accession(conn, info.accession_number)
        if not info.placer_order_number:
            raise OrderError("the order has neither an accession nor a placer order number", code="101", http_status=400)
        rows = conn.execute(
            select(orders_t).where(orders_t.c.placer_order_number == info.placer_order_number).limit(2)
        ).all()
        if len(rows) > 1:
            raise OrderError(f"placer order number {info.placer_order_number} names several procedures; "
                             "send the accession number of the one meant", code="205", http_status=409)
        return rows[0] if rows else None

    @staticmethod
    def _order_by_accession(conn: Connection, accession: str) -> Any:
        if not accession:
            return None
        return conn.execute(select(orders_t).where(orders_t.c.accession_number == accession)).first()

    def place(self, info: OrderInfo, source: str = "") -> dict[str, Any]:
        """A new order (HL7 ORC-1 NW). Returns the stored order."""
        return dict(self.apply([("place", info)], source)[0])

    def change(self, info: OrderInfo, source: str = "") -> dict[str, Any]:
        """An order change (ORC-1 XO): new values for an existing order."""
        return dict(self.apply([("change", info)], source)[0])

    def cancel(self, info: OrderInfo, status: str = "CANCELLED") -> dict[str, Any]:
        """Cancel (CA) or discontinue (DC) an order: it leaves the worklist."""
        action = "cancel" if status == "CANCELLED" else "discontinue"
        return dict(self.apply([(action, info)])[0])

    def _place(self, conn: Connection, info: OrderInfo, source: str) -> dict[str, Any]:
        if not info.accession_number:
            raise OrderError("the order has no accession number", code="101", http_status=400)
        validate_order(info)  # the derived procedure and step IDs default to the accession
        if info.study_uid and not valid_uid(info.study_uid):
            raise OrderError(f"invalid Study Instance UID {info.study_uid!r}", code="102", http_status=400)
        # A new procedure is new by its accession alone: the placer order
        # number it may share with procedures placed before is no conflict.
        if self._order_by_accession(conn, info.accession_number) is not None:
            raise OrderError(f"order {info.accession_number} already exists", code="205", http_status=409)
        self._check_study_uid_free(conn, info)
        patient_pk = self._upsert_patient(conn, info.patient)
        now = _now()
        values = {c: getattr(info, c) for c in _ORDER_COLUMNS}
        values["study_uid"] = info.study_uid or generate_uid()
        values["requested_procedure_id"] = info.requested_procedure_id or info.accession_number
        values["step_id"] = info.step_id or info.accession_number
        if not values["start_date"]:
            # No scheduled date (no TQ1-7, OBR-27 or OBR-7: "as soon as
            # possible"): scheduled for when it came, in the hospital's day. The
            # start date and time are Type 1 return keys (PS3.4 K.6-1), and a
            # modality asks for today's steps: an undated one was never offered.
            # Only a new order: a change leaving the date empty keeps what is stored.
            received = datetime.now(self.zone or server_zone())
            values["start_date"] = received.strftime("%Y%m%d")
            values["start_time"] = values["start_time"] or received.strftime("%H%M%S")
        pk = conn.execute(
            orders_t.insert()
            .values(**values, patient_pk=patient_pk, status="SCHEDULED", source=source,
                    created_at=now, updated_at=now)
            .returning(orders_t.c.pk)
        ).scalar_one()
        self._reconcile_existing(conn, pk)
        return self._order_dict(conn, pk)

    @staticmethod
    def _check_study_uid_free(conn: Connection, info: OrderInfo) -> None:
        """A Study Instance UID names one requested procedure: another order's
        UID is an error in the message (AE / 409), never a database failure
        the HIS would resend forever."""
        if not info.study_uid:
            return
        taken = conn.execute(
            select(orders_t.c.accession_number).where(orders_t.c.study_uid == info.study_uid)
        ).scalar()
        if taken is not None:
            raise OrderError(f"Study Instance UID {info.study_uid} is already used by order {taken}",
                             code="205", http_status=409)

    def _change(self, conn: Connection, info: OrderInfo, source: str) -> dict[str, Any]:
        validate_order(info)
        row = self._find_order(conn, info)
        if row is None:
            raise OrderError("no such order to change", code="204", http_status=404)
        if row.status in ("CANCELLED", "DISCONTINUED", "COMPLETED"):
            raise OrderError(f"order is {row.status.lower()} and cannot change", code="207", http_status=409)
        patient_pk = self._upsert_patient(conn, info.patient)
        values = {c: getattr(info, c) for c in _ORDER_COLUMNS if getattr(info, c)}
        values.pop("study_uid", None)  # the study UID handed to modalities never changes
        conn.execute(
            update(orders_t)
            .where(orders_t.c.pk == row.pk)
            .values(**values, patient_pk=patient_pk, source=source, updated_at=_now())
        )
        if patient_pk != row.patient_pk:
            self._move_linked_studies(conn, row.pk)
        return self._order_dict(conn, row.pk)

    @staticmethod
    def _move_linked_studies(conn: Connection, order_pk: int) -> None:
        """The HIS moved the order to another patient (ORC XO with another
        PID): its studies, and so their reports, follow, with the differences
        recorded as corrections -- what a study receives when its order comes
        late. The previous patient stays: the HIS registered it."""
        order = conn.execute(select(orders_t).where(orders_t.c.pk == order_pk)).one()
        now = _now()
        for study in conn.execute(
            select(studies_t).join(links_t, links_t.c.study_pk == studies_t.c.pk).where(links_t.c.order_pk == order_pk)
        ).all():
            previous = conn.execute(select(patients_t).where(patients_t.c.pk == study.patient_pk)).one()
            current = {k: getattr(previous, c) for k, c in PATIENT_COLUMNS.items()}
            record_reconciliation(conn, study.pk, order, current, study.accession_number,
                                  "order moved to another patient", now)

    def _cancel(self, conn: Connection, info: OrderInfo, status: str) -> dict[str, Any]:
        row = self._find_order(conn, info)
        if row is None:
            raise OrderError("no such order to cancel", code="204", http_status=404)
        verb = "cancel" if status == "CANCELLED" else "discontinue"
        if row.status == "COMPLETED" or self._has_signed_report(conn, row.pk):
            # HL7 ORC-1 UC / UD: what was performed (or reported) cannot be
            # undone by the HIS, as an XO of a completed order is refused.
            raise OrderError(f"unable to {verb}: order {row.accession_number} is already performed "
                             f"({row.status.lower()}{', reported' if row.status != 'COMPLETED' else ''})",
                             code="207", http_status=409)
        conn.execute(update(orders_t).where(orders_t.c.pk == row.pk).values(status=status, updated_at=_now()))
        return self._order_dict(conn, row.pk)

    @staticmethod
    def _has_signed_report(conn: Connection, order_pk: int) -> bool:
        return conn.execute(
            select(reports_t.c.pk)
            .join(links_t, links_t.c.study_pk == reports_t.c.study_pk)
            .where(links_t.c.order_pk == order_pk, reports_t.c.status == "signed")
            .limit(1)
        ).first() is not None

    def get(self, accession: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            pk = conn.execute(select(orders_t.c.pk).where(orders_t.c.accession_number == accession)).scalar()
            return self._order_dict(conn, pk) if pk is not None else None

    @staticmethod
    def _order_dict(conn: Connection, pk: int) -> dict[str, Any]:
        row = conn.execute(
            select(orders_t, patients_t.c.patient_id, patients_t.c.issuer, patients_t.c.name)
            .join(patients_t, patients_t.c.pk == orders_t.c.patient_pk)
            .where(orders_t.c.pk == pk)
        ).one()
        data = dict(row._mapping)
        for key in ("created_at", "updated_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data

    # -- status and performed steps -----------------------------------------------------
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
        performed_series: list[dict[str, Any]] | None = None,
        create: bool,
    ) -> dict[str, Any]:
        """MPPS N-CREATE (create=True) or N-SET: track the step, move its orders
        (IN PROGRESS, COMPLETED; back to SCHEDULED when the step is DISCONTINUED
        and no other step of the order is in progress or completed).

        *scheduled*: (accession, study UID, step ID) of each Scheduled Step
        Attributes item of the N-CREATE (default: the one given by *accession*,
        *study_uid*, *step_id*); every order they name is performed by the step.
        Returns the first order (empty when the step matches none)."""
        if status not in ("IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            raise OrderError(f"invalid performed procedure step status {status!r}", http_status=400)
        now = _now()
        with write_transaction(self.engine) as conn:
            existing = conn.execute(select(steps_t).where(steps_t.c.sop_uid == sop_uid)).first()
            if create and existing is not None:
                raise OrderError("performed procedure step already exists", http_status=409)
            if not create and existing is None:
                raise OrderError("no such performed procedure step", http_status=404)
            if existing is not None and existing.status != "IN PROGRESS":
                raise OrderError(f"performed procedure step is already {existing.status}", http_status=409)
            final_end = end or (existing.end if existing is not None else "")
            if status in ("COMPLETED", "DISCONTINUED") and len(final_end) <= 8:
                # PS3.4 Table F.7.2-1, final state: End Date and End Time are Type 1
                # (kept as date + time: eight characters are a date alone).
                raise OrderError(f"a {status} step needs its End Date and End Time", http_status=422)
            if existing is not None:
                order_pks = _step_orders(existing)
            else:
                refs = scheduled if scheduled is not None else [(accession, study_uid, step_id)]
                order_pks = self._orders_for_steps(conn, refs)
            values: dict[str, Any] = {"status": status, "updated_at": now}
            for key, value in (("modality", modality), ("station_ae_title", station_ae_title),
                               ("start", start), ("end", end)):
                if value:
                    values[key] = value
            if performed_series is not None:
                values["performed_series"] = json.dumps(performed_series)
            if existing is None:
                conn.execute(steps_t.insert().values(
                    sop_uid=sop_uid, order_pk=order_pks[0] if order_pks else None, order_pks=json.dumps(order_pks),
                    created_at=now, **values))
            else:
                conn.execute(update(steps_t).where(steps_t.c.pk == existing.pk).values(**values))
            orders = [self._move_order(conn, pk, status, sop_uid, now) for pk in order_pks]
            if not orders:
                log.info("performed procedure step %s matches no order", sop_uid)
            return orders[0] if orders else {}

    def _orders_for_steps(self, conn: Connection, refs: list[tuple[str, str, str]]) -> list[int]:
        """The orders a new step performs, each once, in the items' order. A
        cancelled one refuses the step: the HIS withdrew it, and an MPPS must
        not bring it back to the worklist (the modality shows the reason)."""
        order_pks: list[int] = []
        for accession, study_uid, step_id in refs:
            pk = self._order_for_step(conn, accession, study_uid, step_id)
            if pk is not None and pk not in order_pks:
                order_pks.append(int(pk))
        for pk in order_pks:
            row = conn.execute(select(orders_t.c.accession_number, orders_t.c.status).where(orders_t.c.pk == pk)).one()
            if row.status == "CANCELLED":
                raise OrderError(f"order {row.accession_number} was cancelled by the HIS", http_status=422)
        return order_pks

    def _move_order(self, conn: Connection, order_pk: int, status: str, sop_uid: str, now: datetime) -> dict[str, Any]:
        """The order follows its step and the HIS is told (outbox) -- except
        an order cancelled meanwhile, which stays cancelled, and a completed
        one, which a later step (a repeat acquisition, a step discontinued
        after the exam was done) does not move back: the HIS would read the
        finished exam as running again, and could then cancel it.

        A DISCONTINUED step puts its order back on the worklist (see
        :meth:`_after_discontinued`). The HIS hears of a change only: a
        second step on an order already IN PROGRESS tells it nothing."""
        current = conn.execute(select(orders_t.c.status).where(orders_t.c.pk == order_pk)).scalar_one()
        target: str | None = None if current in FINAL_STATUSES else status
        if status == "DISCONTINUED" and target is not None:
            target = self._after_discontinued(conn, order_pk, current, sop_uid)
        moves = target is not None and target != current
        if moves:
            conn.execute(update(orders_t).where(orders_t.c.pk == order_pk).values(status=target, updated_at=now))
        order = self._order_dict(conn, order_pk)
        if moves:
            # A step discontinued: ORC-5 SC (HL7 table 0038 "in process,
            # scheduled") -- the order is open and waits to be performed, which
            # is the truth. DC would tell the HIS the order itself was stopped
            # (many close or bill it then, and we would refuse its XO), CA that
            # it was withdrawn, IP that it is being performed. The outbound
            # renderer maps SCHEDULED to SC; step_status says why it came back.
            self.enqueue(conn, "his", "order_status",
                         {"order": order, "status": target, "step": sop_uid, "step_status": status})
        return order

    @staticmethod
    def _after_discontinued(conn: Connection, order_pk: int, current: str, sop_uid: str) -> str | None:
        """The order status after one of its performed steps was discontinued
        (None: unchanged).

        IHE RAD-7 (Modality PPS Discontinued): a discontinued performed step
        is void for the scheduled step, which is still to be done -- the
        modality picked the wrong worklist entry (110514), the patient could
        not go on. So an order the step had put IN PROGRESS goes back to
        SCHEDULED, on the worklist again and changeable by the HIS; unless
        another performed step of the order is in progress (it stays IN
        PROGRESS: no IP, SC, IP flapping at the HIS) or completed (the order
        is then COMPLETED and final). An order in any other state (the HIS
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

    @staticmethod
    def _order_for_step(conn: Connection, accession: str, study_uid: str, step_id: str) -> int | None:
        """The order one scheduled step item names: by the Study Instance UID
        the worklist handed out (the stronger evidence), else the accession,
        else (neither sent) the step ID."""
        for column, value in ((orders_t.c.study_uid, study_uid), (orders_t.c.accession_number, accession)):
            if value:
                pk = conn.execute(select(orders_t.c.pk).where(column == value)).scalar()
                if pk is not None:
                    return int(pk)
        if accession or study_uid or not step_id:
            return None
        return conn.execute(select(orders_t.c.pk).where(orders_t.c.step_id == step_id).limit(1)).scalar()

    # -- the outbox --------------------------------------------------------------------------
    @staticmethod
    def enqueue(conn: Connection, destination: str, kind: str, data: dict[str, Any]) -> None:
        """Queue a message in the same transaction as the change it reports."""
        outbox.enqueue(conn, destination, kind, data)

    # -- reconciliation ---------------------------------------------------------------------
    def _reconcile_existing(self, conn: Connection, order_pk: int) -> None:
        """A new order may match studies that arrived before it."""
        order = conn.execute(select(orders_t).where(orders_t.c.pk == order_pk)).one()
        matches = conn.execute(
            select(studies_t.c.pk)
            .outerjoin(links_t, links_t.c.study_pk == studies_t.c.pk)
            .where(
                links_t.c.study_pk.is_(None),
                or_(studies_t.c.study_uid == order.study_uid,
                    and_(studies_t.c.accession_number == order.accession_number,
                         studies_t.c.accession_number != "")),
            )
        ).scalars().all()
        for study_pk in matches:
            link_study(conn, study_pk, order_pk, "order placed after the study")

    def unmatched_studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """Studies no order explains, newest first (for the admin to match)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(studies_t.c.study_uid, studies_t.c.accession_number, studies_t.c.study_date,
                       studies_t.c.modalities, patients_t.c.patient_id, patients_t.c.name)
                .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
                .outerjoin(links_t, links_t.c.study_pk == studies_t.c.pk)
                .where(links_t.c.study_pk.is_(None))
                .order_by(studies_t.c.created_at.desc())
                .limit(limit)
            ).mappings().all()
        return [dict(r) for r in rows]

    def match(self, study_uid: str, accession: str) -> dict[str, Any]:
        """Link a study to an order by hand; the HIS demographics then apply."""
        with write_transaction(self.engine) as conn:
            study_pk = conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).scalar()
            if study_pk is None:
                raise OrderError(f"no study {study_uid}", http_status=404)
            order_pk = conn.execute(select(orders_t.c.pk).where(orders_t.c.accession_number == accession)).scalar()
            if order_pk is None:
                raise OrderError(f"no order {accession}", http_status=404)
            conn.execute(delete(links_t).where(links_t.c.study_pk == study_pk))
            link_study(conn, study_pk, order_pk, "matched by hand")
            return self._order_dict(conn, order_pk)

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


def _step_orders(step: Any) -> list[int]:
    """The orders a stored step performs (steps recorded before order_pks
    existed have their single order_pk only)."""
    pks = [int(pk) for pk in json.loads(step.order_pks or "[]")]
    if not pks and step.order_pk is not None:
        pks = [int(step.order_pk)]
    return pks


def link_study(conn: Connection, study_pk: int, order_pk: int, matched_by: str) -> None:
    """File an existing study under its order's patient, recording corrections."""
    order = conn.execute(select(orders_t).where(orders_t.c.pk == order_pk)).one()
    study = conn.execute(select(studies_t).where(studies_t.c.pk == study_pk)).one()
    received_patient = conn.execute(select(patients_t).where(patients_t.c.pk == study.patient_pk)).one()
    received = {k: getattr(received_patient, c) for k, c in PATIENT_COLUMNS.items()}
    record_reconciliation(conn, study_pk, order, received, study.accession_number, matched_by, _now())
    if received_patient.pk != order.patient_pk:
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
           "validate_order"]
