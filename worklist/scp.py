"""Modality Worklist C-FIND SCP and MPPS (N-CREATE / N-SET) SCP.

The worklist answers from the orders the HIS sent (PS3.4 K.6): every type 1
and 2 return key the modality asks for, patient names in ISO_IR 192 and
matched without diacritics, every match streamed (no cap). Keys it does not
match on are ignored for matching and returned (PS3.4 C.2.2.1.3). Each
scheduled step of an order is an item of its own: the steps of one requested
procedure share Accession Number, Study Instance UID and Requested Procedure
ID, each with its own Scheduled Procedure Step ID, modality, station and
start. MPPS moves the scheduled steps it names through IN PROGRESS to
COMPLETED (a DISCONTINUED step puts them back on the worklist, see
:meth:`pacs.orders.OrderService.record_step`) and queues a status message for
the HIS when the requested procedure's status changes, in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import PersonName
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from dicom_scp.qr import PENDING_UNSUPPORTED_KEYS, _sequence_has_values, cancelled, text_keys
from dicom_scp.permissions import answers_in_ascii
from dicom_scp.server import association_event
from pacs.app import Pacs
from pacs.audit import naming_patients, patient_cx
from pacs.errors import query_failure
from pacs.header import dataset_codec
from pacs.logtext import peer_text
from pacs.orders import OrderError, OrderService, fit_text
from pacs.query import QueryError
from pacs.query.matching import is_date, is_time
from pacs.query.results import as_written, in_ascii, other_ids_sequence
from pacs.timezones import hospital_zone
from pacs.worklist import expired_before, ignored_keys, run_worklist, sps_status

log = logging.getLogger(__name__)

WORKLIST_CONTEXTS = [ModalityWorklistInformationFind, ModalityPerformedProcedureStep]
PENDING, CANCEL, IDENTIFIER_MISMATCH = 0xFF00, 0xFE00, 0xA900
# N-CREATE / N-SET failures (PS3.7 C.4.2 / PS3.4 F.7)
NO_SUCH_INSTANCE, DUPLICATE_INSTANCE, INVALID_VALUE, PROCESSING = 0x0112, 0x0111, 0x0106, 0x0110
# PS3.4 F.7.2.2.4: a step that is COMPLETED or DISCONTINUED "may no longer be
# updated" is a processing failure (0110H) whose Error ID is A710H; A710H is
# not a status of its own, and modalities decode statuses by category.
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


# LO holds 64 characters, SH 16 (PS3.5 6.2). HIS descriptions are free text
# and often longer: served cut (the order keeps the whole text), as a value a
# modality may refuse the whole item for would be worse.
_LO_LIMIT = 64
_SH_LIMIT = 16


def _lo(value: str) -> str:
    """*value* cut to LO's length (see :func:`pacs.orders.fit_text`)."""
    return fit_text(value, _LO_LIMIT)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A Code Sequence Macro item (PS3.3 Table 8.8-1): Code Value, Coding
    Scheme Designator ("L", local, when the HIS named none) and Code Meaning,
    all Type 1 -- *meaning* is never empty (the caller's fallback ends with
    the code value itself). A code longer than SH's 16 characters is a Long
    Code Value (0008,0119, UC) instead, as the macro says."""
    code = Dataset()
    if len(value) > _SH_LIMIT:
        code.LongCodeValue = value
    else:
        code.CodeValue = value
    code.CodingSchemeDesignator = fit_text(scheme, _SH_LIMIT) or "L"
    code.CodeMeaning = _lo(meaning or value)
    return code


def full_item(row: dict[str, Any]) -> Dataset:
    """Every K.6 type 1/2 attribute of one scheduled step.

    What names the exam is never empty where a code says what it is: a
    procedure code sent without text (OBR-4 ``CT-SO-NAO``) has the best
    text there is as its Code Meaning (Type 1) -- OBR-4's text, else the
    requested procedure description, else the code value itself -- and that
    text is the Requested Procedure and Scheduled Procedure Step Description
    too when the HIS sent none (a modality shows them, and copies them into
    the images)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = row["accession_number"]
    ds.ReferringPhysicianName = row["referring_physician"]
    ds.PatientName = row["patient_name"]
    ds.PatientID = row["patient_id"]
    ds.IssuerOfPatientID = row["issuer"]
    ds.PatientBirthDate = row["birth_date"]
    ds.PatientSex = as_written("CS", row["sex"])
    ds.OtherPatientIDsSequence = other_ids_sequence(row["other_ids"])
    ds.StudyInstanceUID = row["study_uid"]
    ds.RequestedProcedureID = row["requested_procedure_id"]
    meaning = row["procedure_code_meaning"] or row["requested_procedure_description"] or row["procedure_code"]
    description = row["requested_procedure_description"] or meaning
    ds.RequestedProcedureDescription = _lo(description)
    ds.RequestedProcedurePriority = row["priority"] or None
    ds.RequestedProcedureCodeSequence = Sequence(
        [_code_item(row["procedure_code"], row["procedure_code_scheme"], meaning)] if row["procedure_code"] else [])
    # Imaging Service Request: the HIS's order numbers (ORC-2 / ORC-3).
    ds.PlacerOrderNumberImagingServiceRequest = _lo(row["placer_order_number"])
    ds.FillerOrderNumberImagingServiceRequest = _lo(row["filler_order_number"])
    ds.ReasonForTheRequestedProcedure = _lo(row["reason"]) or None
    ds.AdmissionID = None
    ds.PatientWeight = None
    ds.MedicalAlerts = None
    ds.Allergies = None
    ds.PregnancyStatus = None
    step = Dataset()
    step.ScheduledStationAETitle = row["station_ae_title"] or None
    step.ScheduledProcedureStepStartDate = row["start_date"]
    step.ScheduledProcedureStepStartTime = row["start_time"]
    step.Modality = row["modality"]
    step.ScheduledPerformingPhysicianName = row["performing_physician"]
    step.ScheduledProcedureStepDescription = _lo(row["step_description"] or description)
    step.ScheduledProcedureStepID = row["step_id"]
    step.ScheduledStationName = fit_text(row["station_name"], _SH_LIMIT)
    step.ScheduledProcedureStepLocation = fit_text(row["location"], _SH_LIMIT)
    # IHE SWF: the protocol the HIS chose (OMI IPC-6), which the modality
    # selects its protocol by and copies into the MPPS and the images.
    step.ScheduledProtocolCodeSequence = Sequence(
        [_code_item(row["protocol_code"], row["protocol_code_scheme"],
                    row["protocol_code_meaning"] or row["step_description"])] if row["protocol_code"] else [])
    step.ScheduledProcedureStepStatus = sps_status(row["status"])
    ds.ScheduledProcedureStepSequence = Sequence([step])
    _single_values(ds)
    # After _single_values: Other Patient IDs (0010,1000) is multi-valued,
    # the sequence's values as the Q/R C-FIND answers them (pacs.query.engine).
    ds.OtherPatientIDs = "\\".join(o["PatientID"] for o in row["other_ids"] if o["PatientID"])
    return ds


