"""What a registered calling AE may ask of us, who may call under its title,
and the character set of its answers.

Each known AE carries the DICOM services it may use (``pacs ae add NAME
--services store,query``; all by default). A request for another service is
answered 0x0124 "Refused: Not Authorized" (PS3.7 C.5) with an Error Comment
naming the service and the command that grants it, and the attempt goes to
the audit trail. C-ECHO is always answered. An AE the registry does not know
is governed by the allowlist (``ae_allowlist``), not by this module.

A known AE may also pin its TLS client certificate (``--client-cert``): an
association calling under that title is then refused (A-ASSOCIATE-RJ 1/1/3,
calling AE title not recognised) unless it came over DICOM TLS with exactly
that certificate. A CA-signed certificate proves only that the CA knows the
device; the pin ties the title to one device, so a second device holding a
certificate from the same hospital CA cannot call as the CT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE, N_ACTION, N_CREATE, N_SET
from pynetdicom.sop_class import ModalityWorklistInformationFind

from pacs.aes import RemoteAE
from pacs.app import Pacs
from pacs.errors import Status
from pacs.tls import peer_certificate_sha256

from .cancels import track_cancels
from .server import audit_association

log = logging.getLogger(__name__)

# The audit action of a refused request, as a granted one is recorded.
_ACTIONS = {"store": "store", "query": "query", "retrieve": "retrieve", "worklist": "worklist-query",
            "mpps": "mpps", "commitment": "commit"}


def service_of(message: Any) -> str | None:
    """The :data:`pacs.aes.SERVICES` entry a DIMSE request asks for; None
    for what every AE may do (C-ECHO) or what is not a request we serve."""
    if isinstance(message, C_STORE):
        return "store"
    if isinstance(message, C_FIND):
        return "worklist" if message.AffectedSOPClassUID == ModalityWorklistInformationFind else "query"
    if isinstance(message, C_MOVE | C_GET):
        return "retrieve"
    if isinstance(message, N_CREATE | N_SET):
        return "mpps"
    if isinstance(message, N_ACTION):
        return "commitment"
    return None


def refusal(pacs: Pacs, assoc: Any, service: str) -> str | None:
    """The Error Comment refusing *service* to the association's calling AE
    (logged and audited), or None when it may use it."""
    calling = assoc.requestor.ae_title.strip()
    remote = pacs.aes.get(calling)
    if remote is None or remote.permits(service):
        return None
    comment = f"{service} not permitted for {calling}"  # at most 45 characters: an LO holds 64
    log.warning("%s request from %s (%s) refused: not among its services (pacs ae add %s ... --services)",
                service, calling, assoc.requestor.address, calling)
    audit_association(pacs, assoc, _ACTIONS[service], outcome="denied", detail=comment)
    return comment


def answers_in_ascii(pacs: Pacs, event: Any) -> bool:
    """Whether the C-FIND and worklist answers to the event's calling AE go
    without diacritics and Specific Character Set (``pacs ae add --charset
    ascii``: a modality that reads no UTF-8)."""
    remote = pacs.aes.get(event.assoc.requestor.ae_title.strip())
    return remote is not None and remote.ascii_only


def _response(request: Any, status: int, comment: str) -> Any:
    """The response primitive refusing *request* with *status*."""
    response = type(request)()
    response.MessageIDBeingRespondedTo = request.MessageID
    sop_class = getattr(request, "AffectedSOPClassUID", None) or getattr(request, "RequestedSOPClassUID", None)
    response.AffectedSOPClassUID = UID(str(sop_class)) if sop_class else None
    if isinstance(request, N_CREATE | N_SET | N_ACTION):
        instance = getattr(request, "AffectedSOPInstanceUID", None) or getattr(request, "RequestedSOPInstanceUID", None)
        if instance:
            response.AffectedSOPInstanceUID = instance
    if isinstance(request, N_ACTION) and request.ActionTypeID is not None:
        response.ActionTypeID = request.ActionTypeID
    response.Status = int(status)
    response.ErrorComment = comment
    return response


def gate_services(pacs: Pacs) -> Callable[[Any], None]:
    """EVT_CONN_OPEN: refuse, before any handler runs, the requests the
    calling AE is not permitted (C-STORE is checked by the store handler,
    which also serves the requests pynetdicom does not see). Bound last, so
    that it wraps every other request hook."""

    def on_open(event: Any) -> None:
        assoc = event.assoc
        serve = assoc._serve_request

        def serve_request(message: Any, context_id: int) -> None:
            service = service_of(message)
            if (service is not None and service != "store" and message.is_valid_request
                    and context_id in assoc._accepted_cx):
                try:
                    comment = refusal(pacs, assoc, service)
                except Exception as exc:  # the registry is in the index: it may be down
                    log.warning("%s request refused: the AE registry cannot be read: %s", service, exc)
                    assoc.dimse.send_msg(_response(message, Status.PROCESSING_FAILURE,
                                                   "the AE registry cannot be read"), context_id)
                    return
                if comment is not None:
                    assoc.dimse.send_msg(_response(message, Status.NOT_AUTHORIZED, comment), context_id)
                    return
            serve(message, context_id)

        assoc._serve_request = serve_request
        # Outermost: ties each C-CANCEL to the request it cancels, also one
        # that came while this check ran (pynetdicom forgets those), and
        # drops a late one (it must not cancel the next request reusing its
        # Message ID): dicom_scp.cancels.
        track_cancels(assoc)

    return on_open


def certificate_refusal(assoc: Any, calling: str, remote: RemoteAE | None) -> str | None:
    """Why an association calling as *calling* (registered as *remote*)
    must be refused because the title's pinned TLS client certificate was
    not presented, or None."""
    if remote is None or not remote.enabled or remote.cert_sha256 is None:
        return None
    presented = peer_certificate_sha256(getattr(assoc.dul.socket, "socket", None))
    if presented == remote.cert_sha256:
        return None
    if presented is None:
        return f"calling AE {calling} must call over DICOM TLS with its pinned client certificate"
    return f"calling AE {calling} presented another TLS client certificate than its pinned one ({presented[:16]}...)"
