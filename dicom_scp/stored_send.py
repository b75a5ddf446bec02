"""C-STORE sub-operations (C-MOVE, C-GET) streamed from storage.

pynetdicom's retrieve services only take a :class:`~pydicom.dataset.Dataset`
from the handler and re-encode it element by element. When the peer accepted
the stored transfer syntax and no attribute needs correcting, that parse and
re-encode is pure cost (it was most of the time of a C-MOVE). The handler
yields a :class:`StoredInstance` -- a Dataset with only the identifying
attributes, and the syntax it goes out in -- and the association's
``send_c_store`` is wrapped so such an instance is streamed from the stored
file, header and pixels untouched, its PDUs written to the socket by the
sending thread (see :func:`_write_message`). With both, a C-MOVE of a CT
study went from ~100 to ~450-500 objects/s on the 2-core test machine.

An object whose encoding must change for the peer goes through
:mod:`pacs.transcode`, as for WADO-RS: corrected patient data, Implicit <->
Explicit VR Little Endian, Big Endian to Little Endian, Deflated (header
re-encoded, pixel data copied or byte-swapped from storage), compressed
pixel data decoded frame by frame for an uncompressed peer (the first frame
before the request is written, so a codec's refusal fails only that
sub-operation), lossless encodings frame by frame, from native or from
another compression. Only the layouts transcode cannot stream (a deflated
object, 1-bit native pixels to a compression) are made whole, one of its few
whole-conversion slots held, in a spooled file, and refused (the
sub-operation fails with the reason) above ``MAX_WHOLE_DECODED``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS

from pacs.app import Pacs
from pacs.retrieve import RetrieveItem
from pacs.transcode import (
    bytes_opener,
    can_serve,
    check_size,
    check_stored_size,
    prepared_dataset,
    read_exact,
    streamable,
    unservable_reason,
)
from storage import ObjectStore

from .direct_send import message_pdus, p_data_pdu, store_request_command, write_pdus

# The largest PDU sent, also to a peer that sets no maximum (PS3.8: 0).
LARGEST_PDU = 1024 * 1024
# Objects read ahead from a remote store, and the largest one read whole.
READ_AHEAD = 4
READ_AHEAD_MAX_BYTES = 8 * 1024**2
# What any stored object can be given in (pacs.transcode), the peer's
# preference first among them; compressed syntaxes only after them.
UNCOMPRESSED_TARGETS = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian))


class StoredInstance(Dataset):
    """Stands for a stored object in a retrieve handler's output.

    Carries what pynetdicom's retrieve service reads itself (SOP Class and
    Instance UIDs, for its failure lists) plus the storage key, the syntax
    it goes out in, where a failure's reason goes (the Error Comment of a
    final 0xA702) and, for a C-MOVE, the AE title of the requester.
    """

    def __init__(self, item: RetrieveItem, syntax: str | None = None, failures: list[str] | None = None,
                 move_originator: str | None = None) -> None:
        super().__init__()
        self.SOPClassUID = item.sop_class_uid
        self.SOPInstanceUID = item.sop_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = item.transfer_syntax_uid
        # Not DICOM attributes: Dataset keeps plain Python attributes aside.
        self.storage_key = item.storage_key
        self.stored_size = item.size
        self.item = item
        self.syntax = syntax or item.transfer_syntax_uid
        self.failures = failures if failures is not None else []
        self.move_originator = move_originator
        # The object's bytes, being read ahead from a remote store.
        self.prefetched: Future[bytes] | None = None


def accepted_syntaxes(contexts: Iterable[Any]) -> dict[str, list[str]]:
    """SOP class -> the syntaxes of its accepted contexts where this node
    sends C-STOREs (the SCU role), in the contexts' order."""
    accepted: dict[str, list[str]] = {}
    for cx in contexts:
        if cx.as_scu:
            syntaxes = accepted.setdefault(str(cx.abstract_syntax), [])
            if str(cx.transfer_syntax[0]) not in syntaxes:
                syntaxes.append(str(cx.transfer_syntax[0]))
    return accepted


def _preferred(accepted: Sequence[str]) -> list[str]:
    """*accepted* with the syntaxes any object can be given in first."""
    return sorted(accepted, key=lambda ts: UNCOMPRESSED_TARGETS.index(ts) if ts in UNCOMPRESSED_TARGETS
                  else len(UNCOMPRESSED_TARGETS))


def send_syntax(item: RetrieveItem, accepted: Sequence[str]) -> str | None:
    """The syntax *item* goes out in to a peer that accepted *accepted* for
    its SOP class: the stored one (its bytes as they are), else one
    :mod:`pacs.transcode` can produce from it, uncompressed first; None
    when there is none."""
    if item.transfer_syntax_uid in accepted:
        return item.transfer_syntax_uid
    return next((ts for ts in _preferred(accepted) if can_serve(item, ts)), None)


