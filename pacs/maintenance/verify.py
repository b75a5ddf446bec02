"""``pacs verify``: does storage hold exactly what the index says?

Two passes, both streaming:

1. index -> storage: every instance row, page by page (by primary key); each
   object is read once, in chunks, to compare its size and sha256 with the
   row (``quick``: size only). Missing and corrupt objects are reported.
2. storage -> index: ``store.list()`` in batches of 500 keys; each batch is
   looked up in one indexed query (by the SOP Instance UID the key names), so
   no set of all index keys is ever built. Keys no row references are
   orphans (a crash between the object write and the index commit leaves
   one; so does an object being received at this very moment).

Repair (``repair=True``):

- valid orphans are adopted through the normal ingest path (read from the
  store, validated, indexed; routing and reconciliation apply as for any
  received object); an orphan whose instance is already indexed under
  another key is reported as a duplicate and left alone (also under the
  overwrite policy: a resend a crash left before its commit never replaces
  the acknowledged copy);
- an adopted rejection note withdraws again the instances it lists whose
  objects are gone (an index restored from before it still lists them, or
  does not know them), recording them rejected (pacs.rejections); what it
  lists that is still stored stays (a note that was never applied);
- invalid orphans are reported, never deleted (somebody must look at them);
- objects a crashed ``pacs purge`` left behind are deleted (see purge);
- an original ``<sop>.dcm`` whose instance's row names its intact
  ``pacs compress`` re-encoding is deleted ("superseded", after a reindex);
  so is, under the overwrite policy, a copy of an instance whose row names
  an intact copy in the same series written after it (the copy a resend
  replaced, ``<sop>.dcm`` / ``<sop>.resent.dcm``, left by an index lost
  within its readers' grace); a copy written after the indexed one is not
  (a resend a crash left before its commit: reported as a duplicate); of two
  such copies of an instance not indexed at all (an index restored from
  before it came), the one written last is adopted;
- index rows whose object is missing are only dropped with
  ``drop_missing=True`` (the study then loses those instances; series and
  studies left empty go too). Corrupt objects are never dropped: the row
  is the evidence of what the bytes should be, restore them from a backup.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, select

from storage import ObjectNotFound, StorageError, sha256_of, validate_key

from ..app import Pacs
from ..errors import IngestError, PacsError, Status
from ..index import tombstones
from ..index.db import write_transaction
from ..index.writer import Outcome
from ..ingest import RESENT_VARIANT, Origin, object_key
from ..key_objects import KOS_CLASS
from ..part10 import FileSource
from .common import (
    BATCH,
    Capped,
    NullProgress,
    Progress,
    batched,
    count_rows,
    delete_instance_rows,
    index_stored_object,
    indexed_among,
    instances_t,
    os_user,
    sop_of_key,
    written_after,
)
from .compress import KEY_VARIANTS
from .purge import PurgeJournal, finish_interrupted

if TYPE_CHECKING:
    from ..rejections import Rejection  # pacs.rejections imports this package

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What verify found (and repaired)."""

    checked: int = 0
    checked_bytes: int = 0
    stored: int = 0
    missing: Capped = field(default_factory=Capped)
    corrupt: Capped = field(default_factory=Capped)
    unreadable: Capped = field(default_factory=Capped)
    orphans: Capped = field(default_factory=Capped)
    invalid_orphans: Capped = field(default_factory=Capped)
    duplicate_orphans: Capped = field(default_factory=Capped)
    adopted: Capped = field(default_factory=Capped)
    not_adopted: Capped = field(default_factory=Capped)
    # Originals pacs compress left next to their indexed, intact re-encoding, deleted.
    superseded_removed: Capped = field(default_factory=Capped)
    # Copies of instances rejection notes withdrew, refused when adopted, deleted.
    rejected_removed: Capped = field(default_factory=Capped)
    # Adopted rejection notes that withdrew again what they list whose objects
    # are gone (an index restored from before them), and how many of the
    # instances they withdrew were rows found missing by this run.
    withdrawn_again: Capped = field(default_factory=Capped)
    withdrawn_missing: int = 0
    pending_purge: int = 0
    # Rows whose missing object was found under another key and pointed at it.
    repointed_pks: set[int] = field(default_factory=set)
    purged_leftovers: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    repair: bool = False

    @property
    def problems(self) -> int:
        """Problems left after this run (what makes the exit code 1)."""
        missing = max(0, self.missing.count - self.dropped.get("instances", 0) - len(self.repointed_pks)
                      - self.withdrawn_missing)
        # Orphans not adopted: invalid ones and duplicates of indexed instances.
        orphans = max(0, self.orphans.count - self.adopted.count - self.superseded_removed.count
                      - self.rejected_removed.count)
        return missing + self.corrupt.count + self.unreadable.count + orphans

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.problems == 0,
            "problems": self.problems,
            "checked": self.checked,
            "checked_bytes": self.checked_bytes,
            "stored_objects": self.stored,
            "missing": self.missing.as_dict(),
            "repointed": len(self.repointed_pks),
            "corrupt": self.corrupt.as_dict(),
            "unreadable": self.unreadable.as_dict(),
            "orphans": self.orphans.as_dict(),
            "invalid_orphans": self.invalid_orphans.as_dict(),
            "duplicate_orphans": self.duplicate_orphans.as_dict(),
            "adopted": self.adopted.as_dict(),
            "not_adopted": self.not_adopted.as_dict(),
            "superseded_removed": self.superseded_removed.as_dict(),
            "rejected_removed": self.rejected_removed.as_dict(),
            "withdrawn_again": self.withdrawn_again.as_dict(),
            "pending_purge": self.pending_purge,
            "purged_leftovers": self.purged_leftovers,
            "dropped": self.dropped,
            "repair": self.repair,
        }


