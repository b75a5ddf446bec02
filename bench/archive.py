"""A bulk-loaded synthetic archive (bench/synthetic.py), cached between runs.

SQLite: loaded once into ``$PACS_BENCH_CACHE/archive-*.sqlite`` and copied into
each server's data dir. PostgreSQL: loaded once, saved with ``pg_dump -Fc`` next
to it; each bench invocation restores the dump once into a template database
and every run gets a fresh copy with ``CREATE DATABASE ... TEMPLATE`` (a file
copy, seconds). The cache key names the study count, the instances per study,
the schema head revision and a hash of the loader and the models, so a schema
change rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from .common import CACHE, ROOT
from .synthetic import LoadSpec, load

from tests.peers import PG_ADMIN, create_database, drop_database  # noqa: E402

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_key(studies: int, per_study: int) -> str:
    from alembic.script import ScriptDirectory

    from pacs.index import MIGRATIONS
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head() or "none"
    digest = hashlib.sha1()
    for path in (ROOT / "bench" / "synthetic.py", ROOT / "pacs" / "index" / "models.py"):
        digest.update(path.read_bytes())
    for path in sorted((ROOT / "pacs" / "migrations" / "versions").glob("*.py")):
        digest.update(path.read_bytes())
    return f"archive-{studies}s-{per_study}i-{head}-{digest.hexdigest()[:8]}"


def _load_into(url: str, studies: int, per_study: int, log: Log) -> dict[str, int]:
    from pacs.index import create_index_engine, upgrade_schema

    engine = create_index_engine(url)
    try:
        upgrade_schema(engine)
        start = time.perf_counter()
        counts = load(engine, LoadSpec(studies=studies, instances_per_study=per_study))
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        log(f"  bulk-loaded {counts} in {time.perf_counter() - start:.0f} s")
        return counts
    finally:
        engine.dispose()


def sqlite_archive(studies: int, per_study: int, log: Log = _stderr) -> Path:
    """The cached SQLite index file holding the synthetic archive."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{cache_key(studies, per_study)}.sqlite"
    if path.exists():
        return path
    log(f"building the SQLite archive {path.name} (cached for later runs)...")
    tmp = CACHE / f"building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        db = tmp / "index.sqlite"
        _load_into(f"sqlite:///{db}", studies, per_study, log)
        # One self-contained file: checkpoint the WAL into it.
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
        db.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def install_sqlite(archive: Path, data_dir: Path) -> None:
    """Put a copy of the cached archive where `pacs serve --data-dir data_dir` looks."""
    data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "--reflink=auto", str(archive), str(data_dir / "index.sqlite")], check=True)


def _pg_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


class PgArchive:
    """One template database per bench invocation, restored from the dump cache."""

    def __init__(self, studies: int, per_study: int, log: Log = _stderr) -> None:
        self.studies, self.per_study, self.log = studies, per_study, log
        self.template: str | None = None
        self.copies: list[str] = []

    def __enter__(self) -> PgArchive:
        CACHE.mkdir(parents=True, exist_ok=True)
        dump = CACHE / f"{cache_key(self.studies, self.per_study)}.pgdump"
        self.template = create_database()
        start = time.perf_counter()
        if dump.exists():
            subprocess.run(
                ["pg_restore", "--no-owner", "-j", "2", "-d", _libpq(self.template), str(dump)],
                check=True, capture_output=True,
            )
            # VACUUM too, not only ANALYZE: otherwise autovacuum starts on the
            # freshly restored million rows a minute later, in the middle of
            # the timed runs (scenario 4's second and third runs, both
            # databases, were the slow ones).
            with psycopg.connect(_libpq(self.template), autocommit=True) as conn:
                conn.execute("VACUUM (ANALYZE)")
            self.log(f"  PostgreSQL archive restored from {dump.name} in {time.perf_counter() - start:.0f} s")
        else:
            self.log(f"building the PostgreSQL archive (dump cached as {dump.name})...")
            _load_into(self.template, self.studies, self.per_study, self.log)
            tmp = dump.with_suffix(".partial")
            subprocess.run(["pg_dump", "-Fc", "-Z", "1", "-f", str(tmp), _libpq(self.template)], check=True)
            tmp.rename(dump)
        return self

    def copy(self) -> str:
        """A fresh database holding the archive (dropped on exit)."""
        assert self.template
        name = f"pacs_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_pg_name(self.template)}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        self.copies.append(url)
        return url

    def drop(self, url: str) -> None:
        drop_database(url)
        if url in self.copies:
            self.copies.remove(url)

    def __exit__(self, *exc: object) -> None:
        for url in list(self.copies):
            drop_database(url)
        if self.template:
            drop_database(self.template)


def settle() -> None:
    """Let the disk go quiet before a timed run: PostgreSQL writes out what the
    archive copies and drops of earlier runs left in its buffers and WAL, and
    the kernel writes back every dirty page. Without it the fsyncs of whichever
    run came next waited behind that writeback: scenario 4 on SQLite read
    0.76-0.79 in interleaved runs while the same ingest into the full index,
    run alone, was 0.96 of the empty one."""
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass  # no PostgreSQL here: the sync below still applies
    os.sync()


def counts(url: str) -> dict[str, int]:
    """Row counts of the main tables (to print what the archive holds)."""
    from sqlalchemy import func, select

    from pacs.index import create_index_engine
    from pacs.index.models import Instance, Study

    engine = create_index_engine(url, pool_size=0)
    try:
        with engine.connect() as conn:
            return {
                "studies": conn.execute(select(func.count()).select_from(Study)).scalar_one(),
                "instances": conn.execute(select(func.count()).select_from(Instance)).scalar_one(),
            }
    finally:
        engine.dispose()
