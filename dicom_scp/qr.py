"""Query/Retrieve SCP: C-FIND (Patient Root and Study Root, all levels),
C-MOVE and C-GET over the same retrieval core.

Identifiers become :class:`pacs.query.Query` objects; answers are built from
index columns only. Failure statuses (PS3.4 C.4.1.1.4 / C.4.2.1.5):
0xA900 identifier does not match SOP class (bad level, key of a lower
level, unsupported matching key), 0xA801 unknown move destination, 0xA702
out of resources (a registered destination that cannot be reached or
accepts none of the SOP classes, more than 65535 instances), 0xA701 the
index is unavailable (C-MOVE/C-GET), 0xC000-family unable to process,
0xFE00 cancelled, 0xB000 some sub-operations failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from pacs.aes import RemoteAE
from pacs.app import Pacs
from pacs.audit import naming_patients, patient_cx
from pacs.dicom_net import failure, refusal
from pacs.errors import Status, query_failure
from pacs.header import dataset_codec, decode_text
from pacs.logtext import peer_text
from pacs.query import UNIQUE_KEY, Level, Query, QueryError, run_query
from pacs.query.attributes import QUALIFIERS
from pacs.query.results import ResultShape
from pacs.retrieve import RetrieveItem, contexts_for, resolve
from pacs.tls import association_tls

from .cancels import is_cancelled
from .find_responses import PendingResponses
from .permissions import answers_in_ascii
from .server import association_event, audit_association, audit_dimse, error_comment, status_dataset
from .stored_send import (
    StoredInstance,
    accepted_syntaxes,
    read_ahead,
    reads_by_range,
    send_stored_as_is,
    send_syntax,
    unsendable_reason,
)

log = logging.getLogger(__name__)

_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
}
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet"}
# DICOM statuses
PENDING, CANCEL, IDENTIFIER_MISMATCH, UNABLE = 0xFF00, 0xFE00, 0xA900, 0xC000
# Warning: sub-operations complete, one or more failures or warnings (PS3.4 C.4.2.1.5).
WARNING = 0xB000
# Pending, "one or more Optional Keys were not supported for existence
# and/or matching for this Identifier" (PS3.4 Table C.4-1).
PENDING_UNSUPPORTED_KEYS = 0xFF01
UNKNOWN_DESTINATION, OUT_OF_RESOURCES = 0xA801, 0xA702
# Refused: Out of Resources - unable to calculate number of matches (PS3.4
# C.4.2.1.5, C.4.3.1.3): the index that names the instances cannot be read.
UNABLE_TO_COUNT = 0xA701
TOO_MANY = OUT_OF_RESOURCES
MAX_SUBOPERATIONS = 65535


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _match_text(identifier: Dataset, tag: Any, vr: str, codec: str | None) -> str:
    """A matching key's value as text, decoded as ingest decodes the objects
    (:func:`pacs.header.decode_text`; *codec*: the identifier's
    :func:`pacs.header.dataset_codec`, None where only pydicom decodes it).

    Without a declared character set only ASCII is valid (PS3.5 default
    repertoire), and ISO_IR 100 cannot write Vietnamese; many modalities and
    tools still send UTF-8 so (a Vietnamese name typed at the console), and
    the archive indexed their objects' names as UTF-8: such non-ASCII bytes
    are read as UTF-8 when they are valid UTF-8, else as Latin-1.
    """
    raw = identifier.get_item(tag)
    if codec is not None and getattr(raw, "is_raw", False) and isinstance(raw.value, bytes):
        return decode_text(raw.value, vr, codec).strip(" \x00")
    return _value_text(identifier[tag].value)


def _key_elements(ds: Dataset) -> Iterator[tuple[Any, str, str]]:
    """(tag, keyword, VR) of each standard element of an identifier or of
    one of its items, without decoding any value.

    Walk tags, not elements: iterating a dataset decodes every value with
    the declared character set (the default repertoire when none is
    declared) before :func:`_match_text` can look at the raw bytes."""
    for tag in list(ds.keys()):
        keyword = keyword_for_tag(tag)
        if not keyword or tag.is_private:
            continue
        raw = ds.get_item(tag)
        yield tag, keyword, getattr(raw, "VR", None) or dictionary_VR(tag)


def text_keys(ds: Dataset, codec: str | None) -> dict[str, str]:
    """Keyword -> value as text of the non-sequence elements of *ds* (an
    identifier, or an item of one) whose identifier's character set is
    *codec* (:func:`pacs.header.dataset_codec`), read as the Q/R C-FIND
    reads its matching keys (see :func:`_match_text`)."""
    return {keyword: _match_text(ds, tag, vr, codec)
            for tag, keyword, vr in _key_elements(ds) if vr != "SQ"}


def cancelled(event: Any) -> bool:
    """Whether the request being served was cancelled, also by a C-CANCEL
    that arrived before it was served (dicom_scp.cancels marks it); never by
    a late one for an earlier request under the same Message ID."""
    return is_cancelled(event.request) or bool(event.is_cancelled)


def identifier_query(identifier: Dataset, sop_class: str) -> tuple[Query, list[str], list[str]]:
    """Translate a C-FIND/MOVE/GET identifier into a query, its return keys
    and the keys given a value that are not used for matching (optional
    keys the archive does not match on, sequence matching)."""
    try:
        level = Level(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
    except ValueError:
        raise QueryError("missing or invalid Query/Retrieve Level") from None
    if level is Level.PATIENT and sop_class not in _PATIENT_ROOT:
        raise QueryError("PATIENT level is not part of the Study Root information model")
    match: dict[str, str] = {}
    returns: list[str] = []
    not_matched: list[str] = []
    codec = dataset_codec(identifier)
    for tag, keyword, vr in _key_elements(identifier):
        if keyword in _SKIP:
            continue
        returns.append(keyword)
        if vr == "SQ":
            # Sequence matching is not supported: ignored for matching, the
            # key returned when the index holds it (PS3.4 C.2.2.1.3).
            if _sequence_has_values(identifier, tag):
                not_matched.append(keyword)
            continue
        if keyword in QUALIFIERS:
            continue  # qualifies the query (Timezone Offset From UTC...), no matching key
        text = _match_text(identifier, tag, vr, codec)
        if text:
            match[keyword] = text
    query = Query(level, match, returns)
    query.validate()
    not_matched += query.ignored
    if not_matched:
        # PS3.4 C.2.2.1.3: an optional key the SCP does not match on is
        # ignored for matching and returned like a return key (keywords
        # only: values can be patient data).
        log.info("%s-level query: not used for matching: %s", level.value, ", ".join(not_matched))
    return query, returns, not_matched


def _sequence_has_values(identifier: Dataset, tag: Any) -> bool:
    """Whether a sequence key carries matching values (an item with a
    non-empty element), as opposed to a return key (no or an empty item)."""
    try:
        items = identifier[tag].value or []
        return any(element.value not in (None, "", b"") for item in items for element in item)
    except Exception:
        return False


def make_find_handler(pacs: Pacs) -> Any:
    def handle_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            query, returns, not_matched = identifier_query(event.identifier, sop_class)
        except QueryError as exc:
            log.warning("C-FIND from %s refused: %s", event.assoc.requestor.ae_title, peer_text(exc, 300))
            audit_dimse(pacs, event, "query", outcome="failure",
                        detail=f"C-FIND refused 0x{IDENTIFIER_MISMATCH:04X}: {exc}")
            yield status_dataset(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception as exc:
            log.warning("C-FIND identifier unreadable: %s", peer_text(exc, 300))
            audit_dimse(pacs, event, "query", outcome="failure",
                        detail=f"C-FIND refused 0x{UNABLE:04X}: cannot read identifier")
            yield status_dataset(UNABLE, f"cannot read identifier: {exc}"), None
            return
        shape = ResultShape(query.level, returns, pacs.settings.ae_title, ascii_only=answers_in_ascii(pacs, event))
        # PS3.4 C.4.1.1.4: FF01 says an optional key was not supported for
        # matching, so the SCU knows its matches were not narrowed by it.
        pending = PENDING_UNSUPPORTED_KEYS if not_matched else PENDING
        # Matches written here, many per socket write; None: pynetdicom sends each.
        writer = PendingResponses.open(event, shape, pending)
        # Recorded once the answer ended, however it ended: with the
        # patients it showed, as QIDO-RS names them.
        answer = FindAnswer()
        try:
            for row in run_query(pacs.engine, query):
                if cancelled(event):
                    if writer is not None:
                        writer.flush()
                    answer.end = "cancelled by the requester"
                    yield CANCEL, None
                    return
                if writer is None:
                    yield pending, shape.dataset(row, wire=True)
                elif not writer.send(row):
                    answer.end = "the requester is gone"
                    return  # the peer is gone: nothing more to answer
                answer.shown(row)
            if writer is not None and not writer.flush():
                answer.end = "the requester is gone"
                return
            answer.end = ""
        except Exception as exc:
            status, comment = query_failure(log, "C-FIND", exc)
            answer.end = f"failed 0x{status:04X}"
            if writer is not None:
                writer.flush()
            yield status_dataset(status, comment), None
        finally:
            answer.record(pacs, event, query)

    return handle_find


class FindAnswer:
    """What a C-FIND answered, for its one audit event: the matches sent,
    the patients they showed, and how the answer ended."""

    def __init__(self) -> None:
        self.matches = 0
        self.patients: dict[str, None] = {}
        # "" complete; else why it ended early. Until set: the association
        # went away while a match was being sent (pynetdicom dropped the handler).
        self.end = "the association ended"

    def shown(self, row: dict[str, Any]) -> None:
        """A match was sent (its patient from the index, never the identifier)."""
        self.matches += 1
        self.patients[patient_cx(row.get("_patient_id") or "", row.get("_issuer") or "")] = None

    def record(self, pacs: Pacs, event: Any, query: Query) -> None:
        keys = " ".join(f"{k}={v}" for k, v in query.match.items())
        study = query.match.get("StudyInstanceUID", "")
        # A cancel is the requester's choice: what it saw is named, the query succeeded.
        outcome = "success" if not self.end or self.end.startswith("cancelled") else "failure"
        detail = f"C-FIND {query.level.value} {keys}: {self.matches} match(es)" + (f", {self.end}" if self.end else "")
        base = association_event(event.assoc, "query", outcome=outcome, study_uid="" if study == "*" else study,
                                 detail=detail)
        for item in naming_patients(base, self.patients):
            pacs.audit.record(item)


def retrieve_keys(query: Query) -> dict[str, str]:
    """The keys of a C-MOVE/C-GET identifier that select what to send.

    The unique keys (PS3.4 C.4.2.2.1), Patient ID with single value
    matching only (C.4.2.1.4.1: a wildcard or a list of IDs sent several
    patients, "*" the whole archive), and Issuer of Patient ID along with
    a Patient ID: two patients may share an ID under different issuers, and
    a C-FIND that told them apart must not be followed by a retrieve of
    both. Raises :class:`QueryError` (answered 0xA900).
    """
    # "*" alone is universal matching, as an empty value (some viewers send it
    # beside the Study Instance UID): not a selection to refuse.
    match = {k: v for k, v in query.match.items() if k in UNIQUE_KEY.values() and v and v != "*"}
    if not match:
        raise QueryError("a retrieve needs the unique key of its level")
    for keyword in ("PatientID", "IssuerOfPatientID"):
        value = query.match.get(keyword, "")
        if value != "*" and ("*" in value or "?" in value or "\\" in value):
            raise QueryError(f"{keyword} in a retrieve must be a single value, without wildcards")
    if match.get("PatientID") and query.match.get("IssuerOfPatientID"):
        match["IssuerOfPatientID"] = query.match["IssuerOfPatientID"]
    return match


def _retrieve_items(pacs: Pacs, event: Any, what: str) -> tuple[list[RetrieveItem], Dataset | None]:
    """The instances a C-MOVE/C-GET names, or the failure status to answer."""
    try:
        query, _, _ = identifier_query(event.identifier, str(event.request.AffectedSOPClassUID))
        match = retrieve_keys(query)
    except QueryError as exc:
        log.warning("%s from %s refused: %s", what, event.assoc.requestor.ae_title, peer_text(exc, 300))
        return [], status_dataset(IDENTIFIER_MISMATCH, str(exc))
    try:
        items = resolve(pacs, query.level, match, limit=MAX_SUBOPERATIONS + 1)
    except Exception as exc:
        return [], _lookup_failed(what, exc)
    if len(items) > MAX_SUBOPERATIONS:
        return [], status_dataset(TOO_MANY, "more than 65535 instances: retrieve by series")
    return items, None


def _lookup_failed(what: str, exc: Exception) -> Dataset:
    """The prompt refusal of a C-MOVE/C-GET whose index lookup raised *exc*:
    0xA701 with its Error Comment while the index is unavailable (the peer
    may try again), 0xC000 for anything else; never an uncaught error, which
    ended the association's thread and left the peer waiting for an answer."""
    status, comment = query_failure(log, what, exc)
    return status_dataset(UNABLE_TO_COUNT if status == Status.OUT_OF_RESOURCES else status, comment)


