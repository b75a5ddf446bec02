"""Read the header of a received Part 10 object, without its pixel data.

The ingest path never decodes pixel data: it parses the elements before
Pixel Data with pydicom (``stop_before_pixels``) and then walks the element
headers from there to the end of the object to prove it is complete (a
truncated upload is refused, not stored). What it extracts is exactly what
the index needs.

Sequences nested deeper than :data:`~pacs.header_scan.MAX_NESTING`, before
or after Pixel Data, are refused 0xC000 on every path: pydicom reads a
sequence of defined length only when a value in it is first used, so such
an object was stored and then failed every reader (WADO-RS metadata of its
whole study) with a RecursionError.
"""

from __future__ import annotations

import codecs
import functools
import io
import logging
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import IngestError, Status
from .header_scan import (
    MAX_NESTING,
    PIXEL_TAGS,
    NestedTooDeep,
    ScanFailed,
    ScannedDataset,
    implicit_vr,
    leading_meta_length,
    scan,
    single_codec,
    uses_code_extensions,
)
from .names import fold_name, name_reading, name_words
from .part10 import PositionedReader
from .priority import normalized as normalized_priority

log = logging.getLogger(__name__)

# Long free-text values are cut: an index is not the place for a 64 KB comment.
_MAX_TEXT = 1024
# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


@dataclass
class OtherId:
    value: str
    issuer: str = ""
    id_type: str = ""


@dataclass
class InstanceHeader:
    """The indexable facts of one object."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    patient_name_folded: str = ""
    patient_name_words: str = ""
    patient_name_reading: str = ""
    birth_date: str = ""
    sex: str = ""
    other_ids: list[OtherId] = field(default_factory=list)
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    referring_physician: str = ""
    study_description: str = ""
    institution: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    station_name: str = ""
    series_date: str = ""
    series_time: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    bits_allocated: int | None = None
    photometric: str = ""
    charset: str = ""
    content_date: str = ""
    content_time: str = ""
    # The reading priority the modality wrote (pacs.priority's term, '' none).
    priority: str = ""
    pixel_offset: int | None = None
    # A value under a declared Latin-1 set (ISO_IR 100) was UTF-8 and read
    # as such (see _Decoder): the receiving service warns the sender's admin.
    mislabelled_utf8: bool = False
    # The parsed header itself, for rules that look at any tag (routing);
    # after a scan, parsed only when asked for (full_dataset).
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    dataset_loader: Callable[[], Dataset] | None = field(default=None, repr=False, compare=False)

    def full_dataset(self) -> Dataset | None:
        """The header as a pydicom Dataset (parsed now if the scan skipped it)."""
        if self.dataset is None and self.dataset_loader is not None:
            self.dataset = self.dataset_loader()
            self.dataset_loader = None
        return self.dataset


def _text(ds: Dataset, keyword: str, *, uid: bool = False) -> str:
    """A value as text via pydicom's full conversion (the general path;
    *uid*: see _uid_text)."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional element must not sink the object
        return ""
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    if uid:
        return _uid_text(text)
    return text.strip().replace("\x00", "")[:_MAX_TEXT]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, MultiValue):
            value = value[0]
        number = int(value)
    except Exception:
        return None
    # Outside a 32-bit column means garbage, not a real instance number.
    return number if -(2**31) <= number < 2**31 else None


_BINARY_INT = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}
# Values the data set's character set applies to. CS is the default
# repertoire only (PS3.5 6.1.2.3), yet modalities and local RIS write
# Vietnamese in it (Patient's Sex "Nữ", Body Part Examined "NGỰC") in the
# data set's set: read with it, not as Latin-1 ("Ná»¯", which no search finds).
_CHARSET_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "CS"}


@functools.lru_cache(maxsize=64)
def _is_latin1(codec: str | None) -> bool:
    return codec is not None and codecs.lookup(codec).name == "iso8859-1"


def dataset_codec(ds: Dataset) -> str | None:
    """The Python codec of *ds*'s Specific Character Set: pydicom's Latin-1
    default when none is declared (the default repertoire is ASCII); None
    for ISO 2022 code extensions or several sets, which only pydicom's own
    conversion decodes."""
    try:
        charset = ds.get("SpecificCharacterSet")
        terms = list(charset) if isinstance(charset, MultiValue) else ([charset] if charset else [])
        encodings = convert_encodings([t for t in terms if t] or None)
    except Exception:
        return None
    return encodings[0] if len(encodings) == 1 and not uses_code_extensions(terms) else None


