"""``pacs purge``: retention, deleting whole studies that match rules.

"Older than N days" measures the Study Date (the day of the examination,
what retention periods count from), compared with today's date in the
hospital's zone (the ``timezone`` setting: a server on UTC is still on
yesterday for the first 7 hours of a Vietnamese day); a
study without a usable Study Date (empty or not YYYYMMDD) is measured by the
day it was first received instead. ``--modality`` matches any series of the
study; ``--status`` is the status of the latest report version: ``unread``
(no report), ``draft`` or ``signed``. Rules combine with AND; several values
of one rule with OR. At least one rule is required.

Deletion order, per study, keeps the durability invariant (an index row
never without its object): the study row is deleted (series, instances,
reports, links cascade; triggers keep the counters) in a transaction that
records the study's object keys as tombstones (:mod:`pacs.index.tombstones`),
and only after that commit are the objects deleted, each while its
tombstone is locked. A modality resending an instance of the study
meanwhile takes its key back (kept) or, if its object was deleted first,
is refused with a transient status it retries. A crash in between leaves
active tombstones; the next purge or ``verify --repair`` deletes their
objects (and never adopts them back). A patient left without studies and
orders is deleted too. One audit event (action "delete") per study, written in
the transaction that deletes its rows.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, or_, select

from ..app import Pacs
from ..audit import Event, record_in
from ..index import tombstones
from ..index.db import retry_write, write_transaction
from ..index.prune import prune_patients
from ..timezones import hospital_now, server_zone
from .common import (
    BATCH,
    Capped,
    NullProgress,
    Progress,
    batched,
    instances_t,
    lock_study,
    os_user,
    patients_t,
    reports_t,
    series_t,
    studies_t,
    unindexed_under,
)

log = logging.getLogger(__name__)

STATUSES = ("unread", "draft", "signed")

# Study dates before this are placeholders, not dates (see PurgeRules.condition).
EARLIEST_STUDY_DATE = "19000101"


class PurgeJournal:
    """Keys of objects whose index rows were (being) deleted, as a purge or a
    deletion of an earlier version wrote them (``DATA_DIR/purge.journal``,
    ``delete-<id>.journal``) before the rows' transaction. Tombstones in the
    index replaced them (see :mod:`pacs.index.tombstones`); a journal left by
    a crash is finished through them."""

    def __init__(self, data_dir: Path | str, name: str = "purge.journal") -> None:
        self.path = Path(data_dir) / name

    @classmethod
    def every(cls, data_dir: Path | str) -> list[PurgeJournal]:
        """The purge journal and every deletion's journal left in *data_dir*."""
        folder = Path(data_dir)
        names = ["purge.journal", *sorted(p.name for p in folder.glob("delete-*.journal"))] if folder.is_dir() else []
        return [cls(folder, name) for name in names]

    def append(self, keys: list[str]) -> None:
        """Record *keys* durably before their index rows are deleted."""
        if not keys:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(k + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())

    def iter_keys(self) -> Iterator[str]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()

    def keys(self) -> set[str]:
        """Every journaled key (small: the journal is emptied after each run)."""
        return set(self.iter_keys())

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def finish(self, pacs: Pacs) -> int:
        """Delete the journaled objects no index row references (a crashed
        run's leftovers) and empty the journal. Objects still indexed (the
        crash came before the commit) are kept. The unindexed keys become
        tombstones first, in one transaction with the check, and go through
        :func:`pacs.index.tombstones.finish` like a deletion's (on
        PostgreSQL a resend whose INSERT is in flight during that check is
        not covered: a journal is only left by a crash of an older
        version). Returns how many went."""
        deleted = 0
        failed = False
        for keys in batched(self.iter_keys()):
            with write_transaction(pacs.engine) as conn:
                indexed = set(conn.execute(select(instances_t.c.storage_key)
                                           .where(instances_t.c.storage_key.in_(keys))).scalars())
                unindexed = [k for k in keys if k not in indexed]
                tombstones.record(conn, unindexed, f"journal {self.path.name}")
            done = tombstones.finish(pacs.engine, pacs.store, unindexed)
            deleted += len(done.deleted)
            failed = failed or bool(done.failed)
        if not failed:
            self.clear()
        return deleted


