"""The one ingest path: every entry point (C-STORE, STOW-RS, import, C-MOVE
retrieval, reports) hands received Part 10 bytes to :meth:`Ingestor.ingest`.

Order of work, which is what makes an acknowledgement trustworthy:

1. refuse early what cannot be stored (size limit, disk low-water mark);
2. parse and validate the header only (pixel data is never decoded);
3. write the object to storage, durably and atomically; a resend of a kept
   instance is recognised by the filesystem store (publishing never
   replaces) or, for a remote store, by the index before any upload.
   Under the overwrite policy a resend is written beside the copy it
   replaces (``<sop>.resent.dcm`` and ``<sop>.dcm`` alternate), never over it.
   3 and 4 of one SOP Instance UID hold a lock, so the row and the stored
   object are the same copy when several processes receive it at once: an
   flock under ``DATA_DIR/locks`` on one node (a filesystem store, or a
   SQLite index; see :mod:`pacs.instance_locks`), or, under the overwrite
   policy, one that every node sharing a PostgreSQL index takes (see
   ``Ingestor._lock_across_nodes``);
4. index it (group-committed transaction) and only then return success
   (a replacing resend's commit switches the row to its key and records the
   replaced copy as a tombstone, deleted once its readers' grace is over:
   a C-MOVE, C-GET or WADO-RS that looked the row up before still reads it).
   A deletion removing the same key meanwhile (a resend of an instance
   whose study is being deleted) is settled in that transaction: the
   resend takes the key back and is kept, or, if its object was already
   deleted under it, is refused with a transient status (0xA702, HTTP 503)
   the modality retries (see :mod:`pacs.index.tombstones`).

(Writing the bytes in a second thread while parsing was measured slower: the
GIL hand-offs cost more than the overlap saves.)

A crash between 3 and 4 leaves an orphan object and no index row; ``pacs
verify --repair`` adopts orphans. An index row never exists without its
object. The received bytes are stored exactly as they came.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from storage import ObjectExists, ObjectStore, StorageError, StorageFullError, sha256_of

from .errors import IngestError, Status
from .header import InstanceHeader, parse_header
from .index.committer import GroupCommitter
from .index.tombstones import REPLACED, ObjectDeleted
from .index.writer import AddResult, IndexRecord, InstanceRejected, Outcome
from .instance_locks import InstanceFileLocks
from .part10 import Source, dataset_start
from .reads import IndexReader
from .routing import RoutingRules

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Who handed us an object: protocol, AE title, address, user."""

    source: str
    calling_ae: str = ""
    remote_host: str = ""
    user: str = ""
    # False: the routing rules do not apply. An object this archive fetched
    # itself (its own C-MOVE or C-GET: pacs remote pull, a migration) or an
    # import is old data coming in, not an examination arriving: routed, a
    # rule such as "chest CT to the AI server" sent it years of priors.
    routed: bool = True
    # False: old data coming in (an import, this archive's own C-MOVE or
    # C-GET: pacs remote pull, prefetched priors, a retrieve on demand), not
    # an examination arriving: its images' priority (STAT...) is not taken,
    # or a CD of years ago stayed first in the urgent group until reported.
    examination: bool = True
    # Its routing jobs wait this long (pacs.routing.VIEWER_SAVE_HOLD_SECONDS:
    # a document the viewer saves anew at each change).
    route_hold_seconds: int = 0


@dataclass(frozen=True)
class IngestResult:
    status: int
    outcome: Outcome
    header: InstanceHeader
    storage_key: str
    size: int
    # The key of the object this one replaced, left in the store for the
    # caller to delete (Ingestor(keep_obsolete=True)).
    obsolete_key: str | None = None

    @property
    def sop_uid(self) -> str:
        return self.header.sop_uid

    @property
    def kept_elsewhere(self) -> bool:
        """A duplicate whose first copy, kept, was received in another study or
        series than this one: not a resend but a conflicting object, whose
        content was not stored (keep-first policy)."""
        h = self.header
        return self.outcome is Outcome.DUPLICATE and not self.storage_key.startswith(
            f"{h.study_uid}/{h.series_uid}/")

    @property
    def conflict(self) -> str | None:
        """Why this object was NOT stored, when it is :attr:`kept_elsewhere`:
        every entry point answers that as a failure, 0111H Duplicate SOP
        Instance (a success would let the modality delete an object that
        this archive does not hold)."""
        if not self.kept_elsewhere:
            return None
        kept_study = self.storage_key.split("/", 1)[0]
        return (f"SOP Instance UID already stored in study {kept_study}, in another study or series than "
                "this object's; the first copy is kept and this one was not stored")


