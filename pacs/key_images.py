"""Key images (ảnh chính): the few images of a study a radiologist marks
while reading, for the referring doctor, the patient's share link and the
signed report.

They are kept the DICOM way, as Key Object Selection documents
(:mod:`pacs.key_objects`) in the study, so every DICOM and DICOMweb peer
sees them (a KO series) and no table of ours is needed. One selection per
radiologist and study: a KOS is immutable, so a new selection is a new KOS
stored through the one ingest path (:class:`pacs.ingest.Ingestor`, as a
signed report's PDF is), after which the radiologist's previous ones are
deleted through the deletion path (:func:`pacs.maintenance.delete.delete_target`,
each deletion an audited ``delete`` event); an empty selection deletes them.
Two selections saved at once by one radiologist each keep only the newest
(highest index row) of that radiologist's: whichever finishes last leaves
exactly one.

Reading gathers the images of every KOS of the study, the modalities' own
included; rejection notes (IHE IOCM titles) and manifests (XDS-I, "Complete
Study Content") are listed but are not key images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from storage import ObjectDamaged, ObjectNotFound

from .app import Pacs
from .audit import Event
from .errors import RefusedRequest
from .header import valid_uid
from .index.models import Instance, Order, Patient, Series, Study, StudyOrderLink
from .ingest import Origin
from .key_objects import (
    DEFAULT_TITLE,
    KOS_CLASS,
    SET_ASIDE_TITLES,
    TITLES,
    KeyDocument,
    RequestRef,
    Selected,
    StudyHeader,
    build_kos,
    key_document,
    title_code,
)
from .orders import fit_text
from .routing import VIEWER_SAVE_HOLD_SECONDS
from .part10 import BufferSource
from .query import Level
from .retrieve import RetrieveItem, resolve
from .sr_content import is_sr_class
from .sr_reads import SrError, read_sr, store_problem
from .timezones import dicom_date_time, hospital_zone

log = logging.getLogger(__name__)
instances_t = Instance.__table__
series_t = Series.__table__
studies_t = Study.__table__
patients_t = Patient.__table__
orders_t = Order.__table__
links_t = StudyOrderLink.__table__

# Images one selection holds at most (a radiologist marks a handful).
MAX_MARKS = 1000
# Characters of the Key Object Description at most.
MAX_DESCRIPTION = 4000
# KOS documents of one study read at most (a study has one per reader, a few from modalities).
MAX_DOCUMENTS = 200
# Key images a signed report's PDF shows, and their rendered size.
PDF_IMAGES = 4
PDF_IMAGE_SIZE = 512


class KeyImageError(RefusedRequest):
    """A key image request refused, with the HTTP status a client sees."""


@dataclass(frozen=True)
class Mark:
    """An image the radiologist marked: an instance and, for a multi-frame
    one, a frame (None: the whole instance)."""

    sop_uid: str
    frame: int | None = None


@dataclass(frozen=True)
class Author:
    """Who saves a selection: their login, name as shown, role, and where from (the audit trail)."""

    username: str
    display_name: str = ""
    role: str = ""
    client: str = ""
    protocol: str = "http"

    def event(self, action: str, study_uid: str = "") -> Event:
        """The audit event of *action* by this author."""
        return Event(action=action, user=self.username, role=self.role, client=self.client, protocol=self.protocol,
                     study_uid=study_uid)


@dataclass(frozen=True)
class _Stored:
    """A KOS of the study as stored: its index row and what it says (None: unreadable)."""

    pk: int
    sop_uid: str
    series_uid: str
    document: KeyDocument | None
    error: str = ""


def parse_title(value: str | None) -> str:
    """The CID 7010 code of a title given as its code ("113000") or meaning
    ("Of Interest", case ignored); the default "Of Interest" when none."""
    try:
        return title_code(value, TITLES, DEFAULT_TITLE, "document title")
    except ValueError as exc:
        raise KeyImageError(str(exc), 400) from None


def _description(value: str | None) -> str:
    text = (value or "").strip()
    if "\x00" in text:
        raise KeyImageError("the description contains a NUL character (U+0000): remove it", 400)
    if len(text) > MAX_DESCRIPTION:
        raise KeyImageError(f"the description is longer than {MAX_DESCRIPTION} characters", 400)
    return text


def study_row(conn: Connection, study_uid: str) -> Any:
    """The study row with its patient's (404 when none)."""
    row = conn.execute(
        select(studies_t, patients_t.c.name.label("patient_name"), patients_t.c.patient_id, patients_t.c.issuer,
               patients_t.c.birth_date, patients_t.c.sex)
        .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
        .where(studies_t.c.study_uid == study_uid)
    ).first()
    if row is None:
        raise KeyImageError(f"no study {study_uid}", 404)
    return row


