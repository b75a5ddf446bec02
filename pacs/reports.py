"""Radiology reports: draft, sign, amend.

A signed version is immutable; an amendment is a new version (the old one
stays). Signing renders the PDF, stores it back into the study as a DICOM
Encapsulated PDF through the normal ingest path, and queues an ORU^R01 for
the HIS with a link to the images -- the PDF instance and the queued message
make the report visible to PACS clients and the EMR alike.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EncapsulatedPDFStorage, generate_uid
from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from . import critical_results
from .app import Pacs
from .errors import RefusedRequest
from .index.db import retry_write
from .index.models import Instance, Order, Patient, Report, Series, Study, StudyOrderLink
from .ingest import Origin
from .key_images import key_image_thumbnails
from .maintenance.common import delete_instance_rows
from .orders import OrderService, report_order
from .part10 import BufferSource, new_instance
from .query import READABLE
from .query.results import as_written
from .reading_claims import end_on_signature
from .report_pdf import Letterhead, ReportContent, render
from .report_signature import sign_pdf, signatures_for, trust_roots, verify_pdf
from .timezones import dicom_date_time, hl7_timestamp, hospital_zone, in_hospital_zone, utc_offset

log = logging.getLogger(__name__)
reports_t = Report.__table__
studies_t = Study.__table__
patients_t = Patient.__table__
orders_t = Order.__table__
links_t = StudyOrderLink.__table__
instances_t = Instance.__table__
series_t = Series.__table__
# A report PDF's series number is this plus its version (`pacs report verify`
# finds a signed PDF by it when the index lost the report rows).
_PDF_SERIES = 900


class ReportError(RefusedRequest):
    """Refused, with the HTTP status a client sees."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _row_dict(row: Any) -> dict[str, Any]:
    return {
        "version": row.version,
        "status": row.status,
        "findings": row.findings,
        "impression": row.impression,
        "author": row.author,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "signed_by": row.signed_by,
        "signed_at": _iso(row.signed_at),
        "pdf_sop_uid": row.pdf_sop_uid,
        "revision": row.revision,
    }


# Objects the archive adds to a study that are not the procedure performed:
# the report PDFs themselves (DOC), structured reports, key object
# selections, presentation states. "Procedure CT/DOC" on an amendment's PDF
# would name the first signature as part of the examination.
NOT_PROCEDURE = frozenset({"DOC", "SR", "KO", "PR"})



def procedure_modalities(modalities: str) -> str:
    """The study's modalities as the procedure performed, "/"-separated
    (CT/MR), without the documents and annotations stored alongside."""
    return "/".join(m for m in modalities.split("\\") if m and m not in NOT_PROCEDURE)


def _check_text(findings: str, impression: str) -> None:
    """400 for a NUL character (pasted from another program): PostgreSQL
    refuses it in text (a 500, the draft lost), an HL7 or PDF peer cuts
    the text there."""
    if "\x00" in findings or "\x00" in impression:
        raise ReportError("the report text contains a NUL character (U+0000), likely pasted from another "
                          "program: remove it and save again", 400)


def _conflict() -> ReportError:
    return ReportError("a colleague changed the report at the same moment: reload it, compare, then try again", 409)


def _check_revision(current: Any, revision: int | None) -> None:
    """409 when the author's *revision* is not the current draft's: a
    colleague saved in between, and their text would be lost (a save) or
    signed unseen under this author's name (a signature)."""
    if revision is None:
        return
    have = current.revision if current is not None else 0
    if revision != have:
        who = f" by {current.author}" if current is not None and current.author else ""
        raise ReportError(f"the report was changed{who} after you opened it (revision {have}, yours {revision}): "
                          "reload it, compare, then save again", 409)


