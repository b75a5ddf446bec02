"""DICOM JSON (PS3.18 F.2) from datasets, with BulkDataURIs for binary values."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

# Binary values larger than this become BulkDataURIs instead of inline base64.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def to_json(
    ds: Dataset,
    *,
    drop: Iterable[str] = (),
    bulk_uri: Callable[[DataElement], str] | None = None,
) -> dict[str, Any]:
    """The dataset as a DICOM JSON object; *drop* removes keywords first."""
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    if bulk_uri is None:
        return ds.to_json_dict()
    return ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk_uri)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON (names stay readable, not \\u-escaped)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def is_binary(elem: DataElement) -> bool:
    return elem.VR in _BINARY_VRS


class NotDirect(ValueError):
    """A value pydicom's DICOM JSON writer should convert."""


_NUMBER_VRS = {"IS", "US", "UL", "SS", "SL"}
# Text VRs that never hold several values (no backslash splitting).
_SINGLE_TEXT_VRS = {"LT", "ST", "UT"}


def _json_value(vr: str, value: Any) -> list[Any]:
    if vr in _NUMBER_VRS:
        return [int(value)]
    if isinstance(value, list):
        texts = value
    else:
        texts = [str(value)]
        if "\\" in texts[0] and vr not in _SINGLE_TEXT_VRS:
            raise NotDirect("several values in one")
    if vr == "PN":
        if any("=" in t for t in texts):
            raise NotDirect("person name with ideographic or phonetic groups")
        return [{"Alphabetic": t} for t in texts]
    if vr not in _TEXT_JSON_VRS:
        raise NotDirect(f"{vr} value")
    return list(texts)


_TEXT_JSON_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def _element_json(vr: str, value: Any) -> dict[str, Any]:
    if vr == "SQ":
        return {"vr": "SQ", "Value": [
            {f"{tag:08X}": _element_json(item_vr, item_value or None) for tag, item_vr, item_value in elements}
            for elements in value or []
        ]}
    if value is None or value == [] or value == "":
        return {"vr": vr}
    return {"vr": vr, "Value": _json_value(vr, value)}


def values_json(values: Iterable[tuple[int, str, Any]]) -> dict[str, Any]:
    """DICOM JSON of (tag, VR, value) triples in tag order, as pydicom's
    ``to_json_dict`` writes the same values (text, numbers, person names
    without ideographic groups, sequences of such); raises
    :class:`NotDirect` for anything else. Builds no Dataset: ~10x faster
    for QIDO-RS answers of many matches."""
    return {f"{tag:08X}": _element_json(vr, value) for tag, vr, value in values}