def _send_items(pacs: Pacs, event: Any, items: list[RetrieveItem], accepted: Any,
                move_originator: str | None = None) -> Iterator[tuple[int, Dataset | None]]:
    """The handler's sub-operations: each item in the syntax it goes out in
    (:func:`send_syntax`), or counted failed when the peer accepted none it
    can be given in. The reasons of failures are kept for the final
    response's Error Comment (:func:`_explain_failure`)."""
    peer_accepts: dict[str, list[str]] = accepted()
    failures: list[str] = []
    event.assoc.__dict__[_FAILURES] = (event.request.MessageID, failures)
    retrieval = _retrieval(event.assoc, event.request.MessageID)
    if retrieval is not None:
        retrieval.failures = failures
    syntaxes = [send_syntax(item, peer_accepts.get(item.sop_class_uid, [])) for item in items]
    ranged = [item for item, syntax in zip(items, syntaxes) if syntax is not None and reads_by_range(item, syntax)]
    with read_ahead(pacs.store, ranged) as fetch:
        ranged_index = 0
        for item, syntax in zip(items, syntaxes):
            if cancelled(event):
                # No identifier of our own: pynetdicom then lists every failed
                # sub-operation (PS3.4 C.4.2.3.1, C.4.3.3.1), those the peer
                # refused too; a list of the unsendable ones alone answered
                # "1 failed" beside an empty Failed SOP Instance UID List.
                yield CANCEL, None
                return
            if syntax is None:
                reason = unsendable_reason(item, peer_accepts.get(item.sop_class_uid, []))
                log.warning("cannot send %s: %s", item.sop_uid, reason)
                failures.append(reason)
                # pynetdicom counts a dataset it cannot send (no SOP Class
                # UID) as a failed sub-operation and lists its SOP Instance UID.
                unsendable = Dataset()
                unsendable.SOPInstanceUID = item.sop_uid
                if retrieval is not None:
                    retrieval.attempted += 1
                yield PENDING, unsendable
                continue
            instance = StoredInstance(item, syntax, failures, move_originator)
            if reads_by_range(item, syntax):
                instance.prefetched = fetch(ranged_index)
                ranged_index += 1
            if retrieval is not None:
                retrieval.attempted += 1
            yield PENDING, instance


