"""Messages to the HIS: rendering outbox events as HL7 v2 and delivering
them over MLLP with retries (exponential backoff) until the HIS says AA.

Connection failures are retried for as long as it takes (nothing is lost
while the HIS is down); a message the HIS rejects (AE/AR) is retried a few
times and then parked as "dead" for an operator to look at.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pacs import outbox
from pacs.app import Pacs
from pacs.settings import Settings

from . import mllp
from .hl7v2 import ack_code, escape, escape_lines

log = logging.getLogger(__name__)

_ORC_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC", "SCHEDULED": "SC", "CANCELLED": "CA"}
# Result status (HL7 tables 0123 for OBR-25, 0085 for OBX-11): an amended
# report replaces a final one, so it goes out as C (corrected), not F.
_RESULT_STATUS = {"final": "F", "amended": "C"}
MAX_REJECTIONS = 10
MAX_BACKOFF = 60.0


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


def render(kind: str, data: dict[str, Any], control_id: str, to: Addresses = Addresses()) -> bytes:
    """The HL7 v2 message for an outbox event."""
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    order = data.get("order", {})
    msh_type = {"order_status": "ORM^O01^ORM_O01", "report": "ORU^R01^ORU_R01"}[kind]
    segments = [
        "|".join(["MSH", "^~\\&", escape(to.application), escape(to.facility), escape(to.his_application),
                  escape(to.his_facility), now, "", msh_type, control_id, "P", "2.5",
                  "", "", "", "", "", "UNICODE UTF-8"]),
        "|".join(["PID", "1", "", f"{escape(order.get('patient_id', ''))}^^^{escape(order.get('issuer', ''))}",
                  "", _pn_to_xpn(order.get("name", ""))]),
    ]
    placer, filler = escape(order.get("placer_order_number", "")), escape(order.get("filler_order_number", ""))
    service = f"{escape(order.get('procedure_code', ''))}^{escape(order.get('requested_procedure_description', ''))}^{escape(order.get('procedure_code_scheme', ''))}"
    accession = escape(order.get("accession_number", ""))
    if kind == "order_status":
        status = _ORC_STATUS.get(data.get("status", ""), "SC")
        segments.append("|".join(["ORC", "SC", placer, filler, "", status]))
        segments.append("|".join(["OBR", "1", placer, filler, service] + [""] * 13 + [accession]))
    else:
        result_status = _RESULT_STATUS.get(data.get("status", "final"), "F")
        segments.append("|".join(["ORC", "RE", placer, filler, "", "CM"]))
        segments.append("|".join(["OBR", "1", placer, filler, service] + [""] * 13 + [accession]
                                 + [""] * 6 + [result_status]))
        segments.extend(_obx(index, line, result_status) for index, line in enumerate(data.get("lines", []), start=1))
    return "\r".join(segments).encode("utf-8") + b"\r"


def _obx(index: int, line: dict[str, Any], result_status: str) -> str:
    """One OBX per report section (its own OBX-3 code). TX text keeps its
    line breaks as repetitions of OBX-5 (a repetition is a hard line break
    for TX, HL7 v2.5 2.A.79), so no CR/LF ever sits inside the segment and the
    one-OBX-per-LOINC-section layout the HIS already reads stays as it is;
    other types (RP: the viewer link) are one value."""
    value_type = line.get("type", "TX")
    value = line.get("value", "")
    encoded = escape_lines(value) if value_type == "TX" else escape(value)
    return "|".join(["OBX", str(index), value_type, line.get("code", "GDT^Report^L"),
                     "", encoded, "", "", "", "", "", result_status])


class OutboundSender:
    """Background delivery of the outbox to the HIS MLLP endpoint."""

    def __init__(self, pacs: Pacs, host: str, port: int, *, interval: float = 1.0) -> None:
        self.pacs, self.host, self.port, self.interval = pacs, host, port, interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hl7-outbound", daemon=True)

    def start(self) -> OutboundSender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(15)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("outbound delivery round failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def deliver_due(self) -> int:
        """Send what is due now; returns how many were delivered."""
        delivered = 0
        claimed = outbox.claim_due(self.pacs.engine, "his")
        for index, message in enumerate(claimed):
            control_id = f"FILMLESS{message.pk}"  # stable: a resend can be recognised
            payload = render(message.kind, message.data, control_id, Addresses.of(self.pacs.settings))
            try:
                reply = mllp.send(self.host, self.port, payload, ack_timeout=self.pacs.settings.hl7_ack_timeout)
            except OSError as exc:
                backoff = min(MAX_BACKOFF, 2.0 ** min(message.attempts, 6))
                # A slow HIS (no ACK in time) is not a down one: the operator
                # must know which, and the HIS sees the resend's same MSH-10.
                what = "sent no ACK" if isinstance(exc, mllp.NoAck) else "unreachable"
                outbox.mark_failed(self.pacs.engine, message.pk, f"HIS {what}: {exc}", dead=False, retry_in=backoff)
                log.info("HIS %s:%d %s (%s); message %d retried in %.0fs", self.host, self.port, what, exc,
                         message.pk, backoff)
                # The HIS is down: hand the rest back for the next round, in order.
                outbox.release(self.pacs.engine, [m.pk for m in claimed[index + 1 :]], backoff)
                break
            code, text = ack_code(reply)
            if code in ("AA", "CA"):
                outbox.mark_sent(self.pacs.engine, message.pk)
                delivered += 1
            else:
                dead = message.attempts + 1 >= MAX_REJECTIONS
                outbox.mark_failed(
                    self.pacs.engine, message.pk, f"HIS answered {code}: {text}", dead=dead,
                    retry_in=min(MAX_BACKOFF, 2.0 ** min(message.attempts, 6)),
                )
                log.warning("HIS refused message %d (%s %s)%s", message.pk, code, text, "; parked" if dead else "")
        return delivered
