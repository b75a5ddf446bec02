"""Deleting one study, series or instance on request (sent in error, wrong
patient, test images on the production archive).

The entry points are ``pacs delete`` and ``DELETE /api/studies/...`` (admin).
A reason is required and goes to the audit trail with who, what and how
much. A study with a signed report is clinical record: it, or any of its
series or instances, is deleted only when the request says so
(``force``); a deleted study's reports go with it.

Order (an index row is never left without its object): the rows are
deleted in one transaction (series and studies left empty are removed, a
study keeping a report stays) that also records their storage keys as
tombstones (:mod:`pacs.index.tombstones`); only then are the objects
deleted, each while its tombstone is locked, and the tombstones finished.
A modality resending an instance meanwhile (same UIDs, same key) either
takes its key back before the object is deleted (acknowledged and kept) or,
if the deletion got there first, is refused with a transient status it
retries. A crash or a store failure in between leaves active tombstones; the
next ``pacs purge --yes`` or ``pacs verify --repair`` deletes their objects
and never adopts them back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, func, select

from .. import routing
from ..app import Pacs
from ..audit import Event, patient_cx, record_in
from ..errors import RefusedRequest
from ..index import tombstones
from ..index.db import retry_write
from ..index.prune import prune_after_delete, prune_patients
from .common import (
    batched,
    indexed_among,
    instances_t,
    lock_study,
    patients_t,
    reports_t,
    series_t,
    studies_t,
    unindexed_under,
)

log = logging.getLogger(__name__)


class DeleteRefused(RefusedRequest):
    """The deletion was not done; *http_status* is what an HTTP client sees."""


@dataclass(frozen=True)
class Target:
    """What to delete: a study, one of its series, or one instance of that series."""


    study_uid: str
    series_uid: str = ""
    sop_uid: str = ""
    # Several instances of the series instead of one (a rejection note's).
    sop_uids: tuple[str, ...] = ()

    @property
    def level(self) -> str:
        return "instance" if self.sop_uid or self.sop_uids else "series" if self.series_uid else "study"

    @property
    def instances(self) -> tuple[str, ...]:
        """The instances named (none: the whole series or study)."""
        return (self.sop_uid, *self.sop_uids) if self.sop_uid else self.sop_uids

    def __post_init__(self) -> None:
        if self.instances and not self.series_uid:
            raise ValueError("an instance is named with its series")


@dataclass
class DeleteReport:
    level: str
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str = ""
    instances: int = 0
    bytes: int = 0
    reports_deleted: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    objects_deleted: int = 0
    object_failures: list[str] = field(default_factory=list)
    dry_run: bool = False
    kept_resent: int = 0  # objects stored again meanwhile, kept
    detail: str = ""  # what the audit trail says of it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named(target: Target) -> str:
    """The target as the audit trail and messages name it."""
    if len(target.instances) > 1:
        return f"{target.instances[0]} and {len(target.instances) - 1} more of series {target.series_uid}"
    return (target.instances or (target.series_uid or target.study_uid,))[0]


def _selected(conn: Connection, target: Target) -> tuple[Any, list[Any]]:
    """The study row and the (pk, storage key, size) of the target's instances."""
    study = conn.execute(
        select(studies_t.c.pk, studies_t.c.patient_pk, patients_t.c.patient_id, patients_t.c.issuer)
        .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
        .where(studies_t.c.study_uid == target.study_uid)
    ).first()
    if study is None:
        raise DeleteRefused(f"no study {target.study_uid}", 404)
    lock_study(conn, study.pk)
    query = (select(instances_t.c.pk, instances_t.c.storage_key, instances_t.c.size_bytes, instances_t.c.series_pk,
                    instances_t.c.sop_uid)
             .join(series_t, series_t.c.pk == instances_t.c.series_pk)
             .where(series_t.c.study_pk == study.pk))
    if target.series_uid:
        query = query.where(series_t.c.series_uid == target.series_uid)
    if target.instances:
        # In batches: a rejection note may list more instances than one
        # statement binds (PostgreSQL: 65,535 parameters; SQLite: 32,766).
        rows = [r for batch in batched(target.instances)
                for r in conn.execute(query.where(instances_t.c.sop_uid.in_(batch))).all()]
    else:
        rows = conn.execute(query).all()
    if not rows and target.level != "study":
        raise DeleteRefused(f"no {target.level} {_named(target)} in study {target.study_uid}", 404)
    return study, rows


def delete_unindexed(pacs: Pacs, keys: list[str], report: DeleteReport) -> None:
    """Delete the objects of *keys*, whose rows (and tombstones) the
    deletion's transaction deleted (recorded).

    The keys follow the UIDs: a modality resending an instance while its
    study is being deleted stores it under the same key. Its index
    transaction claims the key's tombstone, and an object is deleted only
    while its tombstone is active and locked (see
    :mod:`pacs.index.tombstones`), so such a resend, once acknowledged, is
    kept; one whose object this deletion removed first is refused, and
    stored again by the modality's retry."""
    for batch in batched(keys, tombstones.FINISH_BATCH):
        # Resends indexed already need no lock (their tombstones are claimed).
        indexed = indexed_among(pacs.engine, batch)
        done = tombstones.finish(pacs.engine, pacs.store, [k for k in batch if k not in indexed])
        for key in [*indexed, *done.kept]:
            log.warning("%s was stored again while it was being deleted: kept", key)
        report.kept_resent += len(indexed) + len(done.kept)
        report.objects_deleted += len(done.deleted)
        report.object_failures.extend(key for key, _ in done.failed)