def utf8_under_latin1(value: bytes, vr: str, codec: str | None) -> bool:
    """Whether a raw *value* of *vr* in a data set of character set *codec*
    (:func:`dataset_codec`) is UTF-8 its sender labelled wrongly or not at all.

    Latin-1 cannot write Vietnamese: non-ASCII bytes under ISO_IR 100 (or
    under no declared set, where only ASCII is valid) that are valid UTF-8
    (multi-byte sequences, which Latin-1 text practically never forms: "Ã¼"
    for "ü") come from a sender that writes UTF-8, and are read as UTF-8. A
    real Latin-1 name ("Müller", 0xFC alone) is not valid UTF-8 and stays
    Latin-1. Ingest and every C-FIND identifier read values so."""
    return vr in _CHARSET_VRS and not value.isascii() and _is_latin1(codec) and _is_utf8(value)


def decode_text(value: bytes, vr: str, codec: str | None) -> str:
    """A raw value of *vr* as text, padding and all: with *codec* where the
    character set applies (UTF-8 where :func:`utf8_under_latin1`), as
    Latin-1 (ASCII, kept byte for byte if not) elsewhere."""
    if utf8_under_latin1(value, vr, codec):
        return value.decode("utf-8")
    return value.decode((codec or "latin-1") if vr in _CHARSET_VRS else "latin-1", "replace")


class _Decoder:
    """Raw text values to str with one data set's character set (see
    :func:`utf8_under_latin1` for UTF-8 labelled Latin-1 or not labelled).
    The stored object keeps its bytes as received."""

    codec: str | None = None
    mislabelled: bool = False

    def decode(self, value: bytes, vr: str, *, uid: bool = False) -> str:
        """*value* as the index keeps it (see :func:`_decode_text`)."""
        if not uid and utf8_under_latin1(value, vr, self.codec):
            # The receiving service warns the sender's admin.
            self.mislabelled = True
        return _decode_text(value, vr, self.codec, uid=uid)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Values(_Decoder):
    """Reads the few values the index needs straight from pydicom's raw
    elements: ~20x cheaper than pydicom's per-element conversion, which
    matters once per received object. Anything unusual (ISO 2022 code
    extensions, deferred values, odd encodings) takes pydicom's path."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.order = "<" if ds.original_encoding[1] is not False else ">"
        # One character set (no ISO 2022 switching): a plain codec decodes it.
        # No declared set means ASCII (PS3.5 default repertoire); non-ASCII
        # bytes there are invalid, and in practice UTF-8 from a modality that
        # forgot to declare it: read as UTF-8 when they decode as such.
        self.codec = dataset_codec(ds)

    def _raw(self, ds: Dataset, tag: int) -> Any:
        try:
            elem = ds.get_item(tag)
        except Exception:
            return None
        if elem is None:
            return None
        if not getattr(elem, "is_raw", False) or elem.value is None:
            return False  # already converted, or deferred: take the slow path
        return elem

    def text(self, keyword: str, *, uid: bool = False, ds: Dataset | None = None) -> str:
        """*keyword*'s value in the data set, or in *ds* (an item of it)."""
        ds = self.ds if ds is None else ds
        tag = keyword_dict[keyword]
        elem = self._raw(ds, tag)
        if elem is None:
            return ""
        vr = elem and (elem.VR or dictionary_VR(tag))
        if elem is False or vr in _BINARY_INT or (vr in _CHARSET_VRS and self.codec is None):
            return _text(ds, keyword, uid=uid)
        return self.decode(elem.value, vr, uid=uid)

    def int(self, keyword: str) -> int | None:
        tag = keyword_dict[keyword]
        elem = self._raw(self.ds, tag)
        if elem is None:
            return None
        vr = elem and (elem.VR or dictionary_VR(tag))
        if elem is False or (vr != "IS" and vr not in _BINARY_INT):
            return _int(self.ds, keyword)
        return _decode_int(elem.value, vr, self.order)

    def other_ids(self) -> list[OtherId]:
        """Other Patient IDs, item values read as top-level ones are (the
        data set's character set, undeclared UTF-8), as the scan reads them."""
        ids: list[OtherId] = []
        try:
            for item in self.ds.get("OtherPatientIDsSequence") or []:
                value = self.text("PatientID", ds=item)
                if value:
                    ids.append(OtherId(value, self.text("IssuerOfPatientID", ds=item),
                                       self.text("TypeOfPatientID", ds=item)))
            legacy = self.text("OtherPatientIDs")  # retired (0010,1000), still sent
        except Exception:  # a malformed optional sequence must not sink the object
            return ids
        for part in legacy.split("\\") if legacy else []:
            part = part.strip()
            if part and all(o.value != part for o in ids):
                ids.append(OtherId(part))
        return ids