def requested_procedure(conn: Connection, study: Any) -> RequestRef | None:
    """The Requested Procedure the study was ordered as: the HIS order it is
    reconciled with (its requested procedure's row), else its accession
    alone; None for a study without either (an emergency not ordered)."""
    order = conn.execute(
        select(orders_t).join(links_t, links_t.c.order_pk == orders_t.c.pk).where(links_t.c.study_pk == study.pk)
    ).first()
    if order is None:
        return RequestRef(study.accession_number) if study.accession_number else None
    meaning = order.procedure_code_meaning or order.requested_procedure_description or order.procedure_code
    # Cut to the VRs' lengths (LO 64, SH 16) as the worklist serves them: the HIS's texts may be longer.
    return RequestRef(
        accession_number=order.accession_number, placer_order=fit_text(order.placer_order_number, 64),
        filler_order=fit_text(order.filler_order_number, 64), procedure_id=fit_text(order.requested_procedure_id, 16),
        description=fit_text(order.requested_procedure_description or meaning, 64),
        code=(order.procedure_code, fit_text(order.procedure_code_scheme, 16) or "L", fit_text(meaning, 64))
        if order.procedure_code else None,
    )


def study_header(study: Any, request: RequestRef | None) -> StudyHeader:
    """The patient and study attributes a new object of the study carries (the index's, now)."""
    return StudyHeader(
        study_uid=study.study_uid, patient_name=study.patient_name, patient_id=study.patient_id,
        issuer=study.issuer, birth_date=study.birth_date, sex=study.sex, study_date=study.study_date,
        study_time=study.study_time, accession_number=study.accession_number, study_id=study.study_id,
        referring_physician=study.referring_physician, description=study.description, request=request,
    )


def study_instances(conn: Connection, study_pk: int, sop_uids: set[str]) -> dict[str, Any]:
    """The study's instances among *sop_uids*, by SOP Instance UID."""
    found: dict[str, Any] = {}
    wanted = sorted(sop_uids)
    for start in range(0, len(wanted), 500):
        rows = conn.execute(
            select(instances_t.c.sop_uid, instances_t.c.sop_class_uid, instances_t.c.rows, instances_t.c.columns,
                   instances_t.c.frames, instances_t.c.photometric, instances_t.c.storage_key,
                   instances_t.c.pixel_offset, series_t.c.series_uid)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .where(series_t.c.study_pk == study_pk, instances_t.c.sop_uid.in_(wanted[start:start + 500]))
        ).all()
        found.update({r.sop_uid: r for r in rows})
    return found


