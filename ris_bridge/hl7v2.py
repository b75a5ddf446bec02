"""HL7 v2 messages in and out: decoding (MSH-18 aware), mapping orders and
patient updates onto the core's models, and ACKs (AA / AE with ERR / AR).

Inbound: ORM^O01 and OMI^O23 (ORC-1 NW new, XO change, CA/OC cancel,
DC/OD discontinue), ADT^A01/A04/A08/A31 (patient update), ADT^A40 (merge).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7

from pacs.orders import OrderError, OrderInfo, OrderService, OtherIdentifier, PatientInfo

# MSH-18 values and the Python codec for each (HL7 table 0211).
_CHARSETS = {
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "ASCII": "ascii",
}
_CONTROL_IDS = itertools.count(1)
# python-hl7 builds an object per field, repetition and component: a 4 MB
# message made of "|" or "^" took 25 s of CPU (holding the GIL over every
# protocol). Real orders are a few kilobytes and a few hundred delimiters.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DELIMITERS = 20_000


class HL7Reject(Exception):
    """The message cannot be processed at all: answer AR (code: table 0357)."""

    def __init__(self, message: str, code: str = "200") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Header:
    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    version: str = "2.5"
    charset: str = ""


def decode(raw: bytes) -> tuple[str, str]:
    """Bytes to text using the character set MSH-18 declares.

    Returns (text, charset name). Undeclared non-ASCII is read as UTF-8 when
    it is valid UTF-8 (what Vietnamese HIS send), else Latin-1.
    """
    head = raw.split(b"\r", 1)[0].decode("latin-1")
    fields = head.split(head[3]) if head.startswith("MSH") and len(head) > 3 else []
    declared = fields[17].split("^")[0].strip().upper() if len(fields) > 17 else ""
    codec = _CHARSETS.get(declared)
    if codec is None:
        try:
            return raw.decode("utf-8"), declared
        except UnicodeDecodeError:
            return raw.decode("latin-1"), declared
    try:
        return raw.decode(codec), declared
    except UnicodeDecodeError as exc:
        raise HL7Reject(f"message is not valid {declared}: {exc}", code="103") from None


def parse(raw: bytes) -> tuple[Any, Header]:
    """Parse a message; raise HL7Reject when it is not a usable HL7 v2 message."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise HL7Reject(f"message of {len(raw)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}", code="207")
    text, charset = decode(raw)
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7Reject("not an HL7 v2 message: it must start with an MSH segment", code="100")
    delimiters = sum(text.count(c) for c in set(text[3:8]))
    if delimiters > MAX_DELIMITERS:
        raise HL7Reject(f"message has {delimiters} delimiters, more than the limit of {MAX_DELIMITERS}", code="207")
    try:
        message = hl7.parse(text)
        msh = message.segment("MSH")
    except Exception as exc:
        raise HL7Reject(f"unparsable message: {exc}", code="100") from None
    header = Header(
        sending_app=_get(msh, 3),
        sending_facility=_get(msh, 4),
        receiving_app=_get(msh, 5),
        receiving_facility=_get(msh, 6),
        message_type=_get(msh, 9, comp=0).upper(),
        trigger=_get(msh, 9, comp=1).upper(),
        control_id=_get(msh, 10),
        version=_get(msh, 12) or "2.5",
        charset=charset,
    )
    if not header.message_type:
        raise HL7Reject("MSH-9 (message type) is empty", code="101")
    if not header.control_id:
        raise HL7Reject("MSH-10 (message control ID) is empty", code="101")
    return message, header


def _raw(segment: Any, field: int) -> str:
    if segment is None:
        return ""
    try:
        return str(segment[field])
    except (IndexError, KeyError):
        return ""


def _unescape(text: str) -> str:
    return (
        text.replace("\\F\\", "|").replace("\\S\\", "^").replace("\\R\\", "~").replace("\\T\\", "&")
        .replace("\\E\\", "\\")
    )


def _get(segment: Any, field: int, comp: int | None = None) -> str:
    """Field *field* (first repetition) or one of its components, as text."""
    value = _raw(segment, field).split("~")[0]
    if comp is not None:
        parts = value.split("^")
        value = parts[comp] if comp < len(parts) else ""
    return _unescape(value).strip()


def _repetitions(segment: Any, field: int) -> list[str]:
    return [r for r in _raw(segment, field).split("~") if r.strip()]


def _components(text: str) -> list[str]:
    return [_unescape(c).strip() for c in text.split("^")]


def _segments(message: Any, name: str) -> list[Any]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


# -- mapping ------------------------------------------------------------------------
def _dicom_date(value: str) -> str:
    digits = "".join(c for c in value if c.isdigit())
    return digits[:8] if len(digits) >= 8 else ""


