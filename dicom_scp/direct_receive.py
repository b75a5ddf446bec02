"""C-STORE requests assembled and served without pydicom's command decoding.

For every received message pynetdicom parses the command set into a pydicom
Dataset and then copies each element into a primitive: ~0.3 ms per object
on the test machine, a tenth of a small object's whole cost. A C-STORE-RQ
has a fixed, small command set (PS3.7 9.3.1.1), read here straight from the
bytes. The data set fragments are gathered as pynetdicom gathers them.

When the association's only C-STORE handler offers a direct entry (the
server's store handler does), a request whose UIDs are conformant is served
here too: the handler is called with the request's values and a success is
answered with a hand-encoded C-STORE-RSP, in the association thread, with
pynetdicom's checks (release sent, context accepted, a storage SOP class)
made first in its order, then that the class is its context's. That leaves out pynetdicom's storage service class,
its event object and eight UID validations per object (~20% of the Python
time of a small object). Otherwise the primitive is filled through
pynetdicom's own setters (which validate the UIDs and numbers) and served
by pynetdicom, and failures are answered through pynetdicom's encoder.

Every other message -- and a C-STORE-RQ with anything unexpected in its
command set -- is replayed into pynetdicom's decoder unchanged, which then
receives the rest of that message itself; the PDVs after it in the same
P-DATA-TF are taken here again (pynetdicom's decoder drops them). Every
fragment of a message must come on its command's presentation context
(PS3.8 E.1), or the association is aborted. pynetdicom's EVT_DIMSE_RECV and
EVT_C_STORE are not raised for the requests taken here (nothing in the
server listens to them but the store handler); with pynetdicom's debug
logging on, this module is not used.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from pacs.errors import Status
from pacs.header import valid_uid

from .contexts import OFF_CONTEXT_COMMENT, off_context
from .direct_send import can_write_directly, message_pdus, store_response_command, write_pdus
from .received import Limits, ReceivedData

log = logging.getLogger(__name__)

_ELEMENT = struct.Struct("<HHI")
_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101
# Command elements a plain C-STORE-RQ may carry, and the primitive parameter each fills.
_PARAMETERS = {
    0x0002: "AffectedSOPClassUID",
    0x0110: "MessageID",
    0x0700: "Priority",
    0x1000: "AffectedSOPInstanceUID",
    0x1030: "MoveOriginatorApplicationEntityTitle",
    0x1031: "MoveOriginatorMessageID",
}
_NUMBERS = {0x0100, 0x0110, 0x0700, 0x0800, 0x1031}
_REQUIRED = {0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000}


@dataclass(slots=True)
class ReceivedStore:
    """A C-STORE-RQ taken off the wire, to be served by a direct handler."""

    sop_class: str
    sop_uid: str
    message_id: int
    priority: int
    context_id: int = 0
    dataset: ReceivedData = field(default_factory=lambda: ReceivedData(None))
    # (0000,1030): the AE that asked for the C-MOVE this C-STORE is a sub-operation of.
    move_originator: str = ""


# (association, request, transfer syntax UID) -> (status, error comment)
DirectStore = Callable[[Any, ReceivedStore, str], tuple[int, str]]


def _store_values(command: bytes) -> dict[int, Any] | None:
    """The elements of a C-STORE-RQ command set (Implicit VR Little Endian),
    or None when it is anything else."""
    values: dict[int, Any] = {}
    offset = 0
    while offset < len(command):
        if offset + 8 > len(command):
            return None
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += 8
        value = command[offset:offset + length]
        offset += length
        if group != 0 or len(value) != length:
            return None
        if element == 0x0000:
            continue
        if element in _NUMBERS:
            if length != 2:
                return None
            values[element] = int.from_bytes(value, "little")
        elif element in _PARAMETERS:
            values[element] = value.decode("ascii", "replace").strip(" \x00")
        else:
            return None  # error comment, offending element, private...
    if not _REQUIRED <= values.keys() or values[0x0100] != _C_STORE_RQ or values[0x0800] == _NO_DATASET:
        return None
    return values


def _conformant(uid: str) -> bool:
    # What pynetdicom's UID setter accepts without a word.
    return bool(uid) and valid_uid(uid)


def parse_direct_store(command: bytes) -> ReceivedStore | None:
    """A C-STORE-RQ whose UIDs pynetdicom would accept silently, as a
    :class:`ReceivedStore`; None for anything else."""
    values = _store_values(command)
    if values is None or not (_conformant(values[0x0002]) and _conformant(values[0x1000])):
        return None
    return ReceivedStore(values[0x0002], values[0x1000], values[0x0110], values[0x0700],
                         move_originator=values.get(0x1030, ""))


def parse_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE-RQ primitive of an Implicit VR Little Endian command set,
    or None when it is anything else (another message, an unexpected or
    missing element, a value pynetdicom's setters refuse)."""
    values = _store_values(command)
    if values is None:
        return None
    return _primitive(values)


