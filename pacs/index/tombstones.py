"""Tombstones: the storage keys whose objects a deletion is removing.

Storage keys follow the UIDs, so a modality resending an instance of a study
being deleted writes the very key the deletion is about to delete. Checking
the index right before each ``store.delete`` left a window (a resend written
and indexed between that check and the delete lost its acknowledged object:
an index row without its object). The rules that close it:

1. The deletion's transaction that deletes the index rows also inserts one
   ``deleting_objects`` row (a tombstone) per key (:func:`record`). A key is
   deleted from the store only by :func:`finish`, and only while a tombstone
   of it is *active* (not finished) *and locked*: ``BEGIN IMMEDIATE`` on
   SQLite (the one writer), ``SELECT ... FOR UPDATE`` on PostgreSQL; the
   same transaction marks it finished ("deleted") after the delete.
   Whoever locks several tombstones locks them in (storage key, pk) order
   (:data:`LOCK_ORDER`), so two of them never wait for each other.
2. The ingest's index transaction, after inserting an instance row, looks
   its key up among the tombstones (one query per batch; nothing found is
   the common case) (:func:`settle`):

   - an active tombstone is *claimed*: marked finished ("kept") in the
     transaction that commits the row, so the deletion then skips the key
     and the resend is acknowledged and kept. On PostgreSQL the claim is an
     ``UPDATE ... WHERE finished_at IS NULL``: it waits for a deletion that
     holds the row locked, then sees it finished and claims nothing;
   - a tombstone finished "deleted" (its object was deleted at some moment,
     maybe after this ingest wrote it) makes the ingest check that the
     object is there now. No deletion can delete the key any more before
     this row is committed (a new tombstone needs a committed row to
     delete), so present means kept; absent means the store is refused with
     a transient status (C-STORE 0xA702, STOW 503) and the modality's retry
     succeeds. Nothing is left behind: the refused copy is already gone.

   The check comes after the row's INSERT: on PostgreSQL an INSERT that
   meets the old row deleted by a deletion still in progress waits for it to
   commit, so the lookup then sees its tombstones (read committed takes a
   new snapshot per statement). A deletion that commits before the INSERT
   is seen too; one whose row deletion comes after the INSERT met a live row
   (the resend is a duplicate of an instance the deletion then removes,
   object and row together).
3. Finished tombstones are kept for :data:`RETAIN` and then pruned
   (:func:`prune`); an ingest whose index transaction comes more than
   :data:`INGEST_GUARD` seconds after its object was written is refused
   (transient), so it can never miss a pruned "deleted" tombstone.
4. A deletion that dies after its commit leaves active tombstones (as
   durable as the rows' deletion); the next ``pacs purge --yes`` or ``pacs
   verify --repair`` finishes them (:func:`finish_all`). Their objects are
   never adopted back: an active tombstone's key is not an orphan.

Nothing here deletes an object an index row references: a refused ingest
deletes nothing; :func:`finish` deletes only keys of an active, locked
tombstone, which no committed row references (the row that did was deleted
with the tombstone's insert; a resend's row claims the tombstone in its
own transaction, and the claim conflicts with the lock).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, exists, insert, or_, select, update

from .db import db_now
from .models import DeletingObject, Instance

log = logging.getLogger(__name__)

tombstones_t: Table = DeletingObject.__table__  # type: ignore[assignment]
_instances_t: Table = Instance.__table__  # type: ignore[assignment]

# How long finished tombstones are kept; far more than INGEST_GUARD, so that
# clocks of different nodes may differ by most of an hour.
RETAIN = timedelta(hours=1)
# Seconds an ingest may take from its object write to its index transaction.
INGEST_GUARD = 600.0
# Objects deleted per locked transaction (the lock holds SQLite ingest commits).
FINISH_BATCH = 50
# The tombstones of objects `pacs compress` replaced, and how long such an
# object stays for a server that looked the old row up before the
# replacement (a C-MOVE to a slow satellite link resolves its instances a
# batch ahead of sending them): no one deletes it earlier.
REPLACED = "compress"
READERS_GRACE = timedelta(minutes=10)
# The order in which tombstone rows are locked (finish, settle's claims,
# _take_over_replaced): two finishes of overlapping keys (two deletions, a
# deletion and the sweeper) or a finish and an ingest claiming several keys
# locked them in whatever order their scans met them, and deadlocked.
LOCK_ORDER = (tombstones_t.c.storage_key, tombstones_t.c.pk)


class ObjectDeleted(Exception):
    """The object of a record being indexed may be gone (deleted by a
    deletion after it was written): the ingest is refused, transiently."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def now(conn: Connection) -> datetime:
    """The time of tombstones: the database's (:func:`pacs.index.db.db_now`),
    so that a node whose clock runs ahead does not find a replaced object's
    readers' grace over minutes early, nor prune tombstones early."""
    return db_now(conn)