class ReportService:
    def __init__(self, pacs: Pacs) -> None:
        self.pacs = pacs
        # Only the configured address: a link built from a request's Host
        # header would put whatever a client sent into a signed document.
        self.public_url = (pacs.settings.public_url or "").rstrip("/")

    def _study(self, conn: Any, study_uid: str, *, lock: bool = False) -> Any:
        """The study and its patient; *lock*: the study row locked for the
        rest of the transaction (PostgreSQL; SQLite's BEGIN IMMEDIATE already
        serialises writers), so that the report writes of one study (saves,
        signatures, amendments) queue instead of deciding on rows a
        concurrent one is changing."""
        stmt = (
            select(studies_t, patients_t.c.name.label("patient_name"), patients_t.c.patient_id,
                   patients_t.c.issuer, patients_t.c.birth_date, patients_t.c.sex)
            .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)
            .where(studies_t.c.study_uid == study_uid)
        )
        if lock:
            # NO KEY UPDATE: ingest's inserts of series referencing the
            # study (a KEY SHARE lock) are not held up.
            stmt = stmt.with_for_update(of=studies_t, key_share=True)
        row = conn.execute(stmt).first()
        if row is None:
            raise ReportError(f"no study {study_uid}", 404)
        return row

    def _versions(self, conn: Any, study_pk: int) -> list[Any]:
        return list(conn.execute(select(reports_t).where(reports_t.c.study_pk == study_pk).order_by(reports_t.c.version)))

    def get(self, study_uid: str, *, signed_only: bool = False) -> dict[str, Any]:
        """The report of a study: current version and history."""
        with self.pacs.engine.connect() as conn:
            study = self._study(conn, study_uid)
            versions = self._versions(conn, study.pk)
            critical = critical_results.of_study(conn, study.pk)
        if signed_only:
            versions = [v for v in versions if v.status == "signed"]
        rows = [{**_row_dict(v), "critical": critical.get(v.version)} for v in versions]
        return {
            "study_uid": study_uid,
            "status": rows[-1]["status"] if rows else "none",
            "current": rows[-1] if rows else None,
            "versions": rows,
        }

    def save_draft(self, study_uid: str, findings: str, impression: str, author: str,
                   revision: int | None = None) -> dict[str, Any]:
        """Save the draft. *revision* is the one the author loaded (0: no
        report yet); another save since then is a 409, never overwritten.
        None skips the check (API clients that do not send it). A deadlock's
        victim (an ingest or an HIS update holding the study) is saved again
        (pacs.index.db.retry_transaction), not answered 503."""
        _check_text(findings, impression)

        def once(conn: Connection) -> None:
            now = datetime.now(UTC)
            study = self._study(conn, study_uid, lock=True)
            versions = self._versions(conn, study.pk)
            current = versions[-1] if versions else None
            if current is not None and current.status == "signed":
                raise ReportError("the report is signed and cannot change; amend it for a new version", 409)
            _check_revision(current, revision)
            if current is None:
                conn.execute(reports_t.insert().values(
                    study_pk=study.pk, version=1, status="draft", findings=findings, impression=impression,
                    author=author, created_at=now, updated_at=now, revision=1,
                ))
            else:
                # Conditional on what was read: a signature or a save
                # committed since (the lock above aside) makes it match
                # no row, never overwrite a signed version or a colleague's text.
                done = conn.execute(
                    update(reports_t)
                    .where(reports_t.c.pk == current.pk, reports_t.c.status == "draft",
                           reports_t.c.revision == current.revision)
                    .values(findings=findings, impression=impression, author=author, updated_at=now,
                            revision=current.revision + 1)
                ).rowcount
                if done != 1:
                    raise _conflict()

        try:
            retry_write(self.pacs.engine, once, what="report save")
        except IntegrityError:  # a first version inserted concurrently (uq study_pk, version)
            raise _conflict() from None
        return self.get(study_uid)

    def amend(self, study_uid: str, author: str) -> dict[str, Any]:
        """A new draft version carrying the signed text forward (run again
        when it loses a deadlock, as :meth:`save_draft`)."""
        def once(conn: Connection) -> None:
            now = datetime.now(UTC)
            study = self._study(conn, study_uid, lock=True)
            versions = self._versions(conn, study.pk)
            if not versions or versions[-1].status != "signed":
                raise ReportError("only a signed report can be amended", 409)
            last = versions[-1]
            # Revisions go on counting across versions: one read from the
            # signed version must not match the new draft.
            conn.execute(reports_t.insert().values(
                study_pk=study.pk, version=last.version + 1, status="draft", findings=last.findings,
                impression=last.impression, author=author, created_at=now, updated_at=now,
                revision=last.revision + 1,
            ))

        try:
            retry_write(self.pacs.engine, once, what="report amendment")
        except IntegrityError:  # a colleague's amendment inserted that version first
            raise ReportError("a colleague amended the report at the same moment: reload it", 409) from None
        return self.get(study_uid)

    def sign(self, study_uid: str, signer: str, signer_name: str = "", revision: int | None = None,
             pin: str | None = None, critical: bool = False, critical_note: str = "") -> dict[str, Any]:
        """Sign the current draft: PDF into the study, ORU^R01 queued for the
        HIS. *revision*: the draft revision the signer read (see save_draft).
        With report_signature on, the PDF is digitally signed first (PAdES,
        pacs.report_signature), the radiologist's key opened with *pin*: a
        refusal (SigningKeyError: wrong PIN, lock, expired certificate)
        leaves the draft unsigned. *critical*: the report holds a critical
        result (pacs.critical_results), *critical_note* what must be acted on."""
        note = critical_results.clean_text(critical_note, "the critical result's note", required=False)
        if note and not critical:
            raise ReportError("a critical result's note is given, but the report is not flagged critical", 400)
        now = datetime.now(UTC)
        with self.pacs.engine.connect() as conn:
            study = self._study(conn, study_uid)
            versions = self._versions(conn, study.pk)
            # Read before the PDF is stored: the PDF (DOC) would make the study readable again.
            withdrawn = conn.execute(select(studies_t.c.pk).where(studies_t.c.pk == study.pk, READABLE)).first() is None
        if not versions or versions[-1].status != "draft":
            raise ReportError("there is no draft to sign", 409)
        draft = versions[-1]
        _check_revision(draft, revision)
        if withdrawn:
            # Every image was withdrawn by rejection notes (sent under the wrong patient, failed): signed,
            # another person's findings went to this patient's record at the HIS (ORU^R01), and the study
            # came back into their history (worklist, FHIR, QIDO) holding only the report.
            raise ReportError("every image of this study was withdrawn by a rejection note: there is nothing to "
                              "report; the draft is kept (lift the rejection to sign it)", 409)
        if not (draft.findings.strip() or draft.impression.strip()):
            raise ReportError("an empty report cannot be signed", 422)
        signatures = signatures_for(self.pacs.engine, self.pacs.settings, signer, signer_name, pin)
        viewer_url = self._viewer_url(study_uid)
        modalities = procedure_modalities(study.modalities)
        # The signature as the hospital's clock showed it, with the offset
        # (a bare UTC time read as local is 7 hours off in Vietnam).
        local = in_hospital_zone(now, self.pacs.settings)
        offset = utc_offset(local)
        content = ReportContent(
            institution=study.institution, patient_name=study.patient_name, patient_id=study.patient_id,
            birth_date=study.birth_date, sex=study.sex, study_date=study.study_date,
            accession=study.accession_number, description=study.description, modalities=modalities,
            findings=draft.findings, impression=draft.impression, signed_by=signer_name or signer,
            signed_at=f"{local:%Y-%m-%d %H:%M} (UTC{offset[:3]}:{offset[3:]})", version=draft.version, viewer_url=viewer_url,
            # The key images marked (the signer's first), printed with the text.
            key_images=tuple(key_image_thumbnails(self.pacs, study_uid, prefer=signer)),
            letterhead=Letterhead.from_settings(self.pacs.settings), place=self.pacs.settings.report_place,
            critical=note if critical else None,
        )
        pdf = render(content)
        if signatures:  # the stored instance holds the signed file byte for byte
            pdf = sign_pdf(pdf, signatures, location=self.pacs.settings.report_signature_location or study.institution,
                           tsa_url=self.pacs.settings.report_tsa_url)
        sop_uid = self._store_pdf(study, draft.version, pdf, content, now)

        def once(conn: Connection) -> bool:
            self._study(conn, study_uid, lock=True)  # after a save or amendment under way, not amid it
            return self._signed(conn, study, draft, sop_uid, signer, signer_name, viewer_url, modalities, now,
                                note if critical else None)

        # Only the transaction is run again when it loses a deadlock (a save,
        # an ingest or an HIS update holding the study or the draft): the PDF
        # is stored once, and is the one the signature names.
        try:
            done = retry_write(self.pacs.engine, once, what="report signature")
        except Exception:
            # Lost every run (HTTP 503 "busy"), or the index failed: a PDF
            # no signature names must not stay in the study.
            self._withdraw_unsigned_pdf(sop_uid)
            raise
        if not done:  # after that transaction: the withdrawal writes too
            self._withdraw_pdf(sop_uid)
            raise ReportError("the draft changed while signing; try again", 409)
        return self.get(study_uid)

    def _signed(self, conn: Any, study: Any, draft: Any, sop_uid: str, signer: str, signer_name: str,
                viewer_url: str, modalities: str, now: datetime, critical: str | None = None) -> bool:
        """In the signature's transaction, the study locked: *draft* signed
        with the PDF *sop_uid* and the ORU^R01 queued; False (nothing
        written) when the draft is no longer the one read (signed, or saved
        again, meanwhile). *critical*: the note of the critical result it
        holds (flagged here, in the ORU as OBX-8 "AA"); None: none."""
        done = conn.execute(
            update(reports_t)
            .where(reports_t.c.pk == draft.pk, reports_t.c.status == "draft",
                   reports_t.c.revision == draft.revision)
            .values(status="signed", signed_by=signer_name or signer, signed_at=now, pdf_sop_uid=sop_uid,
                    updated_at=now)
        ).rowcount
        if not done:
            return False
        if critical is not None:
            critical_results.flag(conn, study.pk, draft.version, critical, signer, now)
        # Read and reported: nobody is reading it any more (pacs.reading_claims).
        end_on_signature(conn, study.pk)
        study_uid = study.study_uid
        order = self._order_for(conn, study)
        OrderService.enqueue(conn, "his", "report", {
            "order": order,
            # In-order delivery per order (or study): pacs.outbox.message_key.
            "key": f"order:{order['order_pk']}" if order.get("order_pk") else f"study:{study_uid}",
            "study_uid": study_uid,
            "modalities": modalities,
            "signed_by": signer, "signed_by_name": signer_name or signer,
            "signed_at": hl7_timestamp(now, hospital_zone(self.pacs.settings)),
            "status": "final" if draft.version == 1 else "amended",
            # A critical result: OBX-8 "AA" (critically abnormal, HL7 table 0078)
            # on the impression and on the radiologist's note of it.
            "lines": [
                {"type": "TX", "code": "59776-5^Findings^LN", "value": draft.findings},
                {"type": "TX", "code": "19005-8^Impression^LN", "value": draft.impression,
                 **({"abnormal": "AA"} if critical is not None else {})},
            ] + ([{"type": "TX", "code": "CRITICAL^Critical result^L", "abnormal": "AA",
                   "value": critical or "KẾT QUẢ NGUY KỊCH / CRITICAL RESULT"}] if critical is not None else [])
            + ([{"type": "RP", "code": "IMAGES^Images^L", "value": viewer_url}] if viewer_url else []),
        })
        return True

    def _viewer_url(self, study_uid: str) -> str:
        """The absolute link to the images for the signed PDF and the ORU;
        '' when public_url is not configured (a relative link is of no use
        in the HIS, and the request's Host is not ours to sign)."""
        # `pacs serve` warns at start when it is not set.
        return f"{self.public_url}/viewer/study/{study_uid}" if self.public_url else ""

    def _withdraw_pdf(self, sop_uid: str) -> None:
        """Remove the PDF stored for a signature that did not happen (a
        colleague saved in between): left in the study it would read as a
        signed report of a text nobody signed. Index row first: a crash
        between leaves an orphan object, never a row without its object."""
        with self.pacs.engine.connect() as conn:
            row = conn.execute(select(instances_t.c.pk, instances_t.c.storage_key)
                               .where(instances_t.c.sop_uid == sop_uid)).first()
        if row is None:
            return
        delete_instance_rows(self.pacs.engine, [row.pk])
        try:
            self.pacs.store.delete(row.storage_key)
        except Exception as exc:
            log.warning("withdrawn report PDF %s left in storage as an orphan: %s", sop_uid, exc)

    def _withdraw_unsigned_pdf(self, sop_uid: str) -> None:
        """After the signature's transaction failed: withdraw the PDF unless a
        signed version names it (a commit whose answer was lost did sign it).
        Never raises: the caller answers the transaction's own error."""
        try:
            with self.pacs.engine.connect() as conn:
                signed = conn.execute(select(reports_t.c.pk).where(reports_t.c.pdf_sop_uid == sop_uid)).first()
            if signed is None:
                self._withdraw_pdf(sop_uid)
        except Exception as exc:
            log.warning("the PDF %s of a signature that failed could not be withdrawn: %s",
                        sop_uid, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def pdf_names_patient(self, pdf_sop_uid: str, patient_id: str, issuer: str) -> bool:
        """Whether the signed PDF *pdf_sop_uid* was signed for the patient
        *patient_id* / *issuer* (its stored header names them): a study the
        HIS refiled (an order moved to another patient, a merge, a study
        moved) after the signature keeps the PDF printed with the other
        person's name, ID and birth date -- never rewritten -- which must not
        be offered as this patient's document (FHIR DiagnosticReport
        presentedForm, the share page: see :meth:`pdf`). False when the PDF
        is not in the archive."""
        from pydicom import dcmread

        stored = self.pacs.reader.stored_instance(pdf_sop_uid)
        if stored is None:
            return False
        ds = dcmread(io.BytesIO(self.pacs.store.read_bytes(stored.storage_key)),
                     specific_tags=["PatientID", "IssuerOfPatientID"])
        return _names_patient(ds, patient_id, issuer)

    def _order_for(self, conn: Any, study: Any) -> dict[str, Any]:
        row = conn.execute(
            select(orders_t).join(links_t, links_t.c.order_pk == orders_t.c.pk).where(links_t.c.study_pk == study.pk)
        ).first()
        base = {"patient_id": study.patient_id, "issuer": study.issuer, "name": study.patient_name,
                "accession_number": study.accession_number, "placer_order_number": "",
                "filler_order_number": "", "procedure_code": "", "procedure_code_scheme": "",
                "requested_procedure_description": study.description}
        if row is not None:
            base.update(report_order(row))
        return base

    def _store_pdf(self, study: Any, version: int, pdf: bytes, content: ReportContent, now: datetime) -> str:
        """Encapsulated PDF into the study, through the one ingest path."""
        ds = new_instance(EncapsulatedPDFStorage)
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.IssuerOfPatientID = study.issuer
        ds.PatientBirthDate = study.birth_date
        ds.PatientSex = as_written("CS", study.sex)
        ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
        ds.AccessionNumber = study.accession_number
        ds.StudyID = study.study_id
        ds.ReferringPhysicianName = study.referring_physician
        ds.StudyDescription = study.description
        ds.Modality = "DOC"
        ds.SeriesNumber = _PDF_SERIES + version
        ds.SeriesDescription = f"Report v{version}"
        ds.InstanceNumber = 1
        # DICOM dates and times are the local ones of the place (PS3.3
        # C.12.1.1.8): the hospital's, with TimezoneOffsetFromUTC saying which.
        day, clock, offset = dicom_date_time(now, hospital_zone(self.pacs.settings))
        ds.InstanceCreationDate, ds.InstanceCreationTime = day, clock
        ds.TimezoneOffsetFromUTC = offset
        ds.ContentDate = day
        ds.ContentTime = clock
        ds.AcquisitionDateTime = day + clock
        ds.Manufacturer = "filmless-pacs"
        ds.ConversionType = "WSD"
        ds.BurnedInAnnotation = "YES"
        ds.DocumentTitle = "Imaging report"
        concept = Dataset()
        concept.CodeValue = "18748-4"
        concept.CodingSchemeDesignator = "LN"
        concept.CodeMeaning = "Diagnostic imaging study"
        ds.ConceptNameCodeSequence = Sequence([concept])
        ds.VerificationFlag = "VERIFIED"
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
        ds.EncapsulatedDocumentLength = len(pdf)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
        self.pacs.ingestor.ingest(BufferSource(b"", data), Origin(source="report", calling_ae=self.pacs.settings.ae_title))
        return str(ds.SOPInstanceUID)

    def signature(self, study_uid: str, version: int | None = None) -> dict[str, Any]:
        """The digital signature of the signed report's PDF (latest, or a
        given version) as stored in the study: who signed, the certificate's
        validity at the signing time, whether the bytes are intact and
        whether the signer chains to report_trust_roots (404: no signed report)."""
        versions = self.get(study_uid, signed_only=True)["versions"]
        if version is not None:
            versions = [v for v in versions if v["version"] == version]
        if not versions:
            # The index lost the signature (`pacs reindex`, a backup older
            # than it restored) but the signed PDF is in the study: the
            # document of record, verified as stored.
            stored = self._stored_pdf(study_uid, version)
            if stored is None:
                raise ReportError("no signed report", 404)
            number, sop_uid, pdf = stored
            found = verify_pdf(pdf, trust_roots(self.pacs.settings))
            first = found["signatures"][0] if found["signatures"] else {}
            return {"study_uid": study_uid, "version": number, "signed_by": first.get("signer", ""),
                    "signed_at": first.get("signing_time"), "pdf_sop_uid": sop_uid, **found}
        found = verify_pdf(self.pdf(study_uid, versions[-1]["version"]), trust_roots(self.pacs.settings))
        return {"study_uid": study_uid, "version": versions[-1]["version"], "signed_by": versions[-1]["signed_by"],
                "signed_at": versions[-1]["signed_at"], "pdf_sop_uid": versions[-1]["pdf_sop_uid"], **found}

    def _stored_pdf(self, study_uid: str, version: int | None) -> tuple[int, str, bytes] | None:
        """The report PDF this archive stored in the study for *version*
        (None: the latest), found among its objects rather than in the
        report rows: (version, SOP Instance UID, PDF), or None. The
        signature writes it as series number 900 + version, made by
        filmless-pacs (another system's PDF is not our report)."""
        from pydicom import dcmread

        with self.pacs.engine.connect() as conn:
            study = self._study(conn, study_uid)
            number = series_t.c.series_number
            candidates = conn.execute(
                select(number, instances_t.c.sop_uid, instances_t.c.storage_key)
                .join(series_t, series_t.c.pk == instances_t.c.series_pk)
                .where(series_t.c.study_pk == study.pk, series_t.c.modality == "DOC",
                       instances_t.c.sop_class_uid == EncapsulatedPDFStorage,
                       number == _PDF_SERIES + version if version is not None else number > _PDF_SERIES)
                .order_by(number.desc(), instances_t.c.received_at.desc())).all()
        for row in candidates:
            try:
                ds = dcmread(io.BytesIO(self.pacs.store.read_bytes(row.storage_key)))
            except Exception as exc:  # a missing or unreadable object (pacs verify says which): not one to verify
                log.warning("report PDF %s of %s cannot be read: %s", row.sop_uid, study_uid, exc)
                continue
            if str(ds.get("Manufacturer", "")) != "filmless-pacs" or "EncapsulatedDocument" not in ds:
                continue
            data = bytes(ds.EncapsulatedDocument)
            length = int(ds.get("EncapsulatedDocumentLength", len(data)) or len(data))
            return int(row.series_number) - _PDF_SERIES, str(row.sop_uid), data[:length]
        return None

    def pdf(self, study_uid: str, version: int | None = None, *, current_patient: bool = False) -> bytes:
        """The PDF of the signed report (latest, or a given version), read back
        from the stored Encapsulated PDF instance. *current_patient*: refused
        (409) when the PDF names another patient than the one the study is
        filed under now (the HIS refiled it after the signature): a signed
        PDF is never rewritten, and a patient's share link must not hand
        out another person's name, ID and birth date; an amendment signs a
        new one."""
        from pydicom import dcmread

        report = self.get(study_uid, signed_only=True)
        versions = report["versions"]
        if version is not None:
            versions = [v for v in versions if v["version"] == version]
        if not versions:
            raise ReportError("no signed report", 404)
        stored = self.pacs.reader.stored_instance(versions[-1]["pdf_sop_uid"])
        if stored is None:
            raise ReportError("the report PDF is not in the archive", 404)
        ds = dcmread(io.BytesIO(self.pacs.store.read_bytes(stored.storage_key)))
        if current_patient:
            with self.pacs.engine.connect() as conn:
                study = self._study(conn, study_uid)
            if not _names_patient(ds, study.patient_id or "", study.issuer or ""):
                raise ReportError("the signed report's PDF names the patient the study was filed under when it "
                                  "was signed; it is available again once the report is amended", 409)
        data = bytes(ds.EncapsulatedDocument)
        length = int(ds.get("EncapsulatedDocumentLength", len(data)) or len(data))
        return data[:length]


def _names_patient(ds: Any, patient_id: str, issuer: str) -> bool:
    """Whether a stored report PDF's header names the patient *patient_id* /
    *issuer*. Signed without issuer, it names the patient who since got one
    under the same ID (the HIS's first message gave the issuer the modality
    did not send): the same person, as the ingest files such a study."""
    named_issuer = str(ds.get("IssuerOfPatientID", ""))
    return str(ds.get("PatientID", "")) == (patient_id or "") and named_issuer in ("", issuer or "")