def _report_counts(conn: Connection, study_pk: int) -> tuple[int, int]:
    """(every report version, the signed ones) of the study."""
    total, signed = conn.execute(
        select(func.count(), func.count().filter(reports_t.c.status == "signed"))
        .select_from(reports_t).where(reports_t.c.study_pk == study_pk)).one()
    return int(total), int(signed)


def _signed_refusal(study_uid: str) -> DeleteRefused:
    return DeleteRefused(f"study {study_uid} has a signed report: its images are part of the patient's record; "
                         "delete them only on purpose (force)", 409)


def refuse_if_signed(conn: Connection, study_uid: str) -> None:
    """Raise the refusal :func:`delete_target` gives a study with a signed
    report (nothing for a study not in the archive)."""
    pk = conn.execute(select(studies_t.c.pk).where(studies_t.c.study_uid == study_uid)).scalar()
    if pk is not None and _report_counts(conn, pk)[1]:
        raise _signed_refusal(study_uid)


def delete_target(pacs: Pacs, target: Target, *, reason: str, user: str = "", event: Event | None = None,
                  force: bool = False, dry_run: bool = False,
                  also: Callable[[Connection], None] | None = None) -> DeleteReport:
    """Delete *target* (see the module docstring); raises :class:`DeleteRefused`.

    The "delete" audit event is written in the transaction that deletes the
    rows (a process killed after that commit cannot lose it): *event* (HTTP:
    the request's access event, given :attr:`DeleteReport.detail` here; the
    caller must not write it again) or, with *user* (the CLI), one made here.
    *also* runs in that transaction too (a rejection note's record of what
    it withdrew)."""
    reason = " ".join(reason.split())
    if not reason:
        raise DeleteRefused("a reason is required (it goes to the audit trail)", 400)
    report = DeleteReport(target.level, target.study_uid, target.series_uid, target.sop_uid, dry_run=dry_run)
    deletion = f"delete-{uuid.uuid4().hex}"
    if event is None and user:
        event = Event(action="delete", user=user, role="admin", protocol="cli", study_uid=target.study_uid)
    # A deadlock victim (an HIS update of the patient, an ingest), or a row
    # gone meanwhile, is deleted again: not an outage to report (HTTP 503).
    keys = retry_write(pacs.engine,
                       lambda conn: _delete_rows(conn, pacs, target, report, deletion, event, reason, force=force,
                                                 also=also),
                       what=f"deletion of {target.level} {_named(target)}")
    if keys is None:
        return report
    delete_unindexed(pacs, keys, report)
    tombstones.prune(pacs.engine)  # those finished long enough ago
    return report


def _delete_rows(conn: Connection, pacs: Pacs, target: Target, report: DeleteReport, deletion: str,
                 event: Event | None, reason: str, *, force: bool,
                 also: Callable[[Connection], None] | None = None) -> list[str] | None:
    """The transaction of :func:`delete_target`: the rows deleted, their
    keys recorded as tombstones of *deletion* and returned (None for a dry
    run), *report* filled in. Run again whole when it loses a race."""
    study, rows = _selected(conn, target)
    report.patient_id = study.patient_id
    report.instances = len(rows)
    report.bytes = sum(int(r.size_bytes or 0) for r in rows)
    # A signed report makes the study's images part of the patient's
    # record: any of them, not only the whole study, go only on purpose.
    reports, signed = _report_counts(conn, study.pk)
    if signed and not force:
        raise _signed_refusal(target.study_uid)
    # A whole study's report versions go with it (drafts too); a series or instance takes none.
    report.reports_deleted = reports if target.level == "study" else 0
    if report.dry_run:
        return None
    keys = [r.storage_key for r in rows]
    if target.level != "instance":
        # A crash's orphans of the study or series go with it.
        folder = f"{target.study_uid}/" + (f"{target.series_uid}/" if target.series_uid else "")
        keys += unindexed_under(conn, pacs.store, folder, keys)
    # (An original pacs compress replaced is both unindexed and taken over.)
    keys = list(dict.fromkeys(keys + tombstones.record(conn, keys, deletion, instances_deleted=True)))
    report.detail = (f"{target.level} {_named(target)}: {report.instances} instances, {report.bytes} bytes"
                     + (f", {report.reports_deleted} reports" if report.reports_deleted else "")
                     + f"; reason: {reason}")[:500]
    if event is not None:
        # The patient as every other event names it (with its issuer: an HL7 CX), or a search of
        # the patient's trail by that name misses the deletion.
        event.detail, event.patient_id = report.detail, patient_cx(study.patient_id, study.issuer or "")
        record_in(conn, event)
    # Their routing jobs not yet claimed end with them (a replaced key image
    # selection or measurement, held before it is sent: see routing.VIEWER_SAVE_HOLD_SECONDS);
    # a job being sent now is dropped by its sender.
    routing.cancel_jobs_of(conn, target.study_uid, None if target.level == "study" else [r.sop_uid for r in rows],
                           f"the {target.level} was deleted before it was sent")
    if target.level == "study":
        conn.execute(delete(studies_t).where(studies_t.c.pk == study.pk))  # series, instances, reports cascade
        report.removed = {"instances": len(rows), "studies": 1, "patients": prune_patients(conn, {study.patient_pk})}
    else:
        for batch in batched(r.pk for r in rows):
            conn.execute(delete(instances_t).where(instances_t.c.pk.in_(batch)))
        report.removed = {"instances": len(rows),
                          **prune_after_delete(conn, {r.series_pk for r in rows}, set())}
    if also is not None:
        also(conn)
    return keys
