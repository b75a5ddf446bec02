"""The DICOM listener: C-ECHO and C-STORE, all storage SOP classes.

The handlers translate DIMSE into calls on the core and the core's
:class:`~pacs.errors.IngestError` back into the C-STORE status (with an Error
Comment the modality's log will show). Query/retrieve handlers are added by
their own modules through :func:`build_ae`'s ``extra_handlers``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from pacs.app import Pacs
from pacs.addresses import host_matches
from pacs.audit import Event, patient_cx
from pacs.dicom_net import (
    abort_on_action_error, apply_limits, keep_responses, request, thread_association, tune_socket,
)
from pacs.errors import IngestError, Status
from pacs.header import stray_meta_length
from pacs.ingest import IngestResult, Origin
from pacs.key_objects import KOS_CLASS
from pacs.logtext import association_peer, peer_text
from pacs.part10 import BufferSource, file_meta_bytes
from pacs.rejections import NOT_APPLIED, apply_or_report

from .acceptor import InlineAssociationServer
from .associate_rq import AssociationGate, decoding_peer_request
from .contexts import (
    OFF_CONTEXT_COMMENT,
    QR_MODELS,
    STORAGE_TRANSFER_SYNTAXES,
    ContextList,
    off_context,
    prefer_requestor_order,
    storage_classes,
)
from .reactor import idle_line
from .received import Limits, ReceivedData
from .stored_send import send_stored_as_is

if TYPE_CHECKING:
    from .workers import PoolHostCounts

log = logging.getLogger(__name__)

# Identifiers hold patient names and IDs: never in our logs at INFO level.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


class FilmlessAE(AE):
    """An AE whose calling-AE allowlist is the live known-AE registry."""

    def __init__(self, pacs: Pacs) -> None:
        super().__init__(ae_title=pacs.settings.ae_title)
        self._pacs = pacs
        self.on_associate: list[Any] = []

    def associate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Open an association (C-MOVE sub-operations): TCP_NODELAY on, its
        state-machine faults answered, its release bounded, and aborted at
        once when no PDV fits in its Maximum Length (pacs.dicom_net.request)."""
        assoc = request(super().associate, *args, **kwargs)
        for callback in self.on_associate:
            callback(assoc)
        return assoc

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if not self._pacs.settings.ae_allowlist:
            return []
        titles = [ae.title for ae in self._pacs.aes.cached().values() if ae.enabled]
        # An empty list means "anyone" to pynetdicom; with the allowlist on and
        # nobody registered, nobody may connect.
        return titles or ["\\"]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:
        self._require_calling_aet = value


FIND_CLASSES = [m[0] for m in QR_MODELS.values()]
MOVE_CLASSES = [m[1] for m in QR_MODELS.values()]
GET_CLASSES = [m[2] for m in QR_MODELS.values()]
_UNCOMPRESSED_QR = [ImplicitVRLittleEndian, ExplicitVRBigEndian]


def error_comment(comment: str) -> str:
    """*comment* as an Error Comment may carry it (LO: ASCII here, at most 64 characters)."""
    return comment.encode("ascii", "replace").decode()[:64]


