"""Bulk import of DICOM files from folders through the one ingest path."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .app import Pacs
from .audit import Event
from .errors import IngestError, Status
from .index.writer import Outcome
from .ingest import IngestResult, Origin
from .key_objects import KOS_CLASS
from .rejections import apply_or_report

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
    # Refused as withdrawn by a rejection note (0xA771): the archive's choice, not a failure.
    rejected: int = 0
    # Instances the rejection notes imported withdrew (``rejecting_user`` given).
    withdrawn: int = 0
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
            "rejected": self.rejected,
            "withdrawn": self.withdrawn,
            "bytes": self.bytes,
            "errors": self.errors[:100],
        }


def iter_files(paths: Iterable[Path], unreadable: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Every regular file under *paths* (recursively), in a stable order.

    Folders that cannot be listed are added to *unreadable* with why (an
    import that silently left out a folder of a scratched CD reported
    success), and so are the files a DICOMDIR lists that are not there (a
    copy of the CD that lost some). A DICOMDIR named in *paths* gives the
    files it lists (after itself): `pacs import /media/cdrom/DICOMDIR`
    stored nothing at all."""

    def failed(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(exc.filename or "?"), f"cannot read: {exc.strerror or exc}"))

    def missing_from(dicomdir: Path, lost: list[Path]) -> None:
        if unreadable is not None:
            unreadable.extend((path, f"listed in the DICOMDIR {dicomdir} but not found") for path in lost)

    for path in paths:
        if path.is_file():
            yield path
            if _named_dicomdir(path.name):
                files = dicomdir_files(path)
                if files is None:
                    # Unreadable: its folder holds the files.
                    yield from (other for other in iter_files([path.parent], unreadable) if other != path)
                else:
                    missing_from(path, files[1])
                    yield from files[0]
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, onerror=failed):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name
                    if _named_dicomdir(name):
                        # Its files are in the walk; those it lists and the
                        # walk cannot find are said.
                        files = dicomdir_files(Path(dirpath) / name)
                        if files is not None:
                            missing_from(Path(dirpath) / name, files[1])


def _media_name(name: str) -> str:
    """A file name as a DICOMDIR's File ID gives it: upper case (PS3.10
    8.5), without the ``;1`` version or the trailing dot an ISO 9660 mount
    may show (Linux shows a CD without Rock Ridge in lower case)."""
    return name.split(";", 1)[0].rstrip(".").upper()


def _named_dicomdir(name: str) -> bool:
    return _media_name(name) == "DICOMDIR"


def dicomdir_files(dicomdir: Path) -> tuple[list[Path], list[Path]] | None:
    """(the files *dicomdir* references that are there, in its order; those
    it lists that are not), File IDs matched to names whatever their case;
    None when it is no readable DICOMDIR (a damaged one, or a file of
    another kind so named)."""
    from pydicom import dcmread

    try:
        if not is_part10(dicomdir) or not is_dicomdir(dicomdir):
            return None
        ds = dcmread(dicomdir)
        records = list(ds.get("DirectoryRecordSequence", []))
    except Exception:  # unreadable or damaged: the caller falls back on the folder
        return None
    listings: dict[Path, dict[str, str]] = {}

    def entry(folder: Path, component: str) -> Path | None:
        if folder not in listings:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            listings[folder] = {}
            for name in names:
                listings[folder].setdefault(_media_name(name), name)
        if (found := listings[folder].get(_media_name(component))) is None:
            return None
        return folder / found

    found: list[Path] = []
    lost: list[Path] = []
    seen: set[Path] = set()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        components = [file_id] if isinstance(file_id, str) else [str(c) for c in file_id]
        path: Path | None = dicomdir.parent
        for component in components:
            path = entry(path, component) if path is not None else None
        if path is None:
            lost.append(dicomdir.parent.joinpath(*components))
        elif path not in seen:
            seen.add(path)
            found.append(path)
    return found, lost


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
    routed: bool = False,
    rejecting_user: str = "",
) -> ImportSummary:
    """Ingest every DICOM file under *paths*; skip others with a count.
    *routed*: the routing rules apply to them (``pacs import --route``); an
    import is old data, not an examination arriving (see Origin.routed).
    *rejecting_user* (the operator of ``pacs import``): a rejection note
    among the files withdraws what it lists, as that user's deletions, once
    every file is in: an old archive's notes and the images they rejected
    come in any order, and a note applied while its images were being
    written by the other threads could miss one (PostgreSQL). An instance a
    note withdrew before (an earlier import, a modality) is counted
    ``rejected``, not failed."""
    summary = ImportSummary()
    origin = Origin(source="import", calling_ae="", remote_host="localhost", routed=routed, examination=False)
    notes: list[tuple[Path, IngestResult]] = []

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
            return path, "rejected" if exc.status == Status.REJECTED_INSTANCE else "failed", 0, str(exc), ""
        except OSError as exc:
            return path, "failed", 0, f"cannot read: {exc}", ""
        if isinstance(result, str):
            return path, result, 0, "", ""
        if result.conflict:
            # Not stored (answered 0111H over DICOM): the file must not be
            # taken for archived and deleted from the CD or disk it came from.
            return path, "failed", 0, result.conflict, ""
        if rejecting_user and result.header.sop_class_uid == KOS_CLASS:
            notes.append((path, result))  # applied at the end (list.append: atomic across the threads)
        outcome = "duplicate" if result.outcome is Outcome.DUPLICATE else "stored"
        return path, outcome, result.size, "", result.header.study_uid

    def count(path: Path, outcome: str, size: int, error: str, study_uid: str) -> None:
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
        elif outcome == "rejected":
            summary.rejected += 1
        else:
            summary.failed += 1
            summary.errors.append({"path": str(path), "error": error})
        if on_file:
            on_file(path, outcome)

    unreadable: list[tuple[Path, str]] = []
    # Threads overlap file reads and storage writes; the group committer
    # turns their index rows into shared transactions. Files are taken from
    # the walk a few per thread ahead, not all at once (Executor.map queues
    # the whole tree first: a future per file of a disk of millions, no
    # progress until the walk ends, and Ctrl-C waiting for every one).
    ahead = max(1, workers) * 4
    queued: deque[Future[tuple[Path, str, int, str, str]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for path in iter_files(paths, unreadable):
                queued.append(pool.submit(one, path))
                while len(queued) > ahead:
                    count(*queued.popleft().result())
            while queued:
                count(*queued.popleft().result())
        finally:
            for future in queued:  # interrupted: what has not started is not started
                future.cancel()
    for path, error in unreadable:
        summary.failed += 1
        summary.errors.append({"path": str(path), "error": error})
    for path, result in notes:
        _apply_note(pacs, path, result, rejecting_user, summary)
    return summary


def _apply_note(pacs: Pacs, path: Path, result: IngestResult, user: str, summary: ImportSummary) -> None:
    """A Key Object Selection imported: what it withdraws, if it is a
    rejection note, goes (pacs.rejections), counted in *summary*; a failure
    (the index or the store failing; logged and audited) is one: the note is
    stored, and imported again it applies."""
    done, failed = apply_or_report(pacs, result.storage_key, result.sop_uid, result.header.study_uid,
                                   lambda: Event(action="delete", user=user, role="admin", protocol="cli"))
    if failed:
        summary.failed += 1
        summary.errors.append({"path": str(path), "error": f"rejection note stored, not applied: {failed}; "
                                                         "import it again"})
    elif done is not None:
        summary.withdrawn += done.deleted
