"""Copy the whole index into another database: the way from the embedded
SQLite index to PostgreSQL when a hospital outgrows it (or back).

Everything the index holds is copied -- patients, studies, orders and the
worklist, reports, users and tokens, routing rules and queue, the HL7
outbox, the audit trail -- with its primary keys, in one transaction on the
target: an interrupted copy leaves the target empty, and the command can
simply run again. `pacs reindex` into a new database rebuilds only what the
objects say (no orders, reports, users or audit trail).

The source must not change meanwhile: the copy refuses while `pacs serve`
runs on the data dir (stop every node of a shared index). Study and series
counters are recounted by the target's own triggers as instances arrive;
the studies' and patients' changed_at (FHIR meta.lastUpdated) are then set
back to the source's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, Table, bindparam, func, select, text, update
from sqlalchemy.engine import make_url

from ..audit import Event, record_in
from ..index import create_index_engine
from ..index.models import Base
from ..index.schema import prepare_schema, sessions_besides
from .common import NullProgress, Progress

CHUNK = 2_000
# The application name of the copy's own sessions (create_index_engine role).
COPY_ROLE = "copy"
# Leases name the processes of the old database's nodes: nothing to carry over.
SKIPPED = {"job_leases"}
# Kept by triggers on `instances` (migration 0002): copied as zero, recounted.
RECOUNTED = {"studies": ("num_instances", "size_bytes"), "series": ("num_instances", "size_bytes")}


class CopyRefused(Exception):
    """The copy cannot start (the message says why)."""


@dataclass
class CopyReport:
    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    switched: bool = False
    config_file: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def copy_index(source: Engine, target_url: str, progress: Progress | None = None, *,
               record: Callable[[CopyReport], Event] | None = None) -> CopyReport:
    """Copy every table of *source* (at this version's schema) into the
    empty database *target_url* (created at the same schema). *record*
    makes the audit event of the copy, written into the copy's trail in its
    transaction: the new index says where it came from and who copied it."""
    progress = progress or NullProgress()
    report = CopyReport(redacted(source.url.render_as_string(hide_password=False)), redacted(target_url))
    start = time.perf_counter()
    prepare_schema(source, upgrade=False)
    target = create_index_engine(target_url)
    try:
        if make_url(target_url).render_as_string(hide_password=False) == \
                source.url.render_as_string(hide_password=False):
            raise CopyRefused("the target is the current index")
        prepare_schema(target, upgrade=False)  # a new database gets this version's schema
        if source.dialect.name == "postgresql":
            with source.connect() as conn:
                others = sessions_besides(conn, COPY_ROLE)
            if others:
                raise CopyRefused(f"the index is in use ({others}): stop pacs serve on every node first")
        tables = [t for t in Base.metadata.sorted_tables if t.name not in SKIPPED]
        # One snapshot of every table (PostgreSQL reads each statement anew otherwise).
        options = {"isolation_level": "REPEATABLE READ"} if source.dialect.name == "postgresql" else {}
        with source.connect().execution_options(**options) as src, target.begin() as dst:
            full = [t.name for t in tables if dst.execute(select(func.count()).select_from(t)).scalar()]
            if full:
                raise CopyRefused(f"the target database already holds data ({', '.join(full)}): give an "
                                  "empty database")
            for table in tables:
                total = src.execute(select(func.count()).select_from(table)).scalar_one()
                progress.start(f"copying {table.name}", total)
                copied = 0
                for rows in _chunks(src, table):
                    dst.execute(table.insert(), rows)
                    copied += len(rows)
                    progress.advance(len(rows))
                report.rows[table.name] = copied
            _restore_changed_at(src, dst)
            if dst.dialect.name == "postgresql":
                _advance_sequences(dst, tables)
            for table in tables:
                there = dst.execute(select(func.count()).select_from(table)).scalar_one()
                if there != report.rows[table.name]:
                    raise CopyRefused(f"{table.name}: {there} rows in the target, {report.rows[table.name]} copied")
            if record is not None:
                record_in(dst, record(report))
    finally:
        target.dispose()
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _chunks(conn: Any, table: Table) -> Iterator[list[dict[str, Any]]]:
    order = list(table.primary_key.columns)
    result = conn.execution_options(yield_per=CHUNK).execute(select(table).order_by(*order))
    dates = [c.name for c in table.columns if isinstance(c.type, DateTime)]
    zeroed = RECOUNTED.get(table.name, ())
    for part in result.partitions():
        rows = [dict(row._mapping) for row in part]
        for row in rows:
            for name in dates:
                row[name] = _utc(row[name])
            for name in zeroed:
                row[name] = 0
        yield rows


def _restore_changed_at(src: Any, dst: Any) -> None:
    """The studies' and patients' changed_at as the source kept them: the
    rows copied after them (instances, identifiers, studies) moved each to
    the copy's time (the triggers of migrations 0022 and 0024), and an EMR
    polling _lastUpdated would fetch every study and patient again, though
    none changed."""
    for name in ("studies", "patients"):
        table = Base.metadata.tables[name]
        result = src.execution_options(yield_per=CHUNK).execute(
            select(table.c.pk, table.c.changed_at).order_by(table.c.pk))
        restore = (update(table).where(table.c.pk == bindparam("b_pk"))
                   .values(changed_at=bindparam("b_changed_at")))
        for part in result.partitions():
            dst.execute(restore, [{"b_pk": row.pk, "b_changed_at": _utc(row.changed_at)} for row in part])


def _utc(value: datetime | None) -> datetime | None:
    # SQLite keeps the UTC wall time without its zone; PostgreSQL answers in
    # the session's zone. Both mean the same instant once made UTC.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _advance_sequences(conn: Any, tables: list[Table]) -> None:
    """Rows were inserted with their keys: the next generated key must come after them."""
    for table in tables:
        columns = list(table.primary_key.columns)
        if len(columns) != 1 or not columns[0].autoincrement or columns[0].name != "pk":
            continue
        conn.execute(text(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'pk'), "  # noqa: S608 - names from our metadata
            f"(SELECT coalesce(max(pk), 0) + 1 FROM {table.name}), false)"))


__all__ = ["COPY_ROLE", "CopyRefused", "CopyReport", "copy_index", "redacted"]
