"""Pieces shared by the maintenance jobs: progress hooks, capped problem
lists, batched "is this key indexed?" lookups, indexing an object that is
already stored, and deleting index rows without leaving empty parents."""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Table, delete, exists, func, select, update

from storage import sha256_of

from ..app import Pacs
from ..index.db import write_transaction
from ..index.models import Instance, Order, Patient, Report, Series, Study
from ..index.writer import AddResult, IndexRecord

instances_t: Table = Instance.__table__  # type: ignore[assignment]
series_t: Table = Series.__table__  # type: ignore[assignment]
studies_t: Table = Study.__table__  # type: ignore[assignment]
patients_t: Table = Patient.__table__  # type: ignore[assignment]
orders_t: Table = Order.__table__  # type: ignore[assignment]
reports_t: Table = Report.__table__  # type: ignore[assignment]

# Problems listed per kind in a report; the counts are always complete.
LIST_CAP = 100
# Keys looked up per index query and rows read per page.
BATCH = 500


class Progress(Protocol):
    """What a job tells its caller as it goes (the CLI draws a bar)."""

    def start(self, description: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullProgress:
    """Progress nobody watches."""

    def start(self, description: str, total: int | None = None) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


@dataclass
class Capped:
    """A count with the first few items (a million problems are not listed)."""

    count: int = 0
    items: list[Any] = field(default_factory=list)
    cap: int = LIST_CAP

    def add(self, item: Any) -> None:
        self.count += 1
        if len(self.items) < self.cap:
            self.items.append(item)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "items": self.items, "truncated": self.count > len(self.items)}


def os_user() -> str:
    """Who runs the command, for the audit trail: the person, when sudo
    made them the service account (``alice (as pacs)``, the README's
    ``sudo -u pacs pacs ...``), else the account."""
    try:
        account = getpass.getuser() or "cli"
    except Exception:  # no passwd entry in a container
        account = "cli"
    person = os.environ.get("SUDO_USER", "").strip()
    if person and person != account:
        return f"{person} (as {account})"
    return account


