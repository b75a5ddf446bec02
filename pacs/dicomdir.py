"""The DICOMDIR of a file-set on CD, DVD or USB (PS3.10 section 8, PS3.3
Annex F): directory records built from the header of each file as it was
written, then the DICOMDIR encoded with its record offsets.

One PATIENT / STUDY / SERIES record per folder of the media layout and one
leaf record per file, of the type its SOP class takes (IMAGE, SR DOCUMENT,
KEY OBJECT DOC, PRESENTATION, ENCAP DOC, WAVEFORM, RT ..., see
:func:`record_type`), each with the keys its type requires (PS3.3 F.5) and
Referenced File ID, Referenced SOP Class / Instance / Transfer Syntax UID in
File taken from the file's own File Meta. A record with text outside ASCII
says Specific Character Set ISO_IR 192 and is written in UTF-8, whatever
the object's own character set was.

A Type 1 key the object has no value for (a Study ID left empty: Type 2 in
the image IODs, Type 1 in the directory) is invented, as DCMTK's
``dcmmkdir +I`` does: the folder's name for an ID, the folder's position for
a number, another date of the object (else 19000101) for a date, "OT" for a
modality. Every other value is the file's.

The records are kept encoded (a few hundred bytes per file, not the
headers they were read from) and laid out depth first when the DICOMDIR is
written: patient, its first study, that study's first series, its files,
the next series... Offsets count from the file's first byte (the preamble).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import PersonName

from .part10 import file_meta_bytes

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
UTF8 = "ISO_IR 192"
# File ID components (PS3.10 8.2): at most 8 of them, each 1-8 of A-Z 0-9 _.
MAX_COMPONENTS = 8
_COMPONENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

# -- record types (PS3.3 F.4, F.5) ------------------------------------------------------------
_BY_CLASS = {
    "1.2.840.10008.5.1.4.1.1.481.2": "RT DOSE",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT STRUCTURE SET",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT PLAN",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT PLAN",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.4": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.7": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.481.9": "RT TREAT RECORD",
    "1.2.840.10008.5.1.4.1.1.131": "PRESENTATION",  # Basic Structured Display
    "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC",
    "1.2.840.10008.5.1.4.1.1.88.40": "SR DOCUMENT",  # Procedure Log
    "1.2.840.10008.5.1.4.1.1.78.6": "SR DOCUMENT",  # Spectacle Prescription Report
    "1.2.840.10008.5.1.4.1.1.79.1": "SR DOCUMENT",  # Macular Grid Thickness and Volume Report
    "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",
    "1.2.840.10008.5.1.4.1.1.66": "RAW DATA",
    "1.2.840.10008.5.1.4.1.1.66.1": "REGISTRATION",
    "1.2.840.10008.5.1.4.1.1.66.3": "REGISTRATION",  # Deformable
    "1.2.840.10008.5.1.4.1.1.66.2": "FIDUCIAL",
    "1.2.840.10008.5.1.4.1.1.67": "VALUE MAP",
    "1.2.840.10008.5.1.4.1.1.77.1.5.3": "STEREOMETRIC",
    "1.2.840.10008.5.1.4.1.1.66.5": "SURFACE",
    "1.2.840.10008.5.1.4.1.1.68.1": "SURFACE SCAN",
    "1.2.840.10008.5.1.4.1.1.68.2": "SURFACE SCAN",
    "1.2.840.10008.5.1.4.1.1.66.6": "TRACT",
    "1.2.840.10008.5.1.4.1.1.90.1": "ASSESSMENT",
}
# Ophthalmic measurements (lensometry, autorefraction ... axial measurements).
_MEASUREMENTS = ("1.2.840.10008.5.1.4.1.1.78.", "1.2.840.10008.5.1.4.1.1.80.1")


def record_type(sop_class_uid: str, modality: str = "") -> str:
    """The Directory Record Type of an object of *sop_class_uid* (PS3.3
    F.4): by class, then by the class families' names (every SR ends in "SR
    Storage", every presentation state in "Presentation State Storage"...),
    IMAGE for the image classes and anything else."""
    if modality in ("RTINTENT", "RTSEGANN", "RTRAD"):
        return "RADIOTHERAPY"
    if modality == "PLAN":
        return "PLAN"
    if sop_class_uid in _BY_CLASS:
        return _BY_CLASS[sop_class_uid]
    if sop_class_uid.startswith(_MEASUREMENTS):
        return "MEASUREMENT"
    name = UID(sop_class_uid).name
    if name.startswith("Encapsulated ") and name.endswith(" Storage"):
        return "ENCAP DOC"  # PDF, CDA, STL, OBJ, MTL
    if name.endswith("Presentation State Storage"):
        return "PRESENTATION"
    if name.endswith("SR Storage"):
        return "SR DOCUMENT"
    if name.endswith("Waveform Storage"):
        return "WAVEFORM"
    return "IMAGE"


# -- record keys (PS3.3 F.5) -------------------------------------------------------------------
# (keyword, type): "1" always with a value (invented if the object has none),
# "2" always present (empty if the object has no value), "1C" and "3" copied
# when the object has a value.
Keys = tuple[tuple[str, str], ...]
_CONTENT_ID: Keys = (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1"), ("ContentLabel", "1"),
                     ("ContentDescription", "2"), ("ContentCreatorName", "2"))
_GENERIC: Keys = (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1"))
KEYS: dict[str, Keys] = {
    "PATIENT": (("PatientName", "2"), ("PatientID", "1"), ("IssuerOfPatientID", "3"), ("PatientBirthDate", "3"),
                ("PatientSex", "3")),
    "STUDY": (("StudyDate", "1"), ("StudyTime", "1"), ("AccessionNumber", "2"), ("StudyDescription", "2"),
              ("StudyInstanceUID", "1"), ("StudyID", "1")),
    "SERIES": (("Modality", "1"), ("SeriesInstanceUID", "1"), ("SeriesNumber", "1"), ("SeriesDescription", "3")),
    "IMAGE": (("InstanceNumber", "1"), ("NumberOfFrames", "3")),
    "RT DOSE": (("InstanceNumber", "1"), ("DoseSummationType", "1"), ("DoseComment", "3")),
    "RT STRUCTURE SET": (("InstanceNumber", "1"), ("StructureSetLabel", "1"), ("StructureSetDate", "2"),
                         ("StructureSetTime", "2")),
    "RT PLAN": (("InstanceNumber", "1"), ("RTPlanLabel", "1"), ("RTPlanDate", "2"), ("RTPlanTime", "2")),
    "RT TREAT RECORD": (("InstanceNumber", "1"), ("TreatmentDate", "2"), ("TreatmentTime", "2")),
    "PRESENTATION": (("PresentationCreationDate", "1"), ("PresentationCreationTime", "1"), ("InstanceNumber", "1"),
                     ("ContentLabel", "1"), ("ContentDescription", "2"), ("ContentCreatorName", "2"),
                     ("ReferencedSeriesSequence", "1C"), ("BlendingSequence", "1C")),
    "WAVEFORM": _GENERIC,
    # + Verification DateTime and Content Sequence (1C), see _sr_keys.
    "SR DOCUMENT": (("InstanceNumber", "1"), ("CompletionFlag", "1"), ("VerificationFlag", "1"), ("ContentDate", "1"),
                    ("ContentTime", "1"), ("ConceptNameCodeSequence", "1")),
    "KEY OBJECT DOC": (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1"),
                       ("ConceptNameCodeSequence", "1")),
    "SPECTROSCOPY": (("ImageType", "1"), ("ContentDate", "1"), ("ContentTime", "1"), ("InstanceNumber", "1"),
                     ("ReferencedImageEvidenceSequence", "1C"), ("NumberOfFrames", "1"), ("Rows", "1"),
                     ("Columns", "1"), ("DataPointRows", "1"), ("DataPointColumns", "1")),
    "RAW DATA": _GENERIC,
    "REGISTRATION": _CONTENT_ID,
    "FIDUCIAL": _CONTENT_ID,
    "VALUE MAP": _CONTENT_ID,
    "STEREOMETRIC": (),
    "PLAN": (),
    "ENCAP DOC": (("ContentDate", "2"), ("ContentTime", "2"), ("InstanceNumber", "1"), ("DocumentTitle", "2"),
                  ("HL7InstanceIdentifier", "1C"), ("ConceptNameCodeSequence", "2"),
                  ("MIMETypeOfEncapsulatedDocument", "1")),
    "MEASUREMENT": _CONTENT_ID,
    "SURFACE": _CONTENT_ID,
    "SURFACE SCAN": (("ContentDate", "1"), ("ContentTime", "1")),
    "TRACT": _CONTENT_ID,
    "ASSESSMENT": (("InstanceNumber", "1"), ("InstanceCreationDate", "1"), ("InstanceCreationTime", "2")),
    "RADIOTHERAPY": (("InstanceNumber", "1"), ("UserContentLabel", "1C"), ("UserContentLongLabel", "1C"),
                     ("ContentDescription", "2"), ("ContentCreatorName", "2")),
}
# Where an invented date or time is taken from, in this order.
_DATES = ("ContentDate", "SeriesDate", "AcquisitionDate", "InstanceCreationDate", "StudyDate")
_TIMES = ("ContentTime", "SeriesTime", "AcquisitionTime", "InstanceCreationTime", "StudyTime")


@dataclass(frozen=True)
class Place:
    """Where a file sits in the media layout: its File ID, and the names and
    positions invented keys are made from."""

    file_id: tuple[str, ...]  # ("DICOM", "PAT00001", "STU00001", "SER00001", "IMG00001")
    series_number: int
    instance_number: int

    @property
    def patient(self) -> str:
        return self.file_id[-4]

    @property
    def study(self) -> str:
        return self.file_id[-3]


def check_file_id(components: Sequence[str]) -> None:
    """Raise ValueError unless *components* is a File ID PS3.10 allows."""
    if not 1 <= len(components) <= MAX_COMPONENTS:
        raise ValueError(f"a File ID has 1 to {MAX_COMPONENTS} components, not {len(components)}")
    for part in components:
        if not 1 <= len(part) <= 8 or not set(part) <= _COMPONENT_CHARS:
            raise ValueError(f"File ID component {part!r}: 1-8 characters of A-Z, 0-9 and _")


def _has_value(ds: Dataset, keyword: str) -> bool:
    if keyword not in ds:
        return False
    value = ds[keyword].value
    return value not in (None, "", b"") and not (isinstance(value, list | MultiValue | DicomSequence) and not value)


def _plain_value(elem: DataElement) -> Any:
    """*elem*'s value as a fresh Python value: decoded text (written again
    in the record's own character set), sequences copied item by item."""
    value = elem.value
    if elem.VR == "SQ":
        return DicomSequence([_plain(item) for item in value])
    if elem.VR == "PN":
        if isinstance(value, MultiValue | list):
            return [PersonName(str(v)) for v in value]
        return PersonName(str(value)) if value is not None else ""
    if isinstance(value, MultiValue):
        return list(value)
    return value