def _stored_documents(pacs: Pacs, study: Any) -> list[_Stored]:
    """The KOS documents of the study, oldest first, each read whole (a few kilobytes)."""
    with pacs.engine.connect() as conn:
        rows = conn.execute(
            select(instances_t.c.pk, instances_t.c.sop_uid, instances_t.c.sop_class_uid,
                   instances_t.c.transfer_syntax_uid, instances_t.c.storage_key, instances_t.c.size_bytes,
                   series_t.c.series_uid)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .where(series_t.c.study_pk == study.pk, instances_t.c.sop_class_uid == KOS_CLASS)
            .order_by(instances_t.c.pk).limit(MAX_DOCUMENTS)
        ).all()
    stored = []
    for row in rows:
        item = RetrieveItem(sop_uid=row.sop_uid, sop_class_uid=row.sop_class_uid,
                            transfer_syntax_uid=row.transfer_syntax_uid, storage_key=row.storage_key,
                            size=int(row.size_bytes or 0), study_uid=study.study_uid, series_uid=row.series_uid)
        try:
            document = key_document(row.sop_uid, row.series_uid, read_sr(pacs, item))
        except SrError as exc:  # that one listed as unreadable, not the others
            log.warning("key object selection %s of study %s cannot be read: %s", row.sop_uid, study.study_uid, exc)
            stored.append(_Stored(row.pk, row.sop_uid, row.series_uid, None, str(exc)))
            continue
        except (ObjectNotFound, ObjectDamaged) as exc:  # one line naming it, as a WADO-RS read logs it
            problem = f"key object selection {row.sop_uid} is {store_problem(exc)}"
            log.warning("%s (study %s)", problem, study.study_uid)
            stored.append(_Stored(row.pk, row.sop_uid, row.series_uid, None, problem))
            continue
        stored.append(_Stored(row.pk, row.sop_uid, row.series_uid, document))
    return stored


def _selection(study_uid: str, marks: list[Mark], found: dict[str, Any]) -> list[Selected]:
    """The marks as the images a KOS selects, in the order first marked:
    each an image of the study (400 otherwise), frames only of a
    multi-frame instance, a whole instance when one mark names no frame."""
    frames: dict[str, set[int] | None] = {}
    for mark in marks:
        row = found.get(mark.sop_uid)
        if row is None:
            raise KeyImageError(f"instance {mark.sop_uid} is not in study {study_uid}", 400)
        if not (row.rows and row.columns) or is_sr_class(row.sop_class_uid):
            raise KeyImageError(f"instance {mark.sop_uid} is not an image (SOP class {row.sop_class_uid})", 400)
        count = int(row.frames or 1)
        if mark.frame is not None and not 1 <= mark.frame <= count:
            raise KeyImageError(f"instance {mark.sop_uid} has no frame {mark.frame} (it has {count})", 400)
        chosen = frames.setdefault(mark.sop_uid, set())
        if mark.frame is None or count <= 1:
            frames[mark.sop_uid] = None  # the whole instance
        elif chosen is not None:
            chosen.add(mark.frame)
    return [Selected(sop, found[sop].sop_class_uid, found[sop].series_uid, tuple(sorted(chosen or ())))
            for sop, chosen in frames.items()]


def _same(document: KeyDocument, selected: list[Selected], title: str, description: str) -> bool:
    """Whether *document* already says exactly this (a selection saved again unchanged)."""
    return (document.title_code == title and document.description == description
            and [(r.sop_uid, tuple(sorted(r.frames))) for r in document.images]
            == [(s.sop_uid, s.frames) for s in selected])


def _view(pacs: Pacs, study: Any, stored: list[_Stored], username: str) -> dict[str, Any]:
    """The JSON of a study's key images: the documents, and one entry per
    selected image (per frame of a multi-frame one) found in this study."""
    documents = [s for s in stored if s.document is not None]
    wanted = {ref.sop_uid for s in documents for ref in s.document.images}  # type: ignore[union-attr]
    with pacs.engine.connect() as conn:
        found = study_instances(conn, study.pk, wanted)
    images: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    for s in documents:
        doc = s.document
        assert doc is not None
        own = bool(username) and doc.login == username
        for ref in doc.images:
            row = found.get(ref.sop_uid)
            if row is None:
                continue  # an image of another study, or not (yet) in the archive
            count = int(row.frames or 1)
            shown = [f for f in ref.frames if 1 <= f <= count] if ref.frames and count > 1 else [None]
            for frame in shown:
                entry = {"sop_uid": ref.sop_uid, "series_uid": row.series_uid, "sop_class_uid": row.sop_class_uid,
                         "frame": frame, "frames": count, "document": doc.sop_uid, "title": doc.title,
                         "title_code": doc.title_code, "author": doc.author, "login": doc.login, "key": doc.key,
                         "own": own}
                images.append(entry)
                if own:
                    mine.append({"sop_uid": ref.sop_uid, "frame": frame})
    listed = [s.document.as_json(own=bool(username) and s.document.login == username) if s.document is not None
              else {"sop_uid": s.sop_uid, "series_uid": s.series_uid, "error": s.error} for s in stored]
    return {"study_uid": study.study_uid, "documents": listed, "images": images, "mine": mine}