def batched(items: Iterable[Any], size: int = BATCH) -> Iterator[list[Any]]:
    """Lists of up to *size* items, lazily."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# study/series/sop.dcm, or sop.<variant>.dcm for another encoding of the
# instance (pacs compress: .jls, .j2k; a UID has no letters).
_CANONICAL = re.compile(r"^[^/]+/[^/]+/(?P<sop>[^/]+?)(?:\.[a-z][a-z0-9]*)?\.dcm$")


def sop_of_key(key: str) -> str | None:
    """The SOP Instance UID a key of the ingest layout names, else None."""
    match = _CANONICAL.match(key)
    return match.group("sop") if match else None


def indexed_among(engine: Engine, keys: list[str]) -> set[str]:
    """The keys of *keys* that an index row references.

    Keys of the ingest layout (``study/series/sop.dcm``) are looked up by SOP
    Instance UID, which is indexed: one query per batch, whatever the size
    of the archive. Other keys (rare: hand-made) are compared directly.
    """
    wanted = set(keys)
    by_sop = {sop for k in keys if (sop := sop_of_key(k))}
    odd = [k for k in keys if sop_of_key(k) is None]
    found: set[str] = set()
    with engine.connect() as conn:
        if by_sop:
            rows = conn.execute(select(instances_t.c.storage_key).where(instances_t.c.sop_uid.in_(by_sop)))
            found.update(k for (k,) in rows if k in wanted)
        if odd:
            rows = conn.execute(select(instances_t.c.storage_key).where(instances_t.c.storage_key.in_(odd)))
            found.update(k for (k,) in rows)
    return found


def index_stored_object(pacs: Pacs, key: str, *, source: str = "reindex",
                        replaces: tuple[str, str | None] | None = None) -> AddResult:
    """Index the object stored under *key* as it is: nothing is written to
    storage. Parses the header (validating the object like ingest does) and
    hashes the bytes, then commits through the group committer.

    Raises :class:`pacs.errors.IngestError` for an object that is not valid
    DICOM, :class:`storage.StorageError` when it cannot be read. With
    *replaces*, the instance's row is pointed at *key* if it still holds
    that (storage key, sha256) (see ``IndexRecord.replaces``).
    """
    from ..header import parse_header

    with pacs.store.local_path(key) as path, open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        header = parse_header(stream, size)
        header.dataset = None  # only the index values are needed from here on
        stream.seek(0)
        digest, _ = sha256_of(stream)
    record = IndexRecord(
        header=header,
        size=size,
        sha256=digest,
        storage_key=key,
        received_at=datetime.now(UTC),
        source=source,
        object_present=lambda key=key: pacs.store.exists(key),
        replaces=replaces,
    )
    return pacs.committer.submit(record)


def count_rows(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def lock_study(conn: Connection, study_pk: int) -> None:
    """Hold *study_pk*'s series, then the study, for this deletion's
    transaction, before its instances are selected (PostgreSQL; SQLite's
    deletion already holds the one write lock).

    An instance being indexed into one of its series holds that series row
    (the foreign key's share lock) until it commits; without this lock the
    deletion selected the instances before that commit and its cascade
    deleted the new row after it, so the new object's key had no tombstone
    and the object was left an orphan (which ``verify --repair`` adopted
    back). Series first, as the ingest's counters take them."""
    if conn.dialect.name == "sqlite":
        return
    conn.execute(select(series_t.c.pk).where(series_t.c.study_pk == study_pk).order_by(series_t.c.pk)
                 .with_for_update())
    conn.execute(select(studies_t.c.pk).where(studies_t.c.pk == study_pk).with_for_update())


def prune_after_delete(conn: Connection, series_pks: set[int], patient_pks: set[int]) -> dict[str, int]:
    """After instance or study rows were deleted: drop series left without
    instances, fix their studies' series counters and modalities, drop
    studies left without series (unless a report keeps them) and patients
    left without studies and orders. Counters of instances are kept by the
    database triggers; the series counter of a study is not, hence here."""
    removed = {"series": 0, "studies": 0, "patients": 0}
    study_pks: set[int] = set()
    if series_pks:
        empty = conn.execute(
            select(series_t.c.pk, series_t.c.study_pk).where(
                series_t.c.pk.in_(series_pks), series_t.c.num_instances <= 0
            )
        ).all()
        if empty:
            conn.execute(delete(series_t).where(series_t.c.pk.in_([r.pk for r in empty])))
            removed["series"] = len(empty)
            study_pks = {r.study_pk for r in empty}
    for study_pk in study_pks:
        mods = conn.execute(
            select(series_t.c.modality).where(series_t.c.study_pk == study_pk).distinct()
        ).scalars().all()
        remaining = conn.execute(
            select(func.count()).select_from(series_t).where(series_t.c.study_pk == study_pk)
        ).scalar_one()
        if remaining == 0 and not conn.execute(
            select(exists().where(reports_t.c.study_pk == study_pk))
        ).scalar():
            patient_pk = conn.execute(select(studies_t.c.patient_pk).where(studies_t.c.pk == study_pk)).scalar()
            conn.execute(delete(studies_t).where(studies_t.c.pk == study_pk))
            removed["studies"] += 1
            if patient_pk is not None:
                patient_pks.add(patient_pk)
        else:
            conn.execute(
                update(studies_t)
                .where(studies_t.c.pk == study_pk)
                .values(num_series=remaining, modalities="\\".join(sorted(m for m in mods if m)))
            )
    removed["patients"] = prune_patients(conn, patient_pks)
    return removed


def prune_patients(conn: Connection, patient_pks: set[int]) -> int:
    """Delete the patients of *patient_pks* no study and no order refers to."""
    removed = 0
    for pk in patient_pks:
        used = conn.execute(
            select(
                exists().where(studies_t.c.patient_pk == pk) | exists().where(orders_t.c.patient_pk == pk)
            )
        ).scalar()
        if not used:
            removed += conn.execute(delete(patients_t).where(patients_t.c.pk == pk)).rowcount or 0
    return removed


def delete_instance_rows(engine: Engine, pks: list[int]) -> dict[str, int]:
    """Delete instance rows by primary key (and the parents they leave empty)."""
    removed = {"instances": 0, "series": 0, "studies": 0, "patients": 0}
    for batch in batched(pks):
        with write_transaction(engine) as conn:
            series_pks = set(
                conn.execute(select(instances_t.c.series_pk).where(instances_t.c.pk.in_(batch)).distinct()).scalars()
            )
            removed["instances"] += conn.execute(delete(instances_t).where(instances_t.c.pk.in_(batch))).rowcount or 0
            for k, v in prune_after_delete(conn, series_pks, set()).items():
                removed[k] += v
    return removed