def finish_interrupted(pacs: Pacs) -> int:
    """Finish what deletions that died half way left (journals of an older
    version, active tombstones); objects deleted."""
    deleted = sum(j.finish(pacs) for j in PurgeJournal.every(pacs.settings.data_dir))
    return deleted + len(tombstones.finish_all(pacs.engine, pacs.store).deleted)


@dataclass(frozen=True)
class PurgeRules:
    """Which studies go (see the module doc for what each rule measures)."""

    older_than_days: int | None = None
    modalities: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.older_than_days is None and not self.modalities and not self.statuses:
            raise ValueError("give at least one rule: --older-than, --modality or --status")
        if self.older_than_days is not None and self.older_than_days < 0:
            raise ValueError("--older-than must be a number of days >= 0")
        unknown = set(self.statuses) - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown status {', '.join(sorted(unknown))}; use {', '.join(STATUSES)}")

    def condition(self, today: date | None = None, zone: tzinfo | None = None) -> Any:
        """The WHERE clause on studies. *today* and *zone*: the hospital's
        (default: the server's); a study without a Study Date counts from
        the hospital's midnight of the day it arrived."""
        clauses = []
        if self.older_than_days is not None:
            zone = zone or server_zone()
            today = today or datetime.now(zone).date()
            cutoff = (today - timedelta(days=self.older_than_days)).strftime("%Y%m%d")
            received_cutoff = datetime.combine(
                today - timedelta(days=self.older_than_days), datetime.min.time(), tzinfo=zone
            ).astimezone(UTC)
            # "00000000" or "18000101" (a modality's unset clock) is no date to
            # keep a study by: such a study is kept by when it arrived.
            dated = and_(func.length(studies_t.c.study_date) == 8, studies_t.c.study_date >= EARLIEST_STUDY_DATE)
            clauses.append(
                or_(
                    and_(dated, studies_t.c.study_date < cutoff),
                    and_(~dated, studies_t.c.created_at < received_cutoff),
                )
            )
        if self.modalities:
            clauses.append(
                exists().where(series_t.c.study_pk == studies_t.c.pk, series_t.c.modality.in_(self.modalities))
            )
        if self.statuses:
            latest = (
                select(reports_t.c.status)
                .where(reports_t.c.study_pk == studies_t.c.pk)
                .order_by(reports_t.c.version.desc())
                .limit(1)
                .scalar_subquery()
            )
            options = []
            if "unread" in self.statuses:
                options.append(~exists().where(reports_t.c.study_pk == studies_t.c.pk))
            reported = [s for s in self.statuses if s != "unread"]
            if reported:
                options.append(latest.in_(reported))
            clauses.append(or_(*options))
        return and_(*clauses)

    def as_dict(self) -> dict[str, Any]:
        return {
            "older_than_days": self.older_than_days,
            "modalities": list(self.modalities),
            "statuses": list(self.statuses),
            "date": "study date (received date when the study has none)",
        }


@dataclass
class PurgeReport:
    rules: PurgeRules
    dry_run: bool
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    selected: Capped = field(default_factory=Capped)
    deleted_studies: int = 0
    deleted_instances: int = 0
    deleted_bytes: int = 0
    deleted_patients: int = 0
    objects_deleted: int = 0
    object_failures: Capped = field(default_factory=Capped)
    leftovers_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "rules": self.rules.as_dict(),
            "selected": {"studies": self.studies, "instances": self.instances, "bytes": self.bytes},
            "studies": self.selected.as_dict(),
            "deleted": {
                "studies": self.deleted_studies,
                "instances": self.deleted_instances,
                "bytes": self.deleted_bytes,
                "patients": self.deleted_patients,
                "objects": self.objects_deleted,
            },
            "object_failures": self.object_failures.as_dict(),
            "leftovers_deleted": self.leftovers_deleted,
        }


