"""Storage Commitment Push Model SCP (PS3.4 Annex J) over DIMSE.

The modality sends an N-ACTION naming the instances it sent; the answer is an
N-ACTION-RSP at once, then an N-EVENT-REPORT with what is committed and what
failed (:mod:`pacs.commitment`). The report goes on the modality's own
association while it is open (many modalities wait on it), otherwise on a new
association to the calling AE as registered (``pacs ae add``), with this node
in the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4). Modalities may be
busy or switched off when the report is due: a new association is tried a
few times before the report is given up, logged and audited.

A request is queued in the database (the outbox, destination
``commitment``) before it is answered: a report still owed when the node
stops is sent by the next node or start (:class:`CommitmentReporter`), with
the instances checked again then. Only while the index itself is down does
a request live in memory alone.

The report must follow the N-ACTION-RSP, which pynetdicom sends after the
handler returns: the work starts from :func:`run_after_response`, once the
request has been answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from pacs import outbox
from pacs.aes import RemoteAE
from pacs.app import Pacs
from pacs.audit import Event
from pacs.commitment import CommitmentResult, Reference, check_commitment
from pacs.header import valid_uid
from pacs.logtext import peer_text
from pacs.periodic import Periodic
from pacs.remote import associate, local_ae

from .server import status_dataset

log = logging.getLogger(__name__)

# N-ACTION statuses (PS3.7 10.1.4.1.10).
NO_SUCH_SOP_CLASS, INVALID_OBJECT_INSTANCE, NO_SUCH_ACTION = 0x0118, 0x0117, 0x0123
INVALID_ARGUMENT_VALUE, MISSING_ATTRIBUTE, PROCESSING_FAILURE = 0x0115, 0x0120, 0x0110
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
# Seconds to wait before each try on a new association: the modality's link
# may be down for a while (a satellite), and without the report it never
# learns that it may delete its copy. About 35 minutes in all; each try that
# cannot connect costs at most dicom_connect_timeout.
RETRY_DELAYS = (0.0, 5.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1020.0)
# Seconds between checks of the instances while the index or the store
# cannot answer before the report says "failed" (0110H). Cut at half the
# dicom_timeout: a modality waiting on its association is aborted at
# dicom_timeout, and its report must arrive before that. A definite
# mismatch (missing, damaged, a refused conflict) is never checked again.
CHECK_RETRY_DELAYS = (0.0, 5.0, 15.0, 30.0, 60.0, 120.0)
# A modality that does not wait for the report releases right after the
# N-ACTION-RSP; one that waits keeps its association open for seconds. The
# report waits this long after the response, so that it does not cross the
# first kind's A-RELEASE-RQ: a releasing peer ignores P-DATA (pynetdicom's
# does), so both sides would wait for the other until the peer's ACSE
# timeout aborts the association; the report then goes on a new one, late
# but not lost.
SAME_ASSOCIATION_GRACE = 0.5
_AFTER = "_filmless_after_response"
# The outbox's destination for reports owed to modalities.
DESTINATION, KIND = "commitment", "storage_commitment"
# The request's own thread delivers first; its row is its own this long (the
# check may wait out an index outage), then any node's reporter takes over.
OWNED_FOR = timedelta(seconds=sum(CHECK_RETRY_DELAYS) + 60)


class CommitmentRequestError(ValueError):
    """An N-ACTION that cannot be read as a storage commitment request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def run_after_response(event: Any) -> None:
    """EVT_CONN_OPEN: let handlers queue work to run once their request is
    answered (:func:`after_response`)."""
    assoc = event.assoc
    serve = assoc._serve_request

    def serve_then_run(message: Any, context_id: int) -> None:
        try:
            serve(message, context_id)
        finally:
            for callback in assoc.__dict__.pop(_AFTER, ()):
                callback()

    assoc._serve_request = serve_then_run


def after_response(assoc: Any, callback: Callable[[], None]) -> None:
    """Run *callback* in the association's thread once the request being
    served has been answered."""
    assoc.__dict__.setdefault(_AFTER, []).append(callback)