def record(conn: Connection, keys: Iterable[str], deletion: str, *, instances_deleted: bool = False) -> list[str]:
    """Tombstones for *keys*, in the caller's transaction (the one deleting their rows).

    With *instances_deleted* (``pacs delete``, ``pacs purge``, HTTP DELETE:
    the instances go, not only these objects), the deletion also takes over
    the replaced objects of the same instances still within their readers'
    grace (``<sop>.dcm`` after ``pacs compress`` made ``<sop>.jls.dcm``):
    their keys are returned, for the caller to finish with its own. The
    grace is for readers of a replacement; left to it, an index lost
    meanwhile made ``pacs reindex`` bring the deleted instance back from
    that copy."""
    keys = list(keys)
    at = now(conn)
    rows = [{"storage_key": k, "deletion": deletion[:64], "created_at": at, "outcome": ""} for k in keys]
    for start in range(0, len(rows), 500):
        conn.execute(insert(tombstones_t), rows[start:start + 500])
    if not instances_deleted:
        return []
    return _take_over_replaced(conn, keys, deletion[:64])


# study/series/sop.dcm or sop.<variant>.dcm (a UID has no letters); the same
# layout as pacs.maintenance.common.sop_of_key.
_INSTANCE_KEY = re.compile(r"^(?P<folder>[^/]+/[^/]+)/(?P<sop>[^/]+?)(?:\.[a-z][a-z0-9]*)?\.dcm$")


def _take_over_replaced(conn: Connection, keys: list[str], deletion: str) -> list[str]:
    """Make the active :data:`REPLACED` tombstones of *keys*' instances part
    of *deletion* (due at once); their keys."""
    instances = {(m["folder"], m["sop"]) for k in keys if (m := _INSTANCE_KEY.match(k))}
    taken: list[str] = []
    wanted = sorted(instances)
    for start in range(0, len(wanted), 100):
        chunk = wanted[start:start + 100]
        # UIDs hold dots: "1.2.3." also starts "1.2.3.4.dcm", hence the exact check after.
        prefixes = [tombstones_t.c.storage_key.startswith(f"{folder}/{sop}.", autoescape=True)
                    for folder, sop in chunk]
        rows = conn.execute(select(tombstones_t.c.pk, tombstones_t.c.storage_key).where(
            tombstones_t.c.deletion == REPLACED, tombstones_t.c.finished_at.is_(None), or_(*prefixes))).all()
        mine = [r for r in rows if (m := _INSTANCE_KEY.match(r.storage_key)) and (m["folder"], m["sop"]) in instances]
        if mine:
            # Locked in LOCK_ORDER first (an UPDATE locks in scan order); one
            # a finish_due finished meanwhile is not taken over.
            locked = set(conn.execute(select(tombstones_t.c.pk).where(
                tombstones_t.c.pk.in_([r.pk for r in mine]), tombstones_t.c.finished_at.is_(None))
                .order_by(*LOCK_ORDER).with_for_update()).scalars())
            if locked:
                conn.execute(update(tombstones_t).where(tombstones_t.c.pk.in_(locked)).values(deletion=deletion))
                taken.extend(dict.fromkeys(r.storage_key for r in mine if r.pk in locked))
    return taken


# Sources that index objects found in the store (not received): they never
# take a key back from a deletion (that would undo it), see settle.
NOT_RECEIVED = frozenset({"repair", "reindex"})


