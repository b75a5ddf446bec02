"""Bulk import of DICOM files from folders through the one ingest path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .app import Pacs
from .errors import IngestError
from .index.writer import Outcome
from .ingest import IngestResult, Origin

# PS3.10 8: a media's directory (DICOMDIR) is a Part 10 file but no object to archive.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# A data set without preamble starts with its lowest group: File Meta (0002),
# left in by some writers, or Identifying (0008). Little Endian only.
_BARE_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00")


@dataclass
class ImportSummary:
    files: int = 0
    stored: int = 0
    duplicates: int = 0
    not_dicom: int = 0
    # DICOMDIR files of a CD or USB copy: read by media viewers, not archived.
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    # Instances stored per Study Instance UID: what the audit trail names.
    studies: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "not_dicom": self.not_dicom,
            "skipped": self.skipped,
            "failed": self.failed,
            "bytes": self.bytes,
            "errors": self.errors[:100],
        }


def iter_files(paths: Iterable[Path], unreadable: list[tuple[Path, OSError]] | None = None) -> Iterator[Path]:
    """Every regular file under *paths* (recursively), in a stable order.

    Folders that cannot be listed are added to *unreadable* (an import that
    silently left out a folder of a scratched CD reported success)."""

    def failed(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(exc.filename or "?"), exc))

    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, onerror=failed):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name


def is_part10(path: Path) -> bool:
    """Cheap check for the Part 10 preamble signature (``DICM`` at 128).

    Raises OSError when the file cannot be read: an unreadable object is a
    failure to report, not a file of another kind."""
    if not path.is_file():
        # A named pipe or a device would block the read forever (an import
        # of /dev or of a folder with a FIFO in it): not an object file.
        return False
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicomdir(path: Path) -> bool:
    """A Part 10 file holding a media directory (DICOMDIR), not an object."""
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except OSError:
        raise
    except Exception:  # a damaged meta: ingest judges the file and says why
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def bare_dataset_syntax(path: Path) -> tuple[str, int] | None:
    """(transfer syntax, offset of the data set) of a file holding a DICOM
    data set without the Part 10 preamble and ``DICM`` (old CDs, some
    modality exports; DCMTK's storescu sends these), or None when the file
    is not one. A File Meta group left at its start gives the syntax and is
    skipped: our own File Meta replaces it."""
    from pydicom import dcmread

    if not path.is_file():
        return None
    with path.open("rb") as f:
        head = f.read(65536)
    if len(head) < 8 or head[:2] not in _BARE_FIRST_GROUPS:
        return None
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True)
    except OSError:
        raise
    except Exception:
        return None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    if syntax:
        from .header_scan import leading_meta_length

        # File Meta is always Explicit VR Little Endian (PS3.10 7.1).
        return syntax, leading_meta_length(memoryview(head), True)
    implicit, little = ds.original_encoding
    if not little:
        return None
    return (IMPLICIT_VR_LITTLE_ENDIAN if implicit else EXPLICIT_VR_LITTLE_ENDIAN), 0


def ingest_bare(pacs: Pacs, path: Path, syntax: str, offset: int, origin: Origin) -> IngestResult:
    """Ingest a data set without Part 10 header as the DIMSE path does: our
    File Meta Information built for it, then the file's bytes as they are."""
    from pydicom import dcmread

    from .part10 import FileBodySource, file_meta_bytes

    ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    fd = os.open(path, os.O_RDONLY)
    try:
        source = FileBodySource(meta, fd, offset, os.fstat(fd).st_size - offset)
        return pacs.ingestor.ingest(source, origin, transfer_syntax=syntax, look_up_first=True)
    finally:
        os.close(fd)


def import_paths(
    pacs: Pacs,
    paths: Iterable[Path],
    *,
    workers: int = 4,
    on_file: Callable[[Path, str], None] | None = None,
) -> ImportSummary:
    """Ingest every DICOM file under *paths*; skip others with a count."""
    summary = ImportSummary()
    origin = Origin(source="import", calling_ae="", remote_host="localhost")

    def ingest(path: Path) -> IngestResult | str:
        if is_part10(path):
            if is_dicomdir(path):
                return "skipped"
            return pacs.ingest_file(path, origin, look_up_first=True)
        bare = bare_dataset_syntax(path)
        if bare is None:
            return "not_dicom"
        return ingest_bare(pacs, path, *bare, origin)

    def one(path: Path) -> tuple[Path, str, int, str, str]:
        try:
            result = ingest(path)
        except IngestError as exc:
            return path, "failed", 0, str(exc), ""
        except OSError as exc:
            return path, "failed", 0, f"cannot read: {exc}", ""
        if isinstance(result, str):
            return path, result, 0, "", ""
        if result.conflict:
            # Not stored (answered 0111H over DICOM): the file must not be
            # taken for archived and deleted from the CD or disk it came from.
            return path, "failed", 0, result.conflict, ""
        outcome = "duplicate" if result.outcome is Outcome.DUPLICATE else "stored"
        return path, outcome, result.size, "", result.header.study_uid

    unreadable: list[tuple[Path, OSError]] = []
    # Threads overlap file reads and storage writes; the group committer
    # turns their index rows into shared transactions.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, outcome, size, error, study_uid in pool.map(one, iter_files(paths, unreadable)):
            summary.files += 1
            if outcome == "stored":
                summary.stored += 1
                summary.bytes += size
                summary.studies[study_uid] = summary.studies.get(study_uid, 0) + 1
            elif outcome == "duplicate":
                summary.duplicates += 1
            elif outcome == "not_dicom":
                summary.not_dicom += 1
            elif outcome == "skipped":
                summary.skipped += 1
            else:
                summary.failed += 1
                summary.errors.append({"path": str(path), "error": error})
            if on_file:
                on_file(path, outcome)
    for folder, exc in unreadable:
        summary.failed += 1
        summary.errors.append({"path": str(folder), "error": f"cannot read: {exc.strerror or exc}"})
    return summary
