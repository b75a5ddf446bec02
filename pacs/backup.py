"""Backups of the index: SQLite's online backup, PostgreSQL's pg_dump.

The appliance's de-identification secret (``DATA_DIR/deidentify.salt``)
goes beside the backup, as ``FILE.deidentify-salt``: it lives in no index
and no store, and without it a restored appliance gives the same studies
new UIDs and the same patients new pseudonyms, silently. ``pacs restore``
puts it back.

The signing secret (pacs.signing_keys) is not copied: the radiologists'
keys in the index are sealed under it, and a backup that carried both
would open them to a PIN guessed offline. It is kept apart (key escrow).

The objects are not copied here: the filesystem store is backed up by the
hospital's file backup (it only ever gains whole, immutable files) and an S3
bucket by its replication. After a restore, objects stored since the backup
are orphans that `pacs verify --repair` indexes again, and `pacs reindex`
rebuilds everything from the objects alone if no backup exists at all.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from .atomic_files import write_atomic
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
    # Restore of a SQLite index: where the index it replaced was kept.
    previous: str = ""
    # The de-identification secret written beside the backup (backup), or
    # put back from there (restore); "" when there was none.
    salt: str = ""
    # Restore: where a different secret the data dir had was kept.
    previous_salt: str = ""
    # Backup: where the signing secret is, which the backup leaves out on
    # purpose (the keys it seals are in the index); "" when the index holds none.
    signing_secret: str = ""
    # Restore: why stored signing keys cannot be opened with this data dir's secret; "" when they can.
    signing_secret_problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"no SQLite file in {url}")
    return Path(database)


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """pg_dump/pg_restore's libpq URL (without SQLAlchemy's "+driver") and
    environment. The password goes in PGPASSWORD: on the command line every
    local user would read it in ``ps`` while the dump runs."""
    parsed = make_url(url).set(drivername="postgresql")
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
        parsed = parsed._replace(password=None)  # URL.set() ignores None
    return parsed.render_as_string(hide_password=False), env


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
    if out.is_dir():
        raise BackupError(f"{out} is a directory: name the backup file, e.g. {out / 'index.bak'}")
    if kind == "sqlite":
        _refuse_live_file(_sqlite_path(index_url), out)
    if not out.parent.is_dir():
        # Creating it would put the backup on the local disk when the NAS or
        # USB disk meant to hold it is not mounted, and report success.
        raise BackupError(f"folder {out.parent} does not exist (is the backup disk or share mounted?)")
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    private_file(partial)  # a copy of the index: no more readable than it
    start = time.perf_counter()
    try:
        if kind == "sqlite":
            _sqlite_copy(f"file:{_sqlite_path(index_url)}?mode=ro", partial)
        else:
            libpq_url, env = _libpq(index_url)
            result = subprocess.run(
                [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(partial), libpq_url],
                capture_output=True, text=True, check=False, env=env,
            )
            if result.returncode != 0:
                raise BackupError(f"pg_dump failed: {result.stderr.strip()[-500:]}")
        # Only a complete backup carries the final name.
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return BackupResult(kind, str(out), out.stat().st_size, time.perf_counter() - start)


def _refuse_other_sessions(index_url: str) -> None:
    """Other sessions on the database are nodes (or tools) still using it:
    a restore would swap the index under them (the lock file of pacs serve
    only covers one data dir, and nodes have one each)."""
    from sqlalchemy import text

    from .index.db import create_index_engine

    engine = create_index_engine(index_url, pool_size=0)
    try:
        with engine.connect() as conn:
            others = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")).scalar_one()
    except Exception as exc:
        raise BackupError(f"cannot reach the database to restore into: {exc}") from exc
    finally:
        engine.dispose()
    if others:
        raise BackupError(f"{others} other session(s) use the database (a pacs serve node still running?); "
                          "stop every node first")


def _refuse_live_file(index: Path, out: Path) -> None:
    live = index.absolute()
    if out in {live, live.with_name(live.name + "-wal"), live.with_name(live.name + "-shm")} or (
        out.exists() and live.exists() and out.samefile(live)
    ):
        raise BackupError(f"{out} is the live index itself: write the backup elsewhere")


def _sqlite_copy(source_uri: str, target: Path) -> None:
    """Copy a SQLite database with the online backup API, in one step.

    In steps, SQLite restarts the copy whenever another connection commits:
    on a server ingesting all day, a backup of a large index never ended.
    One step reads under one read transaction; in WAL mode writers go on.
    """
    source = sqlite3.connect(source_uri, uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


# Tables every filmless-pacs index has: a restore refuses a file without them.
_INDEX_TABLES = {"alembic_version", "patients", "studies", "series", "instances"}


def _check_sqlite_backup(backup: Path) -> sqlite3.Connection:
    with backup.open("rb") as head:
        if head.read(5) == b"PGDMP":
            raise BackupError(f"{backup} is a backup of a PostgreSQL index (pg_dump): restore it into a "
                              "PostgreSQL index (--index-url postgresql://...), then `pacs db copy --to "
                              "sqlite:///PATH` makes a SQLite index of it; the current index is left as it is")
    try:
        source = sqlite3.connect(f"file:{backup.absolute()}?mode=ro", uri=True)
        tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{backup} is not a SQLite backup: {exc}") from exc
    missing = _INDEX_TABLES - tables
    if missing:
        source.close()
        raise BackupError(f"{backup} is not a backup of a filmless-pacs index (no table "
                          f"{', '.join(sorted(missing))}); the current index is left as it is")
    try:
        _refuse_newer(backup, source.execute("SELECT version_num FROM alembic_version").fetchone())
    except BaseException:
        source.close()
        raise
    return source


def _refuse_newer(backup: Path, row: Any) -> None:
    """Refuse a backup at a schema revision this version does not know
    (taken by a newer version: the wrong file restored when rolling an
    upgrade back). Restored, it left an index nothing here can open."""
    from .index.db import SCHEMA_HEAD
    from .index.schema import known_revision

    revision = str(row[0]) if row and row[0] else ""
    if revision and not known_revision(revision):
        raise BackupError(f"{backup} was taken by a newer version of filmless-pacs (schema revision {revision}; "
                          f"this one knows revisions up to {SCHEMA_HEAD}): restore it with that version, or "
                          "restore a backup taken before its upgrade; the current index is left as it is")


def _pg_backup_revision(index_url: str, dump: Path) -> tuple[str] | None:
    """The schema revision a pg_dump archive holds (alembic_version's row, read
    with pg_restore without touching any database), or None when it has none
    or cannot be read (a damaged file: the restore itself fails on it and
    puts the index back)."""
    _, env = _libpq(index_url)
    result = subprocess.run(
        [_pg_tool("pg_restore"), "--data-only", "--table=alembic_version", "--file=-", str(dump)],
        capture_output=True, text=True, check=False, env=env,
    )
    if result.returncode != 0:
        return None
    lines = result.stdout.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("COPY ") and "alembic_version" in line and number + 1 < len(lines):
            value = lines[number + 1]
            return None if value == "\\." else (value,)
    return None


def restore_index(index_url: str, backup: Path, keep_dir: Path | None = None) -> BackupResult:
    """Replace the index with *backup*. `pacs serve` must be stopped.

    SQLite: the backup is copied into the index file page by page (the same
    API, in reverse), so a crash midway leaves the old file intact; the
    replaced index is kept beside it. PostgreSQL: refused while other
    sessions use the database (a node still serving); the current database
    is dumped into *keep_dir* first, emptied, then restored with
    ``pg_restore`` in one transaction (the dump put back if that fails).
    """
    kind = _kind(index_url)
    if not backup.is_file():
        raise BackupError(f"no backup file {backup}")
    start = time.perf_counter()
    previous = ""
    if kind == "sqlite":
        source = _check_sqlite_backup(backup)
        path = _sqlite_path(index_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            # Users, reports, orders and the audit trail live only here: keep them.
            kept = path.with_name(f"{path.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
            private_file(kept)
            _sqlite_copy(f"file:{path.absolute()}?mode=ro", kept)
            previous = str(kept)
        target = sqlite3.connect(path, timeout=5)
        try:
            source.backup(target)
        except sqlite3.OperationalError as exc:
            raise BackupError(f"the index is in use (stop pacs serve first): {exc}") from exc
        finally:
            target.close()
            source.close()
    else:
        with backup.open("rb") as head:
            magic = head.read(16)
        if not magic.startswith(b"PGDMP"):
            kind_of = "a SQLite index backup" if magic.startswith(b"SQLite format 3") else "not a pg_dump archive"
            # Not `pacs reindex`: it rebuilds studies only (no orders, reports, users, audit trail).
            raise BackupError(f"{backup} is {kind_of}: a PostgreSQL index is restored from a `pacs backup` "
                              "of a PostgreSQL index; to bring a SQLite backup here whole, restore it into a "
                              "SQLite index (--index-url sqlite:///PATH) and copy that with `pacs db copy --to "
                              "URL` into an empty database")
        _refuse_newer(backup, _pg_backup_revision(index_url, backup))
        _refuse_other_sessions(index_url)
        if keep_dir is not None:
            kept_dump = keep_dir / f"index-before-restore-{time.strftime('%Y%m%dT%H%M%S')}.dump"
            previous = backup_index(index_url, kept_dump).path
        # `pg_restore --clean` drops only what the backup holds: tables and
        # constraints a later schema revision added stayed, so a backup taken
        # before an upgrade (the one the README says to take) failed to
        # restore ("cannot drop constraint pk_patients ... other objects
        # depend on it"), or left tables the next upgrade could not create.
        # The index is emptied first, then restored in one transaction; the
        # database it replaced is dumped above and put back if that fails.
        _empty_database(index_url)
        failure = _pg_restore(index_url, backup)
        if failure:
            if not previous:
                raise BackupError(f"pg_restore failed: {failure}")
            if _pg_restore(index_url, Path(previous)):
                raise BackupError(f"pg_restore failed: {failure}; the index is empty: restore {previous}, the "
                                  "index as it was before, with pacs restore")
            raise BackupError(f"pg_restore failed: {failure}; the index is back as it was before")
    return BackupResult(kind, str(backup), backup.stat().st_size, time.perf_counter() - start, previous)


def _pg_restore(index_url: str, dump: Path) -> str:
    """Restore *dump* into the (empty) database in one transaction; "" when
    done, else the end of pg_restore's error output."""
    libpq_url, env = _libpq(index_url)
    result = subprocess.run(
        [_pg_tool("pg_restore"), "--no-owner", "--single-transaction", "--dbname", libpq_url, str(dump)],
        capture_output=True, text=True, check=False, env=env,
    )
    return "" if result.returncode == 0 else result.stderr.strip()[-500:] or f"exit status {result.returncode}"


