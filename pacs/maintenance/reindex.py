"""``pacs reindex``: rebuild the index from the object store alone.

Disaster recovery after the database is lost: every stored object is listed
(``store.list()``, streamed), its header parsed and validated exactly as at
ingest, its bytes hashed, and a row written through the group-committed
index writer -- the object itself is never rewritten, and no routing or
other ingest side effect runs again.

Resumable by construction: keys already indexed are skipped (one indexed
lookup per batch of 500 keys), so an interrupted run simply starts over.
What only lived in the database (reports, orders, users, audit trail,
routing rules, reconciliation) is not in the objects and does not come
back; signed reports come back as their Encapsulated PDF instances.
``received_at`` of a rebuilt row is the time of the rebuild.

An original ``<sop>.dcm`` that ``pacs compress`` left for its readers'
grace next to its re-encoding ``<sop>.jls.dcm`` (or ``.j2k``) is not
indexed: the re-encoding is ("superseded"; ``pacs verify --repair``
removes the original). Likewise, under the overwrite policy, of a resend and
the copy it replaced (``<sop>.resent.dcm`` and ``<sop>.dcm``, alternating:
the names do not tell which came last) the one written last is indexed.

The rejection notes (IHE IOCM) among the objects are applied once every
object is indexed, as ``pacs verify --repair`` applies the notes it adopts
(:func:`pacs.maintenance.verify.withdraw_again`): the instances a note lists
whose objects are gone (it withdrew them) are recorded rejected again, so a
modality resending the study does not bring them back; those still stored
stay (a note from a sender that may not reject was never applied).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from storage import StorageError

from ..app import Pacs
from ..errors import IngestError
from ..index.writer import Outcome
from ..key_objects import KOS_CLASS
from .common import (
    Capped,
    NullProgress,
    Progress,
    batched,
    index_stored_object,
    indexed_among,
    instances_t,
    series_t,
    sop_of_key,
    studies_t,
    written_after,
)
from .compress import KEY_VARIANTS
from .verify import withdraw_again

log = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    listed: int = 0
    already_indexed: int = 0
    indexed: int = 0
    indexed_bytes: int = 0
    duplicates: Capped = field(default_factory=Capped)
    failed: Capped = field(default_factory=Capped)
    # Originals left by pacs compress next to their verified re-encoding.
    superseded: Capped = field(default_factory=Capped)
    # Rejection notes applied again (instances recorded rejected), and those that could not be.
    rejections: Capped = field(default_factory=Capped)
    rejections_failed: Capped = field(default_factory=Capped)
    warnings: list[str] = field(default_factory=lambda: list(WARNINGS))

    def as_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "already_indexed": self.already_indexed,
            "indexed": self.indexed,
            "indexed_bytes": self.indexed_bytes,
            "duplicates": self.duplicates.as_dict(),
            "failed": self.failed.as_dict(),
            "superseded": self.superseded.as_dict(),
            "rejections": self.rejections.as_dict(),
            "rejections_failed": self.rejections_failed.as_dict(),
            "warnings": self.warnings,
        }


# What the operator must know after every rebuild: the objects cannot tell it.
WARNINGS = (
    "not rebuilt (they only lived in the index): reports (signed ones come back as their PDF instances), "
    "orders, users and API tokens, signing certificates, report templates, routing rules and the forwarding "
    "queue, the AE registry, the audit trail, the lifts of rejections (pacs rejections lift: an image a "
    "rejection note withdrew and not sent again since is refused again), the patient corrections (pacs patient "
    "update, merge and "
    "move-study, HIS updates: the studies show and are filed under what the modality sent again, a moved "
    "study under the wrong patient), the share links given to patients, the critical results flagged and "
    "who was told; "
    "restore them from an index backup with `pacs restore FILE --yes` (then `pacs verify --repair` adopts "
    "the objects received since that backup)",
    "deletions still under way when the index was lost (objects whose delete had not been done yet, e.g. a "
    "store outage) cannot be told from stored objects: such instances may be back; check deletions made "
    "shortly before the loss",
)


def _newer_encoding(pacs: Pacs, key: str) -> str | None:
    """The key of ``pacs compress``'s re-encoding of the object under *key*
    (``<sop>.dcm``), if the store holds one: that copy is written only once
    verified identical, after the original; the original is what compress
    leaves for its readers' grace."""
    sop = sop_of_key(key)
    if sop is None or not key.endswith(f"/{sop}.dcm"):
        return None
    base = key[: -len(".dcm")]
    for variant in KEY_VARIANTS.values():
        encoding = f"{base}.{variant}.dcm"
        # Unless the original is the later one: a resend of a compressed
        # instance (overwrite policy), written after the re-encoding.
        if pacs.store.exists(encoding) and not written_after(pacs.store, key, encoding):
            return encoding
    return None


