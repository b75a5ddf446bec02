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