def _uid_text(text: str) -> str:
    """A UID value without its padding (a trailing NUL or spaces) only: a NUL
    inside it is kept, so that valid_uid refuses "1.2.3\\0.4" instead of
    the index filing it as "1.2.3.4" while the stored object says otherwise."""
    return text.strip(" ").rstrip(" \x00")[:_MAX_TEXT]


def _decode_text(value: bytes, vr: str, codec: str | None, *, uid: bool = False) -> str:
    """A raw value as the index keeps it (*uid*: see _uid_text)."""
    if uid:
        return _uid_text(value.decode("latin-1", "replace"))
    return decode_text(value, vr, codec).strip(" \x00").replace("\x00", "")[:_MAX_TEXT]


def _decode_int(value: bytes, vr: str, order: str) -> int | None:
    """The first number of an IS or binary integer value (None if unusable)."""
    if vr == "IS":
        text = value.split(b"\\", 1)[0].strip(b" \x00")
        try:
            number = int(text) if text else None
        except ValueError:
            return None
        return number if number is None or -(2**31) <= number < 2**31 else None
    fmt = order + _BINARY_INT[vr]
    if len(value) < struct.calcsize(fmt):
        return None
    return int(struct.unpack_from(fmt, value)[0])


class _ScannedValues(_Decoder):
    """The same reads as :class:`_Values` over a :func:`~pacs.header_scan.scan`
    of the received bytes; raises ScanFailed where only pydicom can tell."""

    def __init__(self, scanned: ScannedDataset) -> None:
        self.scanned = scanned
        charset = scanned.values.get(_CHARSET_TAG)
        self.codec = single_codec(charset[1] if charset else None)[0]

    def _decoded(self, elements: dict[int, tuple[str, memoryview]], tag: int, *, uid: bool = False) -> str:
        found = elements.get(tag)
        if found is None:
            return ""
        vr, value = found
        if vr in _BINARY_INT or vr in ("SQ", "UN", "OB", "OW", "FL", "FD", "AT"):
            raise ScanFailed(f"{vr} value where the index expects text")
        return self.decode(bytes(value), vr, uid=uid)

    def text(self, keyword: str, *, uid: bool = False) -> str:
        return self._decoded(self.scanned.values, keyword_dict[keyword], uid=uid)

    def int(self, keyword: str) -> int | None:
        found = self.scanned.values.get(keyword_dict[keyword])
        if found is None:
            return None
        vr, value = found
        if vr != "IS" and vr not in _BINARY_INT:
            raise ScanFailed(f"{vr} value where the index expects a number")
        return _decode_int(bytes(value), vr, "<")

    def other_ids(self) -> list[OtherId]:
        ids: list[OtherId] = []
        for item in self.scanned.other_id_items:
            value = self._decoded(item, _PATIENT_ID_TAG)
            if value:
                ids.append(OtherId(value, self._decoded(item, _ISSUER_TAG), self._decoded(item, _ID_TYPE_TAG)))
        legacy = self.text("OtherPatientIDs")
        for part in legacy.split("\\") if legacy else []:
            part = part.strip()
            if part and all(o.value != part for o in ids):
                ids.append(OtherId(part))
        return ids