def _plain(ds: Dataset) -> Dataset:
    """A copy of a sequence item, without private elements."""
    out = Dataset()
    for elem in ds:  # iterating decodes raw elements with the object's character set
        if elem.tag.is_private:
            continue
        out.add(DataElement(elem.tag, elem.VR, _plain_value(elem)))
    return out


def _first(ds: Dataset, keywords: Sequence[str], default: str) -> str:
    for keyword in keywords:
        if _has_value(ds, keyword):
            return str(ds[keyword].value)
    return default


def _invented(keyword: str, vr: str, ds: Dataset, place: Place) -> Any:
    """A value for the Type 1 key *keyword* the object has none for; None
    when nothing sensible can be made (the key is then left empty)."""
    made: dict[str, Any] = {
        "PatientID": place.patient, "StudyID": place.study, "SeriesNumber": place.series_number,
        "InstanceNumber": place.instance_number, "Modality": "OT", "CompletionFlag": "PARTIAL",
        "VerificationFlag": "UNVERIFIED",
    }
    if keyword in made:
        return made[keyword]
    if vr == "DA":
        return _first(ds, _DATES, "19000101")
    if vr == "TM":
        return _first(ds, _TIMES, "000000")
    if vr in ("CS", "SH", "LO"):
        return "UNNAMED"
    return None