# Drops every table, view, sequence, function and type of the index's schema
# (not those an extension owns), in one transaction: the database is the
# index's own (README: createdb ... pacs).
_EMPTY_SCHEMA = """
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.oid, c.relkind FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
    LOOP
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = item.oid) THEN
            EXECUTE format('DROP %s IF EXISTS %s CASCADE',
                           CASE item.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                           item.oid::regclass);
        END IF;
    END LOOP;
    FOR item IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('DROP ROUTINE IF EXISTS %s CASCADE', item.oid::regprocedure);
    END LOOP;
    FOR item IN
        SELECT t.oid FROM pg_type t
        WHERE t.typnamespace = current_schema()::regnamespace AND t.typtype IN ('e', 'd', 'r', 'm')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e')
    LOOP
        IF EXISTS (SELECT 1 FROM pg_type WHERE oid = item.oid) THEN
            EXECUTE format('DROP TYPE IF EXISTS %s CASCADE', item.oid::regtype);
        END IF;
    END LOOP;
END
$$
"""


def _empty_database(index_url: str) -> None:
    """Drop everything the index's schema holds (see _EMPTY_SCHEMA)."""
    from sqlalchemy import text

    from .index.db import create_index_engine

    engine = create_index_engine(index_url, pool_size=0)
    try:
        with engine.begin() as conn:
            conn.execute(text(_EMPTY_SCHEMA))
    except Exception as exc:
        raise BackupError(f"cannot empty the database before the restore (nothing was changed): {exc}") from exc
    finally:
        engine.dispose()