_CHARSET_TAG = keyword_dict["SpecificCharacterSet"]
_PATIENT_ID_TAG = keyword_dict["PatientID"]
_ISSUER_TAG = keyword_dict["IssuerOfPatientID"]
_ID_TYPE_TAG = keyword_dict["TypeOfPatientID"]


# Checked for four UIDs of every object, so compiled once and used without
# building pydicom UIDs.
_VALID_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(value: str) -> bool:
    """True if *value*, exactly as given, is a valid UID (PS3.5 9.1, at most
    64 characters). pydicom's ``UID.is_valid`` also passes a trailing newline
    (``re.match`` with ``$``); this does not, so "1.2.3%0A" in a URL is a 400."""
    return len(value) <= 64 and _VALID_UID.fullmatch(value) is not None


@functools.lru_cache(maxsize=64)
def _scan_syntax(transfer_syntax: str) -> bool | None:
    """Whether the scanner reads *transfer_syntax* as explicit VR; None when
    it does not read it at all (big endian, deflated, unknown)."""
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax.is_deflated:
        return None
    return not syntax.is_implicit_VR


def stray_meta_length(dataset: bytes | bytearray | memoryview, transfer_syntax: str) -> int:
    """How many leading bytes of a received dataset are File Meta elements
    (group 0002), which belong only in the Part 10 header (PS3.10 7.1):
    stored after our meta they read as a second, conflicting header (a stray
    (0002,0010) was taken for the transfer syntax on retrieval). 0 for
    well-formed data and for syntaxes the scanner does not read."""
    explicit = _scan_syntax(transfer_syntax)
    return 0 if explicit is None else leading_meta_length(memoryview(dataset).cast("B"), explicit)


def _uid(values: _Values | _ScannedValues, keyword: str, *, required: bool = True) -> str:
    value = values.text(keyword, uid=True)
    if not value:
        if required:
            raise IngestError(Status.INVALID_DATASET, f"missing {keyword}")
        return ""
    # The value as received must be valid ("1.2.3\r\n" would name a storage key).
    if not valid_uid(value):
        raise IngestError(Status.INVALID_DATASET, f"invalid {keyword} {value[:80]!r}")
    return value


def parse_header(
    stream: BinaryIO,
    size: int,
    *,
    transfer_syntax: str | None = None,
) -> InstanceHeader:
    """Parse and validate the header of a Part 10 object held in *stream*.

    *size* is the object's total length. Raises :class:`IngestError` carrying
    the DICOM status a peer should see when the object is not acceptable.
    """
    scanned = _parse_scanned(stream, transfer_syntax)
    if scanned is not None:
        return scanned
    deflated = _deflated_dataset_start(stream, transfer_syntax)
    if deflated is not None:
        return _parse_deflated(stream, deflated)
    stream.seek(0)
    try:
        ds = dcmread(stream, stop_before_pixels=True, defer_size=4096)
        end_of_header = stream.tell()
    except InvalidDicomError as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND, f"not a DICOM Part 10 object: {exc}") from exc
    except Exception as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND, f"unreadable DICOM header: {exc}") from exc

    meta = getattr(ds, "file_meta", None)
    ts = transfer_syntax or (meta.get("TransferSyntaxUID") if meta is not None else None)
    if not ts:
        raise IngestError(Status.CANNOT_UNDERSTAND, "no Transfer Syntax UID in file meta")
    ts = str(ts)

    try:
        values = _Values(ds)
        header = _identified(values, ts)
        if meta is not None:
            media_sop = str(meta.get("MediaStorageSOPInstanceUID") or "").strip("\x00 ")
            if media_sop and media_sop != header.sop_uid:
                # Seen in real files; the dataset's own UID is the one that counts.
                log.warning("file meta SOP Instance UID differs from the dataset's; using the dataset's")
        _fill(header, values)
        header.dataset = ds
    except IngestError as exc:
        # pydicom tolerates a lot; if the structure itself is broken, say so
        # (0xC000) rather than blaming a missing attribute (0xA900).
        _check_structure(stream, size, ts)
        raise exc
    except Exception as exc:  # pydicom raises lazily while decoding values
        raise IngestError(Status.CANNOT_UNDERSTAND, f"malformed dataset: {exc}") from exc

    if ts != DeflatedExplicitVRLittleEndian:
        if end_of_header < size:
            header.pixel_offset = end_of_header
            # The header too, not only from Pixel Data on: its sequences'
            # nesting (pydicom read the defined-length ones lazily, unchecked).
            _check_structure(stream, size, ts)
        elif end_of_header > size:
            raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset")
        else:
            # No Pixel Data: pydicom deferred the large values unread, so walk
            # every element to prove the object is whole.
            _check_structure(stream, size, ts)
            if _is_image(header):
                # Pixel Data is type 1 in the Image Pixel module: an image
                # without it was cut short where its pixels should start.
                raise IngestError(Status.CANNOT_UNDERSTAND, NO_PIXEL_DATA)
    return header