def study_key_images(pacs: Pacs, study_uid: str, username: str = "") -> dict[str, Any]:
    """The key images of a study from every KOS in it (*username*: whose
    are ``own``, and ``mine`` the selection they saved)."""
    with pacs.engine.connect() as conn:
        study = study_row(conn, study_uid)
    return _view(pacs, study, _stored_documents(pacs, study), username)


def key_refs(pacs: Pacs, study_uid: str, *, prefer: str = "") -> list[dict[str, Any]]:
    """The study's key images (not rejection notes, nor an image one of them
    names), each image and frame once, *prefer*'s selection (a login) first:
    what a patient's page and a signed report show."""
    try:
        view = study_key_images(pacs, study_uid, prefer)
    except KeyImageError:
        return []
    ordered = sorted((i for i in view["images"] if i["key"]), key=lambda i: not i["own"])
    # An image a rejection note or quality flag names (a whole instance, or that frame) is set aside
    # whoever marked it too: rejected for quality or patient safety, or of another patient's
    # worklist entry (IOCM), it is never shown to a patient nor printed in a report.
    aside = {(i["sop_uid"], i["frame"]) for i in view["images"] if not i["key"] and i["title_code"] in SET_ASIDE_TITLES}
    seen: set[tuple[str, int | None]] = set()
    refs = []
    for image in ordered:
        at = (image["sop_uid"], image["frame"])
        if at in seen or at in aside or (image["sop_uid"], None) in aside:
            continue
        seen.add(at)
        refs.append({"sop_uid": image["sop_uid"], "series_uid": image["series_uid"], "frame": image["frame"],
                     "title": image["title"]})
    return refs


def replace_selection(pacs: Pacs, study_uid: str, marks: list[Mark], author: Author, *,
                      title: str | None = None, description: str | None = None) -> dict[str, Any]:
    """Make *marks* the selection of *author* in the study (see the module
    docstring); an empty list removes it. Answers the study's key images
    with ``document`` (the KOS now holding the selection, None when
    removed), ``removed`` (the KOS deleted) and ``stored`` (whether one was
    written: a selection saved again unchanged is not)."""
    code = parse_title(title)
    text = _description(description)
    if len(marks) > MAX_MARKS:
        raise KeyImageError(f"at most {MAX_MARKS} images may be selected", 400)
    for mark in marks:
        if not valid_uid(mark.sop_uid):
            raise KeyImageError(f"invalid SOP Instance UID {mark.sop_uid[:80]!r}", 400)
    with pacs.engine.connect() as conn:
        study = study_row(conn, study_uid)
        found = study_instances(conn, study.pk, {m.sop_uid for m in marks})
        request = requested_procedure(conn, study)
    selected = _selection(study_uid, marks, found)
    own = [s for s in _stored_documents(pacs, study) if s.document is not None and s.document.login == author.username]
    if (len(own) == 1 and selected and own[0].document is not None
            and _same(own[0].document, selected, code, text)):
        return {**_view(pacs, study, _stored_documents(pacs, study), author.username),
                "document": own[0].sop_uid, "removed": [], "stored": False}
    new_sop = None
    if selected:
        now = datetime.now(UTC)
        new_sop, data = build_kos(study_header(study, request), selected, title=code,
                                  author_name=author.display_name or author.username, login=author.username,
                                  description=text, when=dicom_date_time(now, hospital_zone(pacs.settings)))
        pacs.ingestor.ingest(BufferSource(b"", data), Origin(source="key-images", calling_ae=pacs.settings.ae_title,
                                                             remote_host=author.client, user=author.username,
                                                             route_hold_seconds=VIEWER_SAVE_HOLD_SECONDS))
        own = [s for s in _stored_documents(pacs, study)
               if s.document is not None and s.document.login == author.username]
    keep = max((s.pk for s in own), default=None) if selected else None
    removed = []
    for old in own:
        if old.pk == keep:
            continue
        reason = (f"key images of {author.username} replaced by {new_sop}" if new_sop
                  else f"key images of {author.username} cleared")
        if withdraw_own(pacs, study_uid, old.series_uid, old.sop_uid, author, reason, KeyImageError):
            removed.append(old.sop_uid)
    current = next((s.sop_uid for s in own if s.pk == keep), None)
    return {**_view(pacs, study, _stored_documents(pacs, study), author.username),
            "document": current, "removed": removed, "stored": new_sop is not None}


