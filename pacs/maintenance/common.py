"""Pieces shared by the maintenance jobs: progress hooks, capped problem
lists, batched "is this key indexed?" lookups, indexing an object that is
already stored, and deleting index rows without leaving empty parents."""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, Table, delete, func, select

from storage import ObjectStore, StorageError, sha256_of

from ..app import Pacs
from ..index.db import retry_write
from ..index.models import Instance, Order, Patient, Report, Series, Study
from ..index.prune import prune_after_delete
from ..index.writer import AddResult, IndexRecord

log = logging.getLogger(__name__)

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


def prune_files(root: Path, stale: Callable[[Path], bool], *, keep_root: bool = False) -> None:
    """Remove the files under *root* that *stale* names, then the folders
    left empty (*root* too unless *keep_root*): an export rerun into the
    same folder clears what it no longer writes."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), reverse=True):  # a folder's files before the folder
        if path.is_dir():
            with contextlib.suppress(OSError):  # only an empty one
                path.rmdir()
        elif stale(path):
            path.unlink()
    if not keep_root:
        with contextlib.suppress(OSError):
            root.rmdir()


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


def written_after(store: ObjectStore, key: str, other: str, *, or_same: bool = False) -> bool:
    """Whether the object under *key* was written strictly after the one
    under *other* (or at the same time, with *or_same*): two copies of one
    instance, the overwrite policy's resend beside the copy it replaced
    (``<sop>.resent.dcm`` and ``<sop>.dcm`` alternate, so the names do not
    tell). False when the store cannot tell: an object missing, no time, or
    the same time (S3 counts whole seconds) without *or_same*."""
    try:
        mine, theirs = store.stat(key).modified, store.stat(other).modified
    except StorageError:
        return False
    return mine is not None and theirs is not None and (mine > theirs or (or_same and mine == theirs))


def indexed_among(engine: Engine, keys: list[str]) -> set[str]:
    """The keys of *keys* that an index row references.

    Keys of the ingest layout (``study/series/sop.dcm``) are looked up by SOP
    Instance UID, which is indexed: one query per batch, whatever the size
    of the archive. Other keys (rare: hand-made) are compared directly.
    """
    with engine.connect() as conn:
        return _indexed_in(conn, keys)


def _indexed_in(conn: Connection, keys: list[str]) -> set[str]:
    """:func:`indexed_among` on *conn* (in the caller's transaction)."""
    wanted = set(keys)
    by_sop = {sop for k in keys if (sop := sop_of_key(k))}
    odd = [k for k in keys if sop_of_key(k) is None]
    found: set[str] = set()
    if by_sop:
        rows = conn.execute(select(instances_t.c.storage_key).where(instances_t.c.sop_uid.in_(by_sop)))
        found.update(k for (k,) in rows if k in wanted)
    if odd:
        rows = conn.execute(select(instances_t.c.storage_key).where(instances_t.c.storage_key.in_(odd)))
        found.update(k for (k,) in rows)
    return found


def unindexed_under(conn: Connection, store: ObjectStore, prefix: str, known: Iterable[str]) -> list[str]:
    """Keys stored under *prefix* (a study's or series' folder) that no index
    row references and that are not in *known* (the keys of the rows being
    deleted), looked up in the caller's transaction.

    A crash between an object's write and its index commit leaves it so (an
    orphan). A deletion of its study or series takes it too: left behind,
    ``verify --repair`` adopted it and brought the deleted study back, and
    its patient data stayed in the store. An object being received right
    now is among them as well; the tombstone the deletion records for it
    settles that race as for a resend (see :mod:`pacs.index.tombstones`).
    A store that cannot list is logged: the deletion goes on without them."""
    known = set(known)
    try:
        listed = [info.key for info in store.list(prefix) if info.key not in known]
    except StorageError as exc:
        log.warning("unindexed objects under %s not looked for (the deletion goes on without them): %s",
                    prefix, exc)
        return []
    found: list[str] = []
    for batch in batched(listed):
        indexed = _indexed_in(conn, batch)
        found += [k for k in batch if k not in indexed]
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
        # Indexed anew from storage (pacs reindex): no examination arriving.
        examination=False,
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


def delete_instance_rows(engine: Engine, pks: list[int]) -> dict[str, int]:
    """Delete instance rows by primary key (and the parents they leave empty).

    Each batch's transaction is run again when it loses a deadlock (an
    ingest or an HIS update holding the study or the patient it empties):
    a signature's PDF withdrawn (HTTP) or ``verify --repair`` failed on it."""
    removed = {"instances": 0, "series": 0, "studies": 0, "patients": 0}

    def once(conn: Connection, batch: list[int]) -> dict[str, int]:
        series_pks = set(
            conn.execute(select(instances_t.c.series_pk).where(instances_t.c.pk.in_(batch)).distinct()).scalars()
        )
        done = {"instances": conn.execute(delete(instances_t).where(instances_t.c.pk.in_(batch))).rowcount or 0}
        done.update(prune_after_delete(conn, series_pks, set()))
        return done

    for batch in batched(pks):
        # Counted once committed: a run rolled back deleted nothing.
        for k, v in retry_write(engine, lambda conn, batch=batch: once(conn, batch),
                                what="deletion of instance rows").items():
            removed[k] += v
    return removed