# Cut short where its pixels start, or never given any: the dataset alone
# cannot tell, so the message names both.
NO_PIXEL_DATA = "truncated or invalid dataset: an image (Rows, Bits Allocated) without Pixel Data"


def _is_image(header: InstanceHeader) -> bool:
    """Whether the object has the Image Pixel module, whose Pixel Data is
    type 1: Rows and Bits Allocated, both type 1 there. Rows alone is not
    enough: an MR Spectroscopy object (PS3.3 C.8.14.4) has Rows and
    Columns, no Bits Allocated, and its data in Spectroscopy Data
    (5600,0020); taken for an image cut short, every one was refused 0xC000."""
    return header.rows is not None and header.bits_allocated is not None


# Every top-level attribute _fill and _uid read.
_SCANNED_TAGS = frozenset(keyword_dict[k] for k in (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription",
    "InstitutionName", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "StationName",
    "SeriesDate", "SeriesTime", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "BitsAllocated",
    "PhotometricInterpretation", "ContentDate", "ContentTime",
    "RequestedProcedurePriority", "ScheduledProcedureStepPriority",
))


def _parse_scanned(stream: BinaryIO, transfer_syntax: str | None) -> InstanceHeader | None:
    """The header read by :func:`~pacs.header_scan.scan` from a received
    dataset held in memory, or None where pydicom's reader must do it (a
    file, another syntax, anything the scanner does not read)."""
    view = getattr(stream, "dataset_view", None)
    if view is None or not transfer_syntax:
        return None
    explicit = _scan_syntax(transfer_syntax)
    if explicit is None:
        return None
    offset, data = view()
    try:
        scanned = scan(data, explicit, _SCANNED_TAGS)
    except NestedTooDeep as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND, str(exc)) from None
    except (ScanFailed, struct.error):
        return None  # pydicom's path decides, and words any error
    try:
        values = _ScannedValues(scanned)
        header = _identified(values, str(transfer_syntax))
        _fill(header, values)
    except (ScanFailed, IngestError, UnicodeError, struct.error):
        return None  # pydicom's path decides, and words any error
    if scanned.pixel_offset is not None:
        header.pixel_offset = offset + scanned.pixel_offset
    elif _is_image(header):
        raise IngestError(Status.CANNOT_UNDERSTAND, NO_PIXEL_DATA)
    reopen = stream.reopen  # type: ignore[attr-defined]
    header.dataset_loader = lambda: dcmread(reopen(), stop_before_pixels=True, defer_size=4096)
    return header


