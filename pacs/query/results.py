"""Query results as datasets: the shape C-FIND answers and QIDO-RS returns."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
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


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        return
    if vr == "SQ":
        setattr(ds, keyword, Sequence([]))
    elif value is None or value == "":
        setattr(ds, keyword, None)
    elif keyword == "ModalitiesInStudy":
        ds.ModalitiesInStudy = [m for m in str(value).split("\\") if m]
    elif vr in ("US", "UL", "SS", "SL"):
        setattr(ds, keyword, int(value))
    elif vr == "IS":
        setattr(ds, keyword, str(int(value)))
    else:
        setattr(ds, keyword, str(value))


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
