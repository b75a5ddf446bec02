"""Rejection notes (IHE IOCM): a modality or workstation withdraws images it
sent (a wrong patient, a bad exposure) by sending a Key Object Selection
document titled with a rejection reason that lists them.

The note is stored as any object; then, when its sender may reject
(``pacs ae add AE --services ...,reject``: never implied by "all", an image
deleted by a KOS from any device would be an easy way to lose records; over
STOW-RS an administrator, roles.REJECTING_ROLES; the operator of ``pacs
import``; an administrator making one here, pacs.rejection_notes), the
instances it lists in its own study go through the deletion path, audited
as ``delete`` by the sender with the note's reason (and its Key Object
Description). The note follows them to every destination routing sent them
to (routing.follow_rejection). A whole series
listed goes with its last instance (not as a series: one received since
stays). What the note cannot take is logged and audited as a failed
``delete``, the images kept: a study with a signed report (an
administrator deletes on purpose: ``pacs delete --force``), instances of
another study or listed without their series. A note sent again applies
again (nothing left to delete).

Each instance withdrawn, and each listed that is not stored (yet: a
router may bring it after the note), is recorded as rejected in the
deletion's transaction (``rejected_instances``): the ingest refuses it from
then on, whoever sends it (0xA771; a STOW-RS part 409), so a modality
resending the whole study does not bring it back. IHE IOCM has a modality
send corrected images under new UIDs; ``pacs rejections lift`` lets the same
UIDs in again (audited), and the same note sent again (a modality
resending the whole study with its note) does not withdraw them again.
Instances the note could not withdraw are not recorded.

A "Quality Issue" (113010) flags images without withdrawing them: kept,
as the key image list already treats it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, Exists, Table, exists, func, or_, select, update

from . import routing
from .app import Pacs
from .audit import Event
from .index.db import retry_write
from .index.models import RejectionListing
from .index.writer import rejected_t
from .index.writer_helpers import insert_ignore_rows
from .key_objects import DESCRIPTION, KOS_CLASS, REJECTION_TITLES
from .maintenance.common import batched, instances_t, series_t, studies_t
from .maintenance.delete import DeleteRefused, Target, delete_target, refuse_if_signed

log = logging.getLogger(__name__)
listings_t: Table = RejectionListing.__table__  # type: ignore[assignment]


@dataclass
class Rejection:
    """What one rejection note did."""

    note_uid: str
    study_uid: str
    reason: str
    deleted: int = 0  # instances
    not_found: int = 0  # listed, not (or no longer) in the archive
    refused: list[str] = field(default_factory=list)  # why some listed instances stay

    @property
    def summary(self) -> str:
        """What the note did, in one line (the audit trail, the CLI)."""
        return f"{self.reason}: {self.deleted} instances withdrawn" + "".join(f"; kept: {why}" for why in self.refused)


def rejection_title(ds: Dataset) -> tuple[str, str] | None:
    """The (code, meaning) of a rejection note's title; None for any other
    document (a key image selection, a quality flag)."""
    if str(ds.get("SOPClassUID", "")) != KOS_CLASS:
        return None
    concept = ds.get("ConceptNameCodeSequence")
    if not concept:
        return None
    code, scheme = str(concept[0].get("CodeValue", "")), str(concept[0].get("CodingSchemeDesignator", ""))
    if scheme.upper() != "DCM" or code not in REJECTION_TITLES:
        return None
    return code, REJECTION_TITLES[code]


def _description(ds: Dataset) -> str:
    """The note's Key Object Description (TID 2010), what its author said of
    it ("sent under BN1023 instead of BN1032"), on one line; "" when none."""
    for item in ds.get("ContentSequence") or []:
        concept = item.get("ConceptNameCodeSequence")
        if (item.get("ValueType") == "TEXT" and concept and str(concept[0].get("CodeValue", "")) == DESCRIPTION[0]
                and str(concept[0].get("CodingSchemeDesignator", "")).upper() == "DCM"):
            return " ".join(str(item.get("TextValue", "")).split())[:300]
    return ""


def listed(ds: Dataset) -> tuple[dict[str, set[str]], int]:
    """The instances a note lists in its own study, by series (its Current
    Requested Procedure Evidence), and how many it lists in other studies."""
    study_uid = str(ds.get("StudyInstanceUID", ""))
    own = str(ds.get("SOPInstanceUID", ""))
    by_series: dict[str, set[str]] = {}
    elsewhere = 0
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            sops = {str(r.get("ReferencedSOPInstanceUID", "")) for r in series.get("ReferencedSOPSequence") or []}
            sops -= {"", own}
            if str(study.get("StudyInstanceUID", "")) != study_uid:
                elsewhere += len(sops)
            elif sops:
                by_series.setdefault(str(series.get("SeriesInstanceUID", "")), set()).update(sops)
    return by_series, elsewhere


def apply_rejection(pacs: Pacs, storage_key: str, make_event: Callable[[], Event], *,
                    only: Callable[[str, set[str]], set[str]] | None = None) -> Rejection | None:
    """Withdraw what the stored object at *storage_key* rejects, if it is a
    rejection note (None otherwise). Each deletion is audited with an event
    of *make_event* (the sender's), its detail and patient filled in.
    *only* narrows each series' listed instances (its UID, their SOP UIDs)
    to those the note is to withdraw and record (all when None)."""
    with pacs.store.local_path(storage_key) as path:
        ds = dcmread(path, stop_before_pixels=True)
    title = rejection_title(ds)
    if title is None:
        return None
    code, meaning = title
    note_uid, study_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    by_series, elsewhere = listed(ds)
    sender = make_event().user
    said = _description(ds)
    result = Rejection(note_uid, study_uid, f"rejection note {note_uid} from {sender}: {meaning} ({code})"
                       + (f": {said}" if said else ""))

    def event() -> Event:
        made = make_event()
        made.study_uid = study_uid
        return made

    def refuse(why: str) -> None:
        """What stays, kept in *result* and audited as a failed deletion."""
        result.refused.append(why)
        failure = event()
        failure.outcome, failure.detail = "failure", f"{result.reason}: not applied: {why}"[:500]
        pacs.audit.record(failure)

    if elsewhere:
        refuse(f"{elsewhere} instances of other studies (a note withdraws images of its own study)")
    # A series item without its UID names no series to withdraw from (Target needs one): its
    # instances stay, the note's other series are withdrawn all the same.
    if unplaced := by_series.pop("", set()):
        refuse(f"{len(unplaced)} instances listed without a series (Series Instance UID)")
    lifted = _lifted_from(pacs.engine, note_uid, [sop for sops in by_series.values() for sop in sops])
    for series_uid, sops in sorted(by_series.items()):
        # Only the instances listed, in one transaction: a whole series
        # listed goes with its last instance, an instance received since
        # the note was written stays.
        if only is not None:
            sops = only(series_uid, sops)
        if not (sops := sops - lifted):
            continue
        target = Target(study_uid, series_uid, sop_uids=tuple(sorted(sops)))
        bar = _recorder(study_uid, series_uid, sops, code, note_uid, sender)
        try:
            report = delete_target(pacs, target, reason=result.reason, event=event(), also=bar)
        except DeleteRefused as exc:
            if exc.http_status == 404:  # none of them stored (any more): refused when they come ...
                try:
                    retry_write(pacs.engine, _unless_signed(study_uid, bar), what=f"rejection of series {series_uid}")
                    result.not_found += len(sops)
                    continue
                except DeleteRefused as signed:  # ... unless the note may not withdraw what is stored either
                    exc = signed
            refuse(str(exc))
            break  # the same refusal (a signed report) holds for the study's other series
        result.deleted += report.instances
        result.not_found += len(sops) - report.instances
    if result.refused:
        log.warning("%s: %d instances withdrawn; kept: %s", result.reason, result.deleted, "; ".join(result.refused))
    else:
        log.info("%s: %d instances withdrawn (%d listed not stored)", result.reason, result.deleted,
                 result.not_found)
    return result


def notes_listing_kept(pacs: Pacs, study_uid: str) -> set[str]:
    """The SOP Instance UIDs of the rejection notes stored in *study_uid* that
    list an instance the archive keeps: its rejection lifted (and the image
    sent again), or a note not applied (a sender that may not reject, a
    signed report). An export leaves them out: the receiver, knowing no
    lift, would withdraw the image there (IHE IOCM has every archive apply
    a note it receives; `pacs import` does)."""
    with pacs.engine.connect() as conn:
        notes = conn.execute(
            select(instances_t.c.sop_uid, instances_t.c.storage_key)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .join(studies_t, studies_t.c.pk == series_t.c.study_pk)
            .where(studies_t.c.study_uid == study_uid, instances_t.c.sop_class_uid == KOS_CLASS)).all()
    found: set[str] = set()
    for note in notes:
        try:
            with pacs.store.local_path(note.storage_key) as path:
                ds = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # missing or unreadable: the export reports it as it writes the object
            log.warning("cannot read key object %s: %s", note.sop_uid, exc)
            continue
        if rejection_title(ds) is None:
            continue
        sops = sorted({sop for sops in listed(ds)[0].values() for sop in sops})
        with pacs.engine.connect() as conn:
            if any(conn.execute(select(instances_t.c.sop_uid).where(instances_t.c.sop_uid.in_(batch)).limit(1))
                   .first() for batch in batched(sops)):
                found.add(str(note.sop_uid))
    return found


# What a sender is told of a note stored but not applied (a C-STORE's Error Comment keeps 64 characters).
NOT_APPLIED = "rejection note stored, not applied yet: send it again"


def apply_or_report(pacs: Pacs, storage_key: str, note_uid: str, study_uid: str,
                    make_event: Callable[[], Event], *,
                    only: Callable[[str, set[str]], set[str]] | None = None) -> tuple[Rejection | None, str]:
    """:func:`apply_rejection` (narrowed by *only*) and "", or its failure
    (the index or the store failing) logged and audited as a failed
    deletion: None and why. The note is stored either way; sent again, it
    withdraws what is left."""
    try:
        return apply_rejection(pacs, storage_key, make_event, only=only), ""
    except Exception as exc:
        failure = make_event()
        log.exception("rejection note %s from %r not applied", note_uid, failure.user)
        failure.study_uid, failure.outcome = study_uid, "failure"
        failure.detail = f"rejection note {note_uid} not applied: {exc}"[:500]
        pacs.audit.record(failure)
        return None, str(exc) or type(exc).__name__


def _recorder(study_uid: str, series_uid: str, sops: Iterable[str], code: str, note_uid: str,
              sender: str) -> Callable[[Connection], None]:
    """What records *sops* as rejected, in a caller's transaction. A UID
    rejected before keeps its first record; one still indexed (kept in
    another series than the note says) is not recorded: the note did not
    withdraw it."""
    def record(conn: Connection) -> None:
        values = {"study_uid": study_uid, "series_uid": series_uid, "code": code, "note_uid": note_uid,
                  "rejected_by": sender[:64], "rejected_at": datetime.now(UTC), "lifted_at": None, "lifted_by": ""}
        for batch in batched(sorted(sops)):
            kept = set(conn.execute(select(instances_t.c.sop_uid).where(instances_t.c.sop_uid.in_(batch))).scalars())
            if not (gone := [sop for sop in batch if sop not in kept]):
                continue
            insert_ignore_rows(conn, rejected_t, [{"sop_uid": sop, **values} for sop in gone], ["sop_uid"])
            # Lifted, and this note never listed it (another note did): it rejects it anew.
            conn.execute(update(rejected_t).values(**values).where(
                rejected_t.c.sop_uid.in_(gone), rejected_t.c.lifted_at.is_not(None),
                rejected_t.c.note_uid != note_uid, ~_listed_by(note_uid)))
            # Every note listing it, not only the one recorded: a lift stands against each sent again.
            insert_ignore_rows(conn, listings_t, [{"sop_uid": sop, "note_uid": note_uid} for sop in gone],
                               ["sop_uid", "note_uid"])
            if forwarded := routing.follow_rejection(conn, study_uid, gone, note_uid):
                log.info("rejection note %s follows the images it withdrew to %d destinations", note_uid, forwarded)
    return record


def _unless_signed(study_uid: str, record: Callable[[Connection], None]) -> Callable[[Connection], None]:
    """*record*, refused as the deletion would be on a study with a signed
    report: what a note may not withdraw it does not bar either."""

    def work(conn: Connection) -> None:
        refuse_if_signed(conn, study_uid)
        record(conn)

    return work


def _lifted_from(engine: Engine, note_uid: str, sops: list[str]) -> set[str]:
    """Those of *sops* whose rejection was lifted after *note_uid* listed
    them (the note recorded, or another listing them too): the same note
    sent again leaves them."""
    by_note = or_(rejected_t.c.note_uid == note_uid, _listed_by(note_uid))
    with engine.connect() as conn:
        return {sop for batch in batched(sorted(sops)) for sop in conn.execute(
            select(rejected_t.c.sop_uid).where(rejected_t.c.sop_uid.in_(batch), by_note,
                                               rejected_t.c.lifted_at.is_not(None))).scalars()}


def _listed_by(note_uid: str) -> Exists:
    """The rejected instance (a row of rejected_instances) was listed by *note_uid*."""
    return exists().where(listings_t.c.sop_uid == rejected_t.c.sop_uid, listings_t.c.note_uid == note_uid)


def rejected_among(engine: Engine, sop_uids: Iterable[str]) -> set[str]:
    """Those of *sop_uids* the ingest refuses (rejected, not lifted)."""
    with engine.connect() as conn:
        return {sop for batch in batched(sorted(set(sop_uids))) for sop in conn.execute(
            select(rejected_t.c.sop_uid).where(rejected_t.c.sop_uid.in_(batch),
                                               rejected_t.c.lifted_at.is_(None))).scalars()}


@dataclass(frozen=True)
class RejectedEntry:
    """One instance the ingest refuses (see the module docstring)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    code: str
    note_uid: str
    rejected_by: str
    rejected_at: datetime

    @property
    def reason(self) -> str:
        return REJECTION_TITLES.get(self.code, self.code)

    def as_dict(self) -> dict[str, Any]:
        return {"sop_uid": self.sop_uid, "study_uid": self.study_uid, "series_uid": self.series_uid,
                "code": self.code, "reason": self.reason, "note_uid": self.note_uid,
                "rejected_by": self.rejected_by, "rejected_at": self.rejected_at.isoformat()}


def rejected(engine: Engine, study_uid: str = "", limit: int = 1000) -> tuple[list[RejectedEntry], int]:
    """The rejected instances, not lifted (of *study_uid*), newest first, at
    most *limit*, and how many there are in all."""
    where = [rejected_t.c.lifted_at.is_(None)] + ([rejected_t.c.study_uid == study_uid] if study_uid else [])
    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(rejected_t).where(*where)).scalar_one())
        rows = conn.execute(select(rejected_t).where(*where)
                            .order_by(rejected_t.c.rejected_at.desc(), rejected_t.c.sop_uid).limit(limit)).all()
    return [_entry(row) for row in rows], total