def _identified(values: _Values | _ScannedValues, transfer_syntax: str) -> InstanceHeader:
    """A header holding the object's four UIDs, each checked (0xA900 if missing or invalid)."""
    return InstanceHeader(
        sop_class_uid=_uid(values, "SOPClassUID"),
        sop_uid=_uid(values, "SOPInstanceUID"),
        study_uid=_uid(values, "StudyInstanceUID"),
        series_uid=_uid(values, "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax,
    )


# DA and TM as written before DICOM 3.0, which PS3.5 Table 6.2-1 asks
# readers to accept: "2024.01.15", "10:15:00.5" (and "08:30"). Indexed as
# they were, a date or time range compared them as text and found the wrong
# studies, and QIDO-RS answered an invalid DA value. The index keeps the
# DICOM form; the stored object keeps its bytes.
_LEGACY_DATE = re.compile(r"\d{4}\.\d{2}\.\d{2}")
_LEGACY_TIME = re.compile(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?")


def index_date(text: str) -> str:
    """A DA value as the index keeps it: "yyyy.mm.dd" as "yyyymmdd"."""
    return text.replace(".", "") if _LEGACY_DATE.fullmatch(text) else text


def index_time(text: str) -> str:
    """A TM value as the index keeps it: "hh:mm[:ss[.ffffff]]" as "hhmm[ss[.ffffff]]"."""
    return text.replace(":", "") if _LEGACY_TIME.fullmatch(text) else text


def _fill(h: InstanceHeader, v: _Values | _ScannedValues) -> None:
    h.patient_id = v.text("PatientID")
    h.issuer = v.text("IssuerOfPatientID")
    h.patient_name = v.text("PatientName")
    h.patient_name_folded = fold_name(h.patient_name)
    h.patient_name_words = name_words(h.patient_name)
    h.patient_name_reading = name_reading(h.patient_name)
    h.birth_date = index_date(v.text("PatientBirthDate"))
    h.sex = v.text("PatientSex")
    h.other_ids = v.other_ids()
    h.study_date = index_date(v.text("StudyDate"))
    h.study_time = index_time(v.text("StudyTime"))
    h.accession_number = v.text("AccessionNumber")
    h.study_id = v.text("StudyID")
    h.referring_physician = v.text("ReferringPhysicianName")
    h.study_description = v.text("StudyDescription")
    h.institution = v.text("InstitutionName")
    h.modality = v.text("Modality")
    h.series_number = v.int("SeriesNumber")
    h.series_description = v.text("SeriesDescription")
    h.body_part = v.text("BodyPartExamined")
    h.station_name = v.text("StationName")
    h.series_date = index_date(v.text("SeriesDate"))
    h.series_time = index_time(v.text("SeriesTime"))
    h.instance_number = v.int("InstanceNumber")
    h.rows = v.int("Rows")
    h.columns = v.int("Columns")
    h.frames = v.int("NumberOfFrames")
    h.bits_allocated = v.int("BitsAllocated")
    h.photometric = v.text("PhotometricInterpretation")
    h.charset = v.text("SpecificCharacterSet")
    h.content_date = index_date(v.text("ContentDate"))
    h.content_time = index_time(v.text("ContentTime"))
    # Top level, where modalities that copy it from the worklist write it.
    h.priority = normalized_priority(v.text("RequestedProcedurePriority")
                                     or v.text("ScheduledProcedureStepPriority"))
    h.mislabelled_utf8 = v.mislabelled


# -- deflated data sets -------------------------------------------------------
# Inflated bytes produced per step, and kept behind the reading position for
# pydicom's look-backs (a rewind to an element's tag, an undefined-length
# value's search for its delimiter).
_INFLATE_STEP = 1 << 16
_INFLATE_KEEP = 1 << 20


class _Inflating(PositionedReader):
    """The data set of a Deflated Explicit VR Little Endian object (PS3.5
    A.5) inflated as it is read: seekable forward (what is skipped is
    inflated and dropped) and back within the last :data:`_INFLATE_KEEP`
    bytes. pydicom inflates the whole data set in memory before reading a
    byte of it: a few megabytes of deflated zeros (a "zip bomb", or a long
    cine) took gigabytes per object, enough for the kernel to kill the
    server with every association on it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = 0  # offset in the inflated data set of _buffer[0]
        self._pos = 0
        self._ended = False

    @property
    def complete(self) -> bool:
        """Whether the deflate stream ended as it should (not cut short)."""
        return self._inflater.eof

    def _more(self, limit: int) -> bool:
        """Inflate up to *limit* more bytes into the buffer; False at the end."""
        while not self._ended and not self._inflater.eof:  # after its end: a padding byte, not data
            data = self._inflater.unconsumed_tail
            if not data:
                data = self._raw.read(_INFLATE_STEP)
                if not data:
                    break
            try:
                out = self._inflater.decompress(data, limit)
            except zlib.error as exc:
                raise IngestError(Status.CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {exc}") from None
            if out:
                self._buffer += out
                return True
        self._ended = True
        return False

    def _drop_behind(self) -> None:
        keep_from = max(self._start, self._pos - _INFLATE_KEEP)
        if keep_from - self._start >= _INFLATE_KEEP:
            del self._buffer[:keep_from - self._start]
            self._start = keep_from

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("a deflated data set is read by lengths")
        end = self._pos + size
        while self._start + len(self._buffer) < end:
            if not self._more(max(_INFLATE_STEP, end - self._start - len(self._buffer))):
                break
        data = bytes(self._buffer[self._pos - self._start:end - self._start])
        self._pos += len(data)
        self._drop_behind()
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END or target < self._start:
            raise OSError("a deflated data set is not read backwards that far")
        while self._start + len(self._buffer) < target:
            # Skipped values (pixel data) are inflated and dropped as they come.
            self._start += len(self._buffer)
            self._buffer.clear()
            if not self._more(min(_INFLATE_STEP << 4, target - self._start)):
                raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset")
        self._pos = target
        self._drop_behind()
        return target

    def at_end(self) -> bool:
        """Whether nothing is left to read."""
        return self._start + len(self._buffer) <= self._pos and not self._more(_INFLATE_STEP)


def _deflated_dataset_start(stream: BinaryIO, transfer_syntax: str | None) -> int | None:
    """Where the data set of a Deflated Explicit VR Little Endian Part 10
    object starts in *stream*, or None for another syntax (or no readable
    File Meta: pydicom's reader words that)."""
    if transfer_syntax is not None and transfer_syntax != DeflatedExplicitVRLittleEndian:
        return None
    try:
        stream.seek(0)
        if stream.read(132)[128:] != b"DICM":
            return None
        syntax = None
        end = None  # where the File Meta group ends, by its group length
        while True:
            head = stream.read(8)
            if len(head) < 8 or head[:2] != b"\x02\x00" or (end is not None and stream.tell() - 8 >= end):
                # (Deflated bytes may begin as a group 0002 tag would: the group length decides.)
                start = stream.tell() - len(head)
                start = start if end is None else min(start, end)
                break
            if head[4:6] in _LONG_VRS:
                length = struct.unpack("<L", stream.read(4))[0]
            else:
                length = struct.unpack("<H", head[6:8])[0]
            value = stream.read(length)
            if head[2:4] == b"\x00\x00" and length == 4 and end is None:  # (0002,0000) its group's length
                end = stream.tell() + struct.unpack("<L", value)[0]
            elif head[2:4] == b"\x10\x00":  # (0002,0010) Transfer Syntax UID
                syntax = value.decode("ascii", "replace").strip(" \x00")
    except (OSError, struct.error):
        return None
    return start if (transfer_syntax or syntax) == DeflatedExplicitVRLittleEndian else None


def inflated_dataset(stream: BinaryIO, limit: int) -> bytes | None:
    """The data set of a Deflated Explicit VR Little Endian Part 10 object
    in *stream*, inflated (Explicit VR Little Endian bytes); None for another
    syntax. At most *limit* + 1 bytes are inflated: a longer result means
    the data set is larger than *limit* (a caller that reads a whole object,
    an SR, refuses it; pydicom alone inflates all of it, whatever its size)."""
    start = _deflated_dataset_start(stream, None)
    if start is None:
        return None
    stream.seek(start)
    try:
        return _Inflating(stream).read(limit + 1)
    except IngestError as exc:
        raise ValueError(str(exc)) from None


def _at_pixels(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_TAGS


def _parse_deflated(stream: BinaryIO, start: int) -> InstanceHeader:
    """:func:`parse_header` of a deflated object, inflating it as it is read
    (see :class:`_Inflating`): the header up to the pixel data with
    pydicom, then every element after it walked to prove the object whole."""
    stream.seek(start)
    inflating: Any = _Inflating(stream)  # a binary stream, as pydicom and _Walker read one
    try:
        ds = read_dataset(inflating, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixels,
                          defer_size=4096)
        values = _Values(ds)
        header = _identified(values, DeflatedExplicitVRLittleEndian)
        _fill(header, values)
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND, f"malformed dataset: {exc}") from exc
    # Values above 4 KB were skipped, not kept: the index reads none of them,
    # and a routing rule naming one reads it as empty.
    header.dataset = ds
    pixels = not inflating.at_end()
    walker = _Walker(inflating, 1 << 62, explicit=True, little=True)
    try:
        while not inflating.at_end():
            walker.element()
    except struct.error:
        raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset") from None
    if not inflating.complete:
        raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset: the deflate stream is cut short")
    if not pixels and _is_image(header):
        raise IngestError(Status.CANNOT_UNDERSTAND, NO_PIXEL_DATA)
    return header


# -- completeness ------------------------------------------------------------
class _Walker:
    """Skips over encoded elements by their headers, without reading values."""

    def __init__(self, stream: BinaryIO, end: int, explicit: bool, little: bool) -> None:
        self.stream = stream
        self.end = end
        self.explicit = explicit
        self.order = "<" if little else ">"

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset")
        return data

    def _skip(self, n: int) -> None:
        pos = self.stream.tell() + n
        if pos > self.end:
            raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset")
        self.stream.seek(pos)

    def element(self, depth: int = 0, *, in_sequence: bool = False) -> int:
        """Skip one element (an item where *in_sequence*); return its tag.
        Sequences and their items are walked into, whatever their length,
        to refuse nesting deeper than MAX_NESTING (0xC000)."""
        group, elem = struct.unpack(self.order + "HH", self._read(4))
        tag = (group << 16) | elem
        sequence = False
        if group == 0xFFFE:  # item and delimiters have no VR, even when explicit
            (length,) = struct.unpack(self.order + "L", self._read(4))
        elif self.explicit:
            vr = self._read(2)
            sequence = vr == b"SQ"
            if vr in _LONG_VRS:
                self._read(2)
                (length,) = struct.unpack(self.order + "L", self._read(4))
            elif vr.isalpha() and vr.isupper():
                (length,) = struct.unpack(self.order + "H", self._read(2))
            else:
                # Some writers put implicit-VR elements in explicit files;
                # pydicom reads them, so must we: those 4 bytes were a length.
                (length,) = struct.unpack(self.order + "L", vr + self._read(2))
        else:
            (length,) = struct.unpack(self.order + "L", self._read(4))
            sequence = implicit_vr(tag) == "SQ"
        container = sequence or (in_sequence and tag == _ITEM)
        if tag in (_ITEM_END, _SEQ_END):
            pass
        elif (container or length == _UNDEFINED) and depth > MAX_NESTING:
            raise IngestError(Status.CANNOT_UNDERSTAND, f"sequences nested more than {MAX_NESTING} levels deep")
        elif length != _UNDEFINED and container:
            end = self.stream.tell() + length
            if end > self.end:
                raise IngestError(Status.CANNOT_UNDERSTAND, "truncated dataset")
            while self.stream.tell() < end:
                self.element(depth + 1, in_sequence=sequence)
        elif length != _UNDEFINED:
            self._skip(length)
        else:
            # Undefined length: a sequence, an item or encapsulated pixel data;
            # their contents end with a delimiter.
            end_tag = _ITEM_END if tag == _ITEM else _SEQ_END
            while self.element(depth + 1, in_sequence=sequence) != end_tag:
                pass
        return tag


def _dataset_start(stream: BinaryIO) -> int:
    """Offset of the first dataset element after the File Meta group."""
    stream.seek(132)
    while True:
        head = stream.read(8)
        if len(head) < 8 or head[:2] != b"\x02\x00":
            return stream.tell() - len(head)
        if head[4:6] in _LONG_VRS:
            length = struct.unpack("<L", stream.read(4))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        stream.seek(length, 1)


def _check_structure(stream: BinaryIO, size: int, ts: str) -> None:
    """Walk every element header of the dataset; raise 0xC000 if broken."""
    if ts == DeflatedExplicitVRLittleEndian:
        return
    try:
        start = _dataset_start(stream)
    except struct.error:
        raise IngestError(Status.CANNOT_UNDERSTAND, "truncated file meta") from None
    _check_complete(stream, start, size, ts)


def _check_complete(stream: BinaryIO, offset: int, size: int, ts: str) -> None:
    uid = UID(ts)
    explicit = ts != ImplicitVRLittleEndian
    little = uid.is_little_endian if uid.is_transfer_syntax else True
    walker = _Walker(stream, size, explicit, little)
    stream.seek(offset)
    while stream.tell() < size:
        walker.element()