def _dicom_time(value: str) -> str:
    digits = "".join(c for c in value.split("+")[0].split("-")[0] if c.isdigit() or c == ".")
    return digits[8:14] if len(digits) >= 12 else ""


def _person(components: list[str], offset: int = 0) -> str:
    """XPN / XCN components to a DICOM PN: Family^Given^Middle^Prefix^Suffix."""
    family = components[offset] if len(components) > offset else ""
    given = components[offset + 1] if len(components) > offset + 1 else ""
    middle = components[offset + 2] if len(components) > offset + 2 else ""
    suffix = components[offset + 3] if len(components) > offset + 3 else ""
    prefix = components[offset + 4] if len(components) > offset + 4 else ""
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def patient_from_pid(pid: Any) -> PatientInfo:
    ids = [_components(r) for r in _repetitions(pid, 3)]
    if not ids or not ids[0][0]:
        raise OrderError("PID-3 (patient identifier) is empty", code="101", http_status=400)
    primary = ids[0]
    others = [
        OtherIdentifier(value=c[0], issuer=c[3] if len(c) > 3 else "", id_type=c[4] if len(c) > 4 else "")
        for c in ids[1:]
        if c and c[0]
    ]
    names = _repetitions(pid, 5)
    sex = _get(pid, 8)[:1].upper()
    return PatientInfo(
        patient_id=primary[0],
        issuer=primary[3] if len(primary) > 3 else "",
        name=_person(_components(names[0])) if names else "",
        birth_date=_dicom_date(_get(pid, 7)),
        sex=sex if sex in ("M", "F", "O") else "",
        other_ids=others,
    )


def _study_uid(message: Any) -> str:
    for zds in _segments(message, "ZDS"):
        return _get(zds, 1, comp=0)
    return ""


def orders_from(message: Any) -> list[tuple[str, OrderInfo]]:
    """(action, order) for each ORC/OBR group of an ORM^O01 or OMI^O23."""
    pids = _segments(message, "PID")
    if not pids:
        raise OrderError("the order message has no PID segment", code="100", http_status=400)
    patient = patient_from_pid(pids[0])
    pv1 = next(iter(_segments(message, "PV1")), None)
    referring = _person(_components(_get(pv1, 8)), offset=1) if pv1 is not None else ""
    ipcs = _segments(message, "IPC")
    tq1s = _segments(message, "TQ1")
    study_uid = _study_uid(message)
    actions = []
    orcs, obrs = _segments(message, "ORC"), _segments(message, "OBR")
    if not orcs:
        raise OrderError("the order message has no ORC segment", code="100", http_status=400)
    for index, orc in enumerate(orcs):
        control = _get(orc, 1).upper()
        action = {"NW": "place", "XO": "change", "SC": "change", "CA": "cancel", "OC": "cancel",
                  "DC": "discontinue", "OD": "discontinue"}.get(control)
        if action is None:
            raise OrderError(f"order control {control!r} (ORC-1) is not supported", code="207", http_status=400)
        obr = obrs[index] if index < len(obrs) else None
        ipc = ipcs[index] if index < len(ipcs) else None
        tq1 = tq1s[index] if index < len(tq1s) else None
        start = (_get(tq1, 7) if tq1 is not None else "") or (
            _components(_get(obr, 27))[3] if obr is not None and len(_components(_get(obr, 27))) > 3 else ""
        ) or (_get(obr, 7) if obr is not None else "")
        service = _components(_get(obr, 4)) if obr is not None else []
        accession = (
            (_get(ipc, 1, comp=0) if ipc is not None else "")
            or (_get(obr, 18) if obr is not None else "")
            or _get(orc, 3, comp=0)
            or (_get(obr, 3, comp=0) if obr is not None else "")
        )
        info = OrderInfo(
            patient=patient,
            accession_number=accession,
            placer_order_number=_get(orc, 2, comp=0) or (_get(obr, 2, comp=0) if obr is not None else ""),
            filler_order_number=_get(orc, 3, comp=0) or (_get(obr, 3, comp=0) if obr is not None else ""),
            study_uid=(_get(ipc, 3, comp=0) if ipc is not None else "") or study_uid,
            requested_procedure_id=(_get(ipc, 2, comp=0) if ipc is not None else "") or (_get(obr, 19) if obr is not None else ""),
            requested_procedure_description=service[1] if len(service) > 1 else "",
            procedure_code=service[0] if service else "",
            procedure_code_scheme=service[2] if len(service) > 2 else "",
            procedure_code_meaning=service[1] if len(service) > 1 else "",
            step_id=(_get(ipc, 4, comp=0) if ipc is not None else "") or (_get(obr, 20) if obr is not None else ""),
            step_description=service[1] if len(service) > 1 else "",
            modality=((_get(ipc, 5, comp=0) if ipc is not None else "") or (_get(obr, 24) if obr is not None else "")).upper(),
            station_ae_title=_get(ipc, 9, comp=0) if ipc is not None else "",
            station_name=_get(ipc, 7, comp=0) if ipc is not None else "",
            location=_get(ipc, 8, comp=0) if ipc is not None else "",
            start_date=_dicom_date(start),
            start_time=_dicom_time(start),
            performing_physician=_person(_components(_get(obr, 34)), offset=1) if obr is not None else "",
            referring_physician=referring or (_person(_components(_get(obr, 16)), offset=1) if obr is not None else ""),
            priority={"S": "STAT", "A": "HIGH", "R": "ROUTINE"}.get(
                ((_get(tq1, 9) if tq1 is not None else "") or (_components(_get(obr, 27))[5] if obr is not None and len(_components(_get(obr, 27))) > 5 else ""))[:1].upper(), ""
            ),
            reason=_get(obr, 31) if obr is not None else "",
        )
        actions.append((action, info))
    return actions