def status_dataset(status: int, comment: str) -> Dataset:
    """A DIMSE status with an Error Comment."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds


def audit_dimse(pacs: Pacs, event: Any, action: str, *, study_uid: str = "", detail: str = "",
                outcome: str = "success", patient_id: str = "") -> None:
    """Record a DICOM access: the calling AE stands for the user."""
    audit_association(pacs, event.assoc, action, study_uid=study_uid, detail=detail, outcome=outcome,
                      patient_id=patient_id)


def audit_association(pacs: Pacs, assoc: Any, action: str, *, study_uid: str = "", detail: str = "",
                      outcome: str = "success", patient_id: str = "") -> None:
    """:func:`audit_dimse` for an association."""
    pacs.audit.record(association_event(assoc, action, study_uid=study_uid, detail=detail, outcome=outcome,
                                        patient_id=patient_id))


def association_event(assoc: Any, action: str, *, study_uid: str = "", detail: str = "", outcome: str = "success",
                      patient_id: str = "") -> Event:
    """The audit event of a request on *assoc*: the calling AE and its
    address stand for the user (a patient left empty is filled in from the
    study when the event is written)."""
    requestor = assoc.requestor
    return Event(action=action, user=requestor.ae_title.strip(), role="dicom", client=str(requestor.address),
                 protocol="dicom", outcome=outcome, study_uid=study_uid, patient_id=patient_id, detail=detail[:500])


# On an association: its refused C-STOREs, (study, status) -> _Refusals.
_REFUSALS = "_filmless_store_refusals"


@dataclass
class _Refusals:
    count: int
    reason: str
    patient_id: str


def audit_store_refusal(pacs: Pacs, assoc: Any, status: int, reason: str, sop_uid: str, header: Any) -> None:
    """Record a refused C-STORE (PS3.15 A.5.3.3, outcome a failure): who
    (the calling AE and its address), what (the study and patient of the
    object when its header could be read; its SOP Instance UID) and the
    status and reason answered.

    One event for the first refusal of each study and status on an
    association, written at once; the others are counted, and the count
    is written when the association ends (:func:`audit_refusal_counts`).
    A modality resending 10,000 refused objects on one association costs
    two rows, not 10,000, and one that sends one object per association
    gets an event per refusal, as ATNA expects."""
    study = str(getattr(header, "study_uid", "") or "")
    patient = patient_cx(str(getattr(header, "patient_id", "") or ""), str(getattr(header, "issuer", "") or ""))
    refusals: dict[tuple[str, int], _Refusals] = assoc.__dict__.setdefault(_REFUSALS, {})
    known = refusals.get((study, int(status)))
    if known is not None:
        known.count += 1
        return
    refusals[(study, int(status))] = _Refusals(1, reason, patient)
    audit_association(pacs, assoc, "store", study_uid=study, patient_id=patient, outcome="failure",
                      detail=f"C-STORE refused 0x{int(status):04X}: {reason} (SOP Instance {sop_uid})")


def audit_refusal_counts(pacs: Pacs) -> Any:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: how many C-STOREs of each
    study and status the association had refused, where more than the one
    already recorded (:func:`audit_store_refusal`); once per association."""

    def ended(event: Any) -> None:
        assoc = event.assoc
        refusals: dict[tuple[str, int], _Refusals] = assoc.__dict__.pop(_REFUSALS, None) or {}
        for (study, status), refused in refusals.items():
            if refused.count > 1:
                audit_association(pacs, assoc, "store", study_uid=study, patient_id=refused.patient_id,
                                  outcome="failure",
                                  detail=f"C-STORE refused 0x{status:04X} for {refused.count} instances on this "
                                         f"association in all (the first recorded when refused): {refused.reason}")

    return ended


def origin_of(assoc: Any, source: str = "dimse", *, routed: bool = True, examination: bool = True) -> Origin:
    """Where an association's objects come from (*examination*: see Origin)."""
    requestor = assoc.requestor
    return Origin(source=source, calling_ae=requestor.ae_title.strip(), remote_host=str(requestor.address),
                  routed=routed, examination=examination)


def withdraw_rejected(pacs: Pacs, assoc: Any, result: IngestResult) -> tuple[int, str] | None:
    """A stored Key Object Selection from an AE granted "reject": the images
    it withdraws, if it is a rejection note, go (pacs.rejections); what
    that refuses (a signed report) is logged and audited there, and the note
    acknowledged. None, or the failure to answer when the withdrawal could
    not be done (the index or the store failing): the note is stored, and
    the modality sends it again, which withdraws what is left."""
    try:
        remote = pacs.aes.get(assoc.requestor.ae_title.strip())
    except Exception as exc:
        log.exception("rejection note %s from %s not applied", result.sop_uid, peer_text(assoc.requestor.ae_title, 16))
        audit_association(pacs, assoc, "delete", study_uid=result.header.study_uid, outcome="failure",
                          detail=f"rejection note {result.sop_uid} not applied: {exc}")
        return Status.OUT_OF_RESOURCES, NOT_APPLIED
    if remote is None or not remote.permits("reject"):
        return None
    _, failed = apply_or_report(pacs, result.storage_key, result.sop_uid, result.header.study_uid,
                                lambda: association_event(assoc, "delete"))
    return (Status.OUT_OF_RESOURCES, NOT_APPLIED) if failed else None