def withdraw_own(pacs: Pacs, study_uid: str, series_uid: str, sop_uid: str, author: Author, reason: str,
                 error: type[RefusedRequest]) -> bool:
    """Delete a document the viewer saved for *author* (their KOS, their
    presentation state) through the deletion path, audited as *author*'s
    ``delete`` (written in the deletion's transaction); False when it was
    gone already (a concurrent save of the same author deleted it); any other
    refusal raised as *error*."""
    # Imported here: the maintenance jobs (codecs among them) are not needed to start serving.
    from .maintenance.delete import DeleteRefused, Target, delete_target

    event = author.event("delete", study_uid)
    try:
        # force: the study may have a signed report; what goes is this author's own document alone.
        delete_target(pacs, Target(study_uid, series_uid, sop_uid), reason=reason, event=event, force=True)
    except DeleteRefused as exc:
        if exc.http_status == 404:
            return False
        raise error(str(exc), exc.http_status) from None
    return True


def key_image_thumbnails(pacs: Pacs, study_uid: str, *, prefer: str = "", limit: int = PDF_IMAGES,
                         size: int = PDF_IMAGE_SIZE) -> list[bytes]:
    """Up to *limit* of the study's key images (*prefer*'s first) rendered
    as JPEG, at most *size* pixels on the longer side, for a signed report.
    Rendered by the viewer's renderer (a plain library, no HTTP: as
    :mod:`pacs.forwarding` uses :mod:`viewer_api.multipart`), one frame
    decoded at a time within the process's pixel memory budget. An image
    that cannot be rendered (a video, a codec not installed) is left out,
    logged: the signature never fails for it."""
    from viewer_api.render import RenderParams, render_dataset_bytes

    from .frames import local_object
    from .pixel_memory import PIXELS

    params = RenderParams("image/jpeg", quality=85, viewport=(size, size))
    out: list[bytes] = []
    try:
        refs = key_refs(pacs, study_uid, prefer=prefer)
    except Exception as exc:  # the report is signed without them
        log.warning("the key images of study %s are left out of its report: %s", study_uid,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return []
    for ref in refs:
        if len(out) >= limit:
            break
        items = resolve(pacs, Level.IMAGE, {"StudyInstanceUID": study_uid, "SOPInstanceUID": ref["sop_uid"]},
                        limit=1)
        if not items:
            continue
        try:
            with local_object(pacs, items[0]) as path, open(path, "rb") as f:
                out.append(render_dataset_bytes(f, (ref["frame"] or 1) - 1, params, hold=PIXELS.lease))
        except Exception as exc:  # one image left out of the PDF, never the signature refused
            log.warning("key image %s frame %s of study %s not rendered for the report: %s",
                        ref["sop_uid"], ref["frame"] or 1, study_uid, str(exc).splitlines()[0][:200] if str(exc)
                        else type(exc).__name__)
    return out
