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
smaller, and any verification mismatch. One object is in memory at a time,
but several times over (the dataset, a copy of its pixels, the encoding, the
decoded check): objects above :data:`MAX_REENCODE_BYTES`, or more than a
sixth of the memory available, are left as they are ("too large to
re-encode in memory") rather than risk the OOM killer on a small server.

The new object goes under a key of its own (``<sop>.jls.dcm``,
``<sop>.j2k.dcm``), never over the received one: a server reading the
instance meanwhile (WADO-RS, C-GET, C-MOVE) looked its row up before the
replacement and streams the object that row describes, its size and its
transfer syntax (writing over it served JPEG-LS bytes labelled Explicit VR
Little Endian, and ended C-GETs early). The replacement is made only if the
row still holds the object the encoding was made from (a resend
acknowledged meanwhile, or a deletion, wins: "changed meanwhile"). The old
object is recorded as being deleted (a tombstone, in the replacement's
transaction) and deleted once :data:`READERS_GRACE` has passed: by this
run, `pacs serve` (every few minutes), the next run, ``pacs purge --yes``
or ``pacs verify --repair``; until then ``verify`` counts it pending, never
an orphan.

A full disk (ENOSPC/EDQUOT, the store or the index full) stops the run: it
is reported as "disk full" in ``failed`` and ``stopped`` (not as pixels
that did not verify, which reads as damaged images), the object being
replaced keeps its old version and index row.

Resuming is free: a replaced object's row no longer has an uncompressed
syntax. A crash between the new object's write and the index commit leaves
the row on the old object; the rerun encodes it again over the new key.
(Versions before the key of its own wrote over the received object: such a
leftover is found already compressed and only re-indexed.)
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

from storage import StorageError, StorageFullError

from ..app import Pacs
from ..errors import IngestError, Status
from ..index import tombstones
from ..index.committer import GroupCommitter
from ..index.writer import IndexWriter, Outcome
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
# The key variant of each codec's objects (pacs.ingest.object_key).
KEY_VARIANTS = {"jpeg-ls": "jls", "j2k": "j2k"}
# How long a replaced object stays for the readers that looked its row up
# before the replacement (see pacs.index.tombstones), and the tombstones'
# name for the objects compress replaced.
READERS_GRACE = tombstones.READERS_GRACE.total_seconds()
DELETION = tombstones.REPLACED
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
# Re-encoding holds an object about five times (dataset, pixel copy, encoded
# dataset, written file read back, decoded check): a 900 MB multi-frame CT
# took 5 GB. Larger objects stay uncompressed; so do objects whose five-fold
# (plus margin) does not fit in the memory available now.
MAX_REENCODE_BYTES = 256 * 1024**2
MEMORY_PER_OBJECT_BYTE = 6
TOO_LARGE = "too large to re-encode in memory"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class _DiskFull(Exception):
    """Raised inside a run when the disk is full; stops it."""


def _disk_full(exc: BaseException) -> bool:
    """Whether *exc* (or what caused it) says the disk or the index is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _DiskFull | StorageFullError):
            return True
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if isinstance(current, IngestError) and current.status == Status.OUT_OF_RESOURCES:
            return True
        # SQLite's SQLITE_FULL arrives as an OperationalError with this text.
        if "database or disk is full" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _too_large(size: int) -> str | None:
    """Why an object of *size* bytes is not re-encoded here, or None."""
    if size > MAX_REENCODE_BYTES:
        return f"{size} bytes, over the {MAX_REENCODE_BYTES} compress re-encodes in memory"
    available = _available_memory()
    if available is not None and size * MEMORY_PER_OBJECT_BYTE > available:
        return f"{size} bytes would need ~{size * MEMORY_PER_OBJECT_BYTE} bytes of memory, {available} available"
    return None


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
    # Why the run ended before its last candidate (a full disk), or None.
    stopped: str | None = None
    # Replaced objects deleted by this run, and those left for the readers
    # (deleted by the next run, purge --yes or verify --repair).
    old_deleted: int = 0
    old_pending: int = 0

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
            "stopped": self.stopped,
            "old_objects_deleted": self.old_deleted,
            "old_objects_pending": self.old_pending,
        }


def _candidates(pacs: Pacs, study_uids: list[str] | None) -> Iterator[Any]:
    columns = (
        instances_t.c.pk, instances_t.c.sop_uid, instances_t.c.storage_key, instances_t.c.size_bytes,
        instances_t.c.sha256, instances_t.c.source, instances_t.c.calling_ae, instances_t.c.remote_host,
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
    # A Big Endian original decodes to '>i2', its encoding to '<i2': the
    # values and their type must match, not the byte order they came in.
    same_type = original.dtype.newbyteorder("=") == decoded.dtype.newbyteorder("=")
    return original.shape == decoded.shape and same_type and bool(np.array_equal(original, decoded))


class _QuietInThread(logging.Filter):
    """Drops the records of the threads that asked for quiet."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "quiet", False)


# pydicom logs a codec's refusal (a 3x3 RGB image CharLS cannot take) with its
# traceback at ERROR, openjpeg its own errors; the object is skipped as "not
# encodable" with that reason, so these records only alarm whoever reads the
# output. Filtered for the encoding thread alone: a transcode elsewhere in the
# process still logs its failures.
_ENCODER_LOGGERS = ("pydicom.pixels.encoders.base", "openjpeg.encode")
_quiet = _QuietInThread()
for _name in _ENCODER_LOGGERS:
    logging.getLogger(_name).addFilter(_quiet)


@contextmanager
def _encoders_quiet() -> Iterator[None]:
    _quiet.local.quiet = True
    try:
        yield
    finally:
        _quiet.local.quiet = False


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
        with _encoders_quiet():
            convert_dataset(ds, UID(ds.file_meta.TransferSyntaxUID), target)
    except Exception as exc:  # the codec refuses this pixel format
        # pydicom names each plugin's reason on the lines after its first:
        # the only place it is told now that its log is quiet.
        return "not encodable", None, " ".join(line.strip() for line in str(exc).splitlines())[:200]
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
        if _disk_full(exc):
            # Not the pixels' fault: "did not verify" reads as damaged images.
            raise _DiskFull(f"disk full writing the encoded object in {tmp_dir}: {exc}") from exc
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
                        max_object_bytes=pacs.settings.max_object_bytes,
                        key_variant=KEY_VARIANTS[codec], keep_obsolete=True)
    retired = _Retired(pacs)
    retired.finish_earlier_runs()
    where = [instances_t.c.transfer_syntax_uid.in_([str(u) for u in UNCOMPRESSED]), instances_t.c.rows.isnot(None)]
    progress.start(f"compressing ({codec})", count_rows(pacs.engine, instances_t, *where) if not study_uids else None)
    try:
        for row in _candidates(pacs, study_uids):
            report.candidates += 1
            progress.advance()
            try:
                _one(pacs, ingestor, row, target, tmp_dir, report, retired)
                retired.finish_due(report)
            except (StorageError, IngestError, OSError, _DiskFull) as exc:
                if _disk_full(exc):
                    # Every later object would fail the same way: stop here.
                    report.stopped = (f"disk full: compress stopped at {row.sop_uid} ({exc}); "
                                      "that object is unchanged, free space and run it again")
                    report.failed.add({"sop_uid": row.sop_uid, "key": row.storage_key,
                                       "detail": f"disk full, compress stopped here: {exc}"})
                    log.error("%s", report.stopped)
                    break
                report.failed.add({"sop_uid": row.sop_uid, "key": row.storage_key, "detail": str(exc)})
    finally:
        committer.close()
        retired.finish_due(report)
        report.old_pending = retired.pending
    return report


