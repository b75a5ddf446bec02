"""Query results as datasets: the shape C-FIND answers and QIDO-RS returns.

A :class:`ResultShape` is worked out once per query (which attributes, in
tag order, with their VRs); each match then only converts its index values.
C-FIND encodes those values straight to bytes
(:mod:`dicom_scp.find_responses`), QIDO-RS and the fallback build a
:class:`~pydicom.dataset.Dataset` from the very same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ..names import ascii_text
from .attributes import UNIQUE_KEY, Level

# An item of Other Patient IDs Sequence: (tag, VR, value) in tag order.
ItemElements = list[tuple[int, str, str]]
# A converted value: None (empty), text, a number, several texts (ModalitiesInStudy)
# or sequence items.
Value = None | str | int | list[str] | list[ItemElements]

@dataclass(frozen=True)
class ResultField:
    """One attribute of every answer to a query."""

    keyword: str
    tag: int
    vr: str
    # Set for attributes that are the same in every answer (character set,
    # level, retrieve AE title, availability).
    constant: Value = None
    is_constant: bool = False


@lru_cache(maxsize=512)
def _tag_and_vr(keyword: str) -> tuple[int, str] | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else (tag, dictionary_VR(tag))


class ResultShape:
    """The attributes of one query's answers, in tag order.

    Every requested key (filled from the index, empty when the index does
    not hold it), the unique keys of the level and those above it, and the
    attributes C-FIND responses carry (PS3.4 C.4.1.1.3.2).
    """

    def __init__(self, level: Level, returns: list[str], ae_title: str, *, ascii_only: bool = False) -> None:
        # *ascii_only*: for a peer that reads no other character set
        # (pacs.aes.RemoteAE.ascii_only): text without diacritics, and no
        # Specific Character Set (the default repertoire).
        self.ascii_only = ascii_only
        keys = list(dict.fromkeys([*returns, UNIQUE_KEY[level]]))
        for depth_level in Level:
            if depth_level.depth < level.depth and depth_level is not Level.PATIENT:
                keys.append(UNIQUE_KEY[depth_level])
        constants = {
            "SpecificCharacterSet": "ISO_IR 192",
            "QueryRetrieveLevel": level.value,
            "RetrieveAETitle": ae_title,
            "InstanceAvailability": "ONLINE",
        }
        if ascii_only:
            del constants["SpecificCharacterSet"]
        fields: dict[int, ResultField] = {}
        for keyword in dict.fromkeys(keys):
            known = _tag_and_vr(keyword)
            if known is not None and keyword not in constants:
                fields[known[0]] = ResultField(keyword, known[0], known[1])
        for keyword, value in constants.items():
            tag, vr = _tag_and_vr(keyword)  # type: ignore[misc]
            fields[tag] = ResultField(keyword, tag, vr, value, True)
        self.fields: list[ResultField] = [fields[tag] for tag in sorted(fields)]

    def value(self, field: ResultField, row: dict[str, Any]) -> Value:
        """*field*'s value for the match *row*, converted for its VR."""
        value = field.constant if field.is_constant else convert_value(field, row.get(field.keyword))
        return in_ascii(field.vr, value) if self.ascii_only else value

    def values(self, row: dict[str, Any]) -> list[tuple[ResultField, Value]]:
        """Each field with the match's value, converted for its VR."""
        return [(f, self.value(f, row)) for f in self.fields]

    def dataset(self, row: dict[str, Any], *, wire: bool = False) -> Dataset:
        """One match as a dataset (QIDO-RS turns it into DICOM JSON; *wire*:
        to be encoded by pydicom, see :func:`as_written`)."""
        ds = Dataset()
        for field, value in self.values(row):
            if field.vr == "SQ":
                value = Sequence([_item(elements) for elements in value or []])  # type: ignore[union-attr]
            elif wire:
                value = as_written(field.vr, value)
            # Values come from the index, validated when the object was
            # received: checking each again was a fifth of a match's cost.
            ds[field.tag] = DataElement(field.tag, field.vr, value, validation_mode=config.IGNORE)
        return ds


