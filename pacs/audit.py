"""The audit trail: every access to patient data, over HTTP and DICOM.

Events are queued and written in small batches by one thread (a scrolling
viewer makes dozens of requests a second; each must not cost an fsync), at
most ~0.2 s after they happen; the table itself refuses UPDATE and DELETE.
Export is RFC 3881 / IHE ATNA shaped JSON, or RFC 5424 syslog lines whose
fields are escaped STRUCTURED-DATA parameters (a value a client chose can
not forge another field).
"""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, insert, or_, select
from sqlalchemy.exc import DataError, SQLAlchemyError

from .index.db import write_transaction
from .index.models import AuditEvent, Patient, Study
from .timezones import in_zone

log = logging.getLogger(__name__)
# While the index is down: how often kept audit events are tried again, and
# how many are kept (~100 MB at most; beyond that the oldest are lost, said loudly).
RETRY_SECONDS = 2.0
MAX_UNWRITTEN = 200_000
# Events written in one transaction at most: a burst is not held back until
# its deadline, nor made one huge INSERT.
MAX_BATCH = 500
events_t = AuditEvent.__table__
studies_t = Study.__table__
patients_t = Patient.__table__

# RFC 3881 EventActionCode: C create, R read, U update, D delete, E execute.
_ACTION_CODE = {
    "view": "R", "download": "R", "query": "E", "store": "C", "report-create": "C", "report-update": "U",
    "report-sign": "U", "report-amend": "C", "export": "R", "delete": "D", "login": "E", "login-failed": "E", "logout": "E",
    "denied": "E", "order": "U", "patient-update": "U", "retrieve": "R", "commit": "E",
    "user-add": "U", "user-disable": "U", "token-create": "C", "token-revoke": "D", "login-lockout": "E",
    "patient-merge": "U", "study-move": "U", "worklist-query": "E", "associate": "E", "hl7-connect": "E", "csrf": "E",
    "api-docs": "R", "audit-archive": "D", "mpps": "U", "metrics": "R",
    # Patient share links (pacs.shares): made, revoked; a birth year answered, a link locked by wrong ones.
    "share-create": "C", "share-revoke": "D", "share-verify": "E", "share-lockout": "E",
    # Report templates (pacs.report_templates).
    "template-create": "C", "template-update": "U", "template-archive": "D",
    # Key images (pacs.key_images): a radiologist's selection saved or removed.
    "key-images-update": "U",
    # Measurements (pacs.annotations): a radiologist's saved as their presentation state, or removed.
    "annotations-update": "U",
    # Signing certificates (pacs.signing_keys): imported, removed; signing locked by wrong PINs.
    "certificate-import": "C", "certificate-remove": "D", "signature-lockout": "E",
    # Reading claims (pacs.reading_claims): a study claimed, taken over from a colleague, released.
    "claim": "U", "claim-takeover": "U", "claim-release": "U",
    # Rejected instances (pacs.rejections): the bar on receiving them again lifted; images withdrawn with a
    # rejection note made here (pacs.rejection_notes; each instance's deletion is a "delete" too).
    "rejection-lift": "U", "reject": "D",
    # A critical result's acknowledgement: who was told, how (pacs.critical_results).
    "critical-ack": "U",
}


# Control characters other than tab: never meaningful in an audit field.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class Event:
    action: str
    user: str = ""
    role: str = ""
    client: str = ""
    protocol: str = "http"
    outcome: str = "success"
    study_uid: str = ""
    patient_id: str = ""
    detail: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


_TEXT_FIELDS = tuple(f.name for f in fields(Event) if f.type in ("str", str))