def unsendable_reason(item: RetrieveItem, accepted: Sequence[str]) -> str:
    """Why :func:`send_syntax` found none, short enough for an Error Comment."""
    if not accepted:
        return f"no context accepted for {UID(item.sop_class_uid).name}"
    first = _preferred(accepted)[0]
    return unservable_reason(item, first) or f"cannot be given in {UID(first).name}"


def reads_by_range(item: RetrieveItem, syntax: str) -> bool:
    """Whether sending *item* in *syntax* reads the stored object by byte
    range (worth reading ahead from a remote store): as stored, or with only
    its header re-encoded."""
    return syntax == item.transfer_syntax_uid or streamable(item, syntax)


def _dataset_offset(stream: BinaryIO) -> int | None:
    """Read past the File Meta Information; where the dataset starts, from the
    meta group length, or None when the file is not laid out that simply."""
    head = read_exact(stream, 144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    rest = int.from_bytes(head[140:144], "little")
    if len(read_exact(stream, rest)) < rest:
        return None
    return 144 + rest


def _pause_reactor(assoc: Any) -> None:
    """Keep a requestor's reactor from taking our responses off the DIMSE
    queue. pynetdicom pauses and resumes it around every request, and each
    pause waits for the reactor's 1 ms sleep to end; a store association that
    only sends keeps it paused instead (``release()`` works paused).

    An acceptor's reactor is the thread running the C-GET handler: nothing to do.
    """
    if not assoc.is_requestor:
        return
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused and assoc.is_established:
        time.sleep(0.0001)


def _send_instance(pacs: Pacs, assoc: Any, instance: StoredInstance, msg_id: int, priority: int = 2,
                   originator_aet: str | None = None, originator_id: int | None = None) -> Dataset:
    """One C-STORE request for *instance* in its syntax: the stored data set
    as it is when that is the stored syntax, else converted by
    :mod:`pacs.transcode`. What can fail (a damaged file, no context, a
    codec refusing the first frame) raises before the request is written."""
    if not assoc.is_established or assoc.acse.is_aborted():
        raise RuntimeError("the store association is no longer established")
    item, syntax = instance.item, instance.syntax
    # A damaged file fails its own sub-operation (PS3.4 C.4.2.3.1,
    # C.4.3.3.1) and the rest are sent, where a file ending mid-message had
    # to abort the association.
    prefetched = instance.prefetched.result() if instance.prefetched is not None else None
    if prefetched is not None:
        check_size(item, len(prefetched))
    else:
        check_stored_size(pacs, item)
    context = assoc._get_valid_context(item.sop_class_uid, syntax, "scu", allow_conversion=False)
    message = (msg_id, priority, originator_aet, originator_id)
    if syntax == item.transfer_syntax_uid and not item.overrides:
        stream = io.BytesIO(prefetched) if prefetched is not None else pacs.store.open(item.storage_key)
        with stream:
            offset = _dataset_offset(stream)
            if offset is not None and item.size > offset:
                return _send_message(assoc, instance, context, stream, item.size - offset, *message)
        # No File Meta group length (some archives write none): the data set
        # re-encoded in its own syntax below.
    if prefetched is not None:
        opener = bytes_opener(prefetched)
    else:
        opener = lambda offset, length: pacs.store.open(item.storage_key, offset, length)  # noqa: E731
    chunks = prepared_dataset(pacs, item, syntax, opener)

    def guarded() -> Iterator[bytes]:
        try:
            yield from chunks
        except Exception as exc:
            # Part of the message is out: the association cannot go on.
            assoc.abort()
            raise RuntimeError(f"reading {item.sop_uid} failed while sending it: {exc}") from exc

    return _send_message(assoc, instance, context, _ChunkReader(guarded()), None, *message)


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to *n* bytes (all that is left when negative); each byte is
        copied once, however small the reads of a large chunk."""
        out: list[bytes] = []
        while n != 0:
            if self._pos >= len(self._chunk):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._chunk, self._pos = chunk, 0
                continue
            left = len(self._chunk) - self._pos
            take = left if n < 0 else min(n, left)
            out.append(self._chunk[self._pos:self._pos + take])
            self._pos += take
            if n > 0:
                n -= take
        return b"".join(out)


def _send_message(assoc: Any, instance: StoredInstance, context: Any, stream: BinaryIO, length: int | None,
                  msg_id: int, priority: int, originator_aet: str | None, originator_id: int | None) -> Dataset:
    command = store_request_command(str(instance.SOPClassUID), str(instance.SOPInstanceUID), msg_id, priority,
                                    originator_aet, originator_id)
    _pause_reactor(assoc)
    _write_message(assoc, command, context.context_id, stream, length)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def _write_message(assoc: Any, command: bytes, context_id: int, stream: BinaryIO, length: int | None) -> None:
    """Write the C-STORE-RQ's PDUs to the socket from this thread (see
    :mod:`dicom_scp.direct_send`), reading the data set as it goes: *length*
    bytes, or up to the end of *stream* when None. An odd-length data set
    (a deflated one written by older software) gets one trailing NULL byte,
    as PS3.5 A.5 pads an odd deflate output: DCMTK peers refuse an odd PDV
    and drop the association. The stored object stays as it is."""
    max_pdu = assoc.dimse.maximum_pdu_size
    # PDUs of at most LARGEST_PDU, whatever the peer allows (0: no limit):
    # one PDU per dataset held a whole 200 MB object in memory. Fragments
    # of even length: only the last one may need the pad.
    fragment = min(max_pdu or LARGEST_PDU, LARGEST_PDU) - 6
    fragment -= fragment % 2

    def fragments() -> Iterator[bytes]:
        left = length
        while left is None or left > 0:
            try:
                data = read_exact(stream, fragment if left is None else min(fragment, left))
            except Exception:
                # The store failed mid-object (an S3 connection reset): as
                # for a file ending early, the next C-STORE would go out
                # inside this unfinished data set (DCMTK: "Unexpected PDV
                # type", a garbled C-GET and a failed release).
                assoc.abort()
                raise
            if not data:
                if left is None:
                    return
                # Part of the message is out: the peer cannot make sense of
                # what would follow on this association.
                assoc.abort()
                raise RuntimeError("the stored file ended early")
            if left is not None:
                left -= len(data)
            yield data

    def pdus() -> Iterator[bytes]:
        yield from message_pdus(context_id, command, None, max_pdu)
        last, total = b"", 0
        for data in fragments():
            # Held back one fragment: the last one is marked as such.
            if last:
                yield p_data_pdu(context_id, b"\x00" + last)
            last, total = data, total + len(data)
        yield p_data_pdu(context_id, b"\x02" + last + b"\0" * (total % 2))

    write_pdus(assoc, pdus())


@contextmanager
def read_ahead(store: ObjectStore, items: list[RetrieveItem]) -> Iterator[Callable[[int], Future[bytes] | None]]:
    """``fetch(i)``: item *i*'s bytes, with the next few read in parallel.

    Only for remote stores (a filesystem read is faster than the hand-off)
    and for objects small enough that a few in memory stay cheap; the rest
    are streamed when sent.
    """
    if not store.remote:
        yield lambda _: None
        return
    futures: dict[int, Future[bytes]] = {}
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="retrieve-read-ahead") as pool:

        def fetch(i: int) -> Future[bytes] | None:
            for j in range(i, min(i + READ_AHEAD + 1, len(items))):
                if j not in futures and items[j].size <= READ_AHEAD_MAX_BYTES:
                    futures[j] = pool.submit(store.read_bytes, items[j].storage_key)
            return futures.pop(i, None)

        try:
            yield fetch
        finally:
            for future in futures.values():
                future.cancel()


def send_stored_as_is(pacs: Pacs, assoc: Any) -> None:
    """Make *assoc* send :class:`StoredInstance` objects from storage (see
    :func:`_send_instance`); a failure's reason is kept on the instance.

    Any other dataset still goes through pynetdicom's own encoding.
    """
    original: Callable[..., Dataset] = assoc.send_c_store
    if getattr(original, "sends_stored", False):
        return

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, *args, **kwargs)
        if dataset.move_originator and kwargs.get("originator_aet") is not None:
            # PS3.7 9.1.1.1: the AE that asked for the C-MOVE (pynetdicom
            # names this one); the Message ID it passes is the C-MOVE's.
            kwargs["originator_aet"] = dataset.move_originator
        try:
            status = _send_instance(pacs, assoc, dataset, *args, **kwargs)
        except Exception as exc:
            dataset.failures.append(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))
            raise
        code = status.get("Status") if status is not None else None
        if code is None:
            dataset.failures.append("no C-STORE response from the peer")
        elif STORAGE_SERVICE_CLASS_STATUS.get(int(code), (STATUS_FAILURE,))[0] == STATUS_FAILURE:
            # As pynetdicom counts it (an unknown status is a failure).
            dataset.failures.append(f"the peer answered C-STORE with 0x{int(code):04X}")
        return status

    send_c_store.sends_stored = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store