def _key(record: Dataset, ds: Dataset, keyword: str, kind: str, place: Place) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    if _has_value(ds, keyword):
        elem = ds[keyword]
        vr = elem.VR if elem.VR not in ("UN", "") else dictionary_VR(tag)
        record.add(DataElement(tag, vr, _plain_value(elem)))
        return
    if kind in ("1C", "3"):
        return
    vr = dictionary_VR(tag)
    value = _invented(keyword, vr, ds, place) if kind == "1" else None
    if vr == "SQ":
        value = DicomSequence([])
    record.add(DataElement(tag, vr, value if value is not None else ""))


def _concept_modifiers(ds: Dataset) -> DicomSequence | None:
    """The document title's modifiers (top-level HAS CONCEPT MOD items): the
    SR and KO records' Content Sequence (1C), None when there are none."""
    items = [_plain(item) for item in ds.get("ContentSequence", []) or []
             if str(item.get("RelationshipType", "")).strip() == "HAS CONCEPT MOD"]
    return DicomSequence(items) if items else None


def _sr_keys(record: Dataset, ds: Dataset) -> None:
    """Verification DateTime (1C: of the latest verification of a VERIFIED
    document) and the Content Sequence of the title's modifiers (1C)."""
    if str(record.get("VerificationFlag", "")).strip() == "VERIFIED":
        times = [str(o.VerificationDateTime) for o in ds.get("VerifyingObserverSequence", []) or []
                 if o.get("VerificationDateTime")]
        record.VerificationDateTime = max(times) if times else f"{record.ContentDate}{record.ContentTime}"
    modifiers = _concept_modifiers(ds)
    if modifiers is not None:
        record.ContentSequence = modifiers


