"""Read-side queries on the index used by the core and the CLI."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import DBAPIError

from .index.db import discard_connection
from .index.models import Instance, Series, Study


@dataclass(frozen=True)
class Stats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance's bytes are and what they should be."""

    sop_uid: str
    study_uid: str
    series_uid: str
    storage_key: str
    size: int
    sha256: str
    transfer_syntax_uid: str
    sop_class_uid: str


class IndexReader:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lookup_lock = threading.Lock()
        self._lookup_conn: Connection | None = None

    def instance_key(self, sop_uid: str) -> str | None:
        """Storage key of an indexed instance, or None.

        Asked once per object received into a remote store, so it runs on
        one kept autocommit connection: a pool checkout costs PostgreSQL a
        ping, a BEGIN and a ROLLBACK around the one query (four round trips
        where one does)."""
        row = self._look_up(select(Instance.storage_key).where(Instance.sop_uid == sop_uid))
        return None if row is None else str(row.storage_key)

    def instance_copy(self, sop_uid: str) -> tuple[str, str, int] | None:
        """(storage key, sha256, size) of an indexed instance, or None: what
        a resend under the overwrite policy is compared with (same kept
        connection as :meth:`instance_key`)."""
        row = self._look_up(select(Instance.storage_key, Instance.sha256, Instance.size_bytes)
                            .where(Instance.sop_uid == sop_uid))
        return None if row is None else (str(row.storage_key), str(row.sha256 or ""), int(row.size_bytes or 0))

    def _look_up(self, stmt: Any) -> Any:
        """The first row of *stmt* on the kept autocommit connection (None: no row)."""
        with self._lookup_lock:
            for attempt in (1, 2):
                try:
                    if self._lookup_conn is None or self._lookup_conn.closed:
                        self._lookup_conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                    return self._lookup_conn.execute(stmt).first()
                except DBAPIError:
                    # The server may have restarted since: one fresh connection.
                    discard_connection(self._lookup_conn)
                    self._lookup_conn = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Give back the kept lookup connection."""
        with self._lookup_lock:
            if self._lookup_conn is not None:
                self._lookup_conn.close()
                self._lookup_conn = None

    def _stored_query(self):  # type: ignore[no-untyped-def]
        return (
            select(
                Instance.sop_uid,
                Study.study_uid,
                Series.series_uid,
                Instance.storage_key,
                Instance.size_bytes,
                Instance.sha256,
                Instance.transfer_syntax_uid,
                Instance.sop_class_uid,
            )
            .join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
        )

    def stored_instance(self, sop_uid: str) -> StoredInstance | None:
        with self.engine.connect() as conn:
            row = conn.execute(self._stored_query().where(Instance.sop_uid == sop_uid)).first()
        return StoredInstance(*row) if row else None

    def iter_stored(self, study_uid: str | None = None, batch: int = 1000) -> Iterator[StoredInstance]:
        """Every indexed instance (of one study), in pages, never all at once."""
        last_pk = 0
        while True:
            query = self._stored_query().add_columns(Instance.pk).where(Instance.pk > last_pk)
            if study_uid:
                query = query.where(Study.study_uid == study_uid)
            with self.engine.connect() as conn:
                rows = conn.execute(query.order_by(Instance.pk).limit(batch)).all()
            if not rows:
                return
            for row in rows:
                yield StoredInstance(*row[:-1])
            last_pk = rows[-1][-1]

    def stats(self) -> Stats:
        with self.engine.connect() as conn:
            return archive_counts(conn)


def archive_counts(conn: Connection) -> Stats:
    """Patients, studies, series, instances and bytes, from the study rows'
    counters (kept by triggers): one pass over the studies, never a count of
    the instances (`pacs stats`, /metrics)."""
    # Patients with images: the HIS registers (ADT, orders) many who
    # never come to imaging, and "patients" sits beside the image counts.
    patients = conn.execute(select(func.count(func.distinct(Study.patient_pk)))).scalar_one()
    studies, series_count, instances, size = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(Study.num_series), 0),
            func.coalesce(func.sum(Study.num_instances), 0),
            func.coalesce(func.sum(Study.size_bytes), 0),
        )
    ).one()
    return Stats(int(patients), int(studies), int(series_count), int(instances), int(size))
