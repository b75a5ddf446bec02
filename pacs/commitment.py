"""Storage commitment (PS3.4 Annex J): do we hold these instances, safely?

A modality asks after sending a study, before it deletes its own copy. An
instance is committed when the index has it with the same SOP class and the
object store has its bytes at the indexed size: the index alone is not
enough to promise a copy (an object lost under the index since it was
acknowledged must be reported, not vouched for). Failure reasons are PS3.4
J.3.2.1.2's, answered per instance in the N-EVENT-REPORT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select

from storage import ObjectNotFound, StorageError

from .app import Pacs
from .index.models import Instance

log = logging.getLogger(__name__)

# Failure Reason (0008,1197) values, PS3.4 J.3.2.1.2 / PS3.3 C.12.1.1.2.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
# Lookups per SELECT: well under SQLite's bound-parameter limit.
_CHUNK = 500


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

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 failures exist."""
        return 2 if self.failed else 1


def check_commitment(pacs: Pacs, transaction_uid: str, references: Sequence[Reference]) -> CommitmentResult:
    """Look every reference up in the index and the object store."""
    result = CommitmentResult(transaction_uid)
    indexed: dict[str, tuple[str, str, int]] = {}
    uids = list(dict.fromkeys(r.sop_instance_uid for r in references))
    with pacs.engine.connect() as conn:
        for start in range(0, len(uids), _CHUNK):
            rows = conn.execute(
                select(Instance.sop_uid, Instance.sop_class_uid, Instance.storage_key, Instance.size_bytes)
                .where(Instance.sop_uid.in_(uids[start:start + _CHUNK]))
            )
            indexed.update((row[0], (row[1], row[2], int(row[3]))) for row in rows)
    for reference in references:
        found = indexed.get(reference.sop_instance_uid)
        if found is None:
            result.failed.append((reference, NO_SUCH_OBJECT_INSTANCE))
            continue
        sop_class, key, size = found
        if sop_class != reference.sop_class_uid:
            result.failed.append((reference, CLASS_INSTANCE_CONFLICT))
            continue
        reason = _stored(pacs, key, size)
        if reason:
            result.failed.append((reference, reason))
        else:
            result.committed.append(reference)
    return result


def _stored(pacs: Pacs, key: str, size: int) -> int:
    """0 when the object is in the store at its indexed size, else a failure reason."""
    try:
        info = pacs.store.stat(key)
    except ObjectNotFound:
        log.error("storage commitment: indexed object %s is missing from the store (pacs verify)", key)
        return NO_SUCH_OBJECT_INSTANCE
    except StorageError as exc:
        log.warning("storage commitment: cannot check %s: %s", key, exc)
        return PROCESSING_FAILURE
    if info.size != size:
        log.error("storage commitment: %s holds %d bytes, the index says %d (pacs verify)", key, info.size, size)
        return PROCESSING_FAILURE
    return 0
