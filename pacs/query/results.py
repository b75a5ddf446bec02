"""Query results as datasets: the shape C-FIND answers and QIDO-RS returns."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .attributes import UNIQUE_KEY, Level


def result_dataset(level: Level, returns: list[str], row: dict[str, Any], ae_title: str) -> Dataset:
    """One match as a dataset: every requested key, filled from the index.

    C-FIND sends it as a pending response; QIDO-RS turns it into DICOM JSON.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level.value
    keys = list(dict.fromkeys([*returns, UNIQUE_KEY[level]]))
    for depth_level in Level:
        if depth_level.depth < level.depth and depth_level is not Level.PATIENT:
            keys.append(UNIQUE_KEY[depth_level])
    for keyword in dict.fromkeys(keys):
        value = row.get(keyword)
        if keyword == "OtherPatientIDsSequence":
            ds.OtherPatientIDsSequence = other_ids_sequence(value or [])
            continue
        _set(ds, keyword, value)
    ds.RetrieveAETitle = ae_title
    ds.InstanceAvailability = "ONLINE"
    return ds


@lru_cache(maxsize=512)
def _tag_and_vr(keyword: str) -> tuple[int, str] | None:
    tag = tag_for_keyword(keyword)
    return None if tag is None else (tag, dictionary_VR(tag))


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    known = _tag_and_vr(keyword)
    if known is None:
        return
    tag, vr = known
    if vr == "SQ":
        value = Sequence([])
    elif value is None or value == "":
        value = None
    elif keyword == "ModalitiesInStudy":
        value = [m for m in str(value).split("\\") if m]
    elif vr in ("US", "UL", "SS", "SL"):
        value = int(value)
    elif vr == "IS":
        value = str(int(value))
    else:
        value = str(value)
    # Values come from the index, validated when the object was received:
    # checking each again on the way out was a fifth of a C-FIND match's cost.
    ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)


def other_ids_sequence(others: list[dict[str, str]]) -> Sequence:
    """Other Patient IDs Sequence items (citizen ID, insurance number...)."""
    items = []
    for other in others:
        item = Dataset()
        item.PatientID = other["PatientID"]
        item.IssuerOfPatientID = other["IssuerOfPatientID"]
        item.TypeOfPatientID = other["TypeOfPatientID"] or "TEXT"
        items.append(item)
    return Sequence(items)