def _check(pacs: Pacs, row: Any, quick: bool) -> tuple[str, str]:
    """("ok" | "missing" | "corrupt" | "unreadable", detail) for one row."""
    try:
        if quick:
            size = pacs.store.stat(row.storage_key).size
            digest = None
        else:
            with pacs.store.open(row.storage_key) as stream:
                digest, size = sha256_of(stream)
    except ObjectNotFound:
        return "missing", "no object under the key"
    except StorageError as exc:
        return "unreadable", str(exc)
    if size != row.size_bytes:
        return "corrupt", f"size {size}, index says {row.size_bytes}"
    if digest is not None and digest != row.sha256:
        return "corrupt", f"sha256 {digest[:16]}..., index says {row.sha256[:16]}..."
    return "ok", ""


def _index_pass(pacs: Pacs, report: VerifyReport, quick: bool, workers: int, progress: Progress,
                missing_pks: list[int]) -> None:
    progress.start("checking indexed objects", count_rows(pacs.engine, instances_t))
    columns = (instances_t.c.pk, instances_t.c.sop_uid, instances_t.c.storage_key,
               instances_t.c.size_bytes, instances_t.c.sha256)
    last_pk = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while True:
            with pacs.engine.connect() as conn:
                rows = conn.execute(
                    select(*columns).where(instances_t.c.pk > last_pk).order_by(instances_t.c.pk).limit(BATCH)
                ).all()
            if not rows:
                return
            last_pk = rows[-1].pk
            for row, (state, detail) in zip(rows, pool.map(lambda r: _check(pacs, r, quick), rows), strict=True):
                report.checked += 1
                progress.advance()
                if state == "ok":
                    report.checked_bytes += row.size_bytes
                    continue
                entry = {"key": row.storage_key, "sop_uid": row.sop_uid, "detail": detail}
                getattr(report, state).add(entry)
                if state == "missing":
                    missing_pks.append(row.pk)


def _classify_orphan(pacs: Pacs, key: str) -> str | None:
    """None if the orphan is a valid DICOM object, else why not."""
    from ..header import parse_header

    try:
        with pacs.store.local_path(key) as path, open(path, "rb") as stream:
            stream.seek(0, 2)
            size = stream.tell()
            parse_header(stream, size)
    except IngestError as exc:
        return str(exc)
    except StorageError as exc:
        return f"unreadable: {exc}"
    return None


