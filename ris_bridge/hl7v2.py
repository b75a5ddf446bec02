"""HL7 v2 messages in and out: decoding (MSH-18 aware), mapping orders and
patient updates onto the core's models, and ACKs (AA / AE with ERR / AR).

Inbound: ORM^O01 and OMI^O23 (ORC-1 NW new, XO change, CA/OC cancel,
DC/OD discontinue), ADT^A01/A04/A08/A31 and the visit events (patient
update, PATIENT_UPDATE_EVENTS), ADT^A40 (merge).
One message per MLLP frame; segments end with CR, CRLF or LF. An order
message is read as ORDER groups (an ORC and what follows it), and every IPC
of a group (OMI), or every group without IPC (ORM: one ORC/OBR per step), is
a scheduled step of its own. Steps with the same accession (IPC-1, OBR-18)
are the steps of one requested procedure (IHE RAD-4: one accession, one
Study Instance UID, several Scheduled Procedure Steps told apart by IPC-4 or
OBR-20); steps with their own accessions are procedures of their own.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import traceback
from dataclasses import dataclass, field
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import hl7

from pacs.audit import Event
from pacs.index.db import is_transient
from pacs.orders import (PRIMARY_ID_TYPES, OrderError, OrderInfo, OrderService, OtherIdentifier, PatientInfo,
                         Receipt, patients_named)
from pacs.priority import hl7_term
from pacs.query.matching import is_date
from pacs.timezones import hl7_timestamp, server_zone

log = logging.getLogger(__name__)

# MSH-18 values and the Python codec for each (HL7 table 0211).
_CHARSETS = {
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "ASCII": "ascii",
}
# HL7 v2.5 lengths: MSH-10 (ST) 20, MSA-3 (ST) 80, ERR-8 (TX) 250 characters.
CONTROL_ID_LENGTH = 20
_MSA_TEXT_LENGTH = 80
_ERR_TEXT_LENGTH = 250
# python-hl7 builds an object per field, repetition and component: a 4 MB
# message made of "|" or "^" took 25 s of CPU (holding the GIL over every
# protocol). Real orders are a few kilobytes and a few hundred delimiters.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DELIMITERS = 20_000
# Some Windows HIS interfaces write a UTF-8 byte order mark before MSH.
_BOM = b"\xef\xbb\xbf"
# HL7 v2.5 2.5.3: a field (or component) of two double quotes is the null
# value -- "delete the stored value" -- never the text.
NULL = '""'
# PRIMARY_ID_TYPES (from pacs.orders): the CX-5 identifier type codes (HL7
# table 0203) of the hospital's own patient number; citizen ID (NI) and
# insurance numbers become other IDs.
_ERROR_MEANINGS = {
    "100": "Segment sequence error", "101": "Required field missing", "102": "Data type error",
    "103": "Table value not found", "200": "Unsupported message type", "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "204": "Unknown key identifier", "205": "Duplicate key identifier", "207": "Application internal error",
}


# Segment separators accepted inbound: CR by the standard, CRLF and LF from
# HIS interfaces that write text files line by line.
_SEGMENT_BREAK = re.compile(rb"\r\n|\r|\n")


class HL7Reject(Exception):
    """The message cannot be processed at all (code: table 0357). Answered
    AR by default (the HIS may resend); *ack_code* AE when resending the same
    bytes can never succeed."""

    def __init__(self, message: str, code: str = "200", ack_code: str = "AR") -> None:
        super().__init__(message)
        self.code = code
        self.ack_code = ack_code


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
    # MSH-11: P (production), T (training), D (debugging).
    processing_id: str = ""
    # MSH-15 / MSH-16 (table 0155: AL, NE, ER, SU): either set is enhanced
    # acknowledgment mode (HL7 v2.5 2.9.3); both empty, original mode. Any
    # other value is read as empty.
    accept_ack: str = ""
    application_ack: str = ""
    # MSH-3 to MSH-6 encoded again with the standard delimiters, components
    # and subcomponents kept apart (an HD may be namespace&universal ID&type):
    # what the ACK echoes. Empty for a header not read from a message.
    addresses: tuple[str, str, str, str] = ("", "", "", "")


def decode(raw: bytes) -> tuple[str, str]:
    """Bytes to text using the character set MSH-18 declares.

    Returns (text, charset name). Undeclared non-ASCII is read as UTF-8 when
    it is valid UTF-8 (what Vietnamese HIS send), else Latin-1; so is
    non-ASCII declared 8859/1 (mislabelled UTF-8).
    """
    # The MSH ends at the first segment break, whichever the sender uses
    # (CR, CRLF, LF): reading on past an LF took a PID field for MSH-18.
    head = _SEGMENT_BREAK.split(raw, maxsplit=1)[0].decode("latin-1")
    fields = head.split(head[3]) if head.startswith("MSH") and len(head) > 3 else []
    declared = fields[17].split("^")[0].strip().upper() if len(fields) > 17 else ""
    codec = _CHARSETS.get(declared)
    if codec is None:
        try:
            return raw.decode("utf-8"), declared
        except UnicodeDecodeError:
            return raw.decode("latin-1"), declared
    if codec == "latin-1" and not raw.isascii():
        # Latin-1 cannot write Vietnamese: valid multi-byte UTF-8 under an
        # 8859/1 label is a HIS writing UTF-8 and labelling it wrongly (a
        # real Latin-1 "Müller", 0xFC alone, is not valid UTF-8).
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            # Once per message; no field in the log (they are PHI).
            log.warning("HL7 message declares MSH-18 %s but its text is UTF-8: read as UTF-8 "
                        "(the HIS should declare UNICODE UTF-8)", declared)
            return text, declared
    try:
        return raw.decode(codec), declared
    except UnicodeDecodeError as exc:
        # The bytes do not fit the declared data: a data type error (table 0357).
        raise HL7Reject(f"message is not valid {declared}: {exc}", code="102") from None


def _strip_bom(raw: bytes) -> bytes:
    return raw[len(_BOM):] if raw.startswith(_BOM) else raw


def _header_from_msh(line: str, charset: str) -> Header:
    """The MSH fields an ACK needs, from the MSH segment's text alone."""
    fields = line.split(line[3])
    components = fields[1][:1] if len(fields) > 1 and fields[1] else "^"

    def field(number: int) -> list[str]:  # MSH-1 is the separator itself: MSH-n is fields[n - 1]
        """MSH-n's components, each decoded on its own (HL7 v2.5 2.7: an
        escaped separator is data, so the split comes first)."""
        if len(fields) < number:
            return [""]
        parts = fields[number - 1].split(components)
        try:
            return [_text(p) for p in parts]
        except OrderError:  # undecodable hex data: the header is still read (ACKs echo it)
            return [p.strip() for p in parts]

    def hd(number: int) -> str:  # an HD (namespace^universal ID^type) as one string, as it was read before
        return components.join(field(number))

    def echo(number: int) -> str:
        """MSH-n for the ACK: each component and subcomponent decoded and
        encoded again on its own, so a "&" between subcomponents stays a
        separator (it was sent back as the data "\\T\\")."""
        if len(fields) < number:
            return ""
        subcomponents = fields[1][3:4] if len(fields) > 1 and len(fields[1]) > 3 else "&"
        return "^".join("&".join(escape(_text_or_raw(sub)) for sub in part.split(subcomponents))
                        for part in fields[number - 1].split(components))

    kind = (fields[8] if len(fields) > 8 else "").split(components)
    return Header(
        sending_app=hd(3),
        sending_facility=hd(4),
        receiving_app=hd(5),
        receiving_facility=hd(6),
        message_type=kind[0].strip().upper(),
        trigger=kind[1].strip().upper() if len(kind) > 1 else "",
        control_id=components.join(field(10)),  # an ST: a stray "^" is part of it (echoed escaped)
        version=field(12)[0] or "2.5",
        charset=charset,
        processing_id=field(11)[0].upper(),
        # Only table 0155's codes switch to enhanced mode: an ACK a garbled
        # MSH-15 ("~~~") turned into CA is one an original-mode sender cannot read.
        accept_ack=field(15)[0].upper() if field(15)[0].upper() in _ACK_CONDITIONS else "",
        application_ack=field(16)[0].upper() if field(16)[0].upper() in _ACK_CONDITIONS else "",
        addresses=(echo(3), echo(4), echo(5), echo(6)),
    )