def _primitive(values: dict[int, Any]) -> C_STORE | None:
    request = C_STORE()
    try:
        for element, parameter in _PARAMETERS.items():
            if element in values:
                setattr(request, parameter, values[element])
    except (ValueError, TypeError):
        return None
    return request


@functools.lru_cache(maxsize=512)
def _is_storage(class_uid: str) -> bool:
    return issubclass(uid_to_service_class(class_uid), StorageServiceClass)


def _as_primitive(request: ReceivedStore) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = request.message_id
    primitive.AffectedSOPClassUID = request.sop_class
    primitive.AffectedSOPInstanceUID = request.sop_uid
    primitive.Priority = request.priority
    primitive.DataSet = request.dataset
    return primitive


def serve_store(assoc: Any, request: ReceivedStore, store: DirectStore, serve: Callable[[Any, int], None]) -> None:
    """Serve *request* with *store*, as pynetdicom's ``_serve_request`` and
    storage service class would; *serve* (pynetdicom's) takes what is not
    plainly a storage request."""
    context_id = request.context_id
    if assoc._sent_release:
        log.warning("C-STORE-RQ message received during association release, ignoring")
        return
    context = assoc._accepted_cx.get(context_id)
    class_uid = request.sop_class
    class_uid = assoc.acceptor.accepted_common_extended.get(class_uid, (class_uid,))[0]
    if context is None or not (_config.UNRESTRICTED_STORAGE_SERVICE or _is_storage(class_uid)):
        # pynetdicom aborts both, with its own log lines.
        serve(_as_primitive(request), context_id)
        return
    if request.sop_class != context.abstract_syntax and (
            refused := off_context(assoc, context.abstract_syntax, request.sop_class)) is not None:
        request.dataset.close()
        log.warning("C-STORE from %s refused: %s (presentation context %d)",
                    assoc.requestor.ae_title, refused, context_id)
        status, comment = Status.SOP_CLASS_NOT_SUPPORTED, OFF_CONTEXT_COMMENT
    else:
        assoc.dimse.cancel_req = {}
        assoc._is_paused = True
        try:
            status, comment = store(assoc, request, context.transfer_syntax[0])
        except Exception:
            log.exception("Exception in the C-STORE handler")
            status, comment = 0xC211, ""
        finally:
            assoc._is_paused = False
            assoc.dimse.cancel_req = {}
    if not assoc.is_established:
        return
    if status == 0 and not comment and can_write_directly(assoc):
        command = store_response_command(request.sop_class, request.sop_uid, request.message_id, 0)
        write_pdus(assoc, message_pdus(context_id, command, None, assoc.dimse.maximum_pdu_size))
        return
    response = C_STORE()
    response.MessageIDBeingRespondedTo = request.message_id
    response.AffectedSOPClassUID = request.sop_class
    response.AffectedSOPInstanceUID = request.sop_uid
    response.Status = status
    if comment:
        response.ErrorComment = comment
    assoc.dimse.send_msg(response, context_id)


def direct_store_of(assoc: Any) -> DirectStore | None:
    """The direct entry of *assoc*'s C-STORE handler, when it is the only one."""
    bound = assoc.get_handlers(evt.EVT_C_STORE)  # an intervention event: (handler, args)
    if not isinstance(bound, tuple) or bound[0] is None or bound[1]:
        return None
    return getattr(bound[0], "direct", None)


class _Incoming:
    """The C-STORE-RQ being received on one association."""

    def __init__(self, limits: Limits | None) -> None:
        self.limits = limits
        # Set once a protocol error aborted the association: nothing more is read.
        self.broken = False
        self.reset()

    def discard(self) -> None:
        """Let go of a data set that will never be handed over (the link
        dropped, or pynetdicom takes the message): its spool file goes now,
        not when a garbage collection finds the association's cycles."""
        self.dataset.close()
        self.reset()

    def reset(self) -> None:
        self.command_pdvs: list[list[Any]] = []
        self.request: C_STORE | ReceivedStore | None = None
        self.context_id = 0
        self.dataset = ReceivedData(self.limits)
        # True while pynetdicom receives the current message itself.
        self.theirs = False