def _text_values(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _text_values(item)
        elif isinstance(elem.value, str | PersonName):
            yield str(elem.value)
        elif isinstance(elem.value, list | MultiValue):
            yield from (str(v) for v in elem.value if isinstance(v, str | PersonName))


def make_record(kind: str, ds: Dataset, place: Place, meta: Dataset | None = None) -> Dataset:
    """The directory record of type *kind* for the object whose header is
    *ds*; a leaf record (with *meta*, the file's File Meta) references the
    file at *place*."""
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    if meta is not None:
        check_file_id(place.file_id)
        record.ReferencedFileID = list(place.file_id)
        record.ReferencedSOPClassUIDInFile = meta.MediaStorageSOPClassUID
        record.ReferencedSOPInstanceUIDInFile = meta.MediaStorageSOPInstanceUID
        record.ReferencedTransferSyntaxUIDInFile = meta.TransferSyntaxUID
    for keyword, key_type in KEYS[kind]:
        _key(record, ds, keyword, key_type, place)
    if kind == "SR DOCUMENT":
        _sr_keys(record, ds)
    elif kind == "KEY OBJECT DOC" and (modifiers := _concept_modifiers(ds)) is not None:
        record.ContentSequence = modifiers
    if any(not text.isascii() for text in _text_values(record)):
        record.SpecificCharacterSet = UTF8
    return record


def encode_record(record: Dataset) -> bytes:
    """*record* as a sequence item of defined length, Explicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, record)
    body = buffer.getvalue()
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


# Where a record's two offsets are in its encoded item: the item header (8
# bytes), then (0004,1400) UL, (0004,1410) US, (0004,1420) UL, each with an
# explicit VR header of 8 bytes.
_NEXT_AT, _LOWER_AT = 16, 38
_NEXT_TAG, _LOWER_TAG = struct.pack("<HH", 0x0004, 0x1400), struct.pack("<HH", 0x0004, 0x1420)


@dataclass
class _Node:
    data: bytes
    summary: dict[str, str] = field(default_factory=dict)
    children: dict[str, _Node] = field(default_factory=dict)
    files: int = 0
    offset: int = 0


_SUMMARY = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": ("StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "StudyInstanceUID"),
    "SERIES": ("Modality", "SeriesDescription"),
}


def _summary(record: Dataset, kind: str, header: Dataset) -> dict[str, str]:
    """What README.TXT says of a folder: the record's values, but none the
    directory invented (a de-identified study's date is not 1900-01-01)."""
    return {k: str(record.get(k, "") or "") if _has_value(header, k) else "" for k in _SUMMARY[kind]}


@dataclass(frozen=True)
class Entry:
    """A file's records, prepared (:meth:`FileSet.prepare`)."""

    place: Place
    folders: list[tuple[bytes, dict[str, str]] | None]  # patient, study, series: a new folder's record
    leaf: bytes


class FileSet:
    """The directory of a file-set being written: a record per file added
    (and per patient, study and series folder), the DICOMDIR at the end."""

    def __init__(self) -> None:
        self._patients: dict[str, _Node] = {}
        self.files = 0

    def add(self, place: Place, header: Dataset) -> None:
        """Record the file at *place* whose header (File Meta included, as
        read back from the file) is *header*."""
        self.commit(self.prepare(place, header))

    def prepare(self, place: Place, header: Dataset) -> Entry:
        """The records of a file about to be published (its own, and its
        folders' where they are new), kept out of the directory until
        :meth:`commit`: a file that fails to be published is not listed."""
        meta = header.file_meta
        kind = record_type(str(meta.get("MediaStorageSOPClassUID", "") or header.get("SOPClassUID", "")),
                           str(header.get("Modality", "") or ""))
        folders: list[tuple[bytes, dict[str, str]] | None] = []
        level: dict[str, _Node] | None = self._patients
        for name, upper in zip(place.file_id[-4:-1], ("PATIENT", "STUDY", "SERIES"), strict=True):
            node = level.get(name) if level is not None else None
            if node is None:
                record = make_record(upper, header, place)
                folders.append((encode_record(record), _summary(record, upper, header)))
            else:
                folders.append(None)
            level = node.children if node is not None else None
        return Entry(place, folders, encode_record(make_record(kind, header, place, meta)))

    def commit(self, entry: Entry) -> None:
        """List the file of *entry* (and its new folders) in the directory."""
        level = self._patients
        for name, folder in zip(entry.place.file_id[-4:-1], entry.folders, strict=True):
            node = level.get(name)
            if node is None:
                if folder is None:  # prepared while another file made the folder, now gone: cannot happen
                    raise AssertionError(f"no record for folder {name}")
                node = level[name] = _Node(*folder)
            node.files += 1
            level = node.children
        level[entry.place.file_id[-1]] = _Node(entry.leaf)
        self.files += 1

    def patients(self) -> Iterator[tuple[dict[str, str], list[tuple[dict[str, str], int, list[str]]]]]:
        """What is on the media, for its README: each patient's summary with,
        per study, its summary, file count and series modalities."""
        for patient in self._patients.values():
            studies = [(study.summary, study.files,
                        list(dict.fromkeys(s.summary["Modality"] for s in study.children.values())))
                       for study in patient.children.values()]
            yield patient.summary, studies

    def _depth_first(self, level: dict[str, _Node]) -> Iterator[_Node]:
        for node in level.values():
            yield node
            yield from self._depth_first(node.children)

    def dicomdir(self, fileset_id: str, source_ae: str = "") -> bytes:
        """The DICOMDIR: File Meta, the root directory's offsets and every
        record, linked (next sibling, first child) by byte offset."""
        meta = file_meta_bytes(MEDIA_STORAGE_DIRECTORY, generate_uid(), ExplicitVRLittleEndian, source_ae)
        head = _root_elements(fileset_id, 0, 0)
        start = len(meta) + len(head) + 12  # + the Directory Record Sequence's element header
        nodes = list(self._depth_first(self._patients))
        position = start
        for node in nodes:
            node.offset = position
            position += len(node.data)
        if position >= 0xFFFFFFFF:
            raise ValueError("too many records for one DICOMDIR")
        first = nodes[0].offset if nodes else 0
        last = list(self._patients.values())[-1].offset if self._patients else 0
        sequence = struct.pack("<HH2sHI", 0x0004, 0x1220, b"SQ", 0, position - start)
        return b"".join([meta, _root_elements(fileset_id, first, last), sequence, *_linked_records(self._patients)])


def _linked_records(level: dict[str, _Node]) -> Iterator[bytes]:
    """The records of *level* and below, depth first (the order their
    offsets were given in), each linked to its next sibling and first child."""
    siblings = list(level.values())
    for index, node in enumerate(siblings):
        yield _linked(node, siblings[index + 1] if index + 1 < len(siblings) else None)
        yield from _linked_records(node.children)


def _linked(node: _Node, next_sibling: _Node | None) -> bytes:
    data = bytearray(node.data)
    if data[8:12] != _NEXT_TAG or data[30:34] != _LOWER_TAG:
        raise AssertionError("directory record laid out unexpectedly")
    lower = next(iter(node.children.values())).offset if node.children else 0
    struct.pack_into("<I", data, _NEXT_AT, next_sibling.offset if next_sibling else 0)
    struct.pack_into("<I", data, _LOWER_AT, lower)
    return bytes(data)


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _root_elements(fileset_id: str, first: int, last: int) -> bytes:
    """File-set ID, the root directory's first and last record offsets and
    the File-set Consistency Flag (0: no known inconsistencies)."""
    fid = fileset_id.encode("ascii")
    fid += b" " * (len(fid) % 2)
    return b"".join([
        _short(0x0004, 0x1130, b"CS", fid),
        _short(0x0004, 0x1200, b"UL", struct.pack("<I", first)),
        _short(0x0004, 0x1202, b"UL", struct.pack("<I", last)),
        _short(0x0004, 0x1212, b"US", struct.pack("<H", 0)),
    ])


def fileset_id(text: str) -> str:
    """*text* as a File-set ID (CS, at most 16 characters: A-Z, 0-9, space, _)."""
    cleaned = "".join(c if c in _COMPONENT_CHARS or c == " " else "_" for c in text.upper()).strip()
    return cleaned[:16].strip() or "FILMLESS"