def parse_request(event: Any) -> tuple[str, list[Reference]]:
    """The Transaction UID and references of a storage commitment N-ACTION."""
    request = event.request
    if str(request.RequestedSOPClassUID) != StorageCommitmentPushModel:
        raise CommitmentRequestError(NO_SUCH_SOP_CLASS, "not the Storage Commitment Push Model SOP Class")
    if str(request.RequestedSOPInstanceUID) != StorageCommitmentPushModelInstance:
        raise CommitmentRequestError(
            INVALID_OBJECT_INSTANCE, f"the SOP Instance must be {StorageCommitmentPushModelInstance}"
        )
    if request.ActionTypeID != REQUEST_COMMITMENT:
        raise CommitmentRequestError(NO_SUCH_ACTION, f"no action type {request.ActionTypeID}")
    try:
        info = event.action_information
    except Exception as exc:
        raise CommitmentRequestError(INVALID_ARGUMENT_VALUE, f"action information unreadable: {exc}") from None
    transaction = str(info.get("TransactionUID", "") or "")
    if not transaction:
        raise CommitmentRequestError(MISSING_ATTRIBUTE, "Transaction UID (0008,1195) missing")
    if not valid_uid(transaction):
        raise CommitmentRequestError(INVALID_ARGUMENT_VALUE, "invalid Transaction UID")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise CommitmentRequestError(MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) missing or empty")
    references = []
    for number, item in enumerate(items, 1):
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not valid_uid(sop_class) or not valid_uid(sop_uid):
            raise CommitmentRequestError(INVALID_ARGUMENT_VALUE, f"item {number}: invalid or missing SOP Class/Instance UID")
        references.append(Reference(sop_class, sop_uid))
    return transaction, references


def report_dataset(result: CommitmentResult) -> Dataset:
    """The N-EVENT-REPORT Event Information (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = result.transaction_uid
    if result.committed:
        ds.ReferencedSOPSequence = DicomSequence([_item(r) for r in result.committed])
    if result.failed:
        failed = []
        for reference, reason in result.failed:
            item = _item(reference)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = DicomSequence(failed)
    return ds


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def make_commitment_handler(pacs: Pacs) -> Any:
    """The EVT_N_ACTION handler: check the request, answer, report later."""

    def handle_action(event: Any) -> tuple[int | Dataset, Dataset | None]:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        try:
            transaction, references = parse_request(event)
        except CommitmentRequestError as exc:
            log.warning("storage commitment request from %s refused: %s", calling, peer_text(exc, 300))
            return status_dataset(exc.status, str(exc)), None
        log.info("storage commitment requested by %s: %d instances (transaction %s)",
                 calling, len(references), peer_text(transaction))
        queued = queue_report(pacs, calling, transaction, references, owned=True)
        _owned.hold(queued)
        after_response(assoc, lambda: threading.Thread(
            target=_report_owned, args=(pacs, assoc, calling, transaction, references, time.monotonic(), queued),
            name="storage-commitment", daemon=True,
        ).start())
        return 0x0000, None

    return handle_action


def _checked(pacs: Pacs, transaction: str, references: Sequence[Reference], calling: str,
             budget: float) -> CommitmentResult:
    """The commitment result, checked again while the index or the store is
    unavailable (:data:`CHECK_RETRY_DELAYS`, no try later than *budget* s
    from now): a short outage must not make the modality read "failed"
    (0110H) for instances that are safely stored. A definite failure is
    final: checking it again only held the report back past the modality's
    patience."""
    result = CommitmentResult(transaction, failed=[(r, PROCESSING_FAILURE) for r in references])
    started, waited = time.monotonic(), 0.0
    for delay in CHECK_RETRY_DELAYS:
        waited += delay
        if waited > budget:
            log.warning("storage commitment %s: the index or the store did not answer within %.0f s: "
                        "reported as failed (0110H); the modality may ask again", transaction, budget)
            break
        time.sleep(max(0.0, started + waited - time.monotonic()))
        try:
            result = check_commitment(pacs, transaction, references, calling)
        except Exception as exc:  # the index failed: nothing can be vouched for yet
            log.warning("storage commitment %s: cannot check yet: %s", transaction, str(exc).splitlines()[0][:200])
            continue
        if not result.unavailable:
            break
    return result


def queue_report(pacs: Pacs, calling: str, transaction: str, references: Sequence[Reference], *,
                 owned: bool) -> outbox.Message | None:
    """The report owed for a request, kept in the outbox (with the request's
    claim when *owned*: its thread tries first, :data:`OWNED_FOR`), or None
    while the index cannot take it (the report then lives in memory only)."""
    data = {"key": f"commitment:{transaction}", "calling": calling, "transaction": transaction,
            "references": [[r.sop_class_uid, r.sop_instance_uid] for r in references]}
    try:
        with pacs.engine.begin() as conn:
            if owned:
                return outbox.enqueue_owned(conn, DESTINATION, KIND, data, OWNED_FOR)
            pk = outbox.enqueue(conn, DESTINATION, KIND, data)
            return outbox.Message(pk, KIND, data, 0, "", data["key"])
    except Exception as exc:
        log.warning("storage commitment %s: not queued in the index (%s); kept in memory",
                    transaction, str(exc).splitlines()[0][:200])
        return None


def report(pacs: Pacs, assoc: Any, calling: str, transaction: str, references: Sequence[Reference],
           answered_at: float, queued: outbox.Message | None = None) -> bool:
    """Check the references and send the N-EVENT-REPORT on the request's
    association; True once delivered. Otherwise the queued report (*queued*,
    claimed by this request) is handed to the reporter at once. Should the
    claim have run out and another node's reporter taken the report over
    (the checks waited out a long outage), it is left to that reporter.
    *answered_at*: when the N-ACTION-RSP went out (``time.monotonic()``)."""
    result = _checked(pacs, transaction, references, calling, pacs.settings.dicom_timeout / 2)
    info = report_dataset(result)
    time.sleep(max(0.0, answered_at + SAME_ASSOCIATION_GRACE - time.monotonic()))
    if queued is not None and queued.lease is not None:
        try:
            held = outbox.renew(pacs.engine, [queued], report_lease(pacs))
        except Exception as exc:  # the index is down: send it anyway, as when it could not be queued
            log.warning("storage commitment: the outbox cannot be updated: %s", str(exc).splitlines()[0][:200])
        else:
            if not held:
                log.info("storage commitment %s: another node's reporter has the report now", transaction)
                return False
            queued = held[0]
            _owned.hold(queued)
    if _on_same_association(assoc, result.event_type, info):
        if queued is not None:
            _settle(pacs, lambda: outbox.mark_sent(pacs.engine, queued))
        _reported(pacs, calling, result, True, client=str(assoc.requestor.address))
        return True
    if queued is None:
        queued = queue_report(pacs, calling, transaction, references, owned=False)
    elif not _settle(pacs, lambda: outbox.release(pacs.engine, [queued], 0)):
        queued = None
    if queued is not None:
        log.info("storage commitment %s: the report to %s goes on a new association (outbox %d)",
                 transaction, calling, queued.pk)
        return False
    remote = _registered(pacs, calling)
    delivered = False
    for delay in RETRY_DELAYS if remote is not None else ():
        time.sleep(delay)
        if delivered := _on_new_association(pacs, remote, result.event_type, info):
            break
    _reported(pacs, calling, result, delivered, client=str(assoc.requestor.address))
    return delivered


class _OwnedReports:
    """The outbox rows request threads hold (:data:`OWNED_FOR`): a node
    stopping gives them back (:func:`release_owned`), so the next start or
    another node sends them at once instead of after the claim runs out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, outbox.Message] = {}

    def hold(self, message: outbox.Message | None) -> None:
        if message is not None and message.lease is not None:
            with self._lock:
                self._held[message.pk] = message  # the newest claim: release matches it

    def drop(self, message: outbox.Message | None) -> None:
        if message is not None:
            with self._lock:
                self._held.pop(message.pk, None)

    def take_all(self) -> list[outbox.Message]:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        return held