def settle(conn: Connection, records: list[tuple[str, Callable[[], bool] | None, float, str]]) -> None:
    """The ingest side (rule 2), in the index transaction after the rows'
    INSERTs: *records* are (storage key, "is the object there?", monotonic
    time the object was written, source) of the rows inserted or replaced.
    Raises :class:`ObjectDeleted` for a record that must be refused; an
    object found in the store (``verify --repair``, ``reindex``) whose key
    is being deleted is refused rather than kept: it is no orphan."""
    if not records:
        return
    clock = time.monotonic()
    for key, _, written, _ in records:
        if clock - written > INGEST_GUARD:
            raise ObjectDeleted(key, f"{key} was written {clock - written:.0f} s before its index transaction: "
                                     "a deletion may have removed it meanwhile")
    keys = {key for key, _, _, _ in records}
    hit = set(conn.execute(select(tombstones_t.c.storage_key).where(tombstones_t.c.storage_key.in_(keys))
                           .distinct()).scalars())
    # In key order: each claim locks the key's tombstones (LOCK_ORDER).
    for key, present, _, source in sorted(records, key=lambda r: r[0]):
        if key not in hit:
            continue
        if source in NOT_RECEIVED:
            if conn.execute(select(exists().where(tombstones_t.c.storage_key == key,
                                                  tombstones_t.c.finished_at.is_(None)))).scalar():
                raise ObjectDeleted(key, f"{key} is being deleted: not adopted")
        claimed = conn.execute(
            update(tombstones_t)
            .where(tombstones_t.c.storage_key == key, tombstones_t.c.finished_at.is_(None))
            .values(finished_at=now(conn), outcome="kept")
        ).rowcount
        if claimed:
            log.warning("%s was stored again while its deletion was under way: kept", key)
        deleted = conn.execute(select(exists().where(tombstones_t.c.storage_key == key,
                                                     tombstones_t.c.outcome == "deleted"))).scalar()
        if not deleted:
            continue
        try:
            there = present() if present is not None else False
        except Exception as exc:  # the store cannot tell: refuse, the retry will
            log.warning("could not check %s after a deletion: %s", key, exc)
            there = False
        if not there:
            raise ObjectDeleted(key, f"{key} was deleted by a deletion of its instance while it was received")


@dataclass
class Finished:
    deleted: list[str] = field(default_factory=list)
    # (key, why): its tombstone stays active, a later run deletes the object
    # (the sweeper's finish_due, ``pacs verify --repair``, ``pacs purge --yes``).
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Keys without an active tombstone any more (a resend took the key back).
    kept: list[str] = field(default_factory=list)


def finish(engine: Engine, store: Any, keys: list[str],
           before_delete: Callable[[str], None] | None = None) -> Finished:
    """Delete the objects of *keys* whose tombstones are active, in locked
    transactions of :data:`FINISH_BATCH` keys (rule 1). A key whose delete
    fails keeps its tombstone active (finished by a later run), and so does
    a batch whose transaction lost to another (a deadlock's victim): its
    keys are reported failed, never raised, for the deletion's rows are
    committed already and the deletion is done but for its objects."""
    from .db import is_transient

    done = Finished()
    for start in range(0, len(keys), FINISH_BATCH):
        batch = list(dict.fromkeys(keys[start:start + FINISH_BATCH]))
        try:
            one = _finish_batch(engine, store, batch, before_delete)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Objects this run deleted before the rollback are deleted again
            # (a missing key is no error) with their tombstones by the next run.
            cause = getattr(getattr(exc, "orig", None), "sqlstate", None) or type(exc).__name__
            why = f"left to the sweeper (or pacs verify --repair): the index was busy ({cause})"
            log.warning("objects of %d keys left to the sweeper (the index was busy: %s): %s",
                        len(batch), cause, ", ".join(batch))
            done.failed.extend((key, why) for key in batch)
            continue
        done.deleted += one.deleted
        done.failed += one.failed
        done.kept += one.kept
    return done