def _entry(row: Any) -> RejectedEntry:
    return RejectedEntry(**{name: row._mapping[name] for name in RejectedEntry.__dataclass_fields__})


def lift(engine: Engine, *, by: str, study_uid: str = "", sop_uids: Iterable[str] = (),
         dry_run: bool = False) -> list[RejectedEntry]:
    """Let the rejected instances of *study_uid*, and *sop_uids*, be received
    again (lifted *by* someone: kept, see the module docstring); the entries
    lifted (none for UIDs not rejected, or lifted already). A *dry_run*
    answers the same entries and changes nothing."""
    sops = sorted(set(sop_uids))
    if not study_uid and not sops:
        raise ValueError("name a study or instances")
    active = rejected_t.c.lifted_at.is_(None)

    def work(conn: Connection) -> list[RejectedEntry]:
        now = datetime.now(UTC)
        found: list[Any] = []
        for where in ([rejected_t.c.study_uid == study_uid] if study_uid else []) + [
                rejected_t.c.sop_uid.in_(batch) for batch in batched(sops)]:
            found += conn.execute(select(rejected_t).where(where, active)).all()
            if not dry_run:
                conn.execute(update(rejected_t).where(where, active).values(lifted_at=now, lifted_by=by[:64]))
        unique = {row.sop_uid: row for row in found}
        return [_entry(row) for _, row in sorted(unique.items())]
    if dry_run:
        with engine.connect() as conn:
            return work(conn)
    return retry_write(engine, work, what="lifting rejections")