class _UnsendableMarker(logging.Filter):
    """Drops pynetdicom's error for the marker of an object that cannot be
    sent (a data set without SOP Class UID, see :func:`_send_items`).

    pynetdicom counts that sub-operation failed, as wanted, but logs "required
    element are missing: SOPClassUID", which reads as a damaged object in the
    operator's log; the real reason is logged just before it ("cannot send").
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        message = record.getMessage()
        if message == "Move SCP: Unable to associate with destination AE":
            return False  # _destination_failed says it, with the destination and why
        return not (message.startswith("Unable to send the dataset as one or more required element")
                    and message.endswith("missing: SOPClassUID"))


logging.getLogger("pynetdicom.service_class").addFilter(_UnsendableMarker())


class MoveDestinations:
    """Remembers the store association pynetdicom opens for each C-MOVE, so
    the handler can see which syntaxes the destination accepted."""

    def __init__(self) -> None:
        self._local = threading.local()

    def remember(self, assoc: Any) -> None:
        self._local.assoc = assoc

    def forget(self) -> None:
        self._local.assoc = None

    def last(self) -> Any:
        """The association pynetdicom opened last on this thread (None: none)."""
        return getattr(self._local, "assoc", None)

    def accepted(self) -> dict[str, list[str]]:
        """SOP class -> the syntaxes the destination accepted for it."""
        assoc = getattr(self._local, "assoc", None)
        if assoc is None:
            return {}
        return accepted_syntaxes(assoc.accepted_contexts)


_RETRIEVE_ITEMS = "_filmless_retrieve_items"
# On the requesting association while a C-MOVE/C-GET sends: (its Message ID,
# the reasons of its failed sub-operations).
_FAILURES = "_filmless_retrieve_failures"
# On the requesting association while pynetdicom opens the store association
# of a C-MOVE to a registered destination: an _OpeningMove.
_MOVE_OPENING = "_filmless_move_opening"


# On the requesting association while a C-MOVE/C-GET is served: its _Retrieval.
_RETRIEVAL = "_filmless_retrieval"


@dataclass
class _Retrieval:
    """A C-MOVE or C-GET being served, for its audit events: written once
    it has ended (:func:`_record_retrieval`), with what its final response
    said, so that a transfer whose sub-operations failed is not recorded
    as a successful export."""

    message_id: int
    action: str  # "export" (C-MOVE) or "retrieve" (C-GET)
    what: str  # "C-MOVE to DEST" or "C-GET"
    studies: list[str]
    count: int
    event: Any
    # Named when no study is (a request that matched nothing): the identifier's patient.
    patient_id: str = ""
    attempted: int = 0
    failures: list[str] = field(default_factory=list)
    # Why the destination could not be associated (C-MOVE).
    cause: str = ""
    # The final response: Status, Completed, Failed, Warning, Remaining.
    final: tuple[int, int, int, int, int] | None = None


def _retrieval(assoc: Any, message_id: int) -> _Retrieval | None:
    retrieval = assoc.__dict__.get(_RETRIEVAL)
    return retrieval if retrieval is not None and retrieval.message_id == message_id else None


def _number(response: Any, name: str) -> int:
    value = getattr(response, name, None)
    return int(value) if value is not None else 0


def _note_final(assoc: Any, response: C_MOVE | C_GET) -> None:
    """Keep the final response of the C-MOVE/C-GET being served for its audit."""
    retrieval = _retrieval(assoc, response.MessageIDBeingRespondedTo)
    if retrieval is not None:
        retrieval.final = (int(response.Status), _number(response, "NumberOfCompletedSuboperations"),
                           _number(response, "NumberOfFailedSuboperations"),
                           _number(response, "NumberOfWarningSuboperations"),
                           _number(response, "NumberOfRemainingSuboperations"))


def retrieval_outcome(retrieval: _Retrieval) -> tuple[str, str]:
    """(outcome, detail) of a C-MOVE/C-GET from its final response, PS3.15
    A.5.3.3 "DICOM Instances Transferred" style: success only when every
    sub-operation completed (warnings included); otherwise a failure whose
    detail says which kind -- partial (some failed), failed (none sent),
    cancelled, or the association ended before the final response -- with
    the sub-operation counts and the first failure's reason."""
    what, total = retrieval.what, retrieval.count
    reason = f": {retrieval.cause or retrieval.failures[0]}" if retrieval.cause or retrieval.failures else ""
    if retrieval.final is None:
        return "failure", (f"{what}: the association ended before the final response, after "
                           f"{retrieval.attempted} of {total} sub-operation(s){reason}")
    status, completed, failed, warning, remaining = retrieval.final
    sent = completed + warning
    counts = f"{sent} of {total} instance(s) sent" + (f", {warning} with warnings" if warning else "")
    if failed:
        counts += f", {failed} failed"
    if status == CANCEL:
        not_sent = remaining or max(0, total - sent - failed)
        return "failure", f"{what}: cancelled by the requester: {counts}, {not_sent} not sent (0x{status:04X})"
    if status in (0x0000, WARNING) and not failed:
        return "success", f"{what}: {counts}" + (f" (0x{status:04X})" if status else "")
    if sent:
        return "failure", f"{what}: partial: {counts} (0x{status:04X}){reason}"
    return "failure", f"{what}: failed: {counts} (0x{status:04X}){reason}"