_owned = _OwnedReports()


def _report_owned(pacs: Pacs, assoc: Any, calling: str, transaction: str, references: Sequence[Reference],
                  answered_at: float, queued: outbox.Message | None) -> None:
    try:
        report(pacs, assoc, calling, transaction, references, answered_at, queued)
    finally:
        _owned.drop(queued)


def release_owned(pacs: Pacs) -> None:
    """On a clean stop: give the reports request threads still hold back to
    the outbox, due now (a report owed is otherwise held up to OWNED_FOR)."""
    held = _owned.take_all()
    if not held:
        return
    try:
        released = outbox.release(pacs.engine, held, 0)
    except Exception as exc:
        log.warning("storage commitment: %d reports not given back to the outbox (%s); sent once their claim "
                    "runs out", len(held), str(exc).splitlines()[0][:200])
        return
    log.info("storage commitment: %d reports owed given back to the outbox for the next start", released)


def _settle(pacs: Pacs, change: Callable[[], Any]) -> bool:
    """Apply an outbox change; False (logged) while the index cannot."""
    try:
        change()
        return True
    except Exception as exc:
        log.warning("storage commitment: the outbox cannot be updated: %s", str(exc).splitlines()[0][:200])
        return False


def _reported(pacs: Pacs, calling: str, result: CommitmentResult, delivered: bool, *, client: str = "") -> None:
    """Log and audit a report delivered, or given up."""
    detail = (f"storage commitment {result.transaction_uid}: {len(result.committed)} committed, "
              f"{len(result.failed)} failed")
    pacs.audit.record(Event(
        action="commit", user=calling, role="dicom", client=client, protocol="dicom",
        outcome="success" if delivered and not result.failed else "failure",
        detail=(detail + ("" if delivered else ", report not delivered"))[:500],
    ))
    if delivered:
        log.info("%s: reported to %s", detail, calling)
    else:
        log.error("%s: the report could not be delivered to %s (tried for %.0f minutes); the modality must "
                  "ask again", detail, calling, sum(RETRY_DELAYS) / 60)


def _send(assoc: Any, event_type: int, info: Dataset) -> bool:
    status, _ = assoc.send_n_event_report(
        info, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
    )
    code = getattr(status, "Status", None)
    if code is None:  # no answer: the association timed out or was aborted
        return False
    if code_to_category(code) not in (STATUS_SUCCESS, STATUS_WARNING):
        # Some modalities take reports only on an association of their own.
        log.warning("storage commitment report refused with status 0x%04X", code)
        return False
    return True