def receive_directly(assoc: Any, limits: Limits | None = None) -> None:
    """Make *assoc* take C-STORE requests off the wire itself (idempotent);
    their data sets are kept under *limits* (:mod:`dicom_scp.received`)."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        return
    dimse = assoc.dimse
    original: Callable[[Any], None] = dimse.receive_primitive
    if getattr(original, "direct", False):
        return
    incoming = _Incoming(limits)
    store = direct_store_of(assoc)
    if store is not None:
        serve = assoc._serve_request

        def serve_request(message: Any, context_id: int) -> None:
            if isinstance(message, ReceivedStore):
                serve_store(assoc, message, store, serve)
            else:
                serve(message, context_id)

        assoc._serve_request = serve_request

    def parse(command: bytes) -> C_STORE | ReceivedStore | None:
        if store is not None and (direct := parse_direct_store(command)) is not None:
            return direct
        return parse_store_request(command)

    def protocol_error(reason: str) -> None:
        """A-ABORT the association (invalid PDU, Evt19: PS3.8 9.2.3), as
        pynetdicom does for a message it cannot decode."""
        log.warning("P-DATA from %s: %s; aborting the association (PS3.8 E.1)",
                    getattr(assoc.requestor, "address", "?"), reason)
        incoming.discard()
        incoming.broken = True
        dimse.dul.event_queue.put("Evt19")

    def feed(pdvs: list[Any], index: int) -> int:
        """Give pynetdicom pdvs[index:] until the message it receives is
        complete; the index of the first PDV after it.

        pynetdicom's decoder stops at the end of a message and ignores the
        rest of the P-DATA-TF: a second message in it was never answered."""
        while index < len(pdvs):
            context_id, data = pdvs[index]
            if context_id != incoming.context_id:
                protocol_error(f"a fragment on presentation context {context_id} inside a message "
                               f"on context {incoming.context_id}")
                return len(pdvs)
            replay = P_DATA()
            # pynetdicom's setter takes [context ID, PDV] lists only.
            replay.presentation_data_value_list = [[context_id, data]]
            original(replay)
            index += 1
            if dimse.message is None:
                incoming.theirs = False
                return index
        return index

    def hand_over(pdvs: list[Any]) -> int:
        """Give pynetdicom the message that starts at pdvs[0]; the index of
        the first PDV after it (pdvs' length when it goes on in later PDUs)."""
        incoming.discard()
        incoming.theirs = True
        incoming.context_id = pdvs[0][0]
        return feed(pdvs, 0)

    def receive_primitive(primitive: Any) -> None:
        if not isinstance(primitive, P_DATA):
            original(primitive)
            return
        pdvs = primitive.presentation_data_value_list
        if incoming.broken:
            return  # aborted: what follows is not read
        if incoming.theirs and len(pdvs) == 1 and pdvs[0][0] == incoming.context_id:
            # The next fragment of a message pynetdicom receives (a long
            # C-FIND identifier, an N-ACTION...): straight to it.
            original(primitive)
            if dimse.message is None:
                incoming.theirs = False
            return
        # A P-DATA-TF may carry several messages (PS3.8 E.1 says it should
        # not; DCMTK serves them, and so does this loop): each one goes to
        # this module or to pynetdicom's decoder, in order.
        index = 0
        while index < len(pdvs):
            if incoming.theirs:
                index = feed(pdvs, index)
                continue
            context_id, data = pdvs[index]
            control = data[0]
            if control & 0x01:  # a command fragment
                if incoming.request is not None:
                    # A new command inside a data set: pynetdicom's call.
                    pdvs = pdvs[index:]
                    index = hand_over(pdvs)
                    continue
                if incoming.command_pdvs and context_id != incoming.context_id:
                    protocol_error(f"command fragments on presentation contexts {incoming.context_id} "
                                   f"and {context_id}")
                    return
                incoming.context_id = context_id
                incoming.command_pdvs.append([context_id, data])
                index += 1
                if control & 0x02:
                    request = parse(b"".join(d[1:] for _, d in incoming.command_pdvs))
                    if request is None:
                        pdvs = incoming.command_pdvs + list(pdvs[index:])
                        index = hand_over(pdvs)
                        continue
                    incoming.request = request
                continue
            if incoming.request is None:
                pdvs = incoming.command_pdvs + list(pdvs[index:])
                index = hand_over(pdvs)
                continue
            if context_id != incoming.context_id:
                # DCMTK: "Presentation Contexts of Command and Data Differ".
                protocol_error(f"the data set on presentation context {context_id}, "
                               f"its command on {incoming.context_id}")
                return
            incoming.dataset.write(data[1:])
            index += 1
            if control & 0x02:
                request = incoming.request
                if isinstance(request, ReceivedStore):
                    request.context_id, request.dataset = incoming.context_id, incoming.dataset
                    dimse.msg_queue.put((incoming.context_id, request))
                    incoming.reset()
                    continue
                # Not through the DataSet setter, which takes a BytesIO only:
                # a C-STORE-RQ pynetdicom serves itself (an invalid UID in
                # its command) still carries the received data set, which
                # the C-STORE handler reads as the direct path does.
                request._dataset = incoming.dataset
                request._context_id = incoming.context_id
                request._dataset_path = None
                request._dataset_file = None
                dimse.msg_queue.put((incoming.context_id, request))
                incoming.reset()

    receive_primitive.direct = True  # type: ignore[attr-defined]
    dimse.receive_primitive = receive_primitive
    # An association that ends in the middle of a data set (a modality
    # killed, a satellite link gone) leaves it unfinished: a spool file of
    # up to max_object_bytes, held while the association's reference cycles
    # wait for a collection (35 minutes were seen).
    assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: incoming.discard())


__all__ = ["ReceivedStore", "parse_direct_store", "parse_store_request", "receive_directly", "serve_store"]
