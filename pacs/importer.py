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
from .ingest import Origin


@dataclass
class ImportSummary:
    files: int = 0
    stored: int = 0
    duplicates: int = 0
    not_dicom: int = 0
    failed: int = 0
    bytes: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "not_dicom": self.not_dicom,
            "failed": self.failed,
            "bytes": self.bytes,
            "errors": self.errors[:100],
        }


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under *paths* (recursively), in a stable order."""
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath) / name


def is_part10(path: Path) -> bool:
    """Cheap check for the Part 10 preamble signature (``DICM`` at 128)."""
    if not path.is_file():
        # A named pipe or a device would block the read forever (an import
        # of /dev or of a folder with a FIFO in it): not an object file.
        return False
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def import_paths(
    pacs: Pacs,
    paths: Iterable[Path],
    *,
    workers: int = 4,
    on_file: Callable[[Path, str], None] | None = None,
) -> ImportSummary:
    """Ingest every Part 10 file under *paths*; skip others with a count."""
    summary = ImportSummary()
    origin = Origin(source="import", calling_ae="", remote_host="localhost")

    def one(path: Path) -> tuple[Path, str, int, str]:
        if not is_part10(path):
            return path, "not_dicom", 0, ""
        try:
            result = pacs.ingest_file(path, origin)
        except IngestError as exc:
            return path, "failed", 0, str(exc)
        except OSError as exc:
            return path, "failed", 0, f"cannot read: {exc}"
        outcome = "duplicate" if result.outcome is Outcome.DUPLICATE else "stored"
        return path, outcome, result.size, ""

    # Threads overlap file reads and storage writes; the group committer
    # turns their index rows into shared transactions.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, outcome, size, error in pool.map(one, iter_files(paths)):
            summary.files += 1
            if outcome == "stored":
                summary.stored += 1
                summary.bytes += size
            elif outcome == "duplicate":
                summary.duplicates += 1
            elif outcome == "not_dicom":
                summary.not_dicom += 1
            else:
                summary.failed += 1
                summary.errors.append({"path": str(path), "error": error})
            if on_file:
                on_file(path, outcome)
    return summary