def _finish_batch(engine: Engine, store: Any, batch: list[str],
                  before_delete: Callable[[str], None] | None) -> Finished:
    """One transaction of :func:`finish`; what it did, counted only once committed."""
    from storage import StorageError

    from .db import is_sqlite, write_transaction

    done = Finished()
    with write_transaction(engine) as conn:
        query = select(tombstones_t.c.pk, tombstones_t.c.storage_key).where(
            tombstones_t.c.storage_key.in_(batch), tombstones_t.c.finished_at.is_(None))
        if not is_sqlite(engine):
            query = query.order_by(*LOCK_ORDER).with_for_update()
        rows = conn.execute(query).all()
        active: dict[str, list[int]] = {}
        for row in rows:
            active.setdefault(row.storage_key, []).append(row.pk)
        # Belt and braces: a key some row references is never deleted.
        referenced = set(conn.execute(select(_instances_t.c.storage_key)
                                      .where(_instances_t.c.storage_key.in_(list(active)))).scalars())
        finished: dict[str, list[int]] = {"deleted": [], "kept": []}
        for key in batch:
            if key not in active:
                done.kept.append(key)
                continue
            if key in referenced:
                log.warning("%s is indexed again: kept", key)
                done.kept.append(key)
                finished["kept"].extend(active[key])
                continue
            try:
                if before_delete is not None:
                    before_delete(key)
                store.delete(key)
            except StorageError as exc:
                done.failed.append((key, str(exc)))
                log.warning("object %s not deleted (its tombstone stays for pacs verify --repair): %s", key, exc)
                continue
            done.deleted.append(key)
            finished["deleted"].extend(active[key])
        at = now(conn)
        for outcome, pks in finished.items():
            if pks:
                conn.execute(update(tombstones_t).where(tombstones_t.c.pk.in_(pks))
                             .values(finished_at=at, outcome=outcome))
    return done


def active_keys(engine: Engine, limit: int | None = None) -> list[str]:
    """Keys of active tombstones (objects still to delete), oldest first."""
    with engine.connect() as conn:
        query = (select(tombstones_t.c.storage_key).where(tombstones_t.c.finished_at.is_(None))
                 .order_by(tombstones_t.c.pk))
        if limit is not None:
            query = query.limit(limit)
        return list(dict.fromkeys(conn.execute(query).scalars()))


def set_aside_after_restore(engine: Engine) -> int:
    """Retire the active tombstones of a restored index (``pacs restore``).

    They name deletions under way when the backup was taken, but since then
    a modality may have sent those instances again and been acknowledged
    (the claim is not in the backup): finishing them would delete
    acknowledged objects. Set aside ("restored"), their objects are orphans
    that ``verify --repair`` indexes again; a deletion can be redone, an
    acknowledged object lost cannot be."""
    from .db import write_transaction

    with write_transaction(engine) as conn:
        return conn.execute(update(tombstones_t).where(tombstones_t.c.finished_at.is_(None))
                            .values(finished_at=now(conn), outcome="restored")).rowcount or 0


def prune(engine: Engine) -> int:
    """Drop tombstones finished more than :data:`RETAIN` ago."""
    from .db import write_transaction

    with write_transaction(engine) as conn:
        return conn.execute(delete(tombstones_t).where(tombstones_t.c.finished_at < now(conn) - RETAIN)).rowcount or 0


def _due_keys(engine: Engine, limit: int, deletion: str | None) -> list[str]:
    """Active tombstones' keys (of *deletion* only, when given), oldest
    first, but for replaced objects still within :data:`READERS_GRACE`."""
    with engine.connect() as conn:
        young = (tombstones_t.c.deletion == REPLACED) & (tombstones_t.c.created_at > now(conn) - READERS_GRACE)
        query = (select(tombstones_t.c.storage_key).where(tombstones_t.c.finished_at.is_(None), ~young)
                 .order_by(tombstones_t.c.pk).limit(limit))
        if deletion is not None:
            query = query.where(tombstones_t.c.deletion == deletion)
        return list(dict.fromkeys(conn.execute(query).scalars()))


def finish_due(engine: Engine, store: Any, deletion: str | None = None) -> Finished:
    """Finish every active tombstone that is due (a deletion that died half
    way, an object compress replaced more than :data:`READERS_GRACE` ago);
    only those of *deletion*, when given. Returns what was done."""
    total = Finished()
    tried: set[str] = set()
    while True:
        keys = [k for k in _due_keys(engine, len(tried) + 500, deletion) if k not in tried]
        if not keys:
            break
        tried.update(keys)
        done = finish(engine, store, keys)
        total.deleted += done.deleted
        total.failed += done.failed
        total.kept += done.kept
    return total


def finish_all(engine: Engine, store: Any) -> Finished:
    """:func:`finish_due` for every deletion, then prune old finished ones."""
    total = finish_due(engine, store)
    prune(engine)
    return total
