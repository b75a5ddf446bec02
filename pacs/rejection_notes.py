"""Rejection notes made here: an administrator withdraws images sent in
error (a wrong patient, a failed exposure) when the modality cannot send a
rejection note itself, as most in service cannot (IHE IOCM's Change
Requester, dcm4chee's "reject").

The note is what a modality would send: a Key Object Selection titled with
the rejection reason (CID 7011), listing the instances withdrawn, in a new
series of the study, with the patient and study as the index holds them. It
is stored through the one ingest path and then applied as any note is
(:func:`pacs.rejections.apply_rejection`): the instances go through the
deletion path, audited as the administrator's deletions; they are recorded
as rejected (a modality resending the study does not bring them back), and
the note follows them to every destination routing sent them to. A
study with a signed report is refused (409), as a note from a modality is:
an administrator deletes those on purpose (``pacs delete --force``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from .app import Pacs
from .errors import RefusedRequest
from .header import valid_uid
from .index.models import Instance, Series
from .ingest import Origin
from .key_images import Author, requested_procedure, study_header, study_instances, study_row
from .key_objects import KOS_CLASS, REJECTION_TITLES, Selected, build_kos, title_code
from .maintenance.delete import refuse_if_signed
from .part10 import BufferSource
from .rejections import Rejection, apply_rejection
from .timezones import dicom_date_time, hospital_zone

instances_t = Instance.__table__
series_t = Series.__table__
# The rejection reason when none is given: dcm4chee's default too.
DEFAULT_CODE = "113001"
# A note lists at most this many instances (a whole study of thin slices
# fits; more is rejected series by series).
MAX_LISTED = 50_000
# The Key Object Description of a note (the administrator's reason) is UT,
# but a reason is a sentence: the audit trail keeps 500 characters.
MAX_REASON = 400
SERIES_DESCRIPTION = "Loại bỏ / Rejection note"
SERIES_NUMBER = 960


class RejectRefused(RefusedRequest):
    """A rejection refused, with the HTTP status a client sees."""


@dataclass
class Selection:
    """What a rejection would withdraw: the study's patient and the instances, by series."""

    study_uid: str
    patient_id: str
    code: str
    by_series: dict[str, list[str]] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(len(sops) for sops in self.by_series.values())

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "patient_id": self.patient_id, "code": self.code,
                "reason": REJECTION_TITLES[self.code], "instances": self.instances,
                "series": [{"series_uid": uid, "instances": len(sops)} for uid, sops in sorted(self.by_series.items())]}

    def answer(self, done: Rejection | None) -> dict[str, Any]:
        """What a rejection answers (the JSON API, ``--json``): the selection and, unless a dry run, what *done*."""
        answer: dict[str, Any] = {"dry_run": done is None, **self.as_dict()}
        if done is not None:
            answer.update(note_uid=done.note_uid, withdrawn=done.deleted, not_found=done.not_found, kept=done.refused)
        return answer


def parse_code(value: str | None) -> str:
    """The CID 7011 code of a rejection reason given as its code ("113001") or
    meaning ("Rejected for Patient Safety Reasons", case ignored)."""
    try:
        return title_code(value, REJECTION_TITLES, DEFAULT_CODE, "rejection reason")
    except ValueError as exc:
        raise RejectRefused(str(exc), 400) from None


def _reason(value: str) -> str:
    text = " ".join(value.split())
    if not text:
        raise RejectRefused("a reason is required (it goes to the audit trail and the note)", 400)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) or len(text) > MAX_REASON:
        raise RejectRefused(f"the reason must be at most {MAX_REASON} characters, without control characters", 400)
    return text