def _record_retrieval(pacs: Pacs, assoc: Any, message_id: int) -> None:
    """Write the audit events of the C-MOVE/C-GET *message_id* once it was
    served (its final response sent, or the association gone): one per
    study it named, all with the transfer's outcome."""
    retrieval = _retrieval(assoc, message_id)
    if retrieval is None:
        return
    del assoc.__dict__[_RETRIEVAL]
    outcome, detail = retrieval_outcome(retrieval)
    for study in retrieval.studies or [""]:
        audit_dimse(pacs, retrieval.event, retrieval.action, study_uid=study, outcome=outcome, detail=detail,
                    patient_id="" if study else retrieval.patient_id)


def _retrieval_of(event: Any, action: str, what: str, items: list[RetrieveItem]) -> _Retrieval:
    """The :class:`_Retrieval` of the C-MOVE/C-GET *event* sending *items*:
    the studies they belong to, else (none matched) those the identifier named."""
    studies = sorted({i.study_uid for i in items})
    patient = ""
    if not studies:
        studies, patient = requested_studies(event.identifier)
    return _Retrieval(event.request.MessageID, action, what, studies, len(items), event, patient_id=patient)


@dataclass
class _OpeningMove:
    message_id: int
    destination: RemoteAE
    count: int
    studies: list[str]
    event: Any
    destinations: MoveDestinations