def _summary(pacs: Pacs, where: Any, report: PurgeReport) -> None:
    with pacs.engine.connect() as conn:
        count, n_instances, size = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(studies_t.c.num_instances), 0),
                func.coalesce(func.sum(studies_t.c.size_bytes), 0),
            ).where(where)
        ).one()
        report.studies, report.instances, report.bytes = int(count), int(n_instances), int(size)
        rows = conn.execute(
            select(
                studies_t.c.study_uid, studies_t.c.study_date, studies_t.c.modalities,
                studies_t.c.num_instances, studies_t.c.size_bytes, patients_t.c.patient_id,
            )
            .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
            .where(where)
            .order_by(studies_t.c.study_date, studies_t.c.pk)
            .limit(report.selected.cap)
        ).all()
    report.selected.count = report.studies
    report.selected.items = [
        {"study_uid": r.study_uid, "study_date": r.study_date, "modalities": r.modalities,
         "patient_id": r.patient_id, "instances": r.num_instances, "bytes": r.size_bytes}
        for r in rows
    ]


def _delete_study(conn: Connection, pacs: Pacs, study_pk: int, where: Any, deletion: str,
                  user: str) -> dict[str, Any] | None:
    """Delete one study's index rows (if it still matches), audited in the
    same transaction (a purge killed after the commit cannot lose the event);
    return what it was."""
    row = conn.execute(
        select(studies_t.c.study_uid, studies_t.c.patient_pk, studies_t.c.num_instances,
               studies_t.c.size_bytes, patients_t.c.patient_id)
        .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
        .where(studies_t.c.pk == study_pk, where)
    ).first()
    if row is None:
        return None  # changed since it was selected (new report, new date...)
    lock_study(conn, study_pk)
    keys = list(
        conn.execute(
            select(instances_t.c.storage_key)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .where(series_t.c.study_pk == study_pk)
        ).scalars()
    )
    # A crash's orphans of the study go with it.
    keys += unindexed_under(conn, pacs.store, f"{row.study_uid}/", keys)
    # (An original pacs compress replaced is both unindexed and taken over.)
    keys = list(dict.fromkeys(keys + tombstones.record(conn, keys, deletion, instances_deleted=True)))
    record_in(conn, Event(action="delete", user=user, protocol="cli", study_uid=row.study_uid,
                          patient_id=row.patient_id,
                          detail=f"purge: {row.num_instances} instances, {row.size_bytes} bytes"))
    conn.execute(delete(studies_t).where(studies_t.c.pk == study_pk))
    patients_removed = prune_patients(conn, {row.patient_pk})
    return {
        "study_uid": row.study_uid, "patient_id": row.patient_id, "instances": row.num_instances,
        "bytes": row.size_bytes, "keys": keys, "patients_removed": patients_removed,
    }


def purge(
    pacs: Pacs,
    rules: PurgeRules,
    *,
    execute: bool = False,
    user: str | None = None,
    progress: Progress | None = None,
    today: date | None = None,
) -> PurgeReport:
    """Summarise (``execute=False``) or delete the studies *rules* select."""
    progress = progress or NullProgress()
    now = hospital_now(pacs.settings)
    where = rules.condition(today or now.date(), now.tzinfo)
    report = PurgeReport(rules=rules, dry_run=not execute)
    _summary(pacs, where, report)
    if not execute:
        return report
    deletion = f"purge-{uuid.uuid4().hex}"
    report.leftovers_deleted = finish_interrupted(pacs)
    user = user or os_user()
    progress.start("purging studies", report.studies)
    last_pk = 0
    while True:
        with pacs.engine.connect() as conn:
            pks = list(
                conn.execute(
                    select(studies_t.c.pk).where(where, studies_t.c.pk > last_pk).order_by(studies_t.c.pk).limit(BATCH)
                ).scalars()
            )
        if not pks:
            break
        last_pk = pks[-1]
        for study_pk in pks:
            # One study's transaction at a time, run again when it loses a
            # deadlock (an HIS update of its patient): the nightly purge
            # does not stop half-way for a conflict of the moment.
            done = retry_write(pacs.engine,
                               lambda conn, pk=study_pk: _delete_study(conn, pacs, pk, where, deletion, user),
                               what=f"purge of study {study_pk}")
            progress.advance()
            if done is None:
                continue
            report.deleted_studies += 1
            report.deleted_instances += int(done["instances"])
            report.deleted_bytes += int(done["bytes"])
            report.deleted_patients += done["patients_removed"]
            finished = tombstones.finish(pacs.engine, pacs.store, done["keys"])
            report.objects_deleted += len(finished.deleted)
            for key, detail in finished.failed:
                report.object_failures.add({"key": key, "detail": detail})
    return report