SALT_FILE = "deidentify.salt"
SALT_SUFFIX = ".deidentify-salt"


def salt_beside(backup: Path) -> Path:
    """Where the de-identification secret of the backup *backup* goes."""
    return backup.absolute().with_name(backup.name + SALT_SUFFIX)


def backup_salt(data_dir: Path, backup: Path) -> str:
    """Copy the data dir's de-identification secret beside *backup*; its path,
    or "" when the appliance has none yet (a stale one from an earlier backup
    under that name is removed: it would come back as this one's)."""
    source, target = Path(data_dir) / SALT_FILE, salt_beside(backup)
    try:
        salt = source.read_bytes()
    except FileNotFoundError:
        target.unlink(missing_ok=True)
        return ""
    write_atomic(target, salt, 0o600)
    return str(target)


def restore_salt(data_dir: Path, backup: Path) -> tuple[str, str]:
    """Put the de-identification secret saved beside *backup* back into the
    data dir: (its path, or "" when the backup has none; where a different
    secret the data dir had is kept, or "")."""
    source = salt_beside(backup)
    try:
        salt = source.read_bytes()
    except FileNotFoundError:
        return "", ""
    if not salt.strip():
        raise BackupError(f"{source} is empty: it is not the de-identification secret of the backup")
    target = Path(data_dir) / SALT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = ""
    try:
        current = target.read_bytes()
    except FileNotFoundError:
        current = None
    if current is not None and current.strip() != salt.strip():
        # Copies exported with it are only recognised with it: never lost.
        kept = target.with_name(f"{target.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
        write_atomic(kept, current, 0o600)
        previous = str(kept)
    if current is None or previous:
        write_atomic(target, salt, 0o600)
    return str(target), previous
