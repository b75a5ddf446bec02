"""Messages to the HIS: rendering outbox events as HL7 v2 and delivering
them over MLLP with retries (exponential backoff) until the HIS says AA.

Connection failures and AR answers (the HIS cannot take it now: a system
rejection, "send it again") are retried for as long as it takes, with a
backoff (``his_retry_seconds`` doubled per try) capped at
``his_retry_max_seconds``: nothing is lost while the HIS is down or
refusing. AE (the HIS says this message is wrong) is retried
MAX_ERROR_ANSWERS times in a row and then parked "dead", where
`pacs outbox list --state dead` shows it and `pacs outbox retry` sends it
again. So is, at once, an AR or CR whose error code (ERR-3; ERR-1 or MSA-6
before v2.5) says the HIS does not take this kind of message at all
(UNSUPPORTED: a results-only HIS refusing our ORM^O01 status messages):
resent, it would be refused forever and hold back the report queued after
it for the same order. Messages about the same order (or study) go out one
at a time in the order they were queued (see :mod:`pacs.outbox`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import Engine, select

from pacs import outbox
from pacs.app import Pacs
from pacs.audit import Event, patient_cx
from pacs.index.models import Order, Patient, Study
from pacs.index.writer import merged_patient
from pacs.periodic import Periodic
from pacs.settings import Settings
from pacs.timezones import hl7_timestamp, hospital_zone, server_zone, utc_offset

from . import mllp
from .hl7v2 import CONTROL_ID_LENGTH, ack_code, ack_error_code, escape, escape_lines

log = logging.getLogger(__name__)

_ORC_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC", "SCHEDULED": "SC", "CANCELLED": "CA"}
# Result status (OBR-25, HL7 table 0123; OBX-11, table 0085): an amended
# report replaces a final one, so it goes out as C (corrected), not F. A
# report the HIS holds under a patient its study was moved away from
# (pacs.orders.OrderService.move_study) is posted as wrong for that patient:
# OBX-11 W, "post original as wrong, e.g. transmitted for wrong patient".
# Table 0123 has no W; its C ("correction to results") tells the HIS that
# the observations replace those it holds, where X would say the order was
# cancelled and F would post the wrong patient's result as final again.
_RESULT_STATUS = {"final": ("F", "F"), "amended": ("C", "C"), outbox.REPORT_WRONG_PATIENT: ("C", "W")}
# AE/CE answers in a row before a message is parked dead; AR/CR never park it.
MAX_ERROR_ANSWERS = 3
# Messages the HIS may take without an ACK in one round before it is taken
# for stuck (each costs hl7_ack_timeout) and the rest waits for the next round.
MAX_SILENT_IN_A_ROUND = 3
# Seconds to connect to the HIS (mllp.send's own default).
CONNECT_TIMEOUT = 10.0
# At most this many messages claimed at once (fewer when the ACK timeout is long).
MAX_BATCH = 20
_REJECTIONS = re.compile(r"HIS answered [AC]E \(rejection (\d+) of")
# HL7 table 0357 codes that refuse the kind of message, not this one: unsupported
# message type, event code, processing ID, version ID.
UNSUPPORTED = {"200": "unsupported message type", "201": "unsupported event code",
               "202": "unsupported processing id", "203": "unsupported version id"}


# An issuer stored as a whole HD ("BVDK&1.2.840.99999.1&ISO", as HL7 input
# was kept before its subcomponents were read apart): namespace, universal
# ID and its type (HL7 table 0301).
_STORED_HD = re.compile(r"([^&]*)&([^&]+)&(DNS|GUID|HCD|HL7|ISO|L|M|N|Random|URI|UUID|x400|x500)")


def _hd(issuer: str) -> str:
    """The assigning authority (CX-4, an HD) for a stored issuer: the
    namespace, escaped; an issuer stored as a whole HD, its subcomponents
    each escaped on its own with the "&" between them left a separator
    (they went out as the data "\\T\\")."""
    stored = _STORED_HD.fullmatch(issuer)
    if stored is None:
        return escape(issuer)
    return "&".join(escape(part) for part in stored.groups())


def _pn_to_xpn(name: str) -> str:
    parts = (name or "").split("^")
    return "^".join(escape(p) for p in parts[:3])


@dataclass(frozen=True)
class Addresses:
    """MSH-3 to MSH-6 of outbound messages: who sends, who receives."""

    application: str = "FILMLESS"
    facility: str = ""
    his_application: str = "HIS"
    his_facility: str = ""

    @classmethod
    def of(cls, settings: Settings) -> Addresses:
        return cls(settings.hl7_application or settings.ae_title, settings.hl7_facility,
                   settings.his_application, settings.his_facility)


def render(kind: str, data: dict[str, Any], control_id: str, to: Addresses = Addresses(),
           zone: tzinfo | None = None) -> bytes:
    """The HL7 v2 message for an outbox event. Its timestamps (MSH-7, OBR-7,
    OBR-22) are in *zone*, the hospital's (default: the server's), each with
    its offset: a HIS must not have to guess which clock wrote them."""
    zone = zone or server_zone()
    now = hl7_timestamp(datetime.now(UTC), zone)
    order = data.get("order", {})
    msh_type = {"order_status": "ORM^O01^ORM_O01", "report": "ORU^R01^ORU_R01"}[kind]
    segments = [
        "|".join(["MSH", "^~\\&", escape(to.application), escape(to.facility), escape(to.his_application),
                  escape(to.his_facility), now, "", msh_type, control_id, "P", "2.5",
                  "", "", "", "", "", "UNICODE UTF-8"]),
        "|".join(["PID", "1", "", f"{escape(order.get('patient_id', ''))}^^^{_hd(order.get('issuer', ''))}",
                  "", _pn_to_xpn(order.get("name", ""))]),
    ]
    placer, filler = escape(order.get("placer_order_number", "")), escape(order.get("filler_order_number", ""))
    accession = escape(order.get("accession_number", ""))
    code, text = order.get("procedure_code", ""), order.get("requested_procedure_description", "")
    if kind == "report" and not (placer or filler):
        # A report on a study no order explains: the accession is the number
        # this side gave the examination (ORC-3/OBR-3, filler order number).
        filler = accession
    if not (code or text):
        # OBR-4 is required: a study without an order is named by what it is.
        text = data.get("modalities", "")
    service = f"{escape(code)}^{escape(text)}^{escape(order.get('procedure_code_scheme', '') if code else '')}"
    if kind == "order_status":
        # About the order -- the requested procedure, whatever its number of
        # scheduled steps: ORC-5 is its status (pacs.orders.procedure_status:
        # CM once every step is done or withdrawn), sent when that changes,
        # so the HIS gets for an order of two steps what it got for one.
        status = _ORC_STATUS.get(data.get("status", ""), "SC")
        segments.append("|".join(["ORC", "SC", placer, filler, "", status]))
        segments.append("|".join(["OBR", "1", placer, filler, service] + [""] * 13 + [accession]))
    else:
        result_status, observation_status = _RESULT_STATUS.get(data.get("status", "final"), ("F", "F"))
        segments.append("|".join(["ORC", "RE", placer, filler, "", "CM"]))
        # OBR-22 results date/time (the signature), OBR-25 result status,
        # OBR-32 principal result interpreter (the signer, NDL: ID&family&given).
        obr = ["OBR", "1", placer, filler, service] + [""] * 13 + [accession] + [""] * 14
        obr[7] = _observation_time(data.get("study_date", ""), data.get("study_time", ""), zone)
        obr[22] = escape(_in_zone(data.get("signed_at", ""), zone))
        obr[25] = result_status
        obr[32] = _interpreter(data.get("signed_by", ""), data.get("signed_by_name", ""))
        segments.append("|".join(obr).rstrip("|"))
        segments.extend(_obx(index, line, observation_status)
                        for index, line in enumerate(data.get("lines", []), start=1))
    return "\r".join(segments).encode("utf-8") + b"\r"


def _observation_time(study_date: str, study_time: str, zone: tzinfo) -> str:
    """OBR-7 (required in a result, HL7 v2.5 4.5.3.7): the study's DICOM
    date and time as an HL7 TS, YYYYMMDD[HH[MM[SS]]] -- the precision the
    modality gave, no fraction -- followed by *zone*'s offset on that day
    (a modality's clock is the hospital's); the date alone without a time
    and without an offset. Empty when the date is not a DICOM date
    (nothing better than no value)."""
    date = re.sub(r"\D", "", study_date)  # ACR-NEMA wrote 2024.12.01
    if len(date) != 8:
        return ""
    time = re.sub(r"\D", "", study_time.split(".")[0])[:6]
    if len(time) not in (2, 4, 6):
        return date
    try:
        wall = datetime.strptime(date + time.ljust(6, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return date + time  # not a real date or time: as the modality wrote it, no offset invented
    return date + time + utc_offset(wall.replace(tzinfo=zone))


_TS_WITH_OFFSET = re.compile(r"\d{14}[+-]\d{4}")


def _in_zone(value: str, zone: tzinfo) -> str:
    """A queued TS with its offset (the signature time) written in *zone*,
    so that every timestamp of a message is in the same zone (messages
    queued before an upgrade carry the server's offset)."""
    if _TS_WITH_OFFSET.fullmatch(value) is None:
        return value
    try:
        moment = datetime.strptime(value, "%Y%m%d%H%M%S%z")
    except ValueError:
        return value
    return hl7_timestamp(moment, zone)


def _patient_fields(row: Any) -> dict[str, str]:
    """A patient as a message names it (PID-3, PID-5), from a row with its ID, issuer and name."""
    return {"patient_id": row.patient_id or "", "issuer": row.issuer or "", "name": row.name or ""}


def study_facts(engine: Engine, study_uid: str) -> dict[str, str]:
    """The study's date and time (OBR-7 of a report) and the patient it is
    filed under now (PID-3, PID-5), from the index; {} for a study no
    longer there."""
    if not study_uid:
        return {}
    with engine.connect() as conn:
        row = conn.execute(select(Study.study_date, Study.study_time, Patient.patient_id, Patient.issuer, Patient.name)
                           .join(Patient, Patient.pk == Study.patient_pk)
                           .where(Study.study_uid == study_uid)).first()
    if row is None:
        return {}
    return {"study_date": row.study_date or "", "study_time": row.study_time or "", **_patient_fields(row)}


def order_patient(engine: Engine, order_pk: Any) -> dict[str, str]:
    """The patient order *order_pk* is under now (PID-3, PID-5 of its status
    message); {} for none (a message queued without the order's row, an
    order gone)."""
    if not isinstance(order_pk, int):
        return {}
    with engine.connect() as conn:
        row = conn.execute(select(Patient.patient_id, Patient.issuer, Patient.name)
                           .join(Order, Order.patient_pk == Patient.pk).where(Order.pk == order_pk)).first()
    return _patient_fields(row) if row else {}


def patient_named(engine: Engine, patient_id: str, issuer: str) -> dict[str, str]:
    """The patient *patient_id* / *issuer* names now (PID-3, PID-5): its own
    key, else the patient it was merged into (ADT^A40: the HIS moved its
    records there); {} for none (a patient pruned with its last study)."""
    if not patient_id:
        return {}
    with engine.connect() as conn:
        pk = conn.execute(select(Patient.pk).where(Patient.patient_id == patient_id, Patient.issuer == issuer)
                          ).scalar() or merged_patient(conn, patient_id, issuer)
        row = conn.execute(select(Patient.patient_id, Patient.issuer, Patient.name).where(Patient.pk == pk)
                           ).first() if pk is not None else None
    return _patient_fields(row) if row else {}


def control_id(pk: int) -> str:
    """MSH-10 of outbox message *pk* queued without one (before MSH-10s were
    chosen at queueing, :meth:`pacs.orders.OrderService.enqueue`): stable,
    so a resend can be recognised; the prefix gives way to the digits so
    that it never exceeds CONTROL_ID_LENGTH (ST, 20). Not unique across
    archives: the pks start again after a restore or a new install."""
    digits = str(pk)
    return "FILMLESS"[: max(0, CONTROL_ID_LENGTH - len(digits))] + digits[-CONTROL_ID_LENGTH:]


def _interpreter(user: str, name: str) -> str:
    """OBR-32 (NDL) of the signer: its first component is a CNN, whose
    subcomponents (ID number, family name, given name) are separated by &."""
    if not (user or name):
        return ""
    parts = name.split("^") if name and name != user else ["", ""]
    family, given = (parts + [""])[:2]
    return "&".join(escape(p) for p in (user, family, given)).rstrip("&")


def _obx(index: int, line: dict[str, Any], result_status: str) -> str:
    """One OBX per report section (its own OBX-3 code). TX text keeps its
    line breaks as repetitions of OBX-5 (a repetition is a hard line break
    for TX, HL7 v2.5 2.A.79), so no CR/LF ever sits inside the segment and the
    one-OBX-per-LOINC-section layout the HIS already reads stays as it is;
    other types (RP: the viewer link) are one value. OBX-8, the abnormal
    flag: "AA" on a critical result (pacs.critical_results)."""
    value_type = line.get("type", "TX")
    value = line.get("value", "")
    encoded = escape_lines(value) if value_type == "TX" else escape(value)
    return "|".join(["OBX", str(index), value_type, line.get("code", "GDT^Report^L"),
                     "", encoded, "", "", escape(line.get("abnormal", "")), "", "", result_status])


class OutboundSender(Periodic):
    """Background delivery of the outbox to the HIS MLLP endpoint."""

    thread_name = "hl7-outbound"
    join_timeout = 15.0
    round_at_start = True

    def __init__(self, pacs: Pacs, host: str, port: int, *, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.pacs, self.host, self.port = pacs, host, port

    def round(self) -> None:
        self.deliver_due()

    def round_failed(self, exc: Exception) -> None:
        log.error("outbound delivery round failed", exc_info=exc)

    def deliver_due(self, *, rounds: int = 50) -> int:
        """Send what is due now; returns how many were delivered. A message
        delivered lets the next one of its order go at once (another round),
        up to *rounds* rounds."""
        delivered = 0
        for _ in range(rounds):
            sent, more = self._deliver_round()
            delivered += sent
            if not (sent and more) or self.stopping:
                break
        return delivered

    def _lease(self) -> tuple[timedelta, int]:
        """How long a claim lasts, and how many messages to claim at once.

        One send may take the connection timeout plus ``hl7_ack_timeout``;
        the lease, renewed before each send, outlasts two of them (a claim
        never runs out in the middle of a send), and a batch is no larger
        than the lease covers even without renewals: a slow HIS does not let
        one node hoard messages another could send meanwhile."""
        per_send = CONNECT_TIMEOUT + self.pacs.settings.hl7_ack_timeout
        lease = max(outbox.LEASE, timedelta(seconds=2 * per_send + 10))
        return lease, max(1, min(MAX_BATCH, int(lease.total_seconds() // per_send)))

    def _deliver_round(self) -> tuple[int, bool]:
        """One batch: (delivered, whether the HIS was reachable throughout).
        Before each send the claims of the batch are renewed; a message whose
        claim ran out and passed to another node is not sent (nor settled)
        here. One message that fails in any way (its rendering, an ACK that
        cannot be read) fails alone: the others of the batch still go."""
        delivered = 0
        engine = self.pacs.engine
        lease, limit = self._lease()
        queue = outbox.claim_due(engine, "his", limit, lease=lease)
        if not queue:
            return 0, False
        silent = 0
        while queue:
            if self.stopping:
                outbox.release(engine, queue, 0)
                return delivered, False
            queue = outbox.renew(engine, queue, lease)
            if not queue:
                break
            message, queue = queue[0], queue[1:]
            backoff = min(self.pacs.settings.his_retry_max_seconds,
                          self.pacs.settings.his_retry_seconds * 2.0 ** min(message.attempts, 6))
            try:
                # Read once: what is sent is what the audit names (not the index a moment later).
                sent = self._as_sent(message)
                payload = self._render(message, sent)
            except Exception as exc:  # a payload this version cannot render: retried, never dropped
                log.exception("message %d cannot be rendered; retried in %.0fs", message.pk, backoff)
                outbox.mark_failed(engine, message, f"cannot render: {exc}", dead=False, retry_in=backoff)
                continue
            try:
                reply = mllp.send(self.host, self.port, payload, timeout=CONNECT_TIMEOUT,
                                  ack_timeout=self.pacs.settings.hl7_ack_timeout)
            except mllp.NoAck as exc:
                # The HIS took this message and said nothing (or hung up): it
                # is up, and one message it chokes on must not hold back the
                # other orders'. A HIS silent to several in a row is stuck: the
                # rest waits for the next round.
                silent += 1
                outbox.mark_failed(engine, message, f"{outbox.NO_ACK}: {exc}", dead=False, retry_in=backoff)
                log.info("HIS %s:%d sent no ACK for message %d (%s); retried in %.0fs", self.host, self.port,
                         message.pk, exc, backoff)
                if silent < MAX_SILENT_IN_A_ROUND:
                    continue
                outbox.release(engine, queue, backoff)
                return delivered, False
            except OSError as exc:
                outbox.mark_failed(engine, message, f"HIS unreachable: {exc}", dead=False, retry_in=backoff)
                log.info("HIS %s:%d unreachable (%s); message %d retried in %.0fs", self.host, self.port, exc,
                         message.pk, backoff)
                # The HIS is down: hand the rest back for the next round, in order.
                outbox.release(engine, queue, backoff)
                return delivered, False
            except Exception as exc:  # anything else about this one send: this message only
                log.exception("sending message %d to HIS %s:%d failed", message.pk, self.host, self.port)
                outbox.mark_failed(engine, message, f"send failed: {exc}", dead=False, retry_in=backoff)
                continue
            code, text = read_ack(reply)
            error = ack_error_code(reply) if code in ("AR", "CR") else ""
            if error in UNSUPPORTED:
                # Not this message but its kind is refused: resent, it would be
                # refused forever, holding back the later messages of its order
                # (the signed report). Parked at once; the next ones go.
                if outbox.mark_failed(engine, message,
                                      f"HIS answered {code} {error} ({UNSUPPORTED[error]}): {text}; not sent again",
                                      dead=True, retry_in=backoff):
                    self._audit(message, sent, "failure",
                                f"HIS answered {code} {error} ({UNSUPPORTED[error]}): parked dead")
                log.warning("HIS refused message %d (%s %s, %s): parked dead, the messages after it go on; "
                            "pacs outbox retry sends it again", message.pk, code, error, UNSUPPORTED[error])
                continue
            if code in ("AA", "CA"):
                superseded = outbox.mark_sent(engine, message)
                if superseded is not None:  # None: another sender recorded (and audited) it
                    self._audit(message, sent, "success", f"HIS answered {code}")
                if superseded:
                    log.info("message %d superseded %d dead message(s) of %s", message.pk, superseded, message.key)
                delivered += 1
            elif code in ("AE", "CE"):
                # The HIS says the message itself is wrong: resending the same
                # bytes rarely helps. A few tries, then parked for an operator
                # (pacs outbox list/retry); it holds back no later message.
                previous = _REJECTIONS.match(message.last_error)
                rejections = (int(previous.group(1)) if previous else 0) + 1
                dead = rejections >= MAX_ERROR_ANSWERS
                parked = outbox.mark_failed(
                    engine, message,
                    f"HIS answered {code} (rejection {rejections} of {MAX_ERROR_ANSWERS}): {text}",
                    dead=dead, retry_in=backoff,
                )
                if dead and parked:
                    self._audit(message, sent, "failure", f"HIS answered {code} {MAX_ERROR_ANSWERS} times: parked dead")
                log.warning("HIS refused message %d (%s %s)%s", message.pk, code, text,
                            "; parked dead: pacs outbox retry sends it again" if dead else "")
            else:
                # AR (or CR, or no readable MSA): the HIS cannot take it now
                # (its own failure, "send it again"). Never parked: retried with
                # a capped backoff, holding back the later messages of its order.
                outbox.mark_failed(engine, message, f"HIS answered {code or 'no MSA'}: {text}",
                                   dead=False, retry_in=backoff)
                log.warning("HIS rejected message %d (%s %s); retried in %.0fs", message.pk, code, text, backoff)
        return delivered, True

    def _audit(self, message: outbox.Message, data: dict[str, Any], outcome: str, result: str) -> None:
        """Audit what a message disclosed to the HIS, once: when it was
        delivered (the HIS acknowledged it), or when it went dead (not
        each try): the patient and study it names (*data*, the message as
        sent: :meth:`_as_sent`), what it carried, where it went. Like a
        routed study's ``export`` (PS3.15 A.5.3.3)."""
        order = data.get("order") or {}
        if message.kind == "report" and data.get("status") == outbox.REPORT_WRONG_PATIENT:
            what = (f"ORU^R01 report posted as wrong for this patient (the study was moved to another), "
                    f"signed by {data.get('signed_by', '')}")
        elif message.kind == "report":
            what = f"ORU^R01 report ({data.get('status', 'final')}, signed by {data.get('signed_by', '')})"
        else:
            what = f"ORM^O01 order status {data.get('status', '')}"
        address = f"{self.host}:{self.port}"
        self.pacs.audit.record(Event(
            action="export", user="hl7-outbound", role="system", client=address, protocol="hl7", outcome=outcome,
            study_uid=str(data.get("study_uid") or order.get("study_uid") or ""),
            patient_id=patient_cx(str(order.get("patient_id") or ""), str(order.get("issuer") or "")),
            detail=(f"{what}, accession {order.get('accession_number', '')}, to HIS {address}, message "
                    f"{message.pk} (control ID {data.get('control_id') or control_id(message.pk)}): {result}")[:500],
        ))

    def _as_sent(self, message: outbox.Message) -> dict[str, Any]:
        """What *message* says when it is sent: a report names the patient
        its study is filed under then, an order status the order's patient.
        A message waits in the queue while the HIS is down, and the HIS may
        merge the patient meanwhile (ADT^A40: the emergency's temporary
        number into the citizen ID) or the study be moved to its right
        patient: the ID queued with it is one the HIS no longer keeps
        (refused AE, the report parked) or another person's. A report
        posted as wrong (outbox.REPORT_WRONG_PATIENT) names the patient
        queued with it, the one the study left, as known now."""
        data = message.data
        if message.kind == "order_status":
            # About the order, the patient the order is under now (a merge moves it).
            patient = order_patient(self.pacs.engine, (data.get("order") or {}).get("pk"))
            return {**data, "order": {**data["order"], **patient}} if patient else data
        if message.kind != "report":
            return data
        facts = study_facts(self.pacs.engine, str(data.get("study_uid") or ""))
        if not facts:  # the study is gone: the report as it was signed
            return data
        patient = {key: facts.pop(key) for key in ("patient_id", "issuer", "name")}
        if data.get("status") == outbox.REPORT_WRONG_PATIENT:
            # Posted as wrong for the patient the study was moved away from, not the one it is under
            # now: as that patient is known now (merged since: the one the HIS moved their records to).
            queued = data.get("order") or {}
            patient = patient_named(self.pacs.engine, str(queued.get("patient_id") or ""),
                                    str(queued.get("issuer") or ""))
        if "study_date" in data:  # queued with its own date/time; reports are queued without: OBR-7 from the index
            facts = {}
        return {**data, **facts, "order": {**(data.get("order") or {}), **patient}}

    def _render(self, message: outbox.Message, data: dict[str, Any]) -> bytes:
        """The HL7 bytes of *message* as sent (*data*: :meth:`_as_sent`)."""
        # MSH-10 chosen when the message was queued (every resend repeats it);
        # messages queued before that carry none and keep the one of their pk.
        control = str(data.get("control_id") or control_id(message.pk))
        return render(message.kind, data, control, Addresses.of(self.pacs.settings),
                      hospital_zone(self.pacs.settings))


def read_ack(reply: bytes) -> tuple[str, str]:
    """MSA-1 and MSA-3 of the HIS's ACK, never raising: an ACK not valid in
    the character set it declares still has its ASCII MSA-1 read (the HIS
    said AA: sending it again would only repeat it); one that cannot be read
    at all is ("", why), retried like AR."""
    try:
        return ack_code(reply)
    except Exception as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    for segment in reply.decode("latin-1").replace("\n", "\r").split("\r"):
        if segment.startswith("MSA") and len(segment) > 4:
            fields = segment.split(segment[3])
            code = fields[1] if len(fields) > 1 else ""
            if code in ("AA", "AE", "AR", "CA", "CE", "CR"):
                return code, f"(ACK unreadable: {why})"
    return "", f"ACK unreadable: {why}"