def _on_same_association(assoc: Any, event_type: int, info: Dataset) -> bool:
    if not assoc.is_established:
        return False
    try:
        return _send(assoc, event_type, info)
    except Exception as exc:  # released or aborted under us: try a new association
        log.info("storage commitment report not sent on the request's association: %s", exc)
        return False


def _registered(pacs: Pacs, calling: str) -> RemoteAE | None:
    remote = pacs.aes.lookup(calling)  # registered maybe seconds ago: not the cache
    if remote is None:
        log.error("storage commitment: %s closed its association and is not in the AE registry "
                  "(pacs ae add %s --host H --port P): the report cannot be sent", calling, calling)
    return remote


def _on_new_association(pacs: Pacs, remote: RemoteAE, event_type: int, info: Dataset) -> bool:
    """One try on a new association, this node in the SCP role."""
    ae = local_ae(pacs)
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    try:
        assoc = associate(pacs, ae, remote, ext_neg=[role])
    except Exception as exc:  # refused, unreachable, TLS: the next try may find it up
        log.warning("storage commitment: no association with %s: %s", remote.title, exc)
        return False
    try:
        return _send(assoc, event_type, info)
    except Exception as exc:
        log.warning("storage commitment: report to %s failed: %s", remote.title, exc)
        return False
    finally:
        if assoc.is_established:
            assoc.release()


def report_lease(pacs: Pacs) -> timedelta:
    """How long a claim on a queued report lasts: more than one check and
    one try on an association (connection, association, report and its
    answer), renewed before each."""
    settings = pacs.settings
    one_try = settings.dicom_connect_timeout + 2 * settings.dicom_timeout + 30
    return max(outbox.LEASE, timedelta(seconds=2 * one_try))


class CommitmentReporter(Periodic):
    """Sends the reports in the outbox that did not go on their request's
    association: on a new association to the modality, tried on the
    :data:`RETRY_DELAYS` schedule (across restarts: the tries are counted in
    the row), then parked dead (``pacs outbox list --state dead``, ``pacs
    outbox retry``). Rows are claimed atomically: one node sends each."""

    thread_name = "storage-commitment-reports"

    def __init__(self, pacs: Pacs, *, interval: float = 2.0) -> None:
        super().__init__(interval)
        self.pacs = pacs

    def round(self) -> None:
        self.deliver_due()

    def deliver_due(self) -> None:
        """One batch of due reports, each one's claim renewed before it is
        tried: one another node took over meanwhile is not sent here."""
        engine, lease = self.pacs.engine, report_lease(self.pacs)
        queue = outbox.claim_due(engine, DESTINATION, limit=5, lease=lease)
        while queue:
            if self.stopping:
                outbox.release(engine, queue, 0)
                return
            queue = outbox.renew(engine, queue, lease)
            if queue:
                message, queue = queue[0], queue[1:]
                self.deliver(message)

    def deliver(self, message: outbox.Message) -> None:
        """Check the instances again (now) and try the modality once."""
        data, engine = message.data, self.pacs.engine
        calling, transaction = str(data["calling"]), str(data["transaction"])
        references = [Reference(str(c), str(u)) for c, u in data["references"]]
        try:
            result = check_commitment(self.pacs, transaction, references, calling)
        except Exception as exc:
            outbox.mark_failed(engine, message, f"cannot check yet: {exc}"[:500], dead=False, retry_in=30)
            return
        if result.unavailable:  # the store failed to read back: not a definite "failed" either
            outbox.mark_failed(engine, message, "cannot check yet: the store did not answer", dead=False,
                               retry_in=30)
            return
        remote = _registered(self.pacs, calling)
        if remote is not None and _on_new_association(self.pacs, remote, result.event_type, report_dataset(result)):
            outbox.mark_sent(engine, message)
            _reported(self.pacs, calling, result, True)
            return
        tries = message.attempts + 1
        dead = tries >= len(RETRY_DELAYS)
        error = f"{calling} not in the AE registry" if remote is None else f"no report delivered to {calling}"
        outbox.mark_failed(engine, message, f"{error} (try {tries} of {len(RETRY_DELAYS)})", dead=dead,
                           retry_in=RETRY_DELAYS[min(tries, len(RETRY_DELAYS) - 1)])
        if dead:
            _reported(self.pacs, calling, result, False)


def handlers(pacs: Pacs) -> list[tuple[Any, Any]]:
    """The event handlers the DICOM server binds for storage commitment."""
    return [(evt.EVT_N_ACTION, make_commitment_handler(pacs)), (evt.EVT_CONN_OPEN, run_after_response)]