def make_store_handler(pacs: Pacs, source: str = "dimse", *, retrieving: bool = False) -> Any:
    """The C-STORE handler: received bytes go to the core's ingest, untouched.

    Its ``direct`` attribute is the same handler without pynetdicom's event
    (dicom_scp.direct_receive calls it for requests it serves itself)."""

    from .permissions import refusal

    def store(assoc: Any, sop_class: str, sop_uid: str, dataset: Any, transfer_syntax: str,
              move_originator: str = "") -> tuple[int, str]:
        requestor = assoc.requestor
        # Fetched by this archive itself: the objects of its own C-GET
        # (*retrieving*), or sub-operations of a C-MOVE it asked for (their
        # Move Originator is our AE title).
        ours = retrieving or (bool(move_originator) and move_originator.strip() == pacs.settings.ae_title)
        try:
            if (comment := refusal(pacs, assoc, "store")) is not None:
                return Status.NOT_AUTHORIZED, comment  # audited by refusal()
            meta = file_meta_bytes(sop_class, sop_uid, transfer_syntax, requestor.ae_title)
            if isinstance(dataset, ReceivedData):
                received, stray = dataset.source(meta, transfer_syntax)
            else:  # pynetdicom's own BytesIO
                body = dataset.getbuffer()
                stray = stray_meta_length(body, transfer_syntax)
                received = BufferSource(meta, body[stray:])
            if stray:
                # Kept as received except these: our File Meta is the one header.
                log.warning("C-STORE from %s: %d bytes of File Meta elements (group 0002) inside the data set "
                            "of %s dropped (PS3.10 7.1)", peer_text(requestor.ae_title, 16), stray, peer_text(sop_uid))
            result = pacs.ingestor.ingest(
                received,
                origin_of(assoc, source, routed=not ours or pacs.settings.route_retrieved, examination=not ours),
                transfer_syntax=transfer_syntax,
                expected_sop_class=sop_class,
                expected_sop_uid=sop_uid,
            )
        except IngestError as exc:
            log.warning("C-STORE from %s refused: %s", peer_text(requestor.ae_title, 16), peer_text(exc, 300))
            audit_store_refusal(pacs, assoc, exc.status, exc.reason, sop_uid, exc.header)
            return exc.status, exc.reason
        except SQLAlchemyError as exc:  # the AE registry's first read, during an index outage
            log.warning("C-STORE from %s refused: the index cannot be read: %s", peer_text(requestor.ae_title, 16),
                        peer_text(exc, 300))
            audit_store_refusal(pacs, assoc, Status.INDEX_FAILED, "index unavailable", sop_uid, None)
            return Status.INDEX_FAILED, "index unavailable, try again later"
        except Exception as exc:  # never let one object take the listener down
            log.exception("C-STORE failed unexpectedly")
            audit_store_refusal(pacs, assoc, Status.CANNOT_UNDERSTAND, "internal error", sop_uid, None)
            return Status.CANNOT_UNDERSTAND, f"internal error: {exc}"
        finally:
            if isinstance(dataset, ReceivedData):
                dataset.close()
        if result.conflict:
            audit_store_refusal(pacs, assoc, Status.DUPLICATE_SOP_INSTANCE, result.conflict, sop_uid, result.header)
            return Status.DUPLICATE_SOP_INSTANCE, result.conflict
        if result.header.mislabelled_utf8 and not getattr(assoc, "_warned_charset", False):
            # Once per association; no value in the log (names are PHI).
            assoc._warned_charset = True
            log.warning("C-STORE from %s: text declared ISO_IR 100 (Latin-1) is UTF-8; indexed as UTF-8 "
                        "(the modality should declare ISO_IR 192)", peer_text(requestor.ae_title, 16))
        # One audit event per study and association, not per instance.
        study = result.header.study_uid
        if getattr(assoc, "_audited_study", None) != study:
            assoc._audited_study = study
            audit_association(pacs, assoc, "store", study_uid=study, detail=source)
        if result.header.sop_class_uid == KOS_CLASS and not ours:  # not one we fetched (a migration)
            if (failed := withdraw_rejected(pacs, assoc, result)) is not None:
                return failed
        return Status.SUCCESS, ""

    def handle_store(event: Any) -> int | Dataset:
        request = event.request
        abstract_syntax = event.context.abstract_syntax
        if (refused := off_context(event.assoc, abstract_syntax, request.AffectedSOPClassUID)) is not None:
            if isinstance(request.DataSet, ReceivedData):
                request.DataSet.close()
            log.warning("C-STORE from %s refused: %s (presentation context %d)",
                        event.assoc.requestor.ae_title, refused, event.context.context_id)
            return status_dataset(Status.SOP_CLASS_NOT_SUPPORTED, OFF_CONTEXT_COMMENT)
        status, comment = store(event.assoc, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                                request.DataSet, event.context.transfer_syntax,
                                str(request.MoveOriginatorApplicationEntityTitle or ""))
        return status_dataset(status, comment) if comment else status

    def direct(assoc: Any, request: Any, transfer_syntax: str) -> tuple[int, str]:
        status, comment = store(assoc, request.sop_class, request.sop_uid, request.dataset, transfer_syntax,
                                request.move_originator)
        return status, error_comment(comment)

    handle_store.direct = direct  # type: ignore[attr-defined]
    return handle_store