def _text_or_raw(value: str) -> str:
    """A header value decoded; as sent when its hexadecimal data cannot be
    (the ACK still echoes it)."""
    try:
        return _text(value)
    except OrderError:
        return value.strip()


def read_header(raw: bytes) -> Header | None:
    """The MSH of a message that may be unusable otherwise (too large, bytes
    not valid in its character set), so that even an AR echoes MSH-10 and
    goes back to the sender; None when there is no readable MSH."""
    raw = _strip_bom(raw).lstrip(b"\r\n")
    if not raw.startswith(b"MSH") or len(raw) < 8:
        return None
    line = re.split(rb"[\r\n]", raw[:8192], maxsplit=1)[0]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = line.decode("latin-1")  # MSH is ASCII by the standard; do not fail on a stray byte
    # MSH-1 must be a separator: "MSH\r..." (a segment break where it
    # belongs) has no readable header, and the AR goes out without one.
    if len(text) < 8 or text[3].isalnum() or text[3].isspace():
        return None
    try:
        text = standard_delimiters(text)
    except HL7Reject:
        pass  # MSH-2 unusable: read as sent, the components by its first character
    fields = text.split(text[3])
    charset = fields[17].split("^")[0].strip().upper() if len(fields) > 17 else ""
    return _header_from_msh(text, charset)