# VRs whose "\" separates values: text from the HIS (an escaped \E\ in
# HL7) would turn one description into two values for the modality. Every
# attribute of a worklist item with these VRs has one value.
_MULTI_VALUE_VRS = {"LO", "SH", "PN", "CS"}


def _single_values(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _single_values(item)
        elif elem.VR in _MULTI_VALUE_VRS and elem.VM > 1:  # pydicom split the text at its "\\"
            elem.value = "/".join(str(v) for v in elem.value)


def _requested(wanted: Dataset, full: Dataset) -> Dataset:
    """The keys of *wanted* (an identifier or one of its sequence items),
    filled from *full*: zero-length when unknown (PS3.4 K.6.1.2.2)."""
    out = Dataset()
    for elem in wanted:
        keyword = elem.keyword
        if not keyword or keyword == "SpecificCharacterSet":
            continue
        if elem.VR == "SQ":
            known = full[keyword].value if keyword in full else []
            setattr(out, keyword, _requested_items(elem.value, known))
        elif keyword in full:
            out[keyword] = full[keyword]
        else:
            out[elem.tag] = elem.__class__(elem.tag, elem.VR, None)
    return out


def _requested_items(wanted: Sequence, items: Sequence | list[Dataset]) -> Sequence:
    """A sequence key answered item by item (PS3.4 C.2.2.2.6): an item with
    keys asks for those keys of every item (a Requested Procedure Code
    Sequence item with CodeValue alone gets CodeValue alone); no item, or an
    empty one, asks for the items whole."""
    if not len(wanted) or not len(wanted[0]):
        return Sequence(list(items))
    return Sequence([_requested(wanted[0], item) for item in items])


def answer(identifier: Dataset, row: dict[str, Any], *, ascii_only: bool = False) -> Dataset:
    """The requested keys, filled from the full item (PS3.4 K.6.1.2.2);
    *ascii_only*: without diacritics and Specific Character Set, for a
    modality that reads no UTF-8 (``pacs ae add --charset ascii``)."""
    out = _requested(identifier, full_item(row))
    if ascii_only:
        _in_ascii(out)
    else:
        out.SpecificCharacterSet = "ISO_IR 192"
    return out


def _in_ascii(ds: Dataset) -> None:
    """Every text value of *ds* (its items' too) in the default repertoire."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _in_ascii(item)
        elif isinstance(elem.value, str | PersonName):
            elem.value = in_ascii(elem.VR, str(elem.value))
        elif isinstance(elem.value, MultiValue) and all(isinstance(v, str | PersonName) for v in elem.value):
            elem.value = [in_ascii(elem.VR, str(v)) for v in elem.value]


def _sequences_with_values(ds: Dataset, skip: str = "") -> list[str]:
    """Sequence keys of *ds* that carry matching values: not matched on,
    ignored for matching and returned (as the Q/R C-FIND does)."""
    return [e.keyword for e in ds if e.VR == "SQ" and e.keyword and e.keyword != skip
            and _sequence_has_values(ds, e.tag)]


def make_worklist_handler(pacs: Pacs) -> Any:
    def handle_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        requestor = event.assoc.requestor
        ascii_only = answers_in_ascii(pacs, event)
        match: dict[str, str] = {}
        step: dict[str, str] = {}
        try:
            identifier = event.identifier
            # Read as the Q/R C-FIND reads its keys: UTF-8 sent without a
            # Specific Character Set or labelled ISO_IR 100 (many consoles
            # do) still matches.
            codec = dataset_codec(identifier)
            match = text_keys(identifier, codec)
            match.pop("SpecificCharacterSet", None)
            steps = identifier.get("ScheduledProcedureStepSequence") or []
            step = text_keys(steps[0], codec) if len(steps) else {}
            # Refuses a key it cannot match before anything is answered; the
            # rows are then read page by page as they are sent.
            rows = run_worklist(pacs.engine, match, step,
                                expired=expired_before(pacs.settings.worklist_expire_days,
                                                       hospital_zone(pacs.settings)))
            not_matched = ignored_keys(match, step)
            not_matched += _sequences_with_values(identifier, skip="ScheduledProcedureStepSequence")
            if len(steps):
                not_matched += _sequences_with_values(steps[0])
        except QueryError as exc:
            log.warning("worklist query from %s refused: %s", requestor.ae_title, peer_text(exc, 300))
            _audit_query(pacs, event, match, step, 0, f"refused 0x{IDENTIFIER_MISMATCH:04X}: {exc}", {})
            yield _status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception as exc:
            status, comment = query_failure(log, "worklist query", exc)
            _audit_query(pacs, event, match, step, 0, f"failed 0x{status:04X}", {})
            yield _status(status, comment), None
            return
        if not_matched:
            # PS3.4 C.2.2.1.3 / K.2.2.1.1.2: an optional key the SCP does not
            # match on is ignored for matching and returned like a return key
            # (keywords only: values can be patient data).
            log.info("worklist query: not used for matching: %s", ", ".join(not_matched))
        # FF01: an optional key was not supported for matching (PS3.4 Annex K, as C.4.1.1.4).
        pending = PENDING_UNSUPPORTED_KEYS if not_matched else PENDING
        answered = 0
        patients: dict[str, None] = {}
        # Until the loop ends: the association went away while a step was sent.
        end = "the association ended"
        try:
            for row in rows:
                if cancelled(event):
                    end = "cancelled by the requester"
                    yield CANCEL, None
                    return
                yield pending, answer(identifier, row, ascii_only=ascii_only)
                answered += 1
                patients[patient_cx(row["patient_id"] or "", row["issuer"] or "")] = None
            end = ""
        except Exception as exc:
            status, comment = query_failure(log, "worklist query", exc)
            end = f"failed 0x{status:04X}"
            yield _status(status, comment), None
            return
        finally:
            # The worklist names the patients scheduled: reading it is an access to
            # their data (IHE ATNA "Query"), recorded like any C-FIND -- once the
            # answer is sent, with how many steps it named and whose.
            _audit_query(pacs, event, match, step, answered, end, patients)

    return handle_find


def _audit_query(pacs: Pacs, event: Any, match: dict[str, str], step: dict[str, str], answered: int, end: str,
                 patients: dict[str, None]) -> None:
    """The audit event of one worklist query: its keys, the steps answered,
    the patients they named (as QIDO-RS and the Q/R C-FIND name theirs)
    and how the answer ended (*end*: "" complete; a cancel is a success)."""
    outcome = "success" if not end or end.startswith("cancelled") else "failure"
    detail = (f"MWL C-FIND: {answered} scheduled step(s)" + (f", {end}" if end else "") + "; "
              + " ".join(f"{k}={v}" for k, v in {**match, **step}.items() if v))
    for item in naming_patients(association_event(event.assoc, "worklist-query", outcome=outcome, detail=detail),
                                patients):
        pacs.audit.record(item)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds


def _step_refs(attributes: Dataset) -> list[tuple[str, str, str]]:
    """Accession, Study Instance UID and SPS ID of each scheduled step that was
    performed: one item per step, several when one acquisition performs
    several steps or requested procedures (IHE SWF group case), and each is
    done. An item without SPS ID names its procedure only (see
    :meth:`pacs.orders.OrderService._steps_for_item` for the step taken)."""
    return [
        (
            _text(item.get("AccessionNumber")),
            _text(item.get("StudyInstanceUID")),
            _text(item.get("ScheduledProcedureStepID")),
        )
        for item in attributes.get("ScheduledStepAttributesSequence") or []
    ]


def _series(attributes: Dataset) -> list[dict[str, Any]] | None:
    if "PerformedSeriesSequence" not in attributes:
        return None
    return [
        {
            "series_uid": _text(s.get("SeriesInstanceUID")),
            "instances": [_text(r.get("ReferencedSOPInstanceUID")) for r in s.get("ReferencedImageSequence") or []],
        }
        for s in attributes.PerformedSeriesSequence
    ]


# PS3.4 Table F.7.2-1: Type 1 in an N-CREATE.
_CREATE_REQUIRED = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
                    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                    "PerformedProcedureStepStatus", "Modality")
# ...and what an N-SET may not change (the table's "Not allowed"): who and
# what was scheduled, where and when the step started.
_SET_NOT_ALLOWED = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
                    "PerformedStationName", "PerformedLocation", "PerformedProcedureStepStartDate",
                    "PerformedProcedureStepStartTime", "Modality", "StudyID", "ReferencedPatientSequence")
MISSING_ATTRIBUTE, MISSING_VALUE = 0x0120, 0x0121


def _refused(code: int, comment: str, attributes: list[str] | list[int]) -> Dataset:
    """A failure naming the attributes concerned, by keyword or tag
    (Attribute Identifier List, PS3.7 10.1)."""
    status = _status(code, comment)
    status.AttributeIdentifierList = [Tag(attribute) for attribute in attributes]
    return status


def _create_problem(attributes: Dataset) -> Dataset | None:
    missing = [k for k in _CREATE_REQUIRED if k not in attributes]
    if missing:
        return _refused(MISSING_ATTRIBUTE, f"N-CREATE lacks Type 1 {', '.join(missing)}", missing)
    empty = [k for k in _CREATE_REQUIRED if attributes[k].is_empty]
    if empty:
        return _refused(MISSING_VALUE, f"N-CREATE has empty Type 1 {', '.join(empty)}", empty)
    # Each scheduled step item names its study (Type 1 there too).
    for item in attributes.ScheduledStepAttributesSequence:
        if "StudyInstanceUID" not in item:
            return _refused(MISSING_ATTRIBUTE, "a Scheduled Step Attributes item lacks StudyInstanceUID",
                            ["StudyInstanceUID"])
        if item["StudyInstanceUID"].is_empty:
            return _refused(MISSING_VALUE, "a Scheduled Step Attributes item has an empty StudyInstanceUID",
                            ["StudyInstanceUID"])
    return None


def _set_problem(changes: Dataset) -> Dataset | None:
    # Besides the listed ones, none of the patient's attributes (group 0010).
    refused = [e for e in changes if e.keyword in _SET_NOT_ALLOWED or e.tag.group == 0x0010]
    if refused:
        names = ", ".join(e.keyword or str(e.tag) for e in refused)
        return _refused(INVALID_VALUE, f"N-SET may not change {names}", [e.tag for e in refused])
    return _date_time_problem(changes, "N-SET")


# The step's dates and times: stored and compared as DA and TM, and an end
# "2026-12-05" or "9:30" would be kept as the step's end for ever.
_DATE_TIMES = (("PerformedProcedureStepStartDate", is_date), ("PerformedProcedureStepStartTime", is_time),
               ("PerformedProcedureStepEndDate", is_date), ("PerformedProcedureStepEndTime", is_time))


def _date_time_problem(attributes: Dataset, operation: str) -> Dataset | None:
    """0106H (invalid attribute value) naming each start or end date or
    time that is not a DICOM DA or TM value; empty ones are left to the
    Type 1 / final state checks."""
    bad = [k for k, valid in _DATE_TIMES if k in attributes and _text(attributes[k].value)
           and not valid(_text(attributes[k].value))]
    if bad:
        return _refused(INVALID_VALUE, f"{operation} has invalid {', '.join(bad)}", bad)
    return None


def make_mpps_handlers(pacs: Pacs) -> list[tuple[Any, Any]]:
    service = OrderService(pacs.engine, order_status=pacs.settings.his_order_status)

    def handle_create(event: Any) -> tuple[int | Dataset, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        attributes = event.attribute_list
        problem = _create_problem(attributes) or _date_time_problem(attributes, "N-CREATE")
        if problem is not None:
            return problem, None
        # PS3.7 10.1.5.1.4: without an Affected SOP Instance UID in the
        # request the SCP creates the instance under a UID of its own and
        # answers it (pynetdicom takes it from the returned Attribute List
        # into the response's Affected SOP Instance UID). The step was
        # recorded under "" before, and the next such N-CREATE was refused.
        assigned = not uid
        if assigned:
            uid = generate_uid()
        status = _text(attributes.get("PerformedProcedureStepStatus"))
        if status != "IN PROGRESS":
            return _status(INVALID_VALUE, "N-CREATE must have status IN PROGRESS"), None
        try:
            service.record_step(
                uid,
                status=status,
                scheduled=_step_refs(attributes),
                modality=_text(attributes.get("Modality")),
                station_ae_title=_text(attributes.get("PerformedStationAETitle")),
                start=_text(attributes.get("PerformedProcedureStepStartDate"))
                + _text(attributes.get("PerformedProcedureStepStartTime")),
                performed_series=_series(attributes),
                create=True,
            )
        except OrderError as exc:
            code = DUPLICATE_INSTANCE if exc.http_status == 409 else PROCESSING
            return _status(code, str(exc)), None
        if assigned:
            attributes.AffectedSOPInstanceUID = uid
        return 0x0000, attributes

    def handle_set(event: Any) -> tuple[int | Dataset, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        changes = event.modification_list
        problem = _set_problem(changes)
        if problem is not None:
            return problem, None
        status = _text(changes.get("PerformedProcedureStepStatus")) or "IN PROGRESS"
        try:
            service.record_step(
                uid,
                status=status,
                # Each kept beside the other stored: a modality may send the
                # End Date in one N-SET and the End Time with COMPLETED.
                end_date=_text(changes["PerformedProcedureStepEndDate"].value)
                if "PerformedProcedureStepEndDate" in changes else None,
                end_time=_text(changes["PerformedProcedureStepEndTime"].value)
                if "PerformedProcedureStepEndTime" in changes else None,
                performed_series=_series(changes),
                create=False,
            )
        except OrderError as exc:
            code = {404: NO_SUCH_INSTANCE, 409: PROCESSING, 400: INVALID_VALUE}.get(exc.http_status, PROCESSING)
            status = _status(code, str(exc))
            if exc.http_status == 409:
                status.ErrorID = NO_LONGER_UPDATABLE_ERROR_ID
            return status, None
        return 0x0000, changes

    def audited_create(event: Any) -> tuple[int | Dataset, Dataset | None]:
        result = handle_create(event)
        attributes = event.attribute_list
        uid = str(event.request.AffectedSOPInstanceUID or "") or str(
            getattr(result[1], "AffectedSOPInstanceUID", "") or "")
        patient = patient_cx(_text(attributes.get("PatientID")), _text(attributes.get("IssuerOfPatientID")))
        _audit_mpps(pacs, service, event, "N-CREATE", uid, result,
                    _text(attributes.get("PerformedProcedureStepStatus")), _step_refs(attributes), patient)
        return result

    def audited_set(event: Any) -> tuple[int | Dataset, Dataset | None]:
        result = handle_set(event)
        uid = str(event.request.RequestedSOPInstanceUID or "")
        _audit_mpps(pacs, service, event, "N-SET", uid, result,
                    _text(event.modification_list.get("PerformedProcedureStepStatus")) or "IN PROGRESS", [], "")
        return result

    return [(evt.EVT_N_CREATE, audited_create), (evt.EVT_N_SET, audited_set)]


def _audit_mpps(pacs: Pacs, service: OrderService, event: Any, operation: str, uid: str,
                result: tuple[int | Dataset, Dataset | None], status: str, refs: list[tuple[str, str, str]],
                patient: str) -> None:
    """Audit an MPPS N-CREATE or N-SET (action ``mpps``): it changes the
    state of the orders it performs (and may tell the HIS). One event per
    study of those orders, naming its patient, with the accession numbers
    and steps in the detail; a refused request likewise (a failure, with
    its status), naming what the request named when no order was recorded.
    The orders are read back from the index after the change: who they
    are, not what the modality says they are."""
    answer = result[0]
    code = int(answer.Status) if isinstance(answer, Dataset) else int(answer)
    if code == 0:
        outcome, what = "success", status
    else:
        comment = answer.get("ErrorComment", "") if isinstance(answer, Dataset) else ""
        outcome, what = "failure", f"{status} refused 0x{code:04X}: {comment}"
    try:
        orders = service.step_orders(uid) if uid else []
    except Exception as exc:  # the index may be down: the event is still written, naming less
        log.warning("MPPS %s %s: its orders could not be read for the audit trail: %s", operation, uid, exc)
        orders = []
    named: dict[tuple[str, str], list[str]] = {}
    for order in orders:
        key = (order["study_uid"], patient_cx(order["patient_id"] or "", order["issuer"] or ""))
        named.setdefault(key, []).append(f"accession {order['accession_number']} step {order['step_id']}")
    if not named:
        for accession, study_uid, step_id in refs:
            named.setdefault((study_uid, patient), []).append(f"accession {accession} step {step_id}")
    for (study_uid, patient_id), steps in (named or {("", patient): []}).items():
        detail = f"MPPS {operation} {uid}: {what}" + (f"; {', '.join(steps)}" if steps else "; no order")
        pacs.audit.record(association_event(event.assoc, "mpps", study_uid=study_uid, patient_id=patient_id,
                                            outcome=outcome, detail=detail))


__all__ = ["WORKLIST_CONTEXTS", "make_mpps_handlers", "make_worklist_handler"]