def _repoint(pacs: Pacs, key: str, report: VerifyReport) -> bool:
    """Point the row of the orphan's instance at the orphan when the object
    that row names is missing (an index restored from before ``pacs
    compress``: the row names ``<sop>.dcm``, the store holds
    ``<sop>.jls.dcm``). Ingesting it instead wrote its bytes under the row's
    key and left the row describing the old ones (size, transfer syntax)."""
    sop = sop_of_key(key)
    if sop is None:
        return False
    with pacs.engine.connect() as conn:
        row = conn.execute(select(instances_t.c.pk, instances_t.c.storage_key, instances_t.c.sha256)
                           .where(instances_t.c.sop_uid == sop)).first()
    if row is None or row.storage_key == key or pacs.store.exists(row.storage_key):
        return False
    try:
        added = index_stored_object(pacs, key, source="repair", replaces=(row.storage_key, row.sha256))
    except (IngestError, StorageError) as exc:
        report.not_adopted.add({"key": key, "detail": str(exc)})
        return True
    if added.outcome is not Outcome.REPLACED:
        return False  # the row changed meanwhile: the ordinary way
    report.adopted.add({"key": key, "sop_uid": sop, "replaces_missing": row.storage_key})
    report.repointed_pks.add(row.pk)
    return True


def _remove_superseded(pacs: Pacs, key: str, report: VerifyReport) -> bool:
    """Delete the orphan ``<sop>.dcm`` when its instance's row names the
    re-encoding ``pacs compress`` made of it (``<sop>.jls.dcm``,
    ``<sop>.j2k.dcm``) and that object is intact (its sha256 is the row's):
    what ``pacs reindex`` leaves after an index loss within compress's
    readers' grace; or an orphan copy the overwrite policy's resend
    replaced, written before the intact copy the row names, in its folder.
    Deleted through a tombstone, like any deletion, so a resend of the
    instance meanwhile is kept or refused, never lost."""
    sop = sop_of_key(key)
    if sop is None:
        return False
    encodings = ({f"{key[:-len('.dcm')]}.{variant}.dcm" for variant in KEY_VARIANTS.values()}
                 if key.endswith(f"/{sop}.dcm") else set())
    with pacs.engine.connect() as conn:
        row = conn.execute(select(instances_t.c.storage_key, instances_t.c.sha256)
                           .where(instances_t.c.sop_uid == sop)).first()
    if row is None or row.storage_key == key:
        return False
    if row.storage_key in encodings:
        if written_after(pacs.store, key, row.storage_key):
            return False  # written after the re-encoding: a resend of the compressed instance
    elif not (pacs.settings.duplicate_policy == "overwrite"
              and row.storage_key.rsplit("/", 1)[0] == key.rsplit("/", 1)[0]
              and written_after(pacs.store, row.storage_key, key)):
        return False  # replaced by a later copy (overwrite policy) only
    try:
        with pacs.store.open(row.storage_key) as stream:
            digest, _ = sha256_of(stream)
    except StorageError:
        return False
    if digest != row.sha256:
        return False  # the re-encoding is damaged: the original is the evidence, kept
    with write_transaction(pacs.engine) as conn:
        still = conn.execute(select(exists().where(instances_t.c.sop_uid == sop,
                                                   instances_t.c.storage_key == row.storage_key,
                                                   instances_t.c.sha256 == row.sha256))).scalar()
        # Replaced within the readers' grace (compress ran meanwhile): its sweep's.
        busy = conn.execute(select(exists().where(tombstones.tombstones_t.c.storage_key == key,
                                                  tombstones.tombstones_t.c.finished_at.is_(None)))).scalar()
        if not still or busy:
            return False
        tombstones.record(conn, [key], "verify-superseded")
    done = tombstones.finish(pacs.engine, pacs.store, [key])
    if not done.deleted:
        return False
    report.superseded_removed.add({"key": key, "sop_uid": sop, "indexed_key": row.storage_key})
    return True


def _later_copy(pacs: Pacs, key: str, sop: str) -> str | None:
    """Under the overwrite policy, the other of the two keys a resend and
    the copy it replaced alternate on (``<sop>.dcm``, ``<sop>.resent.dcm``
    in *key*'s folder) when the store holds it written after *key*."""
    if pacs.settings.duplicate_policy != "overwrite":
        return None
    folder = key.rsplit("/", 1)[0]
    plain, resent = f"{folder}/{sop}.dcm", f"{folder}/{sop}.{RESENT_VARIANT}.dcm"
    # Written in the same second (S3's times), one of the two must be
    # adopted: <sop>.resent.dcm, by rule. (Both adopted, the first one's
    # adoption rewrote it, which then superseded the other.)
    if key == plain and written_after(pacs.store, resent, key, or_same=True):
        return resent
    if key == resent and written_after(pacs.store, plain, key):
        return plain
    return None