def parse(raw: bytes) -> tuple[Any, Header]:
    """Parse a message; raise HL7Reject when it is not a usable HL7 v2 message."""
    raw = _strip_bom(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise HL7Reject(f"message of {len(raw)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}", code="207",
                        ack_code="AE")  # resending the same bytes can never succeed
    if _FRAMING.search(raw):
        # A start or end block inside a message is broken framing (the rest
        # of another frame), never data: read on, it mixed two messages.
        raise HL7Reject("the message contains an MLLP start block (0x0B) or end block (0x1C): its framing is "
                        "broken; nothing of it was applied", code="100")
    text, charset = decode(raw)
    text = _segments_by_cr(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7Reject("not an HL7 v2 message: it must start with an MSH segment", code="100")
    text = standard_delimiters(text)
    delimiters = sum(text.count(c) for c in set(text[3:8]))
    if delimiters > MAX_DELIMITERS:
        raise HL7Reject(f"message has {delimiters} delimiters, more than the limit of {MAX_DELIMITERS}", code="207",
                        ack_code="AE")
    try:
        message = hl7.parse(text)
        message.segment("MSH")
    except Exception as exc:
        raise HL7Reject(f"unparsable message: {exc}", code="100") from None
    header = _header_from_msh(text.split("\r", 1)[0], charset)
    _refuse_batched(text)
    # AE, not AR: the message itself is wrong, and resent unchanged it would
    # be refused again, forever (AR tells the HIS to resend).
    if not header.message_type:
        raise HL7Reject("MSH-9 (message type) is empty", code="101", ack_code="AE")
    if not header.control_id:
        raise HL7Reject("MSH-10 (message control ID) is empty", code="101", ack_code="AE")
    return message, header


# The encoding characters (MSH-2) every reader below assumes: component,
# repetition, escape, subcomponent (HL7 v2.5 2.5.4).
STANDARD_ENCODING = "^~\\&"
_STANDARD_ESCAPES = {"|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "\\": "\\E\\", "&": "\\T\\"}
_FRAMING = re.compile(rb"[\x0b\x1c]")


def standard_delimiters(text: str) -> str:
    """*text* (a message or its MSH, segments separated by CR) written with
    the standard encoding characters ``|^~\\&``, when its MSH-2 declares
    others (HL7 v2.5 2.5.4: each message names its own). Read with the
    standard ones, "BN891$$$BVDK$MR" (component separator "$") became one
    patient ID and its other IDs were lost. A character that is a delimiter
    here but data in the message is escaped; escape sequences keep their
    meaning. Unchanged when MSH-2 is the standard (any field separator, a
    5th character of v2.7, or fewer characters, which default to the
    standard ones). Raises HL7Reject (AE 102) for an MSH-2 no message can use."""
    if not text.startswith("MSH") or len(text) < 5:
        return text
    separator = text[3]
    end = text.find(separator, 4)
    encoding = text[4:] if end < 0 else text[4:end]
    encoding = encoding.split("\r", 1)[0]
    if STANDARD_ENCODING.startswith(encoding[:4]):
        return text
    delimiters = separator + encoding[:4]
    if (len(encoding) < 4 or len(set(delimiters)) < 5
            or any(c.isalnum() or c.isspace() for c in delimiters)):
        raise HL7Reject(f"MSH-2 encoding characters {encoding[:8]!r} are not usable: four distinct "
                        "characters (component, repetition, escape, subcomponent) are needed",
                        code="102", ack_code="AE")
    component, repetition, escape_char, subcomponent = encoding[:4]
    mapping = {separator: "|", component: "^", repetition: "~", subcomponent: "&", "\r": "\r"}
    rest = text[4 + len(encoding):]
    out = ["MSH|", STANDARD_ENCODING, encoding[4:]]
    i = 0
    while i < len(rest):
        char = rest[i]
        if char == escape_char:
            close = rest.find(escape_char, i + 1)
            body = rest[i + 1 : close] if close > i else None
            if body is not None and not any(c in mapping for c in body):
                # An escape sequence (\F\, \X41\, \.br\): its letters name the
                # message's delimiters, and mean the standard ones alike.
                out.append("\\" + body + "\\")
                i = close + 1
                continue
        if char in mapping:
            out.append(mapping[char])
        else:  # data: escaped where it is a standard delimiter
            out.append(_STANDARD_ESCAPES.get(char, char))
        i += 1
    return "".join(out)


def _segments_by_cr(text: str) -> str:
    """The message with CR between segments. CR is the separator (HL7 v2.5
    2.5.3); CRLF and, in a message with no CR at all, LF are taken as one.
    A bare LF inside a CR-separated message is a line break typed into a
    field (an escape the sender forgot): it becomes a space, so that the
    rest of the segment (accession, modality) is not cut off."""
    text = text.replace("\r\n", "\r")
    text = text.replace("\n", " ") if "\r" in text.strip("\r\n") else text.replace("\n", "\r")
    # An empty line between segments (a HIS writing CRLF CRLF, or a blank
    # line in its template) is no segment: python-hl7 failed on it and the
    # message was answered AR -- resent unchanged, refused forever.
    return "\r".join(segment for segment in text.split("\r") if segment.strip()).strip(" ")


def _refuse_batched(text: str) -> None:
    """One MLLP frame carries one message (HL7 v2.5 Appendix C.4). A sender
    that packs several into a frame gets one ACK and would take it for all of
    them: refuse the frame (AE: as sent it can never be accepted) instead of
    applying the first and dropping the others without a word."""
    count = sum(1 for segment in text.split("\r") if segment.startswith("MSH"))
    if count > 1:
        raise HL7Reject(f"the frame holds {count} messages (MSH segments); send one message per MLLP frame, "
                        f"nothing of this frame was applied", code="100", ack_code="AE")


# Fields an interface engine may set anew when it resends a message: MSH-7,
# the EVN segment (recorded/planned times) and ORC-9 (date/time of
# transaction). Left out of the digest that tells a resend from a new message.
_RESEND_STAMPS = {"MSH": (6,), "ORC": (9,)}


def message_digest(message: Any) -> str:
    """sha256 of the message as parsed, without what a resend may refresh
    (:data:`_RESEND_STAMPS`): what tells a resend (same MSH-10, same content)
    from a new message under a reused MSH-10."""
    segments = str(message).strip("\r").split("\r")
    separator = segments[0][3]
    kept = []
    for segment in segments:
        name = segment[:3]
        if name == "EVN":
            continue
        fields = segment.split(separator)
        for index in _RESEND_STAMPS.get(name, ()):
            # MSH-1 is the separator: MSH-n is fields[n - 1]; other segments' n is fields[n].
            if index < len(fields):
                fields[index] = ""
        kept.append(separator.join(fields))
    return hashlib.sha256("\r".join(kept).encode("utf-8")).hexdigest()


def _raw(segment: Any, field: int) -> str:
    if segment is None:
        return ""
    try:
        return str(segment[field])
    except (IndexError, KeyError):
        return ""


_ESCAPES = {"F": "|", "S": "^", "R": "~", "T": "&", "E": "\\", "H": "", "N": ""}
# HL7 v2.5 2.7: separators, highlighting, hexadecimal data, and the
# formatting commands of FT fields that mean a line break -- a space here:
# every inbound value lands in a one-line DICOM value (LO, PN, SH), where a
# line feed is not allowed.
_ESCAPE_SEQUENCE = re.compile(r"\\(?:([FSRTEHN])|X((?:[0-9A-Fa-f]{2})+)|(\.br|\.sp(?: ?\d+)?))\\")


def _hex_text(digits: str) -> str:
    try:  # UTF-8, what Vietnamese HIS send; a guess at other bytes would store a wrong name
        text = bytes.fromhex(digits).decode("utf-8")
    except UnicodeDecodeError:
        raise OrderError(f"hexadecimal data \\X{digits[:40]}\\ is not UTF-8 text", code="102",
                         http_status=400) from None
    return "".join(" " if ord(c) < 0x20 or c == "\x7f" else c for c in text)


def _unescape(text: str) -> str:
    # One pass: "\E\F\" is an escaped backslash followed by "F\", not a "|".
    # \H\ / \N\ (highlighting on/off) carry no text.
    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return _ESCAPES[m.group(1)]
        if m.group(2):
            return _hex_text(m.group(2))
        return " "

    return _ESCAPE_SEQUENCE.sub(one, text)


def _text(value: str) -> str:
    """One component (never a whole field: split first, then decode, so an
    escaped separator stays data -- HL7 v2.5 2.7) as text: the HL7 null
    value "" reads as empty. Subcomponents are split first where they
    mean something (an HD assigning authority: :func:`_identifier`);
    elsewhere a component is decoded whole, its "&" kept as written (no
    escape sequence holds one)."""
    value = value.strip()
    return "" if value == NULL else _unescape(value).strip()


def _present(segment: Any, field: int) -> bool:
    """Whether *field* was sent at all: an empty field means "leave the
    stored value as it is"; "" (null) is present and means "delete"."""
    return bool(_raw(segment, field).strip())


def _get(segment: Any, field: int, comp: int = 0) -> str:
    """One component (by default the first) of field *field*'s first
    repetition, as text."""
    parts = _field(segment, field)
    return parts[comp] if comp < len(parts) else ""


def _field(segment: Any, field: int) -> list[str]:
    """The components of field *field*'s first repetition, each decoded."""
    return _components(_raw(segment, field).split("~")[0])


def _repetitions(segment: Any, field: int) -> list[str]:
    """The repetitions of a field, still encoded (split them with _components)."""
    return [r for r in _raw(segment, field).split("~") if r.strip()]


def _components(text: str) -> list[str]:
    """Encoded text (one repetition) to its decoded components. The only
    place components are decoded: decoding twice would read "\\E\\S\\E\\"
    (the text "\\S\\") as "^"."""
    return [_text(c) for c in text.split("^")]


def _segments(message: Any, name: str) -> list[Any]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


# -- mapping ------------------------------------------------------------------------
def _dicom_date(value: str) -> str:
    digits = "".join(c for c in value if c.isdigit())
    return digits[:8] if len(digits) >= 8 else ""


def _birth_date(value: str) -> str:
    """PID-7 as a DICOM date, or its year (YYYY) or year and month (YYYYMM)
    when that is all the HIS knows -- common for elderly patients. A partial
    date is not a DA value: the order service keeps a stored date it agrees
    with and stores no invented day (:meth:`OrderService._upsert_patient`)."""
    digits = "".join(c for c in value.split("+")[0] if c.isdigit())
    if len(digits) >= 8:
        digits = digits[:8]
    elif not (len(digits) in (4, 6) or not value.strip()):
        raise OrderError(f"PID-7 {value!r} is not a date (YYYY[MM[DD]])", code="102", http_status=400)
    # A month or day of zeros is one the HIS does not know (its database
    # holds 1945-00-00 for a patient who knows the year alone): the date is
    # the part before it. Stored as sent, "19450000" reached the worklist
    # and the studies' corrections as a Patient's Birth Date no DA reader takes.
    if digits[4:6] == "00":
        return digits[:4]
    if digits[6:8] == "00":
        return digits[:6]
    if (len(digits) == 8 and not is_date(digits)) or (len(digits) == 6 and not "01" <= digits[4:] <= "12"):
        raise OrderError(f"PID-7 {value!r} is not a date (YYYY[MM[DD]])", code="102", http_status=400)
    return digits


def _dicom_time(value: str) -> str:
    digits = "".join(c for c in value.split("+")[0].split("-")[0] if c.isdigit() or c == ".")
    if len(digits) == 10:  # an hour alone (YYYYMMDDHH): that hour's start, a TM range query finds it
        return digits[8:10] + "00"
    return digits[8:14] if len(digits) >= 12 else ""


# An HL7 TS/DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ] (v2.5 2.A.22).
_TS = re.compile(r"(\d{8})(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-])(\d{2})(\d{2})")


def _local_date_time(value: str, zone: tzinfo | None) -> tuple[str, str]:
    """A scheduled TS as the hospital's DICOM (DA, TM). One with an offset
    (a HIS on UTC sends 20261204183000+0000) is converted to *zone* first:
    taken as it is, that order landed on the wrong day in Vietnam. One
    without is local already (HL7 v2.5 2.A.22: the sender's zone, which is
    the hospital's). The time keeps the precision given (HHMM or HHMMSS;
    an hour alone is that hour's start, HH00); a date alone is not shifted
    (no instant to convert)."""
    match = _TS.fullmatch(value.strip())
    if match is None or zone is None or match.group(2) is None:
        return _dicom_date(value), _dicom_time(value)
    day, hour, minute, second, sign, off_h, off_m = match.groups()
    try:
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
        sent = datetime.strptime(day + hour + (minute or "00") + (second or "00"), "%Y%m%d%H%M%S")
        local = sent.replace(tzinfo=timezone(offset)).astimezone(zone)
    except ValueError:
        return _dicom_date(value), _dicom_time(value)  # not a real date or time: read as before
    if minute is None:
        return local.strftime("%Y%m%d"), local.strftime("%H00")
    return local.strftime("%Y%m%d"), local.strftime("%H%M" if second is None else "%H%M%S")


# Delimiters of a DICOM PN (components, groups, values): an escaped "^" in
# an HL7 name component is data there, but would split the PN's components.
_PN_DELIMITERS = re.compile(r"\s*[\\^=]+\s*")


def _person(components: list[str], offset: int = 0) -> str:
    """XPN / XCN components to a DICOM PN: Family^Given^Middle^Prefix^Suffix."""
    parts = [_PN_DELIMITERS.sub(" ", c).strip() for c in components[offset : offset + 5]]
    family, given, middle, suffix, prefix = (parts + [""] * 5)[:5]
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def _identifier(repetition: str) -> OtherIdentifier:
    """CX (one repetition, still encoded): ID^check digit^scheme^assigning
    authority^identifier type code. The assigning authority is an HD,
    namespace&universal ID&universal ID type (HL7 v2.5 2.A.36): its
    namespace is the issuer (Issuer of Patient ID, IHE RAD's mapping), so
    the patient matches images whose issuer is "BVDK" (it was the text
    "BVDK&1.2.840...&ISO"); the universal ID stands in for a namespace not
    sent. The universal ID and its type are not kept otherwise: the index
    has no column for the Issuer of Patient ID Qualifiers."""
    parts = repetition.split("^")
    components = [_text(c) for c in parts]
    authority = [_text(sub) for sub in parts[3].split("&")] if len(parts) > 3 else [""]
    return OtherIdentifier(
        value=components[0],
        issuer=authority[0] or (authority[1] if len(authority) > 1 else ""),
        id_type=(components[4] if len(components) > 4 else "").upper(),
    )


def _identifier_list(segment: Any, field: int) -> list[OtherIdentifier]:
    """The identifiers of a repeating CX field (PID-3, MRG-1), those with an
    ID, the hospital's own number (type PI or MR) first: the identifier the
    patient is known by, wherever the HIS lists it."""
    ids = [i for i in (_identifier(r) for r in _repetitions(segment, field)) if i.value]
    return sorted(ids, key=lambda i: i.id_type not in PRIMARY_ID_TYPES)  # stable: the HIS's order otherwise


def _patient_ids(pid: Any) -> tuple[OtherIdentifier, list[OtherIdentifier]]:
    """The patient ID and the other IDs from PID-3. The hospital's own number
    (type PI or MR) is the patient ID wherever the HIS lists it, so a message
    that puts the citizen ID first still files under the same patient; with
    no such type the first repetition is the patient ID (as before)."""
    ids = [i for i in (_identifier(r) for r in _repetitions(pid, 3)) if i.value]
    if not ids:
        # A HIS of HL7 v2.2/2.3 may send its number in PID-2 alone (Patient
        # ID (External), withdrawn since 2.3.1 for PID-3): refused AE 101, its
        # orders never reached the worklist.
        ids = [i for i in (_identifier(r) for r in _repetitions(pid, 2)) if i.value]
    if not ids:
        raise OrderError("PID-3 (patient identifier) is empty", code="101", http_status=400)
    primary = next((i for i in ids if i.id_type in PRIMARY_ID_TYPES), ids[0])
    return primary, [i for i in ids if i is not primary]


def _sex(pid: Any) -> str | None:
    if not _present(pid, 8):
        return None
    sex = _get(pid, 8)[:1].upper()
    if sex == "U":  # Unknown: the HIS does not know, which deletes nothing the modality recorded
        return None
    return sex if sex in ("M", "F", "O") else ""  # A (ambiguous), N (not applicable): no DICOM value


def patient_from_pid(pid: Any) -> PatientInfo:
    """PID to the core's patient. Demographics not sent are None (keep what
    is stored); the null value "" is an empty string (delete it)."""
    primary, others = _patient_ids(pid)
    names = _repetitions(pid, 5)
    return PatientInfo(
        patient_id=primary.value,
        issuer=primary.issuer,
        id_type=primary.id_type,
        name=_person(_components(names[0])) if names else None,
        birth_date=_birth_date(_get(pid, 7)) if _present(pid, 7) else None,
        sex=_sex(pid),
        other_ids=others,
    )


@dataclass
class OrderGroup:
    """One ORDER group of an ORM^O01 / OMI^O23: an ORC and the segments that
    follow it up to the next ORC (HL7 v2.5 4.4.1, 4.4.6). Segments are paired
    by the group they belong to, never by position in the message: a TQ1 sent
    for the second order only must not time the first."""

    orc: Any
    obr: Any = None
    tq1: Any = None
    zds: Any = None
    ipcs: list[Any] = field(default_factory=list)


def order_groups(message: Any) -> tuple[list[OrderGroup], Any]:
    """The ORDER groups, and a ZDS sent outside any of them (before the first ORC)."""
    groups: list[OrderGroup] = []
    loose_zds = None
    for segment in message:
        name = str(segment[0]).strip().upper()
        if name == "ORC":
            groups.append(OrderGroup(orc=segment))
            continue
        group = groups[-1] if groups else None
        if group is None:
            if name == "ZDS" and loose_zds is None:
                loose_zds = segment
            continue
        # The first OBR/TQ1/ZDS of the group is its own; IPC repeats (one per
        # scheduled step, IHE RAD-4 OMI: of one requested procedure when they
        # share IPC-1, the accession, else of a procedure each).
        if name == "OBR" and group.obr is None:
            group.obr = segment
        elif name == "OBR":
            # ORM^O01 / OMI^O23: an ORDER group has one ORC and one order
            # detail segment. A second OBR under one ORC was dropped (the
            # HIS got AA, the exam never reached the worklist): refused whole.
            raise OrderError(f"ORDER group {len(groups)} has a second OBR segment: each OBR needs its own ORC "
                             "(HL7 v2.5 4.4.1); nothing of the message was applied", code="100", http_status=400)
        elif name == "TQ1" and group.tq1 is None:
            group.tq1 = segment
        elif name == "ZDS" and group.zds is None:
            group.zds = segment
        elif name == "IPC":
            group.ipcs.append(segment)
    return groups, loose_zds


_ORDER_CONTROLS = {"NW": "place", "XO": "change", "SC": "change", "CA": "cancel", "OC": "cancel",
                   "DC": "discontinue", "OD": "discontinue"}


def _coded_text(segment: Any, field_number: int) -> str:
    """A CE/CWE field as text: its text component, else its identifier."""
    parts = _field(segment, field_number)
    return parts[1] if len(parts) > 1 and parts[1] else parts[0]


def _timing(group: OrderGroup) -> tuple[str, str]:
    """(start date/time, priority code): TQ1-7/TQ1-9 (v2.5), OBR-27 and ORC-7
    quantity/timing components 4 and 6 (v2.3 HIS put it in either), the
    observation date OBR-7 last."""
    start = (_get(group.tq1, 7) or _get(group.obr, 27, comp=3) or _get(group.orc, 7, comp=3)
             or _get(group.obr, 7))
    priority = _get(group.tq1, 9) or _get(group.obr, 27, comp=5) or _get(group.orc, 7, comp=5)
    return start, priority


def _order_info(group: OrderGroup, ipc: Any, patient: PatientInfo, referring: str, study_uid: str,
                zone: tzinfo | None = None, *, named_only: bool = False) -> OrderInfo:
    """One requested procedure and step: the group's ORC/OBR/TQ1 with one of
    its IPCs; a start time with an offset is converted to *zone* (the
    hospital's). Without a start (no TQ1-7, OBR-27.4, ORC-7.4 or OBR-7) the
    step has no scheduled date or time: no default is invented here.
    *named_only* (a change or withdrawal): the accession is the one sent
    (IPC-1, OBR-18), never the filler order number standing in for it -- a
    CA of ORC alone names its order by ORC-2 / ORC-3 (HL7 v2.5 4.5.1.2,
    4.5.1.3), which :meth:`pacs.orders.OrderService._find_procedure` looks
    up as the stored numbers. The
    step's description is the text of its protocol code (IPC-6: two steps
    of one OBR, "without" and "with contrast", differ only there), else the
    procedure's (OBR-4); the protocol code itself is the step's Scheduled
    Protocol Code Sequence item (IHE RAD-4), which a modality selects its
    protocol by."""
    orc, obr = group.orc, group.obr
    start, priority = _timing(group)
    start_date, start_time = _local_date_time(start, zone)
    service = _field(obr, 4) if obr is not None else []
    protocol = _field(ipc, 6) if ipc is not None else []
    accession = _get(ipc, 1, comp=0) or _get(obr, 18)
    if not named_only:
        # A new order without OBR-18 / IPC-1: its filler order number is its accession.
        accession = accession or _get(orc, 3, comp=0) or _get(obr, 3, comp=0)
    return OrderInfo(
        patient=patient,
        accession_number=accession,
        placer_order_number=_get(orc, 2, comp=0) or _get(obr, 2, comp=0),
        filler_order_number=_get(orc, 3, comp=0) or _get(obr, 3, comp=0),
        study_uid=_get(ipc, 3, comp=0) or _get(group.zds, 1, comp=0) or study_uid,
        requested_procedure_id=_get(ipc, 2, comp=0) or _get(obr, 19),
        requested_procedure_description=service[1] if len(service) > 1 else "",
        procedure_code=service[0] if service else "",
        procedure_code_scheme=service[2] if len(service) > 2 else "",
        procedure_code_meaning=service[1] if len(service) > 1 else "",
        step_id=_get(ipc, 4, comp=0) or _get(obr, 20),
        step_description=(protocol[1] if len(protocol) > 1 else "") or (service[1] if len(service) > 1 else ""),
        protocol_code=protocol[0] if protocol else "",
        protocol_code_scheme=protocol[2] if len(protocol) > 2 else "",
        protocol_code_meaning=protocol[1] if len(protocol) > 1 else "",
        modality=(_get(ipc, 5, comp=0) or _get(obr, 24)).upper(),
        station_ae_title=_get(ipc, 9, comp=0),
        station_name=_get(ipc, 7, comp=0),
        location=_get(ipc, 8, comp=0),
        start_date=start_date,
        start_time=start_time,
        performing_physician=_person(_field(obr, 34), offset=1) if obr is not None else "",
        referring_physician=referring or (_person(_field(obr, 16), offset=1) if obr is not None else ""),
        # HL7 table 0027's code (S, A, R, P, C, T, PRN) as the DICOM term the worklist gives.
        priority=hl7_term(priority),
        reason=_coded_text(obr, 31),
    )


def orders_from(message: Any, zone: tzinfo | None = None) -> list[tuple[str, OrderInfo]]:
    """(action, order) for each scheduled step of each ORDER group of an
    ORM^O01 or OMI^O23: one per IPC, or one for a group without IPC. Steps
    of one accession are one requested procedure (:mod:`pacs.orders`): NW
    places them together; XO changes the steps its IPC-4 / OBR-20 name and
    adds the others; CA / DC withdraw the step named, or every step not
    performed yet when the group names none. *zone*: the hospital's, that
    start times with an offset are converted to (default: the server's)."""
    zone = zone or server_zone()
    pids = _segments(message, "PID")
    if not pids:
        raise OrderError("the order message has no PID segment", code="100", http_status=400)
    patient = patient_from_pid(pids[0])
    pv1 = next(iter(_segments(message, "PV1")), None)
    referring = _person(_field(pv1, 8), offset=1) if pv1 is not None else ""
    groups, loose_zds = order_groups(message)
    if not groups:
        raise OrderError("the order message has no ORC segment", code="100", http_status=400)
    study_uid = _get(loose_zds, 1, comp=0)
    actions = []
    for group in groups:
        control = _get(group.orc, 1).upper()
        action = _ORDER_CONTROLS.get(control)
        if action is None:
            # Table 0357 103 "Table value not found": ORC-1 is coded by table 0119.
            raise OrderError(f"order control {control!r} (ORC-1) is not supported", code="103", http_status=400)
        for ipc in group.ipcs or [None]:
            actions.append((action, _order_info(group, ipc, patient, referring, study_uid, zone,
                                                named_only=action != "place")))
    return actions


def handle(service: OrderService, raw: bytes, *, processing_id: str = "P", peer: str = "",
           audit: Callable[[Event], None] | None = None, zone: tzinfo | None = None) -> bytes:
    """Process one inbound message; the first ACK :func:`answers` gives
    (b"" when none is asked for): for a caller that expects one answer."""
    replies = answers(service, raw, processing_id=processing_id, peer=peer, audit=audit, zone=zone)
    return replies[0] if replies else b""


def answers(service: OrderService, raw: bytes, *, processing_id: str = "P", peer: str = "",
            audit: Callable[[Event], None] | None = None, zone: tzinfo | None = None) -> list[bytes]:
    """Process one inbound message; return the ACKs to send back, in order
    (never raises). Original mode (MSH-15 and MSH-16 empty): one ACK,
    AA/AE/AR. Enhanced mode (HL7 v2.5 2.9.3): the accept ACK CA/CE/CR when
    MSH-15's condition holds, then the application ACK AA/AE/AR when
    MSH-16's holds (AL always, NE never, ER on an error, SU on success; an
    empty field asks for none); none at all for NE and NE. The message is
    applied before either is sent, so both go back on the connection it came
    on (as original mode's ACK, which v2.5 2.9.3 equates to NE/AL); the
    application ACK is a message of its own asking no ACK back (MSH-15 and
    MSH-16 NE).
    Only messages for *processing_id* (MSH-11; empty counts as ours) are applied.
    *audit* records what the message did to which patients (from *peer*).
    *zone*: the hospital's (the ``timezone`` setting; default the server's),
    for timestamps read with an offset and the ACK's MSH-7."""
    zone = zone or server_zone()
    header, code, text, error_code, patients = _process(service, raw, processing_id, zone)
    if header.message_type == "ACK":
        # An acknowledgment is never acknowledged (answering one loops): a HIS
        # acknowledging our enhanced mode application ACK, whatever MSH-15/16 say.
        log.info("%s: an acknowledgment, nothing to apply or answer", _describe(header))
        return []
    if code != "AA":
        _log_refusal(header, code, error_code)
    if audit is not None:
        kind = f"{header.message_type}^{header.trigger}" if header.trigger else header.message_type or "?"
        action = _AUDIT_ACTIONS.get(header.message_type, "hl7-message")
        if header.trigger == "A40":
            action = "patient-merge"
        for patient_id in patients or [""]:
            audit(Event(
                action=action, user=f"{header.sending_app}^{header.sending_facility}"[:64], role="his",
                client=peer, protocol="hl7", outcome="success" if code == "AA" else "failure",
                patient_id=patient_id,
                detail=f"{kind[:20]} control ID {header.control_id[:40]}: {code}"
                       + (f" {error_code}" if error_code else ""),
            ))
    if not header.accept_ack and not header.application_ack:
        return [ack(header, code, text, error_code, zone=zone)]  # original mode
    replies = []
    if _ack_wanted(header.accept_ack, code == "AA"):
        replies.append(ack(header, _commit_code(code, error_code), text, error_code, zone=zone))
    if _ack_wanted(header.application_ack, code == "AA"):
        replies.append(ack(header, code, text, error_code, zone=zone, modes=("NE", "NE")))
    return replies


# Original mode's MSA-1 and the accept (commit) ACK's of enhanced mode.
_ACK_CONDITIONS = ("AL", "NE", "ER", "SU")  # HL7 table 0155
_COMMIT_CODES = {"AA": "CA", "AE": "CE", "AR": "CR"}
# Table 0357 codes of an interaction this receiver never takes (message type,
# event, processing ID, version): what table 0008's CR (commit reject) is for.
_UNSUPPORTED_INTERACTION = ("200", "201", "202", "203")


def _commit_code(code: str, error_code: str) -> str:
    """The accept ACK's MSA-1 for original mode's *code*: CR only for an
    unsupported interaction (table 0008); any other AR (our internal error
    or a busy index, "please resend"; bytes not in the declared character
    set) is CE, a message that could not be accepted now. A HIS takes CR as
    final and would never resend an order our own failure refused."""
    if code == "AR" and error_code not in _UNSUPPORTED_INTERACTION:
        return "CE"
    return _COMMIT_CODES[code]


def _ack_wanted(condition: str, success: bool) -> bool:
    """Whether MSH-15 or MSH-16 (table 0155) asks for its ACK: AL always,
    NE never, ER on failure only, SU on success only; empty (enhanced mode,
    the other field set) none."""
    if condition == "AL":
        return True
    if condition == "ER":
        return not success
    if condition == "SU":
        return success
    return False


# Audit actions of the messages a HIS sends (a merge is "patient-merge").
_AUDIT_ACTIONS = {"ADT": "patient-update", "ORM": "order", "OMI": "order"}


def _process(service: OrderService, raw: bytes, processing_id: str,
             zone: tzinfo | None = None) -> tuple[Header, str, str, str, list[str]]:
    """(header, MSA-1, text, table 0357 code, patient IDs named) for one message.

    HL7 v2.5 2.9.2 (original mode): AE says the message itself is wrong (the
    HIS must fix it); AR says it could not be processed for reasons that are
    not its content -- unusable framing or encoding, unsupported type, or our
    own failure (database down) -- and the HIS may resend it unchanged.
    """
    try:
        message, header = parse(raw)
    except HL7Reject as exc:
        return read_header(raw) or Header(), exc.ack_code, str(exc), exc.code, []
    if header.message_type == "ACK":
        return header, "AA", "", "", []  # an acknowledgment: not applied, not answered (answers)
    if header.processing_id and header.processing_id != processing_id.upper():
        # A training or test HIS pointed at this archive must not change its patients.
        return header, "AR", (f"processing ID {header.processing_id[:3]!r} is not accepted here: this "
                              f"system processes {processing_id!r} messages"), "202", []
    patients: list[str] = []
    try:
        actions = _actions(message, header, zone)
        if isinstance(actions, tuple):  # (text, code): a type or event we do not handle
            return header, "AR", *actions, []
        patients = patients_named(actions)
        receipt = Receipt(sender=f"{header.sending_app}^{header.sending_facility}", control_id=header.control_id,
                          kind=f"{header.message_type}^{header.trigger}", digest=message_digest(message))
        if not service.apply_message(actions, receipt, source=f"hl7:{header.sending_app}"):
            # A resend after our ACK was lost: acknowledged again, not applied twice.
            log.info("%s was already applied: acknowledged again", _describe(header))
            return header, "AA", "duplicate: this message was already applied", "", patients
    except OrderError as exc:
        return header, "AE", str(exc), exc.code, patients
    except Exception as exc:  # keep the link up; the HIS resends on AR
        if is_transient(exc):
            # Lost a race every time it was applied (retry_transaction): no bug, nothing down.
            log.warning("%s lost to concurrent changes of the same data (%s); answered AR so the HIS resends",
                        _describe(header), type(exc).__name__)
            return header, "AR", "the archive was busy with a conflicting change; please resend", "207", patients
        _log_internal_error(header, exc)
        return header, "AR", f"internal error: {exc.__class__.__name__}; please resend", "207", patients
    return header, "AA", "", "", patients


# ADT events whose PID is the patient as the HIS has it now: each updates
# the patient (IHE RAD-12). A HIS broadcasting every visit event (transfer,
# discharge, their cancellations) to its subscribers resends one answered AR
# and holds its queue behind it; the visit itself is not the archive's.
PATIENT_UPDATE_EVENTS = ("A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A28", "A31")


def _actions(message: Any, header: Header, zone: tzinfo | None = None) -> list[tuple[str, Any]] | tuple[str, str]:
    """What the message asks of the order service, or (text, code) when its
    type or event is not supported."""
    kind = f"{header.message_type}^{header.trigger}"
    if header.message_type in ("ORM", "OMI"):
        if kind not in ("ORM^O01", "OMI^O23"):
            return f"{kind} is not supported", "201"
        return orders_from(message, zone)
    if header.message_type == "ADT":
        pids = _segments(message, "PID")
        if not pids:
            raise OrderError("ADT message without PID segment", code="100", http_status=400)
        if header.trigger == "A40":
            return [("merge", pair) for pair in _merge_pairs(message)]
        if header.trigger in PATIENT_UPDATE_EVENTS:
            return [("patient", patient_from_pid(pids[0]))]
        return f"{kind} is not supported", "201"
    return f"message type {header.message_type} is not supported", "200"


def _merge_pairs(message: Any) -> list[tuple[PatientInfo, list[tuple[str, str]]]]:
    """The PATIENT groups of an ADT^A40 (ADT_A39: PID, [PD1], MRG, [PV1],
    repeated): each PID with the MRG that follows it, (surviving patient,
    prior IDs) per group. Every group is merged, in the message's one
    transaction; a PID without its MRG (or an MRG without its PID) refuses
    the whole message (AE 100), so that no pair is merged without the others."""
    pairs: list[tuple[PatientInfo, list[tuple[str, str]]]] = []
    pid = None
    for segment in message:
        name = str(segment[0]).strip().upper()
        if name == "PID":
            if pid is not None:
                raise OrderError(f"ADT^A40 patient group {len(pairs) + 1} has a PID without MRG segment",
                                 code="100", http_status=400)
            pid = segment
        elif name == "MRG":
            if pid is None:
                raise OrderError(f"ADT^A40 patient group {len(pairs) + 1} has an MRG without PID segment",
                                 code="100", http_status=400)
            pairs.append((patient_from_pid(pid), _prior_ids(segment)))
            pid = None
    if pid is not None:
        text = "ADT^A40 without MRG segment" if not pairs else \
            f"ADT^A40 patient group {len(pairs) + 1} has a PID without MRG segment"
        raise OrderError(text, code="100", http_status=400)
    return pairs


def _prior_ids(mrg: Any) -> list[tuple[str, str]]:
    """MRG-1 of one ADT^A40 patient group: the identifiers of the ONE prior
    patient being merged away (HL7 v2.5 3.4.9.1: a list of that patient's
    IDs), its hospital number (PI, MR) first, as PID-3 is read; the order
    service resolves them as one (:meth:`pacs.orders.OrderService._merge`)."""
    prior = [(i.value, i.issuer) for i in _identifier_list(mrg, 1)]
    if not prior:
        raise OrderError("MRG-1 (prior patient identifier) is empty", code="101", http_status=400)
    return prior


def _describe(header: Header) -> str:
    """Message type, control ID and sender for the log: never the message
    text, which names the patient (error texts quote IDs and accessions)."""
    kind = f"{header.message_type}^{header.trigger}" if header.trigger else header.message_type or "?"
    return f"HL7 {kind[:20]} control ID {header.control_id[:40]!r} from {header.sending_app[:40]!r}"


def _log_refusal(header: Header, code: str, error_code: str) -> None:
    meaning = _ERROR_MEANINGS.get(error_code, "Application error")
    log.warning("%s answered %s (%s %s)", _describe(header), code, error_code, meaning)


def _log_internal_error(header: Header, exc: BaseException) -> None:
    log.error("%s failed with an internal error; answered AR so the HIS resends\n%s",
              _describe(header), _traceback_without_values(exc))


def _traceback_without_values(exc: BaseException) -> str:
    """The traceback with exception types but not their messages: database
    errors quote the SQL parameters, i.e. patient names and IDs."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    parts = [
        "Traceback (most recent call last):\n" + "".join(traceback.format_tb(e.__traceback__))
        + f"{type(e).__module__}.{type(e).__qualname__} (message withheld: may contain patient data)"
        for e in reversed(chain)
    ]
    return "\n\nDuring handling of the above exception, another exception occurred:\n\n".join(parts)


def control_id() -> str:
    """A new MSH-10 of CONTROL_ID_LENGTH characters (the ST limit): 80
    random bits, unique across processes and nodes without coordination
    (a per-process counter restarts with the process and repeats on every node)."""
    return secrets.token_hex(CONTROL_ID_LENGTH // 2)


def _version(text: str) -> tuple[int, ...]:
    """MSH-12 as numbers ("2.3.1" -> (2, 3, 1)); v2.5 when unreadable."""
    try:
        return tuple(int(part) for part in text.strip().split("."))
    except ValueError:
        return (2, 5)


def ack(header: Header, code: str, text: str, error_code: str = "207", *, app: str = "FILMLESS",
        zone: tzinfo | None = None, modes: tuple[str, str] = ("", "")) -> bytes:
    """An ACK for *header*'s message: MSA-1 AA/AE/AR (CA/CE/CR in enhanced
    mode), an ERR segment on errors, laid out for the message's version
    (MSH-12), which the ACK echoes. MSH-7 is in *zone* (the hospital's;
    default the server's) with its offset. *modes*: the ACK's own MSH-15
    and MSH-16 (an enhanced mode application ACK asks for none: NE, NE)."""
    now = hl7_timestamp(datetime.now(UTC), zone or server_zone())
    charset = header.charset or "UNICODE UTF-8"
    version = _version(header.version or "2.5")
    # MSH-9: the message structure (third component) exists from v2.3.1 on.
    kind = "ACK" if not header.trigger else f"ACK^{escape(header.trigger)}" + ("^ACK" if version >= (2, 3, 1) else "")
    # MSH-3..6 as the sender wrote them (subcomponents included), else from the decoded values.
    sending_app, sending_facility, receiving_app, receiving_facility = (
        sent or _echo(value) for sent, value in zip(header.addresses, (
            header.sending_app, header.sending_facility, header.receiving_app, header.receiving_facility)))
    segments = [
        "|".join([
            "MSH", "^~\\&", receiving_app or app, receiving_facility,
            sending_app, sending_facility, now, "", kind, control_id(),
            escape(header.processing_id) or "P", escape(header.version) or "2.5", "", "", *modes, "", charset,
        ]),
        "|".join(["MSA", code, escape(header.control_id), escape_within(text, _MSA_TEXT_LENGTH)]),
    ]
    if code not in ("AA", "CA"):
        meaning = _ERROR_MEANINGS.get(error_code, "Application error")
        if version >= (2, 5):  # ERR-3 error code, ERR-4 severity, ERR-8 user message
            segments.append("|".join(["ERR", "", "", f"{error_code}^{meaning}^HL70357", "E", "", "", "",
                                      escape_within(text, _ERR_TEXT_LENGTH)]))
        else:  # before v2.5 ERR has ERR-1 only: segment^sequence^field^code (a CE: subcomponents)
            segments.append(f"ERR|^^^{error_code}&{meaning}&HL70357")
    codec = _CHARSETS.get(charset.upper(), "utf-8")
    return "\r".join(segments).encode(codec, errors="replace") + b"\r"


def _echo(value: str) -> str:
    """A decoded HD field of the header (components joined by "^") encoded again."""
    return "^".join(escape(part) for part in value.split("^"))


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Other C0 controls: VT and FS would end the MLLP frame early.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def escape(text: str) -> str:
    """One line of text for an HL7 field: the delimiters (| ^ ~ \\ &) as
    escape sequences; a line break becomes a space (a CR or LF inside a
    field reads as a segment break to many engines)."""
    text = _CONTROL.sub(" ", _LINE_BREAK.sub(" ", text))
    return (
        text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\")
        .replace("&", "\\T\\")
    )


# What escape() writes, token by token: an escape sequence or one other character.
_ESCAPED_TOKEN = re.compile(r"\\[FSRTE]\\|[^\\]")


def escape_within(text: str, limit: int) -> str:
    """*text* escaped (:func:`escape`) and cut to at most *limit* characters
    as sent. The cut falls between characters of the text, never inside an
    escape sequence ("...\\F" or a lone "\\" reads as broken data)."""
    escaped = escape(text)
    if len(escaped) <= limit:
        return escaped
    length = 0
    for token in _ESCAPED_TOKEN.finditer(escaped):  # one character or one escape sequence
        if token.end() > limit:
            break
        length = token.end()
    return escaped[:length]


def escape_lines(text: str) -> str:
    """Multi-line text for a repeating TX field: one repetition per line,
    which HL7 v2.5 (2.A.79 TX) defines as a hard line break."""
    return "~".join(escape(line) for line in _LINE_BREAK.split(text.strip("\r\n")))


def ack_code(raw: bytes) -> tuple[str, str]:
    """MSA-1 and MSA-3 of an ACK."""
    text, _ = decode(raw)
    for segment in text.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split("|")
            return (fields[1] if len(fields) > 1 else ""), (fields[3] if len(fields) > 3 else "")
    return "", "no MSA segment"


def ack_error_code(raw: bytes) -> str:
    """The HL7 table 0357 code of an ACK's error ("" when it gives none):
    ERR-3 (v2.5 on), else the code in ERR-1 (ELD, before v2.5:
    segment^sequence^field^code&text), else MSA-6 (v2.1 to 2.4). Never raises."""
    text = raw.decode("latin-1")  # the codes are ASCII; nothing else is read
    segments = text.replace("\n", "\r").split("\r")
    for segment in segments:
        if segment.startswith("ERR") and len(segment) > 4:
            fields = segment.split(segment[3])
            code = fields[3].split("^")[0] if len(fields) > 3 else ""
            if not code and len(fields) > 1:
                code = ((fields[1].split("~")[0].split("^") + [""] * 4)[3]).split("&")[0]
            if code.strip():
                return code.strip()
    for segment in segments:
        if segment.startswith("MSA") and len(segment) > 4:
            fields = segment.split(segment[3])
            if len(fields) > 6 and fields[6].split("^")[0].strip():
                return fields[6].split("^")[0].strip()
    return ""