def _destination_failure(opening: _OpeningMove) -> str:
    """Why the store association to a registered C-MOVE destination could not be opened."""
    dest = opening.destination
    store = opening.destinations.last()
    answer = getattr(getattr(store, "acceptor", None), "primitive", None)
    unreachable = f"{dest.title} unreachable at {dest.host}:{dest.port}"
    if store is None:
        return unreachable
    if (why := refusal(store)) is not None:
        return f"{dest.title} {why}"
    if answer is None:
        return f"{unreachable} ({why})" if (why := failure(store)) else unreachable
    if getattr(store, "is_rejected", False):
        return f"{dest.title} rejected the association: {answer.reason_str}"
    if answer.result == 0 and not store.accepted_contexts:
        return f"{dest.title} accepts none of the SOP classes of the study"
    return f"{dest.title} aborted the association"


def refuse_retrieves_early(pacs: Pacs) -> Any:
    """EVT_CONN_OPEN: answer a C-MOVE or C-GET that must be refused (bad
    identifier, too many instances) before pynetdicom sees it.

    pynetdicom opens the association to the move destination before it
    reads the handler's first status, so a refused C-MOVE became 0xC515
    ("unable to process": no presentation context to propose) instead of
    0xA900 with its Error Comment (PS3.4 C.4.2.1.5). A refused C-GET went
    out with an empty Failed SOP Instance UID List data set, after which
    DCMTK's getscu failed its release. The instances of an accepted request
    are handed to the handler so they are resolved once.
    """

    def on_open(event: Any) -> None:
        assoc = event.assoc
        serve = assoc._serve_request

        def serve_request(message: Any, context_id: int) -> None:
            if not isinstance(message, C_MOVE | C_GET):
                serve(message, context_id)
                return
            if message.is_valid_request and _refused(pacs, assoc, message, context_id):
                return
            try:
                serve(message, context_id)
            finally:
                # Served: its final response is out, or never will be.
                _record_retrieval(pacs, assoc, message.MessageID)

        assoc._serve_request = serve_request
        send = assoc.dimse.send_msg

        def send_msg(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_MOVE) and primitive.Status == UNKNOWN_DESTINATION:
                opening = assoc.__dict__.pop(_MOVE_OPENING, None)
                if opening is not None and opening.message_id == primitive.MessageIDBeingRespondedTo:
                    _destination_failed(primitive, opening)
            if isinstance(primitive, C_MOVE | C_GET) and primitive.Status not in (None, PENDING):
                _explain_failure(assoc, primitive)
                _note_final(assoc, primitive)
            send(primitive, context_id)

        assoc.dimse.send_msg = send_msg

    return on_open