def _on_conn_open(event: Any) -> None:
    tune_socket(event.assoc)
    abort_on_action_error(event.assoc)
    # A storage commitment report goes out on the modality's association from
    # another thread: its N-EVENT-REPORT-RSP must reach that sender.
    keep_responses(event.assoc)


# Seconds a new connection has to send its A-ASSOCIATE-RQ (a few hundred
# bytes, sent at once by every modality, in well under a second over a slow
# satellite link). pynetdicom waits acse_timeout (30 s) holding a slot of
# max_associations: 32 silent connections, re-opened every 30 s (a frozen
# link, a port scanner, a hostile peer), refused every modality for good.
# Less when dicom_timeout (the network timeout) is shorter.
FIRST_REQUEST_WAIT = 10.0
# A connection over its host's share waits this long for its request, to be
# rejected (a real client sends it at once) rather than cut off: with 1 ms, a
# busy server had not read the request yet and aborted instead.
OVER_SHARE_REQUEST_WAIT = 0.5
# Seconds between the acceptor's checks for a shutdown request.
ACCEPT_POLL_SECONDS = 0.1
# Warnings about one peer's refused connections: at most one per minute.
_REFUSAL_LOG_EVERY = 60.0


def _shut(assoc: Any, wait: float) -> None:
    """End a connection whose request never completed within *wait* seconds:
    its reading thread returns at once, and the association ends as on a
    closed connection."""
    log.info("connection from %s closed: no complete A-ASSOCIATE-RQ within %.0f s",
             getattr(assoc.requestor, "address", "?"), wait)
    try:
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


