"""The retrieval core shared by C-MOVE, C-GET (and WADO-RS): which stored
objects a request names, and each one ready to send in a syntax the peer
accepts -- as stored when it can, decompressed when it must."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from .app import Pacs
from .index.models import Correction
from .index.reconcile import PATIENT_COLUMNS, STUDY_COLUMNS
from .query import Level, Query, build_select
from .query.attributes import instances, patients, studies
from .query.results import as_written

log = logging.getLogger(__name__)
corrections = Correction.__table__

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class RetrieveItem:
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    storage_key: str
    size: int
    study_uid: str = ""
    series_uid: str = ""
    sha256: str = ""
    frames: int | None = None
    pixel_offset: int | None = None
    # Attribute values the index corrected (HIS reconciliation, merges):
    # applied to the object on the way out; the stored bytes stay as received.
    overrides: tuple[tuple[str, str], ...] = ()
    # The image's size as indexed (None: no pixel data, or not known).
    rows: int | None = None
    columns: int | None = None


class TranscodeError(Exception):
    """The object cannot be converted to any syntax the peer accepts."""


def resolve(pacs: Pacs, level: Level, match: dict[str, str], *, limit: int | None = None) -> list[RetrieveItem]:
    """Every stored instance under the entities that *match* names."""
    # Withdrawn studies too: a retrieve names what it wants (and routing sends a rejection note by its UID alone).
    stmt, _ = build_select(Query(Level.IMAGE, {k: v for k, v in match.items() if v}, other_ids=False, withdrawn=True))
    stmt = stmt.add_columns(
        studies.c.pk.label("_study_pk"),
        instances.c.storage_key,
        instances.c.size_bytes,
        instances.c.sha256,
        instances.c.pixel_offset,
        instances.c.transfer_syntax_uid.label("_ts"),
    ).order_by(instances.c.series_pk, instances.c.instance_number, instances.c.pk)
    if limit is not None:
        stmt = stmt.limit(limit)
    with pacs.engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
        overrides = corrected_values(conn, {r["_study_pk"] for r in rows})
    return [
        RetrieveItem(
            sop_uid=r["SOPInstanceUID"],
            sop_class_uid=r["SOPClassUID"],
            transfer_syntax_uid=r["_ts"],
            storage_key=r["storage_key"],
            size=r["size_bytes"],
            study_uid=r["StudyInstanceUID"],
            series_uid=r["SeriesInstanceUID"],
            sha256=r["sha256"],
            frames=r["NumberOfFrames"],
            pixel_offset=r["pixel_offset"],
            overrides=overrides.get(r["_study_pk"], ()),
            rows=r["Rows"],
            columns=r["Columns"],
        )
        for r in rows
    ]


def corrected_values(conn: Any, study_pks: set[int]) -> dict[int, tuple[tuple[str, str], ...]]:
    """For studies with recorded corrections: the index's current value of
    each corrected attribute (the HIS may have changed it again since)."""
    if not study_pks:
        return {}
    rows = conn.execute(
        select(corrections.c.study_pk, corrections.c.keyword,
               *(patients.c[column] for column in PATIENT_COLUMNS.values()),
               *(studies.c[column] for column in STUDY_COLUMNS.values()))
        .join(studies, studies.c.pk == corrections.c.study_pk)
        .join(patients, patients.c.pk == studies.c.patient_pk)
        .where(corrections.c.study_pk.in_(study_pks))
    ).all()
    result: dict[int, dict[str, str]] = {}
    for row in rows:
        column = STUDY_COLUMNS.get(row.keyword) or PATIENT_COLUMNS[row.keyword]
        value = getattr(row, column)
        result.setdefault(row.study_pk, {})[row.keyword] = value
    return {pk: tuple(sorted(values.items())) for pk, values in result.items()}


def apply_overrides(ds: Dataset, overrides: tuple[tuple[str, str], ...]) -> Dataset:
    """Set corrected values on a dataset about to leave the archive."""
    if not overrides:
        return ds
    charset = ds.get("SpecificCharacterSet")
    needs_unicode = any(not v.isascii() for _, v in overrides)
    if needs_unicode and charset != "ISO_IR 192":
        # Re-encode every text value in UTF-8, not only the corrected ones.
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in overrides:
        # Patient's Sex "Nữ" as received (CS, see as_written).
        setattr(ds, keyword, as_written(dictionary_VR(keyword), value))
    return ds


def read_dataset(pacs: Pacs, item: RetrieveItem) -> Dataset:
    """The stored object as a dataset whose untouched elements re-encode to
    exactly the stored bytes (pydicom writes raw elements verbatim)."""
    # From a file (a local copy of a remote object): no bytes copy of the
    # whole object besides the dataset's own values.
    with pacs.store.local_path(item.storage_key) as path:
        return dcmread(path)


def for_peer(pacs: Pacs, item: RetrieveItem, accepted: set[tuple[str, str]]) -> Dataset:
    """The dataset in a syntax the peer accepted for its SOP class.

    As stored when possible; a compressed object the peer cannot take is
    decoded (pydicom + pylibjpeg) to explicit or implicit VR little endian.
    Uncompressed-to-uncompressed conversions are left to pynetdicom.
    """
    ds = apply_overrides(read_dataset(pacs, item), item.overrides)
    stored = UID(item.transfer_syntax_uid)
    if (item.sop_class_uid, str(stored)) in accepted or not stored.is_compressed:
        return ds
    target = next((ts for ts in UNCOMPRESSED if (item.sop_class_uid, str(ts)) in accepted), None)
    if target is None:
        raise TranscodeError(f"peer accepts no usable syntax for {item.sop_class_uid}")
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # unsupported codec, corrupt stream
        raise TranscodeError(f"cannot decompress {item.sop_uid}: {exc}") from exc
    if target == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        # Decoded as Explicit VR: pynetdicom refused to send a dataset whose
        # encoding differs from its file meta, and the instance was lost to
        # an Implicit-only destination.
        ds.set_original_encoding(True, True)
    return ds


def contexts_for(items: Iterable[RetrieveItem], limit: int = 128) -> list[tuple[str, list[str]]]:
    """Presentation contexts to propose to a move destination: each stored
    syntax as is, plus an uncompressed fallback per SOP class."""
    wanted: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    sop_classes: list[str] = []
    for item in items:
        if item.sop_class_uid not in sop_classes:
            sop_classes.append(item.sop_class_uid)
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in seen:
            # The stored syntax alone, so a peer that takes it gets the
            # stored bytes as they are (uncompressed ones too: no re-encode).
            seen.add(key)
            wanted.append((item.sop_class_uid, [item.transfer_syntax_uid]))
    fallback = [(sc, [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]) for sc in sop_classes]
    # Fallbacks first: every SOP class must be sendable even if the list is cut.
    return (fallback + wanted)[:limit]