def _explain_failure(assoc: Any, response: C_MOVE | C_GET) -> None:
    """Give the final 0xA702 of a C-MOVE/C-GET whose every sub-operation
    failed (pynetdicom sends it bare) an Error Comment saying why: the
    reason of the first failure, which usually holds for the rest."""
    message_id, failures = assoc.__dict__.get(_FAILURES, (None, []))
    if message_id != response.MessageIDBeingRespondedTo:
        return
    del assoc.__dict__[_FAILURES]
    if response.Status == OUT_OF_RESOURCES and not response.ErrorComment and failures:
        response.ErrorComment = error_comment(failures[0])


def _destination_failed(response: C_MOVE, opening: _OpeningMove) -> None:
    """Turn pynetdicom's 0xA801 for a registered destination it could not
    associate with into 0xA702 naming the cause (PS3.4 C.4.2.1.5: A801 is
    for a destination the SCP does not know), logged and audited (the cause
    goes to the move's audit events, :func:`_record_retrieval`)."""
    cause = _destination_failure(opening)
    log.warning("C-MOVE of %d instances from %s refused: %s", opening.count,
                opening.event.assoc.requestor.ae_title.strip(), cause)
    retrieval = _retrieval(opening.event.assoc, opening.message_id)
    if retrieval is not None:
        retrieval.cause = cause  # audited with the A702 below, once served
    response.Status = OUT_OF_RESOURCES  # Refused: Out of resources - unable to perform sub-operations
    response.ErrorComment = error_comment(cause)
    response.NumberOfRemainingSuboperations = 0
    response.NumberOfCompletedSuboperations = 0
    response.NumberOfFailedSuboperations = opening.count
    response.NumberOfWarningSuboperations = 0