class AuditTrail:
    """Buffered writer of audit events (one per process)."""

    def __init__(self, engine: Engine, flush_seconds: float = 0.2) -> None:
        self.engine = engine
        self.flush_seconds = flush_seconds
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        # Events the index could not take (it was down): written with the next
        # batch, retried every RETRY_SECONDS meanwhile, at most MAX_UNWRITTEN.
        self._unwritten: list[Event] = []
        self._outage_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def record(self, event: Event) -> None:
        self._queue.put(_storable(event))

    def flush(self) -> None:
        """Write everything recorded so far (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(_Flush(done))  # type: ignore[arg-type]
        done.wait(10)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=RETRY_SECONDS if self._unwritten else None)
            except queue.Empty:
                self._write([])
                continue
            batch: list[Event] = []
            waiters: list[threading.Event] = []
            stop = False
            # The batch is due flush_seconds after its first event: waiting
            # for a quiet gap instead wrote nothing for as long as a viewer
            # kept scrolling, and a crash then lost all of it.
            deadline = time.monotonic() + self.flush_seconds
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Flush):
                    waiters.append(item.done)
                else:
                    batch.append(item)
                remaining = deadline - time.monotonic()
                if waiters or stop or len(batch) >= MAX_BATCH or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            self._write(batch)
            for w in waiters:
                w.set()
            if stop:
                return

    def _write(self, batch: list[Event]) -> None:
        batch = self._unwritten + batch
        if not batch:
            return
        try:
            # Read (the patients), then write: BEGIN IMMEDIATE on SQLite, or a
            # commit by another process in between fails the upgrade at once.
            with write_transaction(self.engine) as conn:
                _insert(conn, batch)
            if self._unwritten:
                log.info("%d audit events kept during an index outage are written", len(self._unwritten))
            self._unwritten = []
        except DataError:
            # A value the database refuses (not an outage): the other events
            # are written one by one, the refused one is logged and dropped.
            self._unwritten = []
            self._write_one_by_one(batch)
        except SQLAlchemyError as exc:
            # The index is down or locked: who read what must not be lost to it.
            lost = max(0, len(batch) - MAX_UNWRITTEN)
            self._unwritten = batch[lost:]
            now = time.monotonic()
            if lost or now - self._outage_logged >= 60:
                self._outage_logged = now
                log.warning("audit events wait for the index (%d kept%s): %s", len(self._unwritten),
                            f", {lost} oldest LOST" if lost else "", str(exc).splitlines()[0][:200])
        except Exception:
            # A bug, not an outage: retrying would fail the same way.
            self._unwritten = []
            log.exception("could not write %d audit events", len(batch))

    def _write_one_by_one(self, batch: list[Event]) -> None:
        for event in batch:
            try:
                with write_transaction(self.engine) as conn:
                    _insert(conn, [event])
            except DataError as exc:
                log.error("audit event refused by the index, dropped: %s %s by %s (%s)", event.action,
                          event.study_uid[:80], event.user[:40], str(exc).splitlines()[0][:200])
            except SQLAlchemyError:
                self._unwritten.append(event)  # an outage after all: kept, tried again


# The patients named in one event, backslash-separated, at most this many
# UTF-8 bytes: the column is indexed, and PostgreSQL refuses an index entry
# over ~2.7 kB (an event it refuses was held back as if the index were
# down). More patients go in further events with the same action and detail.
MAX_PATIENT_BYTES = 2000
# The indexed columns: none may hold more than MAX_PATIENT_BYTES.
_INDEXED_FIELDS = ("user", "action", "study_uid", "patient_id")


def _cut(value: str, limit: int = MAX_PATIENT_BYTES) -> str:
    """*value* in at most *limit* UTF-8 bytes: a list of UIDs (a QIDO-RS
    search's, backslash- or comma-separated) cut after its last whole UID."""
    data = value.encode()
    if len(data) <= limit:
        return value
    cut = data[:limit].decode(errors="ignore")
    last = max(cut.rfind("\\"), cut.rfind(","))
    return cut[:last] if last > 0 else cut


def _storable(event: Event) -> Event:
    for name in _TEXT_FIELDS:
        value = getattr(event, name)
        if _CONTROL.search(value):
            # What a client typed (a %00 in a path) is kept visible but
            # storable: PostgreSQL refuses NUL in text, and one such row
            # held every later event back as if the index were down.
            value = _CONTROL.sub("\ufffd", value)
        # A lone surrogate no driver encodes: the write of the whole batch
        # (up to 500 other users' events) failed on it and was dropped.
        value = value.encode("utf-8", "replace").decode("utf-8")
        setattr(event, name, value)
    for name in _INDEXED_FIELDS:
        # A client's value (an 8,000-character study in a WADO path, sent
        # without a token) over PostgreSQL's index entry limit was refused
        # as if the index were down: that event and every later one waited
        # in memory for good, and the trail recorded nothing more.
        setattr(event, name, _cut(getattr(event, name)))
    return event


def patient_chunks(values: Iterable[str], limit: int = MAX_PATIENT_BYTES) -> list[str]:
    """Distinct non-empty *values* (patients as :func:`patient_cx` names
    them) joined with backslashes, in chunks of at most *limit* UTF-8 bytes
    (one value longer than that is cut): the ``patient_id`` of as many
    events as an answer showing them needs."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for value in dict.fromkeys(v for v in values if v):
        value = value.encode()[:limit].decode(errors="ignore")
        length = len(value.encode()) + (1 if current else 0)
        if current and size + length > limit:
            chunks.append("\\".join(current))
            current, size, length = [], 0, len(value.encode())
        current.append(value)
        size += length
    if current:
        chunks.append("\\".join(current))
    return chunks


def naming_patients(event: Event, patients: Iterable[str]) -> list[Event]:
    """*event* naming the patients an answer showed ("who saw which
    patient"): itself with the first :func:`patient_chunks` chunk, and a
    copy (same action, outcome and detail) for each further chunk. Without
    patients, *event* alone, as it is."""
    chunks = patient_chunks(patients)
    if not chunks:
        return [event]
    event.patient_id = chunks[0]
    return [event, *(replace(event, patient_id=chunk) for chunk in chunks[1:])]


def record_in(conn: Connection, event: Event) -> None:
    """Write *event* in the caller's transaction, not through the buffered
    writer: the event of a change (a deletion) commits with the change, so a
    process killed after that commit cannot lose it."""
    _insert(conn, [_storable(event)])


def _insert(conn: Connection, events: list[Event]) -> None:
    _add_patient_ids(conn, events)
    conn.execute(insert(events_t), [asdict(e) for e in events])


def patient_cx(patient_id: str, issuer: str) -> str:
    """A patient as an event names it: the Patient ID with its issuer as an
    HL7 CX (``BN100^^^BVDK``, what IHE ATNA's patient ParticipantObjectID
    holds), the ID alone without one. Two hospitals' BN100 are two people."""
    if not patient_id or not issuer:
        return patient_id
    return f"{patient_id}^^^{issuer}"


def _add_patient_ids(conn: Connection, batch: list[Event]) -> None:
    """Fill in the patient of events that name only a study (most HTTP
    accesses, every DICOM one): "who saw which patient" must not need a join
    at audit time, and must survive the study's later deletion."""
    wanted = {e.study_uid for e in batch if e.study_uid and not e.patient_id}
    if not wanted:
        return
    rows = conn.execute(
        select(studies_t.c.study_uid, patients_t.c.patient_id, patients_t.c.issuer)
        .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
        .where(studies_t.c.study_uid.in_(wanted))
    ).all()
    patient_of = {row.study_uid: patient_cx(row.patient_id, row.issuer) for row in rows}
    for event in batch:
        if event.study_uid and not event.patient_id:
            event.patient_id = patient_of.get(event.study_uid) or ""


@dataclass
class _Flush:
    done: threading.Event


def _names_patient(patient_id: str) -> ColumnElement[bool]:
    """An event naming *patient_id*: alone, or as one of the backslash-
    separated patients of a search answer (see viewer_api.security). An ID
    without issuer finds it under any issuer (``BN100`` finds
    ``BN100^^^BVDK``), an ID with one (:func:`patient_cx`) that patient only."""
    column = events_t.c.patient_id
    # "!" escapes LIKE's wildcards (a patient ID has no backslash: DICOM LO).
    like = patient_id.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    sep = "\\"
    forms = [like] if "^" in patient_id else [like, like + "^^^%"]
    conditions = [column == patient_id]
    for form in forms:
        conditions += [column.like(f"{form}{sep}%", escape="!"), column.like(f"%{sep}{form}", escape="!"),
                       column.like(f"%{sep}{form}{sep}%", escape="!")]
    if len(forms) > 1:
        conditions.append(column.like(forms[1], escape="!"))
    return or_(*conditions)


def query(engine: Engine, *, study_uid: str = "", user: str = "", action: str = "", patient_id: str = "",
          limit: int = 1000) -> list[dict[str, Any]]:
    """The events, newest first, that match every filter given."""
    stmt = select(events_t).order_by(events_t.c.pk.desc()).limit(limit)
    if study_uid:
        stmt = stmt.where(events_t.c.study_uid == study_uid)
    if patient_id:
        stmt = stmt.where(_names_patient(patient_id))
    if user:
        stmt = stmt.where(events_t.c.user == user)
    if action:
        stmt = stmt.where(events_t.c.action == action)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def event_time(at: datetime | str) -> str:
    """When an event happened, unambiguously: UTC with its "Z" (RFC 3881 5.1
    EventDateTime is an xs:dateTime, RFC 5424 6.2.3 TIMESTAMP needs its
    TIME-OFFSET). Times are written in UTC; one read back without a zone
    is taken as such."""
    if isinstance(at, str):
        return at
    return in_zone(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_atna(event: dict[str, Any], source_id: str) -> dict[str, Any]:
    """One event as an RFC 3881 / ATNA shaped record (JSON)."""
    participants = []
    if event["study_uid"]:
        participants.append({"ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 3,
                             "ParticipantObjectIDTypeCode": {"code": "110180", "codeSystemName": "DCM",
                                                             "displayName": "Study Instance UID"},
                             "ParticipantObjectID": event["study_uid"]})
    # One participant per patient named (a search names several, backslash-
    # separated), each as its CX: ID^^^issuer.
    for patient in dict.fromkeys(p for p in (event["patient_id"] or "").split("\\") if p):
        participants.append({"ParticipantObjectTypeCode": 1, "ParticipantObjectTypeCodeRole": 1,
                             "ParticipantObjectIDTypeCode": {"code": "2", "codeSystemName": "RFC-3881",
                                                             "displayName": "Patient Number"},
                             "ParticipantObjectID": patient})
    return {
        "EventIdentification": {
            "EventID": {"code": event["action"], "codeSystemName": "filmless-pacs"},
            "EventActionCode": _ACTION_CODE.get(event["action"], "E"),
            "EventDateTime": event_time(event["at"]),
            "EventOutcomeIndicator": 0 if event["outcome"] == "success" else 4 if event["outcome"] == "failure" else 8,
        },
        "ActiveParticipant": [{"UserID": event["user"], "RoleIDCode": event["role"], "UserIsRequestor": True,
                               "NetworkAccessPointID": event["client"], "NetworkAccessPointTypeCode": 2}],
        "AuditSourceIdentification": {"AuditSourceID": source_id},
        "ParticipantObjectIdentification": participants,
        "Detail": {"protocol": event["protocol"], "text": event["detail"]},
    }


# RFC 5424 6.3: the audit fields are one STRUCTURED-DATA element. Its SD-ID
# names a private enterprise number, as 6.3.2 asks of a non-IANA SD-ID:
# 32473 is RFC 5612's number for documentation and examples (we have none
# of our own); collectors key on the name before the "@".
SYSLOG_SD_ID = "audit@32473"
SYSLOG_APP_NAME = "filmless-pacs"
# The event's fields in a syslog line, in this order (empty ones left out).
SYSLOG_FIELDS = ("user", "role", "client", "protocol", "action", "outcome", "study_uid", "patient_id", "detail")
# Characters that end or split a line for some reader of the export (C0,
# DEL, C1 with NEL, the Unicode line and paragraph separators): a value
# never starts a forged line. Tab is a separator to some SIEM parsers.
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(value: str) -> str:
    """*value* for a line of text output: control and line-breaking
    characters shown as U+FFFD, a tab as a space. Events are stored so
    (:func:`_storable`), but rows written before that was done, or by
    another release, may still hold a newline or an escape sequence."""
    return _LINE_BREAKING.sub(lambda m: " " if m.group() == "\t" else "\ufffd", value)


def syslog_param_value(value: str) -> str:
    """*value* as an RFC 5424 PARAM-VALUE (6.3.3): on one line
    (:func:`one_line`), with ``\\``, ``"`` and ``]`` escaped by a backslash,
    so no value can end its parameter or the element early and forge a
    field, whatever a client put in it (a failed login's username, a
    searched Study UID). UTF-8 stays as it is (PARAM-VALUE is UTF-8):
    Vietnamese names are read as written."""
    return one_line(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 HEADER field: printable US-ASCII without space, at most
    *limit* characters, the NILVALUE "-" when nothing is left."""
    return "".join(c for c in value if "!" <= c <= "~")[:limit] or "-"


def to_syslog(event: dict[str, Any], source_id: str) -> str:
    """One event as an RFC 5424 syslog line (facility authpriv, severity
    notice): ``<85>1 TIMESTAMP HOSTNAME filmless-pacs - AUDIT [audit@32473
    source="AE" user="..." ...]``. Every field is a PARAM of the one
    STRUCTURED-DATA element (:func:`syslog_param_value`), *source_id* (the
    ATNA AuditSourceID: the AE title) as ``source``; no MSG part."""
    at = event_time(event["at"])
    host = _header_field(socket.gethostname(), 255)
    params = [("source", source_id)] + [(k, str(event[k])) for k in SYSLOG_FIELDS if event[k]]
    sd = " ".join(f'{k}="{syslog_param_value(v)}"' for k, v in params if v)
    return f"<85>1 {at} {host} {SYSLOG_APP_NAME} - AUDIT [{' '.join(filter(None, (SYSLOG_SD_ID, sd)))}]"