def _adopt(pacs: Pacs, key: str, report: VerifyReport) -> None:
    """Ingest a valid orphan from the store through the one ingest path."""
    if _remove_superseded(pacs, key, report) or _repoint(pacs, key, report):
        return
    sop = sop_of_key(key)
    if sop is not None:
        # Indexed under another key: a duplicate, never ingested. Under the
        # overwrite policy the ingest replaced the indexed copy with it: an
        # acknowledged object gave way to a resend left by a crash before its
        # commit, which its sender was never told was stored.
        with pacs.engine.connect() as conn:
            indexed = conn.execute(select(instances_t.c.storage_key).where(instances_t.c.sop_uid == sop)).scalar()
        if indexed is not None and indexed != key:
            report.duplicate_orphans.add({"key": key, "sop_uid": sop, "indexed_key": indexed})
            return
        if indexed is None and (later := _later_copy(pacs, key, sop)) is not None:
            # Both copies of a resend unindexed (an index restored from before
            # the instance came, within the replaced copy's grace): the later
            # one is adopted when listed (its adoption writes over this key).
            # Adopted first, the replaced copy was indexed, and the
            # acknowledged correction a duplicate, or removed as superseded.
            report.superseded_removed.add({"key": key, "sop_uid": sop, "indexed_key": later})
            return
    try:
        with pacs.store.local_path(key) as path:
            result = pacs.ingestor.ingest(FileSource(path),
                                          Origin(source="repair", remote_host="localhost", examination=False))
    except IngestError as exc:
        if exc.status == Status.REJECTED_INSTANCE:
            # A copy of an instance a rejection note withdrew (pacs.rejections),
            # left by a failed delete or a crash before the refusal: it goes,
            # as the note's deletion took the instance's other copies. Called
            # invalid, it was an object to move out of the store, gone already
            # (the refusal deletes the copy under the instance's key).
            try:
                pacs.store.delete(key)
            except StorageError as delete_exc:
                report.not_adopted.add({"key": key, "detail": f"{exc}; not deleted: {delete_exc}"})
                return
            report.rejected_removed.add({"key": key, "detail": str(exc)})
            return
        if exc.status in (Status.OUT_OF_RESOURCES, Status.STORAGE_FAILED, Status.INDEX_FAILED):
            # Not the object's fault (disk low, store or index down): retry later.
            report.not_adopted.add({"key": key, "detail": str(exc)})
        else:
            report.invalid_orphans.add({"key": key, "detail": str(exc)})
        return
    except StorageError as exc:
        report.not_adopted.add({"key": key, "detail": str(exc)})
        return
    if result.outcome is Outcome.DUPLICATE and result.storage_key != key:
        report.duplicate_orphans.add({"key": key, "sop_uid": result.sop_uid, "indexed_key": result.storage_key})
        return
    report.adopted.add({"key": result.storage_key, "sop_uid": result.sop_uid})
    if result.header.sop_class_uid == KOS_CLASS:
        _withdraw_again(pacs, result.storage_key, result.sop_uid, result.header.study_uid, report)
    if result.storage_key != key:
        # Ingest stored a byte-identical copy under the key of the ingest
        # layout; the original is now an unreferenced duplicate.
        try:
            pacs.store.delete(key)
        except StorageError as exc:
            log.warning("could not remove %s after adopting it as %s: %s", key, result.storage_key, exc)


