"""DICOM JSON (PS3.18 F.2) from datasets, with BulkDataURIs for binary values."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

log = logging.getLogger(__name__)

# Binary values larger than this become BulkDataURIs instead of inline base64.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# Where an element sits in a dataset: (sequence tag, item index)* then its
# own tag, e.g. (0x54000100, 1, 0x54001010) for WaveformData of the second
# WaveformSequence item; (tag,) at the top level.
ElementPath = tuple[int, ...]
BulkURI = Callable[[DataElement, ElementPath], str]


def to_json(
    ds: Dataset,
    *,
    drop: Iterable[str] = (),
    bulk_uri: BulkURI | None = None,
) -> dict[str, Any]:
    """The dataset as a DICOM JSON object; *drop* removes keywords first.

    Binary values above :data:`BULK_THRESHOLD` get ``bulk_uri(element,
    path)`` as their BulkDataURI (inline base64 without *bulk_uri*); *path*
    locates nested elements (sequence tag, item index, ..., tag) so each
    BulkDataURI names one value. A value that cannot be written (an IS of
    '1A', a DS of 'abc') does not fail the whole answer: an invalid number
    is null among valid ones, an element with no valid value is sent
    without Value, and a warning is logged (PS3.18 F.2.5 allows an element
    without a value)."""
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    return _dataset_json(ds, (), bulk_uri)


def _dataset_json(ds: Dataset, parent: ElementPath, bulk_uri: BulkURI | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in ds.keys():
        try:
            elem = ds[tag]
        except Exception as exc:  # a raw value pydicom cannot even convert
            vr = getattr(ds.get_item(tag), "VR", None)
            _warn(tag, parent, str(vr), exc)
            if vr:
                out[f"{tag:08X}"] = {"vr": str(vr)}
            continue
        out[f"{tag:08X}"] = _element_to_json(elem, (*parent, int(tag)), bulk_uri)
    return out


def _element_to_json(elem: DataElement, path: ElementPath, bulk_uri: BulkURI | None) -> dict[str, Any]:
    if elem.VR == "SQ":
        return {"vr": "SQ", "Value": [
            _dataset_json(item, (*path, index), bulk_uri) for index, item in enumerate(elem.value or [])
        ]}
    if elem.VR == "PN" and not elem.is_empty:
        return _pn_json(elem)
    handler = None if bulk_uri is None else (lambda e: bulk_uri(e, path))
    try:
        out = elem.to_json_dict(bulk_data_element_handler=handler, bulk_data_threshold=BULK_THRESHOLD)
    except Exception as exc:
        _warn(elem.tag, path[:-1], elem.VR, exc)
        return _lenient_json(elem)
    values = out.get("Value")
    if values and elem.VR != "SQ":
        out["Value"] = [_json_safe(elem.VR, v) for v in values]
    return out


# JSON has no number for these (RFC 8259 section 6): Python's json writes the
# bare words NaN and Infinity, which JSON.parse in a browser (OHIF) rejects,
# taking the whole study's metadata with them. FL and FD may hold them
# (IEEE 754); they are written as these strings, as Azure's DICOM service
# does and fo-dicom and dicom-rs read back.
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_safe(vr: str, value: Any) -> Any:
    """One value of a Value array as valid JSON: an empty one in a
    multi-valued element is null (PS3.18 F.2.5), a non-finite FL/FD the
    string naming it, a non-finite DS (not a valid DS) null."""
    if value == "":
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE[repr(value)] if vr in ("FL", "FD") else None
    return value


def _pn_json(elem: DataElement) -> dict[str, Any]:
    """A person name element as pydicom writes it, but an empty value among
    several is null (PS3.18 F.2.5): pydicom raised on it, and the element
    lost every name ("SMITH^J\\" as Operators' Name had no Value)."""
    names = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    values: list[dict[str, str] | None] = []
    for name in names:
        groups = getattr(name, "components", None) or ()
        if not any(groups):
            values.append(None)
            continue
        value = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            value["Ideographic"] = groups[1]
        if len(groups) > 2:
            value["Phonetic"] = groups[2]
        values.append(value)
    return {"vr": "PN", "Value": values}


def _warn(tag: int, parent: ElementPath, vr: str, exc: Exception) -> None:
    # The value itself is not logged: it may identify the patient.
    where = "".join(f"({t:08X})[{i}]" for t, i in zip(parent[::2], parent[1::2], strict=True))
    log.warning("DICOM JSON: invalid %s value of %s(%08X) left out (%s)", vr, where, tag, type(exc).__name__)


def _lenient_json(elem: DataElement) -> dict[str, Any]:
    """*elem* without the values that cannot be written: for IS and DS the
    valid numbers stay (an invalid one is null, so positions keep their
    meaning); otherwise the element has no Value."""
    out: dict[str, Any] = {"vr": elem.VR}
    if elem.VR not in ("IS", "DS"):
        return out
    raw = elem.value
    values = list(raw) if isinstance(raw, (list, tuple, MultiValue)) else [raw]
    numbers = [_number(elem.VR, v) for v in values]
    if any(n is not None for n in numbers):
        out["Value"] = numbers
    return out


def _number(vr: str, value: Any) -> int | float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if vr == "IS":  # as pydicom writes them: IS an int, DS a float
        return int(number) if number.is_integer() else None
    return number


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
        try:
            return [int(value)]
        except (TypeError, ValueError):
            # Not a number ("abc" from a malformed object): the Dataset path
            # writes the element without it.
            raise NotDirect(f"{vr} value that is not a number") from None
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