def _refused(pacs: Pacs, assoc: Any, request: C_MOVE | C_GET, context_id: int) -> bool:
    """Answer *request* here if it must be refused; True when answered."""
    context = assoc._accepted_cx.get(context_id)
    if context is None:
        return False  # pynetdicom aborts for a bad context
    what = "C-MOVE" if isinstance(request, C_MOVE) else "C-GET"
    if isinstance(request, C_MOVE):
        try:
            destination = pacs.aes.lookup(str(request.MoveDestination or "").strip())
        except Exception as exc:
            _answer_refusal(assoc, request, context_id, _lookup_failed(what, exc))
            return True
        if destination is None or not destination.enabled:
            return False  # the handler's 0xA801 comes first
    syntax = context.transfer_syntax[0]
    identifier_bytes = request.Identifier
    try:
        identifier = decode(identifier_bytes, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    except Exception:
        return False  # pynetdicom answers an undecodable identifier itself
    finally:
        if identifier_bytes is not None:
            identifier_bytes.seek(0)
    event = SimpleNamespace(identifier=identifier, request=request, assoc=assoc)
    items, refusal = _retrieve_items(pacs, event, what)
    if refusal is None:
        assoc.__dict__[_RETRIEVE_ITEMS] = (request.MessageID, items)
        return False
    _answer_refusal(assoc, request, context_id, refusal)
    studies, patient = requested_studies(identifier)
    if isinstance(request, C_MOVE):
        what = f"C-MOVE to {str(request.MoveDestination or '').strip()[:16]}"
    detail = f"{what}: refused 0x{int(refusal.Status):04X}: {refusal.get('ErrorComment') or ''}"
    for study in studies or [""]:
        audit_association(pacs, assoc, "export" if isinstance(request, C_MOVE) else "retrieve", study_uid=study,
                          patient_id="" if study else patient, outcome="failure", detail=detail)
    return True


def requested_studies(identifier: Dataset) -> tuple[list[str], str]:
    """The studies a C-MOVE/C-GET identifier names (its Study Instance UID
    values), and its Patient ID (as :func:`pacs.audit.patient_cx` with its
    issuer) for one naming a patient only: what an attempt that sent
    nothing is audited with. Never raises: the identifier may be anything."""
    try:
        codec = dataset_codec(identifier)
        keys = text_keys(identifier, codec)
    except Exception:
        return [], ""
    studies = [uid.strip() for uid in keys.get("StudyInstanceUID", "").split("\\") if uid.strip() not in ("", "*")]
    patient = keys.get("PatientID", "")
    if "*" in patient or "?" in patient or "\\" in patient:
        patient = ""  # a wildcard or a list names nobody
    return list(dict.fromkeys(studies))[:100], patient_cx(patient, keys.get("IssuerOfPatientID", "") if patient else "")


def _answer_refusal(assoc: Any, request: C_MOVE | C_GET, context_id: int, refusal: Dataset) -> None:
    """Send the final response refusing *request* with *refusal*'s status and comment."""
    response = C_MOVE() if isinstance(request, C_MOVE) else C_GET()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response.Status = int(refusal.Status)
    response.ErrorComment = refusal.get("ErrorComment")
    assoc.dimse.send_msg(response, context_id)


def make_move_handler(pacs: Pacs, destinations: MoveDestinations) -> Any:
    def handle_move(event: Any) -> Iterator[Any]:
        event.assoc.__dict__.pop(_MOVE_OPENING, None)
        requestor = event.assoc.requestor.ae_title.strip()
        destination = pacs.aes.lookup(str(event.move_destination).strip())
        if destination is None or not destination.enabled:
            log.warning("C-MOVE from %s to unknown destination %s", requestor, peer_text(event.move_destination, 16))
            # An export attempt to an address we do not know: the trail shows
            # who tried, and what they tried to send out.
            studies, patient = requested_studies(event.identifier)
            for study in studies or [""]:
                audit_dimse(pacs, event, "export", outcome="denied", study_uid=study,
                            patient_id="" if study else patient,
                            detail=f"C-MOVE to unknown destination {str(event.move_destination).strip()[:16]}")
            yield None, None  # pynetdicom answers 0xA801
            return
        items, refusal = _resolved_items(pacs, event, "C-MOVE")
        if refusal is not None:
            # Reached only without refuse_retrieves_early: pynetdicom takes
            # a failure status only after a destination and a count.
            yield destination.host, destination.port, association_tls(pacs.settings, destination)
            yield 1
            yield refusal, None
            return
        contexts = []
        for sop_class, syntaxes in contexts_for(items):
            cx = PresentationContext()
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = syntaxes
            contexts.append(cx)
        studies = sorted({i.study_uid for i in items})
        if items:
            # pynetdicom answers 0xA801 when it cannot open the store
            # association: refuse_retrieves_early makes that 0xA702 with its cause.
            destinations.forget()
            event.assoc.__dict__[_MOVE_OPENING] = _OpeningMove(
                event.request.MessageID, destination, len(items), studies, event, destinations)
        # Audited once served, with its outcome (refuse_retrieves_early).
        event.assoc.__dict__[_RETRIEVAL] = _retrieval_of(event, "export", f"C-MOVE to {destination.title}", items)
        yield destination.host, destination.port, {
            "contexts": contexts, **association_tls(pacs.settings, destination)}
        yield len(items)
        # Asked for the sub-operations: the destination is associated.
        event.assoc.__dict__.pop(_MOVE_OPENING, None)
        log.info("C-MOVE of %d instances from %s to %s", len(items), requestor, destination.title)
        yield from _send_items(pacs, event, items, destinations.accepted, requestor)

    return handle_move


def _resolved_items(pacs: Pacs, event: Any, what: str) -> tuple[list[RetrieveItem], Dataset | None]:
    """The instances :func:`refuse_retrieves_early` resolved for this request,
    or resolved now."""
    message_id, items = event.assoc.__dict__.pop(_RETRIEVE_ITEMS, (None, []))
    if message_id == event.request.MessageID:
        return items, None
    return _retrieve_items(pacs, event, what)


def make_get_handler(pacs: Pacs) -> Any:
    def handle_get(event: Any) -> Iterator[Any]:
        items, refusal = _resolved_items(pacs, event, "C-GET")
        if refusal is not None:
            yield 1
            yield refusal, None
            return
        # Audited once served, with its outcome (refuse_retrieves_early).
        event.assoc.__dict__[_RETRIEVAL] = _retrieval_of(event, "retrieve", "C-GET", items)
        yield len(items)
        send_stored_as_is(pacs, event.assoc)

        yield from _send_items(pacs, event, items, lambda: accepted_syntaxes(event.assoc.accepted_contexts))

    return handle_get


__all__ = ["MoveDestinations", "make_find_handler", "make_get_handler", "make_move_handler", "refuse_retrieves_early"]