def withdraw_again(pacs: Pacs, key: str, note_uid: str, study_uid: str) -> tuple[Rejection | None, str]:
    """A rejection note (pacs.rejections) found in the store, under *key*,
    withdraws again the instances it lists whose objects are gone from the
    store: the note took them when it came, after the backup an index was
    restored from (which still lists them, objects missing, or does not know
    them) or before the index was lost and rebuilt (``pacs reindex``), and
    without their rejection a modality's resend brought them back. Those it
    lists that are still stored stay: a note the archive did not apply (its
    sender may not reject) does not withdraw images at a repair or a rebuild. What
    :func:`pacs.rejections.apply_or_report` answers (None for an object that
    is no rejection note), audited as this command's user's deletions."""
    from ..audit import Event
    from ..rejections import apply_or_report  # pacs.rejections imports this package

    def gone(series_uid: str, sops: set[str]) -> set[str]:
        with pacs.engine.connect() as conn:
            indexed = {row.sop_uid: row.storage_key for batch in batched(sorted(sops)) for row in conn.execute(
                select(instances_t.c.sop_uid, instances_t.c.storage_key).where(instances_t.c.sop_uid.in_(batch)))}
        variants = ("", RESENT_VARIANT, *KEY_VARIANTS.values())
        return {sop for sop in sops if not any(
            pacs.store.exists(copy) for copy in ([indexed[sop]] if sop in indexed else [])
            + [object_key(study_uid, series_uid, sop, variant) for variant in variants])}

    user = os_user()
    return apply_or_report(pacs, key, note_uid, study_uid,
                           lambda: Event(action="delete", user=user, role="admin", protocol="cli"), only=gone)


def _withdraw_again(pacs: Pacs, key: str, note_uid: str, study_uid: str, report: VerifyReport) -> None:
    """:func:`withdraw_again` for a note this repair adopted, in *report*."""
    done, failed = withdraw_again(pacs, key, note_uid, study_uid)
    if failed:
        report.not_adopted.add({"key": key, "detail": f"rejection note adopted, not applied: {failed}"})
    elif done is not None and (done.deleted or done.not_found):
        report.withdrawn_again.add({"key": key, "note_uid": done.note_uid, "instances": done.deleted,
                                    "not_stored": done.not_found})
        report.withdrawn_missing += done.deleted


def _storage_pass(pacs: Pacs, report: VerifyReport, repair: bool, progress: Progress,
                  pending: set[str]) -> None:
    progress.start("looking for orphans", None)
    for keys in batched(info.key for info in pacs.store.list()):
        report.stored += len(keys)
        progress.advance(len(keys))
        indexed = indexed_among(pacs.engine, keys)
        for key in keys:
            if key in indexed:
                continue
            if key in pending:
                report.pending_purge += 1
                continue
            try:
                validate_key(key)
            except ValueError:
                stray = {"key": key, "valid": False,
                         "detail": "not an object of this store (a file or object the store's layout does not "
                                   "explain); move it out of the store or delete it"}
                report.orphans.add(stray)
                report.invalid_orphans.add({"key": key, "detail": stray["detail"]})
                continue
            problem = _classify_orphan(pacs, key)
            report.orphans.add({"key": key, "valid": problem is None, "detail": problem or ""})
            if problem is not None:
                report.invalid_orphans.add({"key": key, "detail": problem})
            elif repair:
                _adopt(pacs, key, report)


def verify(
    pacs: Pacs,
    *,
    repair: bool = False,
    drop_missing: bool = False,
    quick: bool = False,
    workers: int = 4,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check index against storage and storage against index (see module doc)."""
    progress = progress or NullProgress()
    report = VerifyReport(repair=repair)
    journals = PurgeJournal.every(pacs.settings.data_dir)
    if repair:
        report.purged_leftovers = finish_interrupted(pacs)
        pending: set[str] = set(tombstones.active_keys(pacs.engine))  # deletions started meanwhile
    else:
        # Objects of deletions under way (or interrupted): not orphans.
        pending = set().union(*(journal.keys() for journal in journals), tombstones.active_keys(pacs.engine))
    missing_pks: list[int] = []
    _index_pass(pacs, report, quick, workers, progress, missing_pks)
    _storage_pass(pacs, report, repair, progress, pending)
    missing_pks = [pk for pk in missing_pks if pk not in report.repointed_pks]
    if repair and drop_missing and missing_pks:
        if report.stored == 0 and len(missing_pks) == report.checked:
            # Every object gone and the store empty: an unmounted data disk or
            # a wrong --storage-url, not lost objects. Dropping would empty the index.
            raise PacsError(
                f"all {report.checked} indexed objects are missing and the store {pacs.store.url} is empty: "
                "is the data disk mounted, is the storage URL right? Nothing was dropped."
            )
        report.dropped = delete_instance_rows(pacs.engine, missing_pks)
    return report