# VRs pydicom writes in the data set's character set; the others (the
# default repertoire: CS, DA, UI...) it writes as Latin-1.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def as_written(vr: str, value: Value) -> Value:
    """*value* of *vr* as pydicom must be given it to write it in a data set
    of ISO_IR 192 (every answer's, and the archive's own objects').

    Non-ASCII text in a default-repertoire VR is invalid (PS3.5 6.1.2.3) but
    kept as it was received, in the sender's character set (Patient's Sex
    "Nữ", see :mod:`pacs.header`); pydicom cannot write it but as Latin-1,
    so it is given the value's UTF-8 bytes, each as the Latin-1 character
    written as that byte: the peer reads the text as it was received."""
    if vr in _CHARSET_VRS:
        return value
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8").decode("latin-1")
    if isinstance(value, list):
        return [as_written(vr, v) if isinstance(v, str) else v for v in value]  # type: ignore[misc]
    return value


def in_ascii(vr: str, value: Value) -> Value:
    """*value* of *vr* in the default repertoire (:func:`pacs.names.ascii_text`),
    a sequence's items' values too."""
    if isinstance(value, str):
        return value if value.isascii() else ascii_text(value, person_name=vr == "PN")
    if vr == "SQ":
        return [[(tag, item_vr, in_ascii(item_vr, v)) for tag, item_vr, v in item]  # type: ignore[misc]
                for item in value or []]  # type: ignore[union-attr]
    if isinstance(value, list):
        return [in_ascii(vr, v) for v in value]  # type: ignore[misc]
    return value


# Index values holding several values, backslash-separated.
_MULTI_VALUED = frozenset({"ModalitiesInStudy", "OtherPatientIDs", "SOPClassesInStudy"})


def convert_value(field: ResultField, value: Any) -> Value:
    """An index value as *field*'s answer value (None: empty)."""
    vr = field.vr
    if vr == "SQ":
        if field.keyword == "OtherPatientIDsSequence":
            return [other_id_elements(other) for other in value or []]
        return []  # a sequence we do not index: returned empty
    if value is None or value == "":
        return None
    if field.keyword in _MULTI_VALUED:
        return [m for m in str(value).split("\\") if m]
    if vr in ("US", "UL", "SS", "SL"):
        return int(value)
    if vr == "IS":
        return str(int(value))
    return str(value)


_PATIENT_ID, _ISSUER, _ID_TYPE = 0x00100020, 0x00100021, 0x00100022


# Type of Patient ID (0010,0022) defined terms (PS3.3 C.2.2.1.1). The stored
# type is HL7's CX-5 code (NI citizen ID, HC insurance...), which a modality
# would read as an invalid CS value; it says what the ID is, not its medium.
_DICOM_ID_TYPES = ("TEXT", "RFID", "BARCODE")


def dicom_id_type(stored: str) -> str:
    """The Type of Patient ID to send for a stored identifier type."""
    return stored if stored in _DICOM_ID_TYPES else "TEXT"


def other_id_elements(other: dict[str, str]) -> ItemElements:
    """An Other Patient IDs Sequence item (citizen ID, insurance number...)."""
    return [
        (_PATIENT_ID, "LO", other["PatientID"]),
        (_ISSUER, "LO", other["IssuerOfPatientID"]),
        (_ID_TYPE, "CS", dicom_id_type(other["TypeOfPatientID"])),
    ]


def _item(elements: ItemElements) -> Dataset:
    item = Dataset()
    for tag, vr, value in elements:
        item[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    return item


def other_ids_sequence(others: list[dict[str, str]]) -> Sequence:
    """Other Patient IDs Sequence items (citizen ID, insurance number...)."""
    return Sequence([_item(other_id_elements(other)) for other in others])