def object_key(study_uid: str, series_uid: str, sop_uid: str, variant: str = "") -> str:
    """Storage key of an instance: one folder (prefix) per study and series.

    A *variant* (``pacs compress``: ``jls``, ``j2k``) names another encoding
    of the same instance, written beside the received one so that a reader
    who looked the old row up still finds the object that row describes."""
    return f"{study_uid}/{series_uid}/{sop_uid}{'.' + variant if variant else ''}.dcm"


class _KeyedLocks:
    """One lock per SOP Instance UID being ingested, so concurrent copies of the
    same object are decided one after the other."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def acquire(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        lock.acquire()

    def release(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
        lock.release()


class Ingestor:
    """Validates, stores and indexes received objects."""

    def __init__(
        self,
        store: ObjectStore,
        committer: GroupCommitter,
        reader: IndexReader,
        *,
        overwrite: bool = False,
        max_object_bytes: int = 4 * 1024**3,
        min_free_bytes: int = 0,
        key_variant: str = "",
        keep_obsolete: bool = False,
        instance_locks: InstanceFileLocks | None = None,
    ) -> None:
        self.store = store
        # Locks shared with the other processes of this node (see ingest).
        self.instance_locks = instance_locks
        self.committer = committer
        self.reader = reader
        self.overwrite = overwrite
        self.key_variant = key_variant
        self.keep_obsolete = keep_obsolete
        self.max_object_bytes = max_object_bytes
        self.min_free_bytes = min_free_bytes
        self._locks = _KeyedLocks()
        self._free_checked = 0.0
        self._free_bytes: int | None = None
        self._free_guard = threading.Lock()
        # Called after commit with each stored result.
        self.listeners: list[Callable[[IngestResult, Origin], None]] = []
        # Routing rules, evaluated before the commit that creates the jobs.
        self.routes: RoutingRules | None = None

    def check_space(self, size: int) -> None:
        """Raise the :class:`IngestError` an object of *size* bytes gets now:
        too large (0xA701), or the store below its low-water mark (0xA700).
        Receivers call it before the object has arrived (size 0) to refuse
        early without keeping what still comes."""
        if size > self.max_object_bytes:
            raise IngestError(
                Status.OBJECT_TOO_LARGE,
                f"object of {size} bytes exceeds the limit of {self.max_object_bytes}",
            )
        if not self.min_free_bytes:
            return
        with self._free_guard:
            now = time.monotonic()
            # statvfs per object is cheap but not free; a second-old figure is fine
            # because the mark leaves far more room than one object.
            if now - self._free_checked > 1.0:
                self._free_bytes = self.store.free_bytes()
                self._free_checked = now
            free = self._free_bytes
            if free is not None:
                self._free_bytes = free - size
        if free is not None and free - size < self.min_free_bytes:
            raise IngestError(
                Status.OUT_OF_RESOURCES,
                f"storage below its low-water mark ({free} bytes free, {self.min_free_bytes} kept free)",
            )

    def ingest(
        self,
        source: Source,
        origin: Origin,
        *,
        transfer_syntax: str | None = None,
        expected_sop_class: str | None = None,
        expected_sop_uid: str | None = None,
        replaces: tuple[str, str | None] | None = None,
        retire_as: str = "",
        look_up_first: bool = False,
    ) -> IngestResult:
        """Store and index one Part 10 object.

        Returns once the object is durable and indexed. Raises
        :class:`IngestError` with the DICOM status to answer otherwise.
        With *replaces* (the storage key and sha256 of the row the object
        was prepared from: ``pacs compress``), the row is replaced only if it
        still holds them; otherwise nothing stays of this object and the
        result's outcome is ``Outcome.STALE`` (see ``IndexRecord.replaces``).
        With *look_up_first* (an import, most often run again over files
        already stored) the index is asked before anything is written, as
        for a remote store: a file store otherwise writes and syncs each
        object whole before its publish finds the copy already there.
        """
        size = source.size
        self.check_space(size)
        with source.open() as stream:
            header = parse_header(stream, size, transfer_syntax=transfer_syntax)
        try:
            _check_expected(header, expected_sop_class, expected_sop_uid)
            self._locks.acquire(header.sop_uid)
            try:
                with ExitStack() as held:
                    if replaces is None:
                        self._lock_instance(header.sop_uid, held)
                    return self._store_and_index(source, header, origin, replaces, retire_as, look_up_first)
            finally:
                self._locks.release(header.sop_uid)
        except IngestError as exc:
            exc.header = header  # the refusal's audit names its study and patient
            raise

    def _lock_instance(self, sop_uid: str, held: ExitStack) -> None:
        """Copies of one instance received by other processes at once wait
        for this one's write and index commit. Without it, a second worker
        finding the first one's object under the key, not indexed yet, took
        it for a crash's orphan and replaced it, while the first one's row
        won: the row described bytes that were not stored (wrong sha256 and
        size, frames cut at the other copy's pixel offset). On one node
        (a filesystem store or a SQLite index) an flock does it; between
        nodes sharing a PostgreSQL index and S3, the overwrite policy takes
        an index lock and keep-first settles the race afterwards
        (_settle_race). (A conditional replacement, ``pacs compress``, is
        written under a key of its own and needs neither.)"""
        if self.instance_locks is None:
            if self.overwrite:
                self._lock_across_nodes(sop_uid, held)
            return
        try:
            held.enter_context(self.instance_locks.hold(sop_uid))
        except OSError as exc:
            log.error("instance lock of %s not taken: %s", sop_uid, exc)
            raise IngestError(Status.STORAGE_FAILED, f"storage unavailable: {exc}") from exc

    def _lock_across_nodes(self, sop_uid: str, held: ExitStack) -> None:
        """Overwrite policy: copies of one instance received by several nodes
        at once are written and indexed one after the other. Unserialised,
        the index kept whichever copy committed last and the shared store
        whichever was uploaded last: the row described bytes that were not
        stored (wrong size and sha256, frames cut at the other copy's pixel
        offset). Held until the unreferenced object is deleted, so a copy
        under another key that replaces ours meanwhile is not the one deleted.
        (Keep-first needs no lock: the first row wins and _settle_race makes
        it describe the stored bytes; nor does a conditional replacement,
        ``pacs compress``, written under a key of its own.) Unavailable, it
        answers 0xA703, which the modality retries."""
        try:
            held.enter_context(self.committer.instance_lock(sop_uid))
        except Exception as exc:
            log.error("index lock of %s not taken: %s", sop_uid, exc)
            raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc

    def _indexed_key(self, sop_uid: str, key: str) -> str | None:
        """Storage key the index holds for *sop_uid*, or None."""
        return self._index_lookup(self.reader.instance_key, sop_uid, key)

    def _indexed_copy(self, sop_uid: str, key: str) -> tuple[str, str, int] | None:
        """(storage key, sha256, size) the index holds for *sop_uid*, or None."""
        return self._index_lookup(self.reader.instance_copy, sop_uid, key)

    @staticmethod
    def _index_lookup(lookup: Callable[[str], T], sop_uid: str, key: str) -> T:
        """*lookup* of *sop_uid* in the index. A failed lookup answers "index
        unavailable" (0xA703), as a failed commit does: the modality retries
        later instead of giving up."""
        try:
            return lookup(sop_uid)
        except Exception as exc:
            log.error("index lookup failed for %s: %s", key, exc)
            raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc

    def _identical(self, source: Source, indexed: tuple[str, str, int]) -> bool:
        """Whether *source* holds the bytes the index describes (same size and
        sha256) and the store still holds them whole (its size): a resend
        of a lost or truncated copy is stored again, healing it. The source
        is hashed only when the sizes agree."""
        key, sha256, size = indexed
        if not sha256:
            return False
        if size == source.size:
            with source.open() as stream:
                if sha256_of(stream)[0] == sha256:
                    try:
                        return self.store.stat(key).size == size
                    except StorageError:  # gone, or the store cannot say: written as any correction
                        return False
        return self._same_dataset(source, key, size)

    def _same_dataset(self, source: Source, key: str, size: int) -> bool:
        """Whether *source* is the stored object under another File Meta: the
        framing this archive writes names the calling AE and its own version,
        so the very object resent by another AE (a router, the old PACS in a
        migration), or after an upgrade, differs there only. Same transfer
        syntax and dataset bytes (sha256); the stored copy is read only when
        the datasets' lengths agree, and whole (its size, as the index has it)."""
        with source.open() as stream:
            ours = dataset_start(stream)
            if ours is None:
                return False
            try:
                with self.store.open(key, 0, min(size, 144 + (1 << 16))) as head:
                    theirs = dataset_start(head)
            except (StorageError, OSError):
                return False
            if theirs is None or theirs[1] != ours[1] or size - theirs[0] != source.size - ours[0]:
                return False
            digest, _ = sha256_of(stream)  # the rest of the source: its dataset
        try:
            with self.store.open(key, theirs[0]) as stored:
                stored_digest, length = sha256_of(stored)
        except (StorageError, OSError):
            return False
        return stored_digest == digest and length == size - theirs[0]

    def _settle_race(self, key: str, record: IndexRecord, indexed_sha256: str) -> None:
        """Two nodes received different objects under one SOP Instance UID at
        once: both checked the index, both uploaded to *key* (an S3 PUT
        replaces), and the other node's row won. The object now under *key*
        is whichever PUT ended last; the index must describe those bytes."""
        try:
            kept = self.store.checksum(key)
        except StorageError as exc:
            log.error("could not read back %s after a concurrent upload: %s", key, exc)
            raise IngestError(Status.STORAGE_FAILED, f"storage unavailable: {exc}") from exc
        log.warning("SOP Instance UID %s was received twice at once with different content; %s",
                    record.header.sop_uid, _settled(kept, record.sha256, indexed_sha256))
        if kept == record.sha256:
            try:
                self.committer.replace(record)
            except Exception as exc:
                log.error("index commit failed for %s: %s", key, exc)
                raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc

    def _store_and_index(self, source: Source, header: InstanceHeader, origin: Origin,
                         replaces: tuple[str, str | None] | None = None, retire_as: str = "",
                         look_up_first: bool = False) -> IngestResult:
        key = object_key(header.study_uid, header.series_uid, header.sop_uid, self.key_variant)
        # Overwrite policy: the indexed copy a resend replaces. The resend is
        # written under another key than that copy's and the row switched to
        # it by the index commit: written over it, a failed commit (or a crash
        # before it) left the row describing bytes no longer stored, and the
        # acknowledged copy lost for a resend its sender was told failed.
        resending = self.overwrite and replaces is None and not self.key_variant
        if resending:
            # Under the instance lock (_lock_instance): one query decides the key,
            # and whether this is the very copy the index holds.
            indexed = self._indexed_copy(header.sop_uid, key)
            if indexed is not None and self._identical(source, indexed):
                # A byte-identical resend (a modality sending the study again): nothing to
                # correct. Writing it swapped the row to a copy of itself and kept the
                # replaced one for its readers' grace: twice the bytes, for nothing.
                return self._duplicate(header, indexed[0], source.size, origin, key)
            if self.store.remote:
                key = _key_beside(key, indexed[0] if indexed else None)
        if (self.store.remote or look_up_first) and not self.overwrite:
            # On S3 "publish unless present" costs a HEAD round trip before
            # every PUT (a tenth of a CT slice's ingest time against a local
            # SeaweedFS, more against a distant one); the index answers the
            # same question from a local query, and a resend is not uploaded
            # at all. Two nodes racing on one instance both upload either way.
            # An import run again asks too: on a file store the publish below
            # finds a copy only after writing and syncing the object whole.
            existing = self._indexed_key(header.sop_uid, key)
            if existing is not None and not (existing == key and self._lost(key)):
                return self._duplicate(header, existing, source.size, origin, key)
        try:
            staged = self.store.stage(source.open(), source.size)
            try:
                # Keep-first policy: publishing never replaces, so a resend is
                # detected by the store itself, without a query per object.
                # (A remote store's PUT replaces; its resends were decided above.)
                info = staged.commit(key, replace=self.store.remote)
            except ObjectExists:
                try:
                    existing = self._indexed_key(header.sop_uid, key)
                except IngestError:
                    staged.abort()
                    raise
                if existing is not None and resending:
                    key = _key_beside(key, existing)
                elif existing is not None and replaces is not None and existing == key:
                    # A conditional replacement (compress) whose key the row
                    # names already: changed meanwhile, never written over.
                    staged.abort()
                    return IngestResult(Status.SUCCESS, Outcome.STALE, header, existing, source.size)
                elif existing is not None and replaces is None:
                    staged.abort()
                    return self._duplicate(header, existing, source.size, origin, key)
                # An unindexed object under our key is an orphan of a crash
                # (or of a resend whose commit failed), or a replaced copy
                # kept for its readers' grace (compress's key, which a resend
                # of the compressed instance left): the copy being
                # acknowledged now takes its place. (Taken for a duplicate, a
                # compress within the grace reported the instance compressed
                # and left it as it was, run after run.)
                info = staged.commit(key, replace=True)
        except StorageFullError as exc:
            log.error("storage full: %s", exc)
            raise IngestError(Status.OUT_OF_RESOURCES, f"storage full: {exc}") from exc
        except StorageError as exc:
            log.error("storage write failed: %s", exc)
            raise IngestError(Status.STORAGE_FAILED, f"storage unavailable: {exc}") from exc

        routes = self._plan_routes(header, origin, key)
        record = IndexRecord(
            header=header,
            size=info.size,
            sha256=info.sha256 or "",
            storage_key=key,
            received_at=datetime.now(UTC),
            source=origin.source,
            calling_ae=origin.calling_ae,
            remote_host=origin.remote_host,
            examination=origin.examination,
            routes=routes,
            object_present=lambda key=key: self.store.exists(key),
            replaces=replaces,
            # The copy a resend replaces stays for the readers that looked its
            # row up before the switch (a C-GET of the study under way): it
            # is deleted by the tombstone sweep after tombstones.READERS_GRACE.
            # Deleted at once, their sub-operations failed on a missing object.
            retire_as=retire_as or (REPLACED if resending else ""),
        )
        try:
            added: AddResult = self.committer.submit(record)
        except InstanceRejected as exc:
            # Withdrawn by a rejection note: the copy just written is nobody's
            # (no row names it; the instance lock keeps other copies out).
            log.warning("%s refused: %s (pacs rejections lift lets it in again)", key, exc)
            self._delete_refused_copy(key)
            # The Error Comment keeps 64 characters: the reason first.
            raise IngestError(Status.REJECTED_INSTANCE, f"rejected by a rejection note ({exc.code}), not stored: "
                                                        f"{exc.note_uid} from {exc.rejected_by}") from exc
        except ObjectDeleted as exc:
            # A deletion of this instance (pacs delete, purge) removed the key
            # after our write: nothing of ours is left to keep or to delete.
            # Transient: the modality's retry stores it anew.
            log.warning("%s refused: %s", key, exc)
            # The Error Comment keeps 64 characters: the reason first.
            raise IngestError(Status.STORAGE_FAILED, "instance being deleted while received; send it again "
                                                     f"(its object went with the deletion: {header.sop_uid})") from exc
        except Exception as exc:
            # The object stays as an orphan: deleting it could remove the bytes
            # of a commit that did succeed before the error reached us.
            log.error("index commit failed for %s: %s", key, exc)
            if resending:
                # Also when the key was free (the filesystem's publish found
                # nothing there, nor asked the index): the third copy
                # goes under <sop>.dcm again once the first one's grace is
                # over, and left behind it was a duplicate orphan for ever.
                self._drop_refused_resend(header.sop_uid, key)
            raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc

        if (added.outcome is Outcome.DUPLICATE and added.existing_key == key and self.store.remote
                and not self.overwrite and info.sha256 and added.existing_sha256 not in (None, info.sha256)):
            self._settle_race(key, record, added.existing_sha256 or "")
        # The index keeps one object per instance: remove the one it dropped
        # (replaced), or ours if a copy under another key won (duplicate).
        unreferenced = added.obsolete_key
        kept_obsolete = None
        if added.outcome is Outcome.STALE:
            # Nothing indexed: ours goes, unless the row holds this very key.
            unreferenced = key if added.existing_key != key else None
        elif added.outcome is Outcome.DUPLICATE and added.existing_key not in (None, key):
            unreferenced = key
            key = added.existing_key  # the copy the index keeps is the result
        elif unreferenced and self.keep_obsolete:
            kept_obsolete, unreferenced = unreferenced, None
        elif unreferenced and record.retire_as:
            unreferenced = None  # tombstoned by the commit: the sweep deletes it after the grace
        if unreferenced:
            try:
                self.store.delete(unreferenced)
            except StorageError as exc:
                log.warning("could not delete unreferenced object %s: %s", unreferenced, exc)
        result = IngestResult(Status.SUCCESS, added.outcome, header, key, info.size, kept_obsolete)
        if added.outcome is Outcome.STALE:
            return result  # nothing was stored: no listener hears of it
        if result.kept_elsewhere:
            _warn_conflict(result)
        if added.outcome is Outcome.DUPLICATE:
            self._note_conflict(result, origin)
        for listener in self.listeners:
            try:
                listener(result, origin)
            except Exception:
                log.exception("ingest listener failed")
        return result

    def _drop_refused_resend(self, sop_uid: str, key: str) -> None:
        """A copy received under the overwrite policy whose index commit
        failed: its object is deleted once the index (still readable: only
        its writes failing) shows that the row does not name it (under the
        instance's lock, nobody else writes that key meanwhile). The sender
        was told failure and sends it again; left, it was an orphan that
        ``pacs verify`` reports. An index that cannot answer leaves it there (the
        commit may have succeeded before its error reached us)."""
        try:
            indexed = self.reader.instance_key(sop_uid)
        except Exception as exc:
            log.warning("the refused copy under %s is kept until the index answers (%s)", key, exc)
            return
        if indexed == key:
            return
        self._delete_refused_copy(key)

    def _delete_refused_copy(self, key: str) -> None:
        """Delete the copy under *key* of an object refused after it was
        written; one the store keeps is an orphan ``pacs verify`` reports."""
        try:
            self.store.delete(key)
        except StorageError as exc:
            log.warning("could not delete the refused copy under %s: %s", key, exc)

    def _lost(self, key: str) -> bool:
        """Whether the object of an indexed instance is missing from a remote
        store (deleted by hand, a bucket restored from an older copy): a
        resend then stores it again, as the filesystem store's publish does,
        instead of being acknowledged as a duplicate that heals nothing. One
        HEAD per resend only; a store that does not answer counts as holding
        it (the resend is a duplicate, as before)."""
        try:
            present = self.store.exists(key)
        except StorageError:
            return False
        if not present:
            log.warning("the object of indexed instance %s was missing from storage: stored again from this resend",
                        key)
        return not present

    def _plan_routes(self, header: InstanceHeader, origin: Origin, key: str) -> list[Any]:
        if not origin.routed:
            return []
        try:
            routes = (
                self.routes.plan(header.full_dataset, origin.calling_ae, header.sop_class_uid, header.modality)
                if self.routes is not None
                else []
            )
        except Exception as exc:
            # The rules are read from the index: its outage is "try again later"
            # (A703), not the 0xC000 "cannot understand" a modality gives up on.
            log.error("routing rules unavailable for %s: %s", key, exc)
            raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc
        if origin.route_hold_seconds:
            routes = [dataclasses.replace(r, hold_seconds=origin.route_hold_seconds) for r in routes]
        return routes

    def _duplicate(self, header: InstanceHeader, existing: str, size: int, origin: Origin, key: str) -> IngestResult:
        """A resend of a kept instance is routed as this sender's objects are:
        a satellite resending a study that partly arrived by another path
        must reach the rule's destination whole (a job already made for the
        rule and instance is not made twice)."""
        routes = self._plan_routes(header, origin, key)
        if routes:
            try:
                self.committer.add_jobs(routes, header.sop_uid, header.study_uid)
            except Exception as exc:
                log.error("routing jobs of a resent instance not recorded (%s): %s", key, exc)
                raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc
        result = _duplicate(header, existing, size)
        self._note_conflict(result, origin)
        return result

    def _note_conflict(self, result: IngestResult, origin: Origin) -> None:
        """A duplicate from a DICOM AE: a conflict (not stored, refused 0111H)
        is recorded for storage commitment; a resend into the kept study and
        series clears that AE's earlier conflicts for the UID. Only here, on
        the duplicate paths: a new instance costs no statement (pacs.commitment
        ignores a conflict whose study/series is where the instance is kept).
        Unrecorded, a later commitment could vouch for an object we do not
        hold: 0xA703, the modality sends it again."""
        if not origin.calling_ae:
            return  # commitment is asked by AE title: STOW and imports cannot ask
        h = result.header
        try:
            if result.kept_elsewhere:
                self.committer.record_conflict(h.sop_uid, origin.calling_ae, h.study_uid, h.series_uid)
            else:
                self.committer.clear_conflicts(h.sop_uid, origin.calling_ae)
        except Exception as exc:
            log.error("UID conflict of %s from %s not recorded: %s", h.sop_uid, origin.calling_ae, exc)
            raise IngestError(Status.INDEX_FAILED, f"index unavailable: {exc}") from exc


# The variant of a resend's key while the row names the instance's key
# (overwrite policy): the two alternate, one resend after the other.
RESENT_VARIANT = "resent"


def _key_beside(key: str, indexed: str | None) -> str:
    """The key to write a resend of the instance whose row names *indexed*
    under: *key* (the instance's key) unless the row holds that one, then
    its resent variant; never the key of the copy being replaced."""
    if indexed != key:
        return key
    return f"{key[:-len('.dcm')]}.{RESENT_VARIANT}.dcm"


def _settled(kept: str, ours: str, indexed: str) -> str:
    if kept == indexed:
        return "the first copy's bytes are stored: nothing to do"
    if kept == ours:
        return "the second copy's bytes are stored: the index now describes them"
    return "neither copy's bytes are stored (a third sender?): run pacs verify"


def _duplicate(header: InstanceHeader, existing: str, size: int) -> IngestResult:
    result = IngestResult(Status.SUCCESS, Outcome.DUPLICATE, header, existing, size)
    if result.kept_elsewhere:
        _warn_conflict(result)
    else:
        log.debug("duplicate instance kept as first received (%s)", existing)
    return result


def _warn_conflict(result: IngestResult) -> None:
    # The operator must hear of it: two different objects share a UID (a
    # modality's UID bug, or an edited copy sent back), and only one is kept.
    log.warning("SOP Instance UID %s received again in another study/series (%s/%s); the first copy, "
                "at %s, is kept", result.sop_uid, result.header.study_uid, result.header.series_uid,
                result.storage_key)


def _check_expected(header: InstanceHeader, sop_class: str | None, sop_uid: str | None) -> None:
    if sop_uid and sop_uid != header.sop_uid:
        raise IngestError(
            Status.INVALID_DATASET,
            "SOP Instance UID of the dataset differs from the request's Affected SOP Instance UID",
        )
    if sop_class and sop_class != header.sop_class_uid:
        raise IngestError(
            Status.INVALID_DATASET,
            "SOP Class UID of the dataset differs from the request's Affected SOP Class UID",
        )
