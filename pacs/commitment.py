"""Storage commitment (PS3.4 Annex J): do we hold these instances, safely?

A modality asks after sending a study, before it deletes its own copy. An
instance is committed when the index has it with the same SOP class and the
object store has its bytes, read back whole, at the indexed size and sha256:
the index alone is not enough to promise a copy (an object lost or damaged
under the index since it was acknowledged must be reported, not vouched
for), nor is the size (``pacs verify`` finds damage of the same size). An
instance whose UID the requesting AE sent in another study or series than
the one kept, refused then as a conflict (0111H), is not its copy: failed.
Failure reasons are PS3.4 J.3.2.1.2's, answered per instance in the
N-EVENT-REPORT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import select

from storage import ObjectNotFound, sha256_of

from .app import Pacs
from .index.models import CommitmentConflict, Instance

log = logging.getLogger(__name__)

# Failure Reason (0008,1197) values, PS3.4 J.3.2.1.2 / PS3.3 C.12.1.1.2.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
# Lookups per SELECT: well under SQLite's bound-parameter limit.
_CHUNK = 500
# Objects read back at once: a study of thousands must not open thousands of
# streams against the store (each read is streamed in chunks).
_READERS = 4


@dataclass(frozen=True)
class Reference:
    """One instance a modality asks about."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class CommitmentResult:
    """What can be committed and what cannot, with a reason for each failure."""

    transaction_uid: str
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)
    # Some objects could not be read (the store failed, not their bytes):
    # a check later may commit them; a definite mismatch never will.
    unavailable: bool = False

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 failures exist."""
        return 2 if self.failed else 1


def check_commitment(pacs: Pacs, transaction_uid: str, references: Sequence[Reference],
                     calling: str = "") -> CommitmentResult:
    """Look every reference up in the index and read its object back from the
    store; *calling*: the requesting AE title, whose refused conflicts fail.
    Raises what the index raises when it cannot answer."""
    result = CommitmentResult(transaction_uid)
    indexed: dict[str, tuple[str, str, int, str]] = {}
    # Where *calling* sent each UID refused as a conflict: "study/series/".
    conflicts: dict[str, list[str]] = {}
    uids = list(dict.fromkeys(r.sop_instance_uid for r in references))
    table = CommitmentConflict.__table__
    with pacs.engine.connect() as conn:
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start:start + _CHUNK]
            rows = conn.execute(
                select(Instance.sop_uid, Instance.sop_class_uid, Instance.storage_key, Instance.size_bytes,
                       Instance.sha256)
                .where(Instance.sop_uid.in_(chunk))
            )
            indexed.update((row[0], (row[1], row[2], int(row[3]), row[4] or "")) for row in rows)
            if calling:
                for row in conn.execute(select(table.c.sop_uid, table.c.study_uid, table.c.series_uid)
                                        .where(table.c.sop_uid.in_(chunk), table.c.calling_ae == calling)):
                    conflicts.setdefault(row[0], []).append(f"{row[1]}/{row[2]}/")
    to_read: list[tuple[Reference, str, int, str]] = []
    for reference in references:
        found = indexed.get(reference.sop_instance_uid)
        if found is None:
            result.failed.append((reference, NO_SUCH_OBJECT_INSTANCE))
            continue
        sop_class, key, size, sha256 = found
        if sop_class != reference.sop_class_uid:
            result.failed.append((reference, CLASS_INSTANCE_CONFLICT))
            continue
        # A conflict whose study/series is where the instance is kept now is
        # moot: the sender's copy was stored there since.
        refused = [place for place in conflicts.get(reference.sop_instance_uid, ()) if not key.startswith(place)]
        if refused:
            log.error("storage commitment %s: %s sent SOP Instance UID %s in %s; it was refused as a conflict "
                      "(0111H, not stored): the archive keeps another object under that UID, at %s",
                      transaction_uid, calling, reference.sop_instance_uid, refused[0].rstrip("/"), key)
            result.failed.append((reference, PROCESSING_FAILURE))
            continue
        to_read.append((reference, key, size, sha256))
    if to_read:
        with ThreadPoolExecutor(max_workers=min(_READERS, len(to_read)),
                                thread_name_prefix="commitment-read") as readers:
            reasons = list(readers.map(lambda item: _stored(pacs, item[1], item[2], item[3]), to_read))
        for (reference, *_), reason in zip(to_read, reasons, strict=True):
            if reason is None:
                result.unavailable = True
                result.failed.append((reference, PROCESSING_FAILURE))
            elif reason:
                result.failed.append((reference, reason))
            else:
                result.committed.append(reference)
    return result


def _stored(pacs: Pacs, key: str, size: int, sha256: str) -> int | None:
    """0 when the store holds the object at its indexed size and sha256 (read
    whole, streamed), a failure reason when it does not, None when the store
    cannot tell now."""
    try:
        with pacs.store.open(key) as stream:
            digest, read = sha256_of(stream)
    except ObjectNotFound:
        log.error("storage commitment: indexed object %s is missing from the store (pacs verify)", key)
        return NO_SUCH_OBJECT_INSTANCE
    except Exception as exc:  # StorageError, or a read cut off mid-stream (OSError, urllib3's)
        log.warning("storage commitment: cannot check %s now: %s", key, exc)
        return None
    if read != size:
        log.error("storage commitment: %s holds %d bytes, the index says %d (pacs verify)", key, read, size)
        return PROCESSING_FAILURE
    if digest != sha256:
        log.error("storage commitment: %s is damaged: its sha256 is %s..., the index says %s... (pacs verify)",
                  key, digest[:16], sha256[:16])
        return PROCESSING_FAILURE
    return 0