def handle(service: OrderService, raw: bytes) -> bytes:
    """Process one inbound message; return the ACK to send back (never raises)."""
    try:
        message, header = parse(raw)
    except HL7Reject as exc:
        return ack(Header(control_id="", version="2.5"), "AR", str(exc), exc.code)
    kind = f"{header.message_type}^{header.trigger}"
    try:
        if header.message_type in ("ORM", "OMI"):
            if kind not in ("ORM^O01", "OMI^O23"):
                return ack(header, "AR", f"{kind} is not supported", "201")
            service.apply(orders_from(message), source=f"hl7:{header.sending_app}")
        elif header.message_type == "ADT":
            pids = _segments(message, "PID")
            if not pids:
                raise OrderError("ADT message without PID segment", code="100", http_status=400)
            if header.trigger == "A40":
                mrgs = _segments(message, "MRG")
                if not mrgs:
                    raise OrderError("ADT^A40 without MRG segment", code="100", http_status=400)
                prior = [(c[0], c[3] if len(c) > 3 else "") for c in map(_components, _repetitions(mrgs[0], 1)) if c[0]]
                if not prior:
                    raise OrderError("MRG-1 (prior patient identifier) is empty", code="101", http_status=400)
                service.apply([("merge", (patient_from_pid(pids[0]), prior))], source=f"hl7:{header.sending_app}")
            elif header.trigger in ("A01", "A04", "A05", "A08", "A28", "A31"):
                service.apply([("patient", patient_from_pid(pids[0]))], source=f"hl7:{header.sending_app}")
            else:
                return ack(header, "AR", f"{kind} is not supported", "201")
        else:
            return ack(header, "AR", f"message type {header.message_type} is not supported", "200")
    except OrderError as exc:
        return ack(header, "AE", str(exc), exc.code)
    except Exception as exc:  # keep the link up; say what went wrong
        return ack(header, "AE", f"internal error: {exc.__class__.__name__}", "207")
    return ack(header, "AA", "")


def ack(header: Header, code: str, text: str, error_code: str = "207", *, app: str = "FILMLESS") -> bytes:
    """An ACK for *header*'s message: MSA-1 AA/AE/AR, an ERR segment on errors."""
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    charset = header.charset or "UNICODE UTF-8"
    segments = [
        "|".join([
            "MSH", "^~\\&", header.receiving_app or app, header.receiving_facility, header.sending_app,
            header.sending_facility, now, "", f"ACK^{header.trigger}^ACK" if header.trigger else "ACK",
            f"ACK{now}{next(_CONTROL_IDS)}", "P", header.version or "2.5", "", "", "", "", "", charset,
        ]),
        "|".join(["MSA", code, header.control_id, escape(text)[:80]]),
    ]
    if code != "AA":
        meaning = {"100": "Segment sequence error", "101": "Required field missing", "102": "Data type error",
                   "103": "Table value not found", "200": "Unsupported message type", "201": "Unsupported event code",
                   "204": "Unknown key identifier", "205": "Duplicate key identifier",
                   "207": "Application internal error"}.get(error_code, "Application error")
        segments.append("|".join(["ERR", "", "", f"{error_code}^{meaning}^HL70357", "E", "", "", "", escape(text)]))
    codec = _CHARSETS.get(charset.upper(), "utf-8")
    return "\r".join(segments).encode(codec, errors="replace") + b"\r"


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters (| ^ ~ \\ &)."""
    return (
        text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\").replace("&", "\\T\\")
        .replace("\r", " ")
    )


def ack_code(raw: bytes) -> tuple[str, str]:
    """MSA-1 and MSA-3 of an ACK."""
    text, _ = decode(raw)
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split("|")
            return (fields[1] if len(fields) > 1 else ""), (fields[3] if len(fields) > 3 else "")
    return "", "no MSA segment"
