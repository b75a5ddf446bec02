"""``pacs compress``: transcode uncompressed stored images to a lossless codec.

For each indexed image in an uncompressed transfer syntax (explicit or
implicit VR little endian, explicit big endian): decode the stored object,
encode it in JPEG-LS lossless (pyjpegls) or JPEG 2000 lossless (openjpeg),
decode the result again and compare the pixel arrays exactly; only then the
new object replaces the stored one, through the ingest path with overwrite
semantics (same key, same SOP Instance UID since the pixels are identical;
the index row gets the new size, sha256 and transfer syntax, the study and
series byte counters follow by trigger; the row's provenance is kept).

Skipped and reported: objects without Pixel Data (non-image), pixel formats
the codec cannot encode (e.g. 1-bit, 32-bit), encodings that would not be
smaller, and any verification mismatch. One object is in memory at a time.

Resuming is free: a replaced object's row no longer has an uncompressed
syntax. If a crash came between the object replace and the index commit,
the rerun finds the object already compressed and only re-indexes it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from sqlalchemy import select

from storage import StorageError

from ..app import Pacs
from ..errors import IngestError
from ..index.committer import GroupCommitter
from ..index.writer import IndexWriter
from ..ingest import Ingestor, Origin
from ..part10 import FileSource
from ..transcode import convert_dataset
from .common import (
    BATCH,
    Capped,
    NullProgress,
    Progress,
    count_rows,
    instances_t,
    series_t,
    studies_t,
)

log = logging.getLogger(__name__)

CODECS = {"jpeg-ls": JPEGLSLossless, "j2k": JPEG2000Lossless}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


@dataclass
class CompressReport:
    codec: str
    transfer_syntax: str
    candidates: int = 0
    compressed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    reindexed: int = 0
    skipped: dict[str, Capped] = field(default_factory=dict)
    failed: Capped = field(default_factory=Capped)

    def skip(self, reason: str, sop_uid: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, Capped()).add({"sop_uid": sop_uid, "detail": detail})

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def as_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "transfer_syntax": self.transfer_syntax,
            "candidates": self.candidates,
            "compressed": self.compressed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_saved": self.saved,
            "reindexed": self.reindexed,
            "skipped": {reason: c.as_dict() for reason, c in sorted(self.skipped.items())},
            "failed": self.failed.as_dict(),
        }


def _candidates(pacs: Pacs, study_uids: list[str] | None) -> Iterator[Any]:
    columns = (
        instances_t.c.pk, instances_t.c.sop_uid, instances_t.c.storage_key, instances_t.c.size_bytes,
        instances_t.c.source, instances_t.c.calling_ae, instances_t.c.remote_host,
    )
    where = [instances_t.c.transfer_syntax_uid.in_([str(u) for u in UNCOMPRESSED]), instances_t.c.rows.isnot(None)]
    last_pk = 0
    while True:
        stmt = select(*columns).where(instances_t.c.pk > last_pk, *where)
        if study_uids:
            stmt = (
                stmt.join(series_t, series_t.c.pk == instances_t.c.series_pk)
                .join(studies_t, studies_t.c.pk == series_t.c.study_pk)
                .where(studies_t.c.study_uid.in_(study_uids))
            )
        with pacs.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(instances_t.c.pk).limit(BATCH)).all()
        if not rows:
            return
        yield from rows
        last_pk = rows[-1].pk


def _remove_stale(tmp_dir: Path, age: float = 3600.0) -> None:
    """Encoded files an interrupted run left behind (an hour old: not a
    concurrent run's)."""
    now = time.time()
    for path in tmp_dir.glob("compress-*.dcm"):
        try:
            if now - path.stat().st_mtime > age:
                path.unlink()
        except FileNotFoundError:
            continue


def _same_pixels(original: np.ndarray, path: Path) -> bool:
    decoded = dcmread(path).pixel_array
    return original.shape == decoded.shape and original.dtype == decoded.dtype and bool(np.array_equal(original, decoded))


def _native_length(ds: Any) -> int | None:
    """Bytes of native pixel data the image attributes describe (pydicom's
    count; None when the attributes do not say)."""
    from pydicom.pixels.utils import get_expected_length

    try:
        return get_expected_length(ds, "bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _encode(src: Path, target: UID, tmp_dir: Path) -> tuple[str, Path | None, str]:
    """(state, path of the encoded object, detail); state is "encoded",
    "already" (the stored object is compressed already) or a skip reason."""
    ds = dcmread(src)
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        return "already", None, str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds:
        return "not an image", None, "no Pixel Data"
    expected = _native_length(ds)
    if expected is not None and len(ds.PixelData) not in (expected, expected + 1):
        # Bytes beyond (or missing from) what the attributes describe would be lost.
        return "not encodable", None, f"Pixel Data is {len(ds.PixelData)} bytes, its attributes say {expected}"
    try:
        original = ds.pixel_array.copy()
        # The high-bit check, planar pixels interleaved (Planar Configuration
        # 0, as PS3.5 requires of JPEG-LS and JPEG 2000), the encoding.
        convert_dataset(ds, UID(ds.file_meta.TransferSyntaxUID), target)
    except Exception as exc:  # the codec refuses this pixel format
        return "not encodable", None, str(exc).splitlines()[0][:200]
    fd, name = tempfile.mkstemp(prefix="compress-", suffix=".dcm", dir=tmp_dir)
    os.close(fd)
    path = Path(name)
    try:
        ds.save_as(path, enforce_file_format=True)
        del ds
        if not _same_pixels(original, path):
            path.unlink()
            return "verification failed", None, "decoded pixels differ from the original"
    except Exception as exc:
        path.unlink(missing_ok=True)
        return "verification failed", None, str(exc)[:200]
    return "encoded", path, ""


def compress(
    pacs: Pacs,
    *,
    codec: str = "jpeg-ls",
    study_uids: list[str] | None = None,
    progress: Progress | None = None,
) -> CompressReport:
    """Losslessly compress stored uncompressed images (see module doc)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use {', '.join(CODECS)}")
    target = CODECS[codec]
    progress = progress or NullProgress()
    report = CompressReport(codec=codec, transfer_syntax=str(target))
    tmp_dir = Path(pacs.settings.data_dir) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(tmp_dir)
    # Replacing an instance is what the overwrite policy does: a second
    # ingestor with it, on its own committer, leaves the appliance's alone.
    committer = GroupCommitter(pacs.engine, IndexWriter(overwrite=True), batch_max=pacs.settings.commit_batch_max)
    ingestor = Ingestor(pacs.store, committer, pacs.reader, overwrite=True,
                        max_object_bytes=pacs.settings.max_object_bytes)
    where = [instances_t.c.transfer_syntax_uid.in_([str(u) for u in UNCOMPRESSED]), instances_t.c.rows.isnot(None)]
    progress.start(f"compressing ({codec})", count_rows(pacs.engine, instances_t, *where) if not study_uids else None)
    try:
        for row in _candidates(pacs, study_uids):
            report.candidates += 1
            progress.advance()
            try:
                _one(pacs, ingestor, row, target, tmp_dir, report)
            except (StorageError, IngestError, OSError) as exc:
                report.failed.add({"sop_uid": row.sop_uid, "key": row.storage_key, "detail": str(exc)})
    finally:
        committer.close()
    return report


def _one(pacs: Pacs, ingestor: Ingestor, row: Any, target: UID, tmp_dir: Path, report: CompressReport) -> None:
    origin = Origin(source=row.source or "compress", calling_ae=row.calling_ae, remote_host=row.remote_host)
    with pacs.store.local_path(row.storage_key) as stored:
        try:
            state, encoded, detail = _encode(stored, target, tmp_dir)
        except Exception as exc:  # unreadable by pydicom
            report.skip("unreadable", row.sop_uid, str(exc)[:200])
            return
        if state == "already":
            # A crash after the object was replaced, before the index knew.
            ingestor.ingest(FileSource(stored), origin, expected_sop_uid=row.sop_uid)
            report.reindexed += 1
            return
    if encoded is None:
        report.skip(state, row.sop_uid, detail)
        return
    try:
        new_size = encoded.stat().st_size
        if new_size >= row.size_bytes:
            report.skip("no gain", row.sop_uid, f"{new_size} >= {row.size_bytes} bytes")
            return
        result = ingestor.ingest(FileSource(encoded), origin, expected_sop_uid=row.sop_uid)
        report.compressed += 1
        report.bytes_before += row.size_bytes
        report.bytes_after += result.size
    finally:
        encoded.unlink(missing_ok=True)