class ConnectionGuard:
    """EVT_CONN_OPEN / EVT_REQUESTED: a short wait for the first request, and
    at most *per_host* connections from one address at once (the others
    are closed at once, holding no slot): one peer cannot take every slot.
    With *pool* (a DICOM worker), the connections the other workers hold
    count too, and this worker's are published there. *first_request*:
    seconds a new connection has to send its A-ASSOCIATE-RQ."""

    def __init__(self, per_host: int, pool: PoolHostCounts | None = None,
                 first_request: float = FIRST_REQUEST_WAIT) -> None:
        self.per_host = per_host
        self.first_request = first_request
        self._pool = pool
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()
        # Connections whose A-ASSOCIATE-RQ has not arrived yet -> deadline.
        self._waiting: dict[Any, float] = {}
        self._watch: threading.Thread | None = None
        # Connections published to the pool -> (their address bucket, when); count per bucket.
        self._counted: dict[Any, tuple[int, float]] = {}
        self._per_bucket: dict[int, int] = {}

    def opened(self, event: Any) -> None:
        assoc = event.assoc
        normal = assoc.acse_timeout
        address = event.address[0] if event.address else ""
        peers = sum(1 for other in assoc.ae.active_associations
                    if other is not assoc and other.is_acceptor and other.requestor.address == address)
        if self._pool is not None:
            peers += self._pool.elsewhere(address)
        if self.per_host and peers >= self.per_host:
            # A silent connection: the acceptor gives up on the request
            # soon and closes. A request (any real client sends it at once)
            # is refused when it is read (requested).
            assoc.acse_timeout = OVER_SHARE_REQUEST_WAIT
            assoc._pacs_over_host_limit = peers
            self._warn(address, peers)
            return
        assoc.acse_timeout = min(normal or self.first_request, self.first_request)
        assoc._pacs_acse_timeout = normal
        # A request sent a byte at a time keeps pynetdicom reading its PDU
        # past that wait (each byte restarts the network timeout): the
        # watchdog shuts such a connection once its time is up.
        with self._lock:
            self._waiting[assoc] = time.monotonic() + self.first_request + 1.0
            if self._pool is not None:
                self._count(assoc, self._pool.bucket(address))
            if self._watch is None:
                self._watch = threading.Thread(target=self._run_watch, name="dicom-first-request", daemon=True)
                self._watch.start()

    def closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: the connection no longer counts for the pool."""
        if self._pool is not None:
            with self._lock:
                self._uncount(event.assoc)

    def _count(self, assoc: Any, bucket: int) -> None:
        assert self._pool is not None
        self._counted[assoc] = (bucket, time.monotonic())
        self._per_bucket[bucket] = self._per_bucket.get(bucket, 0) + 1
        self._pool.publish(bucket, self._per_bucket[bucket])

    def _uncount(self, assoc: Any) -> None:
        counted = self._counted.pop(assoc, None)
        if counted is None or self._pool is None:
            return
        bucket = counted[0]
        left = self._per_bucket.pop(bucket) - 1
        if left:
            self._per_bucket[bucket] = left
        self._pool.publish(bucket, left)

    def _forget_ended(self) -> None:
        """Connections whose association ended without EVT_CONN_CLOSE (not
        every way out of pynetdicom's state machine triggers it), or whose
        thread never started, stop counting for the pool, so a host is
        never refused for ghosts."""
        never = time.monotonic() - 3 * self.first_request
        with self._lock:
            for assoc in [a for a, (_, at) in self._counted.items()
                          if not a.is_alive() and (a.ident is not None or at < never)]:
                self._uncount(assoc)

    def _run_watch(self) -> None:
        while True:
            time.sleep(1.0)
            if self._pool is not None:
                self._forget_ended()
            now = time.monotonic()
            with self._lock:
                items = list(self._waiting.items())
            for assoc, deadline in items:
                answered = assoc.requestor.primitive is not None or assoc.is_established
                if not answered and now <= deadline:
                    continue
                if not answered and assoc.is_alive():
                    _shut(assoc, self.first_request)
                with self._lock:
                    self._waiting.pop(assoc, None)

    def requested(self, event: Any) -> None:
        assoc = event.assoc
        # Releases and aborts wait the usual time again.
        assoc.acse_timeout = getattr(assoc, "_pacs_acse_timeout", assoc.ae.acse_timeout)
        if getattr(assoc, "_pacs_over_host_limit", None) is not None and not (assoc.is_aborted or assoc.is_rejected):
            # Rejected-transient, local limit exceeded (PS3.8 9.3.4), as at max_associations.
            assoc._pacs_refusal = f"more than {self.per_host} associations from {assoc.requestor.address} " \
                                  "(max_associations_per_host)"
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

    def _warn(self, address: str, peers: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(address, -_REFUSAL_LOG_EVERY) < _REFUSAL_LOG_EVERY:
                return
            self._logged[address] = now
            if len(self._logged) > 10_000:
                self._logged.clear()
        log.warning("connection from %s closed: it already has %d open (max_associations_per_host %d)",
                    address, peers, self.per_host)


def _event_driven(limits: Limits) -> Any:
    """EVT_CONN_OPEN: our reactor, sender and receiver on the association."""
    from .direct_receive import receive_directly
    from .direct_send import send_directly
    from .reactor import event_driven

    def opened(event: Any) -> None:
        event_driven(event.assoc)
        send_directly(event.assoc)
        receive_directly(event.assoc, limits)

    return opened


def _on_conn_close(event: Any) -> None:
    """Free the association slot of a connection that closed before its
    A-ASSOCIATE-RQ was read.

    pynetdicom's acceptor thread waits ``acse_timeout`` for the request even
    after the transport is gone, and it counts against
    ``maximum_associations``: a burst of junk connections (port scanners,
    load-balancer probes, fuzzers) refused every good peer for 30 s. A
    ``None`` primitive is what that wait returns on its timeout.
    """
    assoc = event.assoc
    if assoc.is_acceptor and not assoc.is_established and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def refuse_impostors(pacs: Pacs) -> Any:
    """EVT_REQUESTED: refuse a known AE title called by what is not that AE,
    as an unknown calling AE (A-ASSOCIATE-RJ 1/1/3, PS3.8 9.3.4): any machine
    can claim a modality's title, not its address or its certificate.

    - with ``ae_allowlist`` and ``ae_check_host``: a call from another
      address than the title's registered host;
    - a title with a pinned TLS client certificate (``pacs ae add
      --client-cert``): a call without exactly that certificate
      (:func:`dicom_scp.permissions.certificate_refusal`).
    """
    from .permissions import certificate_refusal

    def requested(event: Any) -> None:
        settings = pacs.settings
        assoc = event.assoc
        if assoc.is_aborted or assoc.is_rejected:
            return
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        remote = pacs.aes.cached().get(calling)
        reason = certificate_refusal(assoc, calling, remote)
        # An unlisted title is pynetdicom's to refuse; AssociationGate.rejected
        # logs and audits every refusal, with this reason.
        if (reason is None and settings.ae_allowlist and settings.ae_check_host and remote is not None
                and remote.enabled and not host_matches(address, remote.host)):
            reason = f"calling AE {calling} is registered at another host ({remote.host}, ae_check_host)"
        if reason is None:
            return
        assoc._pacs_refusal = reason
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    return requested


class _PeerPduErrors(logging.Filter):
    """One line, not a traceback, for a malformed PDU from a peer, and that
    line once.

    pynetdicom answers an undecodable PDU with an A-ABORT (correct) and logs
    the decoding exception with its traceback, which reads like a crash of
    the server in the operator's log; its validators log the bad value at
    ERROR first, so each value was written twice (a peer grew the log twice
    as fast as it sent). The listener's AssociationGate says such a PDU
    itself, with the peer's address and titles: pynetdicom's records of it
    are dropped. Other exceptions keep their traceback.
    """

    # pynetdicom functions whose exceptions come from what the peer sent.
    PEER_DATA_FUNCTIONS = ("_read_pdu_data", "do_action", "decode_bytes", "receive_primitive")
    # Said once, by the record with the exception that follows.
    ANNOUNCEMENTS = ("Connection closed before the entire PDU was received", "Unable to decode the received PDU data")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.utils" and record.levelno >= logging.ERROR and decoding_peer_request():
            return False  # the value pynetdicom refuses, and raises for: AssociationGate says it
        if record.funcName == "_read_pdu_data" and not record.exc_info:
            if record.msg in self.ANNOUNCEMENTS:
                return False
            return self._pdu_header(record)
        if record.funcName == "AE_6" and str(record.msg).startswith("A-ASSOCIATE-RQ: Unsupported protocol version"):
            return False  # AssociationGate says it, with the peer's address and titles
        if record.funcName == "_run_reactor" and record.msg == "Network timeout reached":
            # pynetdicom's own reactor (dicom_event_driven off), in the
            # association's thread: said as ours says it.
            record.msg, record.args = idle_line(thread_association()), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if record.exc_info and record.funcName in self.PEER_DATA_FUNCTIONS:
            exc = record.exc_info[1]
            if getattr(exc, "_pacs_said", False):
                return False
            if isinstance(exc, OSError) and record.funcName == "_read_pdu_data":
                # A peer that hung up or a link that dropped mid-PDU (a
                # killed storescu, a satellite link): not a protocol fault.
                record.msg = (f"connection from {association_peer(thread_association())} lost in the middle of a "
                              f"PDU: {exc.__class__.__name__}")
                record.args = None
                record.levelno, record.levelname = logging.INFO, "INFO"
            else:
                record.msg = f"malformed PDU from peer: {exc.__class__.__name__}: {peer_text(exc, 200)}"
                record.args = None
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True

    @staticmethod
    def _pdu_header(record: logging.LogRecord) -> bool:
        """pynetdicom's ERROR for a PDU cut short (the peer closed the
        connection), which named no peer: the INFO line of a dropped link.
        (A PDU of an unknown type the listener says itself:
        AssociationGate._typed.)"""
        message = record.getMessage()
        if message.startswith("The received PDU is shorter than expected"):
            record.msg = (f"connection from {association_peer(thread_association())} lost in the middle of a PDU: "
                          f"{message.removeprefix('The received PDU is shorter than expected ').strip('()')}")
            record.args = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


for _name in ("pynetdicom.dul", "pynetdicom.fsm", "pynetdicom.utils", "pynetdicom.dimse", "pynetdicom.association"):
    logging.getLogger(_name).addFilter(_PeerPduErrors())


def find_dispatcher(query_retrieve: Any, worklist: Any) -> Any:
    def handle_find(event: Any) -> Any:
        if event.request.AffectedSOPClassUID == ModalityWorklistInformationFind:
            return worklist(event)
        return query_retrieve(event)

    return handle_find


def build_ae(pacs: Pacs) -> FilmlessAE:
    """Configure the AE: contexts, limits, timeouts."""
    settings = pacs.settings
    # pynetdicom's "standard" event handlers only write DEBUG lines, yet they
    # run for every PDU and raise (logging a traceback) on odd ones.
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        _config.LOG_HANDLER_LEVEL = "none"
    ae = FilmlessAE(pacs)
    for sop_class in storage_classes(settings.extra_storage_classes):
        # Every syntax for every storage class, and SCP/SCU role selection
        # accepted: a C-GET requestor takes the storage SCP role and we send
        # its instances back on the same association. (add_supported_context
        # keeps the roles; the list setter drops them.)
        ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(Verification)
    for sop_class in (*FIND_CLASSES, *MOVE_CLASSES):
        ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES[:1] + _UNCOMPRESSED_QR)
    for sop_class in (*GET_CLASSES, ModalityWorklistInformationFind, ModalityPerformedProcedureStep):
        ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES[:1] + _UNCOMPRESSED_QR)
    # A modality may propose role selection so that the N-EVENT-REPORT can
    # come back on its association (dicom_scp.commitment): agree to either role.
    ae.add_supported_context(StorageCommitmentPushModel, STORAGE_TRANSFER_SYNTAXES[:1] + _UNCOMPRESSED_QR,
                             scu_role=True, scp_role=True)
    # C-MOVE sub-operations: requests to destinations use the same limits.
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    return apply_limits(ae, settings)


def start_dicom_server(
    pacs: Pacs,
    *,
    host: str | None = None,
    port: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    extra_handlers: Sequence[tuple[Any, Any]] = (),
    listen_socket: socket.socket | None = None,
    host_counts: PoolHostCounts | None = None,
) -> ThreadedAssociationServer:
    """Start listening in background threads; returns the server to shut down.

    With *listen_socket* (a DICOM worker process), accept on that socket,
    shared with the other workers, instead of binding host and port; with
    *host_counts*, the per-host limit counts the other workers' connections.
    """
    from worklist.scp import make_mpps_handlers, make_worklist_handler

    from . import commitment, permissions

    from .qr import (
        MoveDestinations,
        make_find_handler,
        make_get_handler,
        make_move_handler,
        refuse_retrieves_early,
    )

    ae = build_ae(pacs)
    settings = pacs.settings
    gate = AssociationGate(pacs, worker=listen_socket is not None)
    guard = ConnectionGuard(settings.max_associations_per_host or max(1, settings.max_associations // 2), host_counts,
                            first_request=min(FIRST_REQUEST_WAIT, settings.dicom_timeout))
    destinations = MoveDestinations()
    ae.on_associate.extend([tune_socket, destinations.remember, lambda assoc: send_stored_as_is(pacs, assoc)])
    if pacs.settings.dicom_event_driven:
        from .reactor import event_driven

        ae.on_associate.append(event_driven)
    handlers = [
        (evt.EVT_C_STORE, make_store_handler(pacs)),
        (evt.EVT_CONN_OPEN, _on_conn_open),
        (evt.EVT_CONN_OPEN, gate.opened),
        (evt.EVT_CONN_OPEN, guard.opened),
        *([(evt.EVT_CONN_OPEN, _event_driven(Limits.of(pacs)))] if pacs.settings.dicom_event_driven else []),
        (evt.EVT_CONN_CLOSE, _on_conn_close),
        (evt.EVT_CONN_CLOSE, guard.closed),
        (evt.EVT_REQUESTED, guard.requested),
        (evt.EVT_REQUESTED, gate.requested),
        (evt.EVT_REQUESTED, refuse_impostors(pacs)),
        (evt.EVT_REJECTED, gate.rejected),
        # Whichever comes first ends the association's count of refused C-STOREs.
        (evt.EVT_RELEASED, audit_refusal_counts(pacs)),
        (evt.EVT_ABORTED, audit_refusal_counts(pacs)),
        (evt.EVT_CONN_CLOSE, audit_refusal_counts(pacs)),
        (evt.EVT_ACSE_RECV, prefer_requestor_order),
        # One C-FIND handler per association: dispatch on the information model.
        (evt.EVT_C_FIND, find_dispatcher(make_find_handler(pacs), make_worklist_handler(pacs))),
        (evt.EVT_CONN_OPEN, refuse_retrieves_early(pacs)),
        (evt.EVT_C_MOVE, make_move_handler(pacs, destinations)),
        (evt.EVT_C_GET, make_get_handler(pacs)),
        *make_mpps_handlers(pacs),
        *commitment.handlers(pacs),
        *extra_handlers,
        (evt.EVT_CONN_OPEN, permissions.gate_services(pacs)),  # last: it wraps every other request hook
    ]
    address = (host or pacs.settings.host, port if port is not None else pacs.settings.dicom_port)
    if listen_socket is None:
        server_class: type[ThreadedAssociationServer] = InlineAssociationServer
    else:
        from .workers import shared_server_class

        # The same server on the inherited socket, without a bind of its own.
        server_class = shared_server_class(listen_socket)
    # AE.start_server(block=False) with our server class.
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context, server_class=server_class)
    # socketserver sees a shutdown request only between polls: pynetdicom's
    # 0.5 s made every stop (a restart, each of the tests' servers) wait
    # 0.25 s on average; ten polls a second cost nothing measurable idle.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": ACCEPT_POLL_SECONDS},
                     name="AcceptorServer", daemon=True).start()
    ae._servers.append(server)
    address = server.server_address[:2]
    server.contexts = ContextList(server.contexts)
    log.info("DICOM listening on %s:%d as %s", address[0], address[1], pacs.settings.ae_title)
    return server
