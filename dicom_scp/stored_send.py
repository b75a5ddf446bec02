"""C-STORE sub-operations (C-MOVE, C-GET) that send the stored bytes as they are.

pynetdicom's retrieve services only take a :class:`~pydicom.dataset.Dataset`
from the handler and re-encode it element by element. When the peer accepted
the stored transfer syntax and no attribute needs correcting, that parse and
re-encode is pure cost (it was most of the time of a C-MOVE). The handler
yields a :class:`StoredInstance` -- a Dataset with only the identifying
attributes -- and the association's ``send_c_store`` is wrapped so such an
instance is streamed from the stored file, header and pixels untouched,
its PDUs written to the socket by the sending thread (see
:func:`_write_message`). With both, a C-MOVE of a CT study went from ~100 to
~450-500 objects/s on the 2-core test machine.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from pacs.app import Pacs
from pacs.retrieve import RetrieveItem
from storage import ObjectStore

from .direct_send import message_pdus, p_data_pdu, store_request_command, write_pdus

# Objects read ahead from a remote store, and the largest one read whole.
READ_AHEAD = 4
READ_AHEAD_MAX_BYTES = 8 * 1024**2


class StoredInstance(Dataset):
    """Stands for a stored object in a retrieve handler's output.

    Carries what pynetdicom's retrieve service reads itself (SOP Class and
    Instance UIDs, for its failure lists) plus the storage key.
    """

    def __init__(self, item: RetrieveItem) -> None:
        super().__init__()
        self.SOPClassUID = item.sop_class_uid
        self.SOPInstanceUID = item.sop_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = item.transfer_syntax_uid
        # Not a DICOM attribute: Dataset keeps plain Python attributes aside.
        self.storage_key = item.storage_key
        self.stored_size = item.size
        # The object's bytes, being read ahead from a remote store.
        self.prefetched: Future[bytes] | None = None


def sendable_as_stored(item: RetrieveItem, accepted: set[tuple[str, str]]) -> bool:
    """True when the peer takes the stored bytes unchanged."""
    return not item.overrides and (item.sop_class_uid, item.transfer_syntax_uid) in accepted


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """*n* bytes, or fewer only at the end (S3 bodies may return short reads)."""
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _dataset_offset(stream: BinaryIO) -> int | None:
    """Read past the File Meta Information; where the dataset starts, from the
    meta group length, or None when the file is not laid out that simply."""
    head = _read_exact(stream, 144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    rest = int.from_bytes(head[140:144], "little")
    if len(_read_exact(stream, rest)) < rest:
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


def _send_stored(assoc: Any, instance: StoredInstance, stream: BinaryIO, msg_id: int, priority: int = 2,
                 originator_aet: str | None = None, originator_id: int | None = None) -> Dataset:
    """One C-STORE request whose dataset is streamed from the stored object."""
    if not assoc.is_established or assoc.acse.is_aborted():
        raise RuntimeError("the store association is no longer established")
    context = assoc._get_valid_context(instance.SOPClassUID, instance.file_meta.TransferSyntaxUID, "scu",
                                       allow_conversion=False)
    offset = _dataset_offset(stream)
    if offset is None or instance.stored_size <= offset:
        raise ValueError("no group length in the file meta, or no dataset")
    command = store_request_command(str(instance.SOPClassUID), str(instance.SOPInstanceUID), msg_id, priority,
                                    originator_aet, originator_id)
    _pause_reactor(assoc)
    _write_message(assoc, command, context.context_id, stream, instance.stored_size - offset)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def _write_message(assoc: Any, command: bytes, context_id: int, stream: BinaryIO, remaining: int) -> None:
    """Write the C-STORE-RQ's PDUs to the socket from this thread (see
    :mod:`dicom_scp.direct_send`), reading the dataset as it goes."""
    max_pdu = assoc.dimse.maximum_pdu_size
    fragment = max_pdu - 6 if max_pdu else 1 << 30

    def pdus() -> Iterator[bytes]:
        yield from message_pdus(context_id, command, None, max_pdu)
        left = remaining
        while left > 0:
            data = _read_exact(stream, min(fragment, left))
            if not data:
                # Part of the message is out: the peer cannot make sense of
                # what would follow on this association.
                assoc.abort()
                raise RuntimeError("the stored file ended early")
            left -= len(data)
            yield p_data_pdu(context_id, (b"\x00" if left > 0 else b"\x02") + data)

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
    """Make *assoc* stream :class:`StoredInstance` objects from storage.

    Any other dataset still goes through pynetdicom's own encoding.
    """
    original: Callable[..., Dataset] = assoc.send_c_store
    if getattr(original, "sends_stored", False):
        return

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, StoredInstance):
            try:
                if dataset.prefetched is not None:
                    stream: BinaryIO = io.BytesIO(dataset.prefetched.result())
                else:
                    stream = pacs.store.open(dataset.storage_key)
                with stream:
                    return _send_stored(assoc, dataset, stream, *args, **kwargs)
            except ValueError:
                # Raised before anything is sent: a file without a meta
                # group length, or no context pynetdicom matches exactly.
                # Encode it the ordinary way.
                with pacs.store.local_path(dataset.storage_key) as path:
                    return original(dcmread(path), *args, **kwargs)
        return original(dataset, *args, **kwargs)

    send_c_store.sends_stored = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store