def select_instances(conn: Connection, study: Any, series_uid: str, sop_uids: list[str]) -> dict[str, Selected]:
    """The study's instances to withdraw, by SOP Instance UID: *sop_uids*
    (each must be in the study, in *series_uid* if given), else the series'
    or the whole study's. Key Object Selections are left out of a series or
    study (earlier notes, key image notes), not of a list naming them."""
    if sop_uids:
        found = {sop: Selected(sop, row.sop_class_uid, row.series_uid)
                 for sop, row in study_instances(conn, study.pk, set(sop_uids)).items()
                 if not series_uid or row.series_uid == series_uid}
        missing = [sop for sop in sop_uids if sop not in found]
        if missing:
            where = f"series {series_uid}" if series_uid else f"study {study.study_uid}"
            raise RejectRefused(f"{len(missing)} instances are not in {where}: {missing[0]}"
                                + (" and more" if len(missing) > 1 else ""), 404)
        return found
    query = (select(instances_t.c.sop_uid, instances_t.c.sop_class_uid, series_t.c.series_uid)
             .join(series_t, series_t.c.pk == instances_t.c.series_pk)
             .where(series_t.c.study_pk == study.pk, instances_t.c.sop_class_uid != KOS_CLASS))
    if series_uid:
        query = query.where(series_t.c.series_uid == series_uid)
    found = {row.sop_uid: Selected(row.sop_uid, row.sop_class_uid, row.series_uid)
             for row in conn.execute(query.limit(MAX_LISTED + 1))}
    if not found:
        raise RejectRefused(f"nothing to reject in {'series ' + series_uid if series_uid else 'the study'}", 404)
    return found


def reject(pacs: Pacs, author: Author, *, study_uid: str, series_uid: str = "", sop_uids: list[str] | None = None,
           code: str | None = None, reason: str, dry_run: bool = False) -> tuple[Selection, Rejection | None]:
    """Withdraw the instances named (see :func:`select_instances`) with a
    rejection note made for *author* (the module docstring). Answers what is
    selected and, unless *dry_run*, what the note did. Raises a
    :class:`~pacs.errors.RefusedRequest`: 400 bad input, 404 an unknown
    study or instances, 409 a signed report."""
    chosen = parse_code(code)
    text = _reason(reason)
    wanted = list(dict.fromkeys(sop_uids or []))
    for uid, name in [(study_uid, "Study Instance UID"), *([(series_uid, "Series Instance UID")] if series_uid else []),
                      *((sop, "SOP Instance UID") for sop in wanted)]:
        if not valid_uid(uid):
            raise RejectRefused(f"invalid {name} {uid[:80]!r}", 400)
    if len(wanted) > MAX_LISTED:
        raise RejectRefused(f"a note lists at most {MAX_LISTED} instances: reject series by series", 400)
    with pacs.engine.connect() as conn:
        study = study_row(conn, study_uid)  # 404
        refuse_if_signed(conn, study_uid)  # 409
        found = select_instances(conn, study, series_uid, wanted)
        request = requested_procedure(conn, study)
    if len(found) > MAX_LISTED:
        raise RejectRefused(f"the {'series' if series_uid else 'study'} holds more than {MAX_LISTED} instances: "
                            "reject it series by series", 400)
    selection = Selection(study_uid, study.patient_id, chosen)
    for selected in found.values():
        selection.by_series.setdefault(selected.series_uid, []).append(selected.sop_uid)
    if dry_run:
        return selection, None
    _, data = build_kos(study_header(study, request), list(found.values()), title=chosen,
                        # No login: the author's key image selection (found by login) would
                        # take it for theirs and delete it when replaced.
                        author_name=author.display_name or author.username, login="",
                        description=text, when=dicom_date_time(datetime.now(UTC), hospital_zone(pacs.settings)),
                        series_description=SERIES_DESCRIPTION, series_number=SERIES_NUMBER)
    stored = pacs.ingestor.ingest(BufferSource(b"", data), Origin(
        source="rejection", calling_ae=pacs.settings.ae_title, remote_host=author.client, user=author.username))
    result = apply_rejection(pacs, stored.storage_key, lambda: author.event("delete"))
    assert result is not None  # a note titled with a rejection reason
    return selection, result

