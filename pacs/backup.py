"""Backups of the index: SQLite's online backup, PostgreSQL's pg_dump.

The objects are not copied here: the filesystem store is backed up by the
hospital's file backup (it only ever gains whole, immutable files) and an S3
bucket by its replication. After a restore, objects stored since the backup
are orphans that `pacs verify --repair` indexes again, and `pacs reindex`
rebuilds everything from the objects alone if no backup exists at all.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from .errors import PacsError
from .index.db import private_file


class BackupError(PacsError):
    """A backup or restore could not be done (the message says why)."""


@dataclass
class BackupResult:
    """What a backup or restore did."""

    kind: str  # "sqlite" or "postgresql"
    path: str
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"no SQLite file in {url}")
    return Path(database)


def _libpq_url(url: str) -> str:
    """pg_dump/pg_restore take a libpq URL, without SQLAlchemy's "+driver"."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the versioned binaries out of PATH when only the server is installed.
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if candidates:
        return str(candidates[0])
    raise BackupError(f"{name} not found: install postgresql-client (apt-get install -y postgresql-client)")


def _kind(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"backups of a {backend} index are not supported")
    return backend


def backup_index(index_url: str, out: Path) -> BackupResult:
    """Write a consistent copy of the index to *out* while the server runs.

    SQLite: the online backup API copies pages under a read transaction, so
    concurrent commits neither block it for long nor tear the copy.
    PostgreSQL: ``pg_dump --format=custom`` (one snapshot).
    """
    kind = _kind(index_url)
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    private_file(partial)  # a copy of the index: no more readable than it
    start = time.perf_counter()
    if kind == "sqlite":
        source = sqlite3.connect(f"file:{_sqlite_path(index_url)}?mode=ro", uri=True)
        target = sqlite3.connect(partial)
        try:
            source.backup(target, pages=4096)
        finally:
            target.close()
            source.close()
    else:
        result = subprocess.run(
            [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(partial), _libpq_url(index_url)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BackupError(f"pg_dump failed: {result.stderr.strip()[-500:]}")
    # Only a complete backup carries the final name.
    partial.replace(out)
    return BackupResult(kind, str(out), out.stat().st_size, time.perf_counter() - start)


def restore_index(index_url: str, backup: Path) -> BackupResult:
    """Replace the index with *backup*. `pacs serve` must be stopped.

    SQLite: the backup is copied into the index file page by page (the same
    API, in reverse), so a crash midway leaves the old file intact.
    PostgreSQL: ``pg_restore --clean`` into the configured database.
    """
    kind = _kind(index_url)
    if not backup.is_file():
        raise BackupError(f"no backup file {backup}")
    start = time.perf_counter()
    if kind == "sqlite":
        try:
            source = sqlite3.connect(f"file:{backup.absolute()}?mode=ro", uri=True)
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{backup} is not a SQLite backup: {exc}") from exc
        path = _sqlite_path(index_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        target = sqlite3.connect(path, timeout=5)
        try:
            source.backup(target)
        except sqlite3.OperationalError as exc:
            raise BackupError(f"the index is in use (stop pacs serve first): {exc}") from exc
        finally:
            target.close()
            source.close()
    else:
        result = subprocess.run(
            [_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
             "--dbname", _libpq_url(index_url), str(backup)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise BackupError(f"pg_restore failed: {result.stderr.strip()[-500:]}")
    return BackupResult(kind, str(backup), backup.stat().st_size, time.perf_counter() - start)