class _Retired:
    """Replaced objects waiting :data:`READERS_GRACE` before their deletion.

    Each is recorded as a tombstone in the transaction of its replacement
    (IndexRecord.retire_as), so a crash leaves them to ``verify --repair``
    or ``purge --yes``, never as orphans to adopt back."""

    def __init__(self, pacs: Pacs) -> None:
        self.pacs = pacs
        self.waiting: list[tuple[float, str]] = []

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def add(self, key: str) -> None:
        self.waiting.append((time.monotonic(), key))

    def finish_earlier_runs(self) -> None:
        """Delete what earlier runs left for their readers, once due."""
        tombstones.finish_due(self.pacs.engine, self.pacs.store, deletion=DELETION)

    def finish_due(self, report: CompressReport) -> None:
        due_at = time.monotonic() - READERS_GRACE
        due = [key for at, key in self.waiting if at <= due_at]
        if not due:
            return
        self.waiting = [(at, key) for at, key in self.waiting if at > due_at]
        done = tombstones.finish(self.pacs.engine, self.pacs.store, due)
        report.old_deleted += len(done.deleted)


def _one(pacs: Pacs, ingestor: Ingestor, row: Any, target: UID, tmp_dir: Path, report: CompressReport,
         retired: _Retired) -> None:
    origin = Origin(source=row.source or "compress", calling_ae=row.calling_ae, remote_host=row.remote_host)
    if (why := _too_large(row.size_bytes)) is not None:
        # Decided from the index row, before a byte is read.
        report.skip(TOO_LARGE, row.sop_uid, why)
        return
    with pacs.store.local_path(row.storage_key) as stored:
        try:
            state, encoded, detail = _encode(stored, target, tmp_dir)
        except _DiskFull:
            raise
        except Exception as exc:  # unreadable by pydicom
            if _disk_full(exc):  # e.g. no room for the temporary file
                raise _DiskFull(str(exc)) from exc
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
        # Only over the object this encoding was made from: a resend
        # acknowledged meanwhile (overwrite policy) or a deletion wins.
        result = ingestor.ingest(FileSource(encoded), origin, expected_sop_uid=row.sop_uid,
                                 replaces=(row.storage_key, row.sha256), retire_as=DELETION)
        if result.outcome is Outcome.STALE:
            report.skip("changed meanwhile", row.sop_uid, "sent again or deleted while it was being encoded")
            return
        if result.obsolete_key:
            retired.add(result.obsolete_key)
        report.compressed += 1
        report.bytes_before += row.size_bytes
        report.bytes_after += result.size
    finally:
        encoded.unlink(missing_ok=True)