def _last_written(pacs: Pacs, key: str, replaced: str) -> tuple[str, str]:
    """*key* was just indexed over *replaced*, another copy of its instance
    in the same series folder (overwrite policy: a resend and the copy it
    replaced, both kept for readers when the index was lost). The one
    written last is the copy the sender was last told was stored: the row
    is pointed back at *replaced* if it is that one. ("indexed-over",
    replaced) or ("superseded", replaced)."""
    if key.rsplit("/", 1)[0] != replaced.rsplit("/", 1)[0] or not written_after(pacs.store, replaced, key):
        return "indexed-over", replaced
    with pacs.engine.connect() as conn:
        sha256 = conn.execute(select(instances_t.c.sha256).where(instances_t.c.storage_key == key)).scalar()
    back = index_stored_object(pacs, replaced, source="reindex", replaces=(key, sha256))
    if back.outcome is not Outcome.REPLACED:
        return "indexed-over", replaced  # the row changed meanwhile (an ingest): it stands
    return "superseded", replaced


def _one(pacs: Pacs, key: str, size: int) -> tuple[str, str]:
    try:
        # Both copies indexed by parallel workers left a random one of the
        # two indexed: the re-encoding is the one that counts, whatever the order.
        if (newer := _newer_encoding(pacs, key)) is not None:
            return "superseded", newer
        added = index_stored_object(pacs, key, source="reindex")
        if added.outcome is Outcome.DUPLICATE:
            return "duplicate", added.existing_key or ""
        if added.outcome is Outcome.REPLACED and added.obsolete_key not in (None, key):
            # The overwrite policy's index writer replaces: the copy committed
            # last won, whichever was received last.
            return _last_written(pacs, key, added.obsolete_key or "")
    except IngestError as exc:
        return "failed", str(exc)
    except StorageError as exc:
        return "failed", f"unreadable: {exc}"
    except Exception as exc:  # the index refused the row: keep going, report it
        log.warning("could not index %s: %s", key, exc)
        return "failed", f"index: {exc}"
    return "indexed", ""


def reindex(pacs: Pacs, *, workers: int = 4, progress: Progress | None = None) -> ReindexReport:
    """Index every stored object the index does not know (see module doc)."""
    progress = progress or NullProgress()
    report = ReindexReport()
    progress.start("indexing stored objects", None)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for infos in batched(pacs.store.list()):
            report.listed += len(infos)
            indexed = indexed_among(pacs.engine, [i.key for i in infos])
            todo = [i for i in infos if i.key not in indexed]
            report.already_indexed += len(infos) - len(todo)
            progress.advance(len(infos) - len(todo))
            # Parallel workers share one group committer: their rows are
            # committed together, one transaction per batch.
            for info, (state, detail) in zip(todo, pool.map(lambda i: _one(pacs, i.key, i.size), todo), strict=True):
                progress.advance()
                if state == "indexed":
                    report.indexed += 1
                    report.indexed_bytes += info.size
                elif state == "duplicate":
                    report.duplicates.add({"key": info.key, "indexed_key": detail})
                elif state == "superseded":
                    report.superseded.add({"key": info.key, "indexed_key": detail})
                elif state == "indexed-over":
                    # Indexed over the other copy of its instance, received
                    # before it (its row was counted when this run wrote it).
                    report.superseded.add({"key": detail, "indexed_key": info.key})
                else:
                    report.failed.add({"key": info.key, "detail": detail})
    _apply_rejection_notes(pacs, report, progress)
    return report


def _apply_rejection_notes(pacs: Pacs, report: ReindexReport, progress: Progress) -> None:
    """Apply the rejection notes the index now holds (see module doc): all
    of them, also those an interrupted run indexed. Key Object Selections
    that are no rejection note (key images, a quality flag) change nothing."""
    with pacs.engine.connect() as conn:
        notes = conn.execute(select(instances_t.c.sop_uid, instances_t.c.storage_key, studies_t.c.study_uid)
                             .join(series_t, series_t.c.pk == instances_t.c.series_pk)
                             .join(studies_t, studies_t.c.pk == series_t.c.study_pk)
                             .where(instances_t.c.sop_class_uid == KOS_CLASS)
                             .order_by(instances_t.c.pk)).all()
    progress.start("applying rejection notes", len(notes))
    for note in notes:
        done, failed = withdraw_again(pacs, note.storage_key, note.sop_uid, note.study_uid)
        progress.advance()
        if failed:
            report.rejections_failed.add({"key": note.storage_key, "detail": failed})
        elif done is not None and (done.deleted or done.not_found):
            report.rejections.add({"key": note.storage_key, "note_uid": done.note_uid, "instances": done.deleted,
                                   "not_stored": done.not_found})
