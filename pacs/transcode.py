"""Stored objects in the transfer syntax a client asked for.

As stored when it matches (streamed, never in memory). When only the
encoding of the elements changes -- Implicit <-> Explicit VR Little Endian,
Explicit VR Big Endian to Little Endian, Deflated, or corrected patient data
in the stored syntax -- only the header is re-encoded: it is read (up to the
Pixel Data, whose offset the index knows), corrected and written in the
target syntax, then the Pixel Data value is streamed from the stored object
by byte range (byte-swapped in chunks from big endian), then whatever
follows it (trailing padding) re-encoded. Memory stays at a header's size
whatever the object's.

A codec change goes frame by frame with pydicom + pylibjpeg: native pixel
data to RLE / JPEG-LS / JPEG 2000 lossless is read by range and encoded one
frame at a time (colour stored plane by plane is interleaved first: pydicom's
encoders read native data as interleaved, which scrambled RLE, PS3.5 Annex
G); compressed pixel data is decoded one frame at a time from the stored
file, to native pixel data or, one compression to another (JPEG-LS to JPEG
2000...), each decoded frame encoded at once (PS3.5 A.4 encapsulates frame
by frame: nothing needs every frame at once). The first frame is converted
before a response starts, so a codec's refusal is still an error status.
The codec work of every frame in the process goes through one limit
(:func:`codec_work`: at most one frame per CPU, and at most ``CODEC_BUDGET``
bytes of decoded frames at once), held around the decode and encode only,
never while a converted frame waits for the network: many clients of a 10
MB-per-frame tomosynthesis wait their turn rather than each holding its
buffers. Each converted frame also holds its share of the process's pixel
budget (:mod:`pacs.pixel_memory`) from before its decode until its last byte
is sent, so that frames waiting for slow clients are bounded too, and the
first frame is let go once sent. What remains (Deflated or Big Endian objects
to a compression, unusual layouts: 1-bit or YBR_422 native pixels, Float
Pixel Data, enormous headers) is converted whole: at most
``MAX_WHOLE_CONVERSIONS`` at once in the process (their pixels counted in the
budget while in memory), each written to a spooled temporary file and
released before its bytes are sent, and only for images of at most
``MAX_WHOLE_DECODED`` decoded bytes (a larger one is refused with a reason,
406 / a failed sub-operation, rather than risk the process being killed for
memory).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr, dcmwrite, write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
)

from storage import ObjectDamaged, StorageError

from .app import Pacs
from .errors import PacsError
from .pixel_memory import PIXELS, TRIM_FROM, Lease, held_pieces, trim_heap
from .retrieve import RetrieveItem, apply_overrides

CHUNK = 1 << 20
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
# Lossless encoders pydicom has with the codecs we ship.
ENCODABLE = {RLELossless, JPEGLSLossless, JPEG2000Lossless}
# Compressed syntaxes whose decoded samples are the ones encoded: turning
# their YBR_FULL into RGB would round them, a lossy change under a lossless
# name (lossy sources are given as RGB, as viewers expect).
LOSSLESS_SOURCES = {RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1}
# Syntaxes written by streaming the pixel data (header re-encoded).
LITTLE_ENDIAN_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
# Whole-object conversions (only the layouts frame by frame cannot do) running at once in this process.
MAX_WHOLE_CONVERSIONS = 2
_WHOLE_CONVERSIONS = threading.BoundedSemaphore(MAX_WHOLE_CONVERSIONS)
# The largest object (decoded pixel data, or the whole data set) converted
# whole: that path holds the object about 3.5 times (read, decoded,
# encoded, written), ~1.1 GB for a 300 MB tomosynthesis. 32 MiB takes any
# single frame (a 4096x3328 16-bit mammogram is 27 MB).
MAX_WHOLE_DECODED = 32 * 1024 * 1024
# Frames being decoded or encoded at once in this process: one per CPU (the
# codecs use a CPU each), and at most this many bytes of decoded frames
# (each costs 3-6 times its size in buffers while it is converted): two
# 10 MB tomosynthesis frames at once, many CT frames.
MAX_CODEC_WORK = max(1, os.cpu_count() or 1)
CODEC_BUDGET = 24 * 1024 * 1024
# Elements after Pixel Data (trailing padding, signatures) are re-encoded in memory up to this size.
MAX_TRAILING = 16 * 1024 * 1024
# Header bytes before Pixel Data read into memory at most (else: whole-object path).
MAX_HEADER = 64 * 1024 * 1024

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# Bytes per swapped word of the binary VRs whose values pydicom keeps as bytes.
_WORD = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TransferSyntaxError(PacsError):
    """The object cannot be given in the requested syntax (HTTP 406)."""

    http_status = 406


Opener = Callable[[int, "int | None"], BinaryIO]
# A converted frame: encoded bytes, or decoded pixels (a view of the decoder's array).
_Frame = TypeVar("_Frame", bytes, memoryview)


def can_serve(item: RetrieveItem, target: str | None) -> bool:
    """Whether *item* can be produced in *target* (None or "*": as stored).

    Decided from the index alone, before a response starts: a conversion that
    would fail once the 200 is sent cannot be reported to the client.
    """
    return unservable_reason(item, target) is None


def unservable_reason(item: RetrieveItem, target: str | None) -> str | None:
    """Why *item* cannot be produced in *target*, or None when it can.

    From the index and the codecs installed: a stored compressed syntax with
    no decoder here, a target without an encoder. Big Endian is retired
    (PS3.5 A.3) and never written; a Big Endian object is given in Little
    Endian (the default syntax, PS3.18 8.7.3), byte-swapped as it streams.
    """
    if target in (None, "*", item.transfer_syntax_uid):
        return None
    uid = UID(target)
    stored = UID(item.transfer_syntax_uid)
    if uid == ExplicitVRBigEndian:
        return f"{uid.name} (retired) is not produced"
    if not (uid in UNCOMPRESSED or uid in ENCODABLE):
        return f"no encoder for {uid.name}"
    if stored == ExplicitVRBigEndian:
        if uid in LITTLE_ENDIAN_NATIVE:
            return None
        return f"{stored.name} objects are given in uncompressed Little Endian only"
    if item.pixel_offset is None:
        return None  # no pixels: only the element encoding changes
    if stored.is_compressed and stored != DeflatedExplicitVRLittleEndian and not _decodable(stored):
        return f"no decoder for {stored.name}"
    if uid in ENCODABLE and not _encodable(uid):
        return f"no encoder for {uid.name}"
    return None


def _decodable(uid: UID) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def _encodable(uid: UID) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(uid).is_available)
    except NotImplementedError:
        return False


def stream_stored(pacs: Pacs, item: RetrieveItem) -> Iterator[bytes]:
    """The stored Part 10 bytes, chunk by chunk; :class:`ObjectDamaged` when
    they are not as many as the index recorded (before the first chunk when
    the size is known up front, else at the short end: never a body that
    ends as if complete)."""
    yield from _stored_chunks(_open_checked(pacs, item), item)


def _open_checked(pacs: Pacs, item: RetrieveItem) -> BinaryIO:
    """The stored object opened, its size checked (:func:`check_stored_size`)."""
    stream = pacs.store.open(item.storage_key)
    try:
        check_stored_size(pacs, item, stream)
    except BaseException:
        stream.close()
        raise
    return stream


def check_size(item: RetrieveItem, size: int) -> None:
    """Raise :class:`ObjectDamaged` when the store holds *size* bytes for
    *item*, not the size the index recorded when it was stored."""
    if size != item.size:
        raise ObjectDamaged(f"the stored object {item.sop_uid} is damaged: {size} bytes in the store, "
                            f"{item.size} indexed (pacs verify)")


def check_stored_size(pacs: Pacs, item: RetrieveItem, stream: BinaryIO | None = None) -> None:
    """Compare the stored object's size with the indexed one before any of
    it is sent, so that a damaged file is a failure status (a failed C-STORE
    sub-operation, an HTTP error) rather than an object cut short: from the
    open *stream* (fstat) or the store's stat. A remote store is not asked
    (a round trip per object; its objects are written whole): a short body
    is found as it is read."""
    if pacs.store.remote:
        return
    try:
        size = os.fstat(stream.fileno()).st_size if stream is not None else None
    except (OSError, ValueError):  # not a plain file (a byte range)
        size = None
    if size is None:
        size = pacs.store.stat(item.storage_key).size
    check_size(item, size)


def _stored_chunks(stream: BinaryIO, item: RetrieveItem) -> Iterator[bytes]:
    """The stored bytes of *item* from *stream*, closed at the end; a short
    read raises :class:`ObjectDamaged`, so that a streamed answer breaks off
    (the client sees it incomplete) instead of ending as if whole."""
    sent = 0
    try:
        while chunk := stream.read(CHUNK):
            sent += len(chunk)
            yield chunk
    finally:
        stream.close()
    if sent < item.size:
        raise ObjectDamaged(f"the stored object {item.sop_uid} ended after {sent} of {item.size} bytes (pacs verify)")


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """*n* bytes, or fewer only at the end (S3 bodies may return short reads)."""
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


# -- streamed conversion (the element encoding changes, the pixels do not) ------------------
@dataclass
class StreamPlan:
    """A converted object laid out before any byte is sent: the File Meta
    and dataset header already encoded, the pixel value and the trailing
    elements to follow."""

    target: UID
    meta: bytes  # preamble + File Meta Information
    header: bytes  # dataset elements before Pixel Data, in *target*
    pixel_header: bytes  # the Pixel Data element's tag/VR/length in *target*
    opener: Opener
    pixel_offset: int  # where the copied (or swapped) bytes start in the stored object
    pixel_length: int
    swap: int  # bytes per word to swap (1: none)
    trailing: bytes  # elements after Pixel Data, in *target*

    @property
    def dataset_length(self) -> int:
        """Bytes after the File Meta (before any deflate)."""
        return len(self.header) + len(self.pixel_header) + self.pixel_length + len(self.trailing)

    def _dataset(self) -> Iterator[bytes]:
        yield self.header + self.pixel_header
        left = self.pixel_length
        if left:
            with self.opener(self.pixel_offset, left) as stream:
                while left > 0:
                    data = read_exact(stream, min(CHUNK, left))
                    if not data:
                        raise TransferSyntaxError("the stored object ended inside its Pixel Data")
                    left -= len(data)
                    yield _swapped(data, self.swap)
        if self.trailing:
            yield self.trailing

    def dataset(self) -> Iterator[bytes]:
        """The dataset bytes (after the File Meta), chunk by chunk."""
        if self.target != DeflatedExplicitVRLittleEndian:
            yield from self._dataset()
            return
        yield from _deflated(self._dataset())

    def part10(self) -> Iterator[bytes]:
        yield self.meta
        yield from self.dataset()


def _swapped(data: bytes, width: int) -> bytes:
    if width <= 1:
        return data
    whole = len(data) - len(data) % width
    swapped = np.frombuffer(data, dtype=f">u{width}", count=whole // width).byteswap().tobytes()
    return swapped + data[whole:]


def _to_little_endian(ds: Dataset) -> None:
    """Make a dataset read as big endian encode right in little endian:
    every value decoded (numbers), and the byte values of OW/OF/OL/OD/OV
    elements swapped word by word (pydicom keeps them as stored). Pixel
    Data is left to the caller (its word is Bits Allocated, not its VR)."""
    # Ambiguous VRs (US or SS, LUT Data) resolved with the big endian bytes.
    correct_ambiguous_vr(ds, False)
    for elem in ds:  # iterating turns raw elements into decoded ones
        if elem.VR == "SQ":
            for child in elem.value:
                _to_little_endian(child)
        elif elem.tag == _PIXEL_DATA:
            continue
        elif isinstance(elem.value, bytes) and elem.VR in _WORD:
            elem.value = _swapped(elem.value, _WORD[elem.VR])


def _element_header(tag: int, vr: bytes, length: int, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, element, length)
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, length)
    return struct.pack("<HH2sH", group, element, vr, length)


def _meta_length(part10: bytes) -> int:
    """Bytes of preamble + File Meta at the start of a Part 10 buffer pydicom wrote."""
    if part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise TransferSyntaxError("unexpected File Meta layout")
    return 144 + int.from_bytes(part10[140:144], "little")


def _store_opener(pacs: Pacs, key: str) -> Opener:
    return lambda offset, length: pacs.store.open(key, offset, length)


def bytes_opener(data: bytes) -> Opener:
    """An :data:`Opener` over an object already read (C-MOVE read-ahead)."""
    view = memoryview(data)
    return lambda offset, length: io.BytesIO(view[offset:None if length is None else offset + length])


def streamable(item: RetrieveItem, target: str) -> bool:
    """Whether *item* in *target* is produced by re-encoding its header only."""
    uid, stored = UID(target), UID(item.transfer_syntax_uid)
    if item.pixel_offset is None or stored == DeflatedExplicitVRLittleEndian:
        return False
    if uid == stored:
        return True  # corrections only: everything from Pixel Data on is copied
    return stored in UNCOMPRESSED and uid in LITTLE_ENDIAN_NATIVE


@dataclass
class _StoredPixels:
    """The stored object's header (up to Pixel Data) and where its Pixel Data value is."""

    head: bytes
    start: int  # the Pixel Data element's offset
    vr: bytes  # b"" in Implicit VR
    length: int  # 0xFFFFFFFF when encapsulated
    value_offset: int


def _stored_pixels(opener: Opener, item: RetrieveItem) -> _StoredPixels | None:
    """Read the header of *item* and its Pixel Data element's tag and length;
    None when the object is not laid out for streaming (no Pixel Data at the
    indexed offset, Float Pixel Data, an enormous header)."""
    stored = UID(item.transfer_syntax_uid)
    start = int(item.pixel_offset or 0)
    if item.pixel_offset is None or start > MAX_HEADER or stored == DeflatedExplicitVRLittleEndian:
        return None
    with opener(0, start) as stream:
        head = read_exact(stream, start)
    with opener(start, min(12, item.size - start)) as stream:
        elem = read_exact(stream, 12)
    if len(head) != start or len(elem) < 8:
        raise TransferSyntaxError(f"stored object {item.sop_uid} is shorter than the index says")
    order = "<" if stored != ExplicitVRBigEndian else ">"
    group, element = struct.unpack(order + "HH", elem[:4])
    if (group << 16 | element) != _PIXEL_DATA:
        return None  # Float / Double Float Pixel Data: rare, whole-object path
    if stored == ImplicitVRLittleEndian:
        return _StoredPixels(head, start, b"", struct.unpack("<I", elem[4:8])[0], start + 8)
    vr = elem[4:6]
    if vr in _LONG_VRS:
        return _StoredPixels(head, start, vr, struct.unpack(order + "I", elem[8:12])[0], start + 12)
    return _StoredPixels(head, start, vr, struct.unpack(order + "H", elem[6:8])[0], start + 8)


# Changes a caller makes to the header of a streamed copy (de-identification,
# a routing rule's values) before it is encoded; see stream_plan.
Edit = Callable[[Dataset], None]


def stream_plan(opener: Opener, item: RetrieveItem, target: str, edit: Edit | None = None) -> StreamPlan | None:
    """Lay out *item* in *target* with its header re-encoded and corrected,
    or None when the stored object is not laid out for it (then the
    whole-object path does the work). Reads the header only.

    *edit* changes the dataset before it is encoded: it gets the header and
    the elements after Pixel Data (which it may remove; that is where
    signatures and padding are), with an empty Pixel Data element standing
    for the value that is streamed unchanged. Big Endian is never written
    with an edit (*target* Little Endian instead): None."""
    if not streamable(item, target):
        return None
    uid, stored = UID(target), UID(item.transfer_syntax_uid)
    if edit is not None and uid == ExplicitVRBigEndian:
        return None
    pixels = _stored_pixels(opener, item)
    if pixels is None:
        return None
    head, start, vr, length, value_offset = (pixels.head, pixels.start, pixels.vr, pixels.length,
                                             pixels.value_offset)
    little = stored != ExplicitVRBigEndian
    source_implicit = stored == ImplicitVRLittleEndian
    ds = dcmread(io.BytesIO(head))
    apply_overrides(ds, item.overrides)
    if uid == stored and edit is None:
        # Only the header changes: the rest of the object is copied as it is.
        meta, header = _encoded_header(ds, uid)
        return StreamPlan(uid, meta, header, b"", opener, start, item.size - start, 1, b"")
    implicit = uid == ImplicitVRLittleEndian
    swap = 1
    if length == _UNDEFINED:
        if uid != stored:
            return None  # encapsulated in an "uncompressed" syntax: not ours to stream
        # Encapsulated, kept as it is: items and delimiter are copied.
        value_end = _encapsulated_end_at(opener, value_offset, item.size)
        if value_end is None:
            return None
        pixel_header = _element_header(_PIXEL_DATA, vr or b"OB", _UNDEFINED, implicit)
    else:
        bits = int(ds.get("BitsAllocated", 8) or 8)
        if not vr or vr not in (b"OB", b"OW"):
            vr = b"OW" if bits > 8 else b"OB"
        if not little:
            swap = bits // 8 if bits > 8 else (2 if vr == b"OW" else 1)
            if swap > 1:
                vr = b"OW"
            _to_little_endian(ds)
        value_end = value_offset + length
        pixel_header = _element_header(_PIXEL_DATA, vr, length, implicit)
    if item.size - value_end > MAX_TRAILING:
        return None
    rest = b""
    if item.size > value_end:
        with opener(value_end, item.size - value_end) as stream:
            rest = read_exact(stream, item.size - value_end)
    if edit is None:
        trailing = _reencoded(rest, source_implicit, little, implicit) if rest else b""
    else:
        tail = _edited(ds, rest, source_implicit, little, vr or b"OB", edit)
        trailing = _written(tail, implicit) if len(tail) else b""
    meta, header = _encoded_header(ds, uid)
    return StreamPlan(uid, meta, header, pixel_header, opener, value_offset, value_end - value_offset, swap,
                      trailing)


def _edited(ds: Dataset, rest: bytes, implicit: bool, little: bool, vr: bytes, edit: Edit) -> Dataset:
    """Run *edit* on the header *ds* joined with the elements after Pixel
    Data (*rest*, stored encoding); returns those that are left after it,
    taken out of *ds* again."""
    tail = read_dataset(io.BytesIO(rest), implicit, little) if rest else Dataset()
    if not little:
        _to_little_endian(tail)
    for tag in list(tail.keys()):
        ds[tag] = tail.get_item(tag)
    # Stands for the streamed value: the edit sees an object with pixels.
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, vr.decode(), b"")
    edit(ds)
    after = Dataset()
    for tag in [t for t in ds.keys() if t >= _PIXEL_DATA]:
        if tag != _PIXEL_DATA:
            after[tag] = ds.get_item(tag)
        del ds[tag]
    return after


def _written(ds: Dataset, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = implicit
    write_dataset(out, ds)
    return out.getvalue()


def _encapsulated_end_at(opener: Opener, offset: int, size: int) -> int | None:
    """:func:`_encapsulated_end` read through *opener*: item headers only."""
    pos = offset
    while pos + 8 <= size:
        with opener(pos, 8) as stream:
            head = read_exact(stream, 8)
        if len(head) < 8:
            return None
        group, element, length = struct.unpack("<HHI", head)
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            return None
        pos += 8 + length
    return None


def _reencoded(data: bytes, implicit: bool, little: bool, target_implicit: bool) -> bytes:
    """Elements after Pixel Data, read in the stored encoding, written in the target's."""
    ds = read_dataset(io.BytesIO(data), implicit, little)
    if not little:
        _to_little_endian(ds)
    return _written(ds, target_implicit)


def _encoded_header(ds: Dataset, uid: UID) -> tuple[bytes, bytes]:
    """(preamble + File Meta, dataset elements) of *ds* written in *uid*;
    a deflated target gets its dataset elements uncompressed (the caller
    deflates them with the pixel data that follows)."""
    deflated = uid == DeflatedExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if deflated else uid
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    written = out.getvalue()
    meta_end = _meta_length(written)
    meta = written[:meta_end]
    if deflated:
        ds.file_meta.TransferSyntaxUID = uid
        buffer = DicomBytesIO()
        buffer.write(written[:132])
        write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
        meta = buffer.getvalue()
    return meta, written[meta_end:]


# -- frame by frame codec changes -----------------------------------------------------------
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration")


@dataclass
class CodecPlan:
    """A converted object whose pixel data change codec, one frame at a
    time: the first frame is already done (a codec refusal is known before
    any byte is sent), the rest are encoded or decoded as they are sent."""

    target: UID
    meta: bytes
    header: bytes  # dataset elements and the Pixel Data element header, in *target*
    pieces: Iterator[bytes]  # the Pixel Data value, piece by piece
    trailing: bytes
    resources: ExitStack
    dataset_length: int | None = None

    def _dataset(self) -> Iterator[bytes]:
        try:
            yield self.header
            yield from self.pieces
            if self.trailing:
                yield self.trailing
        finally:
            self.resources.close()

    def dataset(self) -> Iterator[bytes]:
        if self.target != DeflatedExplicitVRLittleEndian:
            return self._dataset()
        return _deflated(self._dataset())

    def part10(self) -> Iterator[bytes]:
        yield self.meta
        yield from self.dataset()


def _deflated(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """*chunks* deflated, padded to even length: PS3.5 A.5 gives an odd
    deflate output one trailing NULL byte, and DCMTK peers refuse an odd
    data set ("Odd Fragment Length")."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    length = 0
    for chunk in chunks:
        if out := deflater.compress(chunk):
            length += len(out)
            yield out
    out = deflater.flush()
    yield out + b"\0" * ((length + len(out)) % 2)


def _number(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


class _CodecLimit:
    """At most *slots* frames in codec work at once, and at most *budget*
    bytes of them (a frame larger than the budget runs alone)."""

    def __init__(self, slots: int, budget: int) -> None:
        self.slots, self.budget = slots, budget
        self._changed = threading.Condition()
        self._running = 0
        self._used = 0

    @contextlib.contextmanager
    def hold(self, frame_bytes: int) -> Iterator[None]:
        """Wait for room for one frame of *frame_bytes*, hold it while the block runs."""
        cost = max(0, min(frame_bytes, self.budget))
        with self._changed:
            self._changed.wait_for(lambda: self._running < self.slots and self._used + cost <= self.budget)
            self._running += 1
            self._used += cost
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._used -= cost
                self._changed.notify_all()
            if frame_bytes >= TRIM_FROM:
                trim_heap()  # the codec's buffers of a big frame, freed: not kept by the allocator


_CODEC_WORK = _CodecLimit(MAX_CODEC_WORK, CODEC_BUDGET)


def codec_work(frame_bytes: int) -> contextlib.AbstractContextManager[None]:
    """Held around one frame's decode and/or encode (*frame_bytes*: its
    decoded size), and nothing else: not while the frame is sent. Every
    frame-by-frame conversion of the process (WADO-RS, WADO-URI, C-MOVE,
    C-GET, routing) waits here for its turn, so that the buffers of frames
    being converted stay bounded whatever the number of clients."""
    return _CODEC_WORK.hold(frame_bytes)


def _pixel_bytes(ds: Dataset) -> int:
    """Bytes of native pixel data *ds*'s Image Pixel attributes describe (all frames)."""
    rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    samples, bits = _number(ds, "SamplesPerPixel", 1), _number(ds, "BitsAllocated", 8)
    return (rows * columns * samples * _number(ds, "NumberOfFrames", 1) * bits + 7) // 8


def _codec_header(ds: Dataset, uid: UID, opener: Opener, item: RetrieveItem, end: int, source_implicit: bool,
                  pixel_vr: bytes, edit: Edit | None) -> tuple[bytes, bytes, bytes] | None:
    """(File Meta, elements before Pixel Data, elements after it) of a
    converted object in *uid*: *ds* is the stored header, corrected and its
    pixel description already changed by the caller; the stored elements
    after Pixel Data start at *end*. *edit* runs as for :func:`stream_plan`.
    None when those trailing elements are too many bytes to hold."""
    if item.size - end > MAX_TRAILING:
        return None
    rest = b""
    if item.size > end:
        with opener(end, item.size - end) as stream:
            rest = read_exact(stream, item.size - end)
    implicit = uid == ImplicitVRLittleEndian
    if edit is None:
        trailing = _reencoded(rest, source_implicit, True, implicit) if rest else b""
    else:
        tail = _edited(ds, rest, source_implicit, True, pixel_vr, edit)
        trailing = _written(tail, implicit) if len(tail) else b""
    meta, header = _encoded_header(ds, uid)
    return meta, header, trailing


def _without_offset_tables(ds: Dataset) -> None:
    """The Extended Offset Table describes the stored frames, not the converted ones."""
    for tag in (0x7FE00001, 0x7FE00002):
        if tag in ds:
            del ds[tag]


def _one_frame(ds: Dataset) -> Dataset:
    """The Image Pixel description of one frame of *ds* (what pydicom's
    codecs read their options from)."""
    frame_ds = Dataset()
    for keyword in _PIXEL_MODULE:
        if keyword in ds:
            setattr(frame_ds, keyword, ds[keyword].value)
    frame_ds.NumberOfFrames = 1
    return frame_ds


def _little_endian_view(arr: np.ndarray) -> memoryview:
    """*arr*'s samples as little endian bytes, without a copy when they
    already are (a decoded frame is sent from the decoder's array)."""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def _encapsulated_value(frame: bytes, lease: Lease, frames: int,
                        following: Callable[[int], tuple[bytes, Lease]]) -> Iterator[bytes]:
    """An encapsulated Pixel Data value (PS3.5 A.4): an empty Basic Offset
    Table, one item per frame (*frame*, the first, held by *lease*, then
    ``following(n)`` for frame n from 0, with its lease), the delimiter.
    The frames are not all known before the first is sent, so there is no
    table of offsets to give. Each frame is let go, and its lease given
    back, once sent, before the next one is converted; the lease also when
    the body is abandoned."""
    try:
        yield _ITEM
        for number in range(frames):
            if number:
                frame, lease = following(number)
            odd = len(frame) % 2
            yield struct.pack("<HHI", 0xFFFE, 0xE000, len(frame) + odd)
            yield from held_pieces(frame)
            if odd:
                yield b"\0"  # items have even lengths
            frame = b""  # not held while the next one is converted
            lease.release()
        yield _SEQUENCE_END
    finally:
        lease.release()


def _leased(nbytes: int, make: Callable[[], _Frame]) -> tuple[_Frame, Lease]:
    """The frame *make* converts, with a lease of the process's pixel budget
    taken for *nbytes* (its decoded size) before the conversion starts, and
    brought down to the converted frame's own size (an encoded frame is
    smaller) once it is made."""
    lease = PIXELS.lease(nbytes)
    try:
        frame = make()
    except BaseException:
        lease.release()
        raise
    lease.resize(len(frame))
    return frame, lease


def encode_plan(opener: Opener, item: RetrieveItem, target: str, edit: Edit | None = None) -> CodecPlan | None:
    """Native little endian pixel data encoded to *target* (RLE, JPEG-LS,
    JPEG 2000 lossless) frame by frame, each read from storage by range;
    None when the object is not laid out for it. *edit*: as for
    :func:`stream_plan`."""
    from pydicom.pixels import get_decoder, get_encoder
    from pydicom.pixels.utils import as_pixel_options

    uid, stored = UID(target), UID(item.transfer_syntax_uid)
    if uid not in ENCODABLE or stored not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    pixels = _stored_pixels(opener, item)
    if pixels is None or pixels.length == _UNDEFINED:
        return None
    ds = dcmread(io.BytesIO(pixels.head))
    rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    samples, bits = _number(ds, "SamplesPerPixel", 1), _number(ds, "BitsAllocated", 0)
    frames = _number(ds, "NumberOfFrames", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if bits not in (8, 16, 32) or not rows or not columns or photometric.endswith("_422"):
        return None  # 1-bit, subsampled or odd layouts: the whole-object path
    frame_size = rows * columns * samples * bits // 8
    bits_stored = _number(ds, "BitsStored", bits)
    keeps_high_bits, signed = 0 < bits_stored < bits, _number(ds, "PixelRepresentation", 0) == 1
    if frames * frame_size > pixels.length:
        raise TransferSyntaxError(f"{item.sop_uid}: Pixel Data is shorter than its attributes say")
    encoder, native = get_encoder(uid), get_decoder(ExplicitVRLittleEndian)
    # One frame's image pixel description: as stored to read it (pydicom's
    # native decoder: planes interleaved, values sign-extended, as
    # pixel_array gives them), pixel by pixel to encode it (pydicom's
    # encoders read native pixel data as interleaved).
    frame_ds = _one_frame(ds)
    read_options = as_pixel_options(frame_ds, transfer_syntax_uid=ExplicitVRLittleEndian)
    read_options["pixel_keyword"] = "PixelData"
    if samples > 1:
        frame_ds.PlanarConfiguration = 0
    options = as_pixel_options(frame_ds)

    def encoded(index: int) -> bytes:
        with codec_work(frame_size):
            with opener(pixels.value_offset + index * frame_size, frame_size) as stream:
                data = read_exact(stream, frame_size)
            if len(data) != frame_size:
                raise TransferSyntaxError(f"{item.sop_uid}: frame {index + 1} is truncated in storage")
            try:
                # Every stored bit, bits above Bits Stored included: RLE keeps them
                # (encoded from bytes: an array is checked against Bits Stored), the
                # others are refused rather than drop any that carry data.
                if uid == RLELossless and samples == 1:
                    source: np.ndarray | bytes = data  # already the bytes RLE takes
                else:
                    raw, _ = native.as_array(data, as_rgb=False, **{**read_options, "correct_unused_bits": False})
                    source = _little_endian_bytes(raw) if uid == RLELossless else raw
                    if uid != RLELossless and keeps_high_bits:
                        if _unused_bits_carry_data(raw, bits_stored, signed):
                            raise ValueError(HIGH_BITS_IN_USE)
                        if signed:  # a negative value stored without its sign's extension gets it
                            source, _ = native.as_array(data, as_rgb=False, **read_options)
                        # Unsigned: the high bits are all zero, raw is already what the
                        # decoder's correction would give.
                    del raw
                del data
                with encoder_lock(uid):
                    return bytes(encoder.encode(source, **options))
            except Exception as exc:
                raise TransferSyntaxError(f"cannot encode {item.sop_uid} as {uid.name}: {exc}") from exc

    def following(index: int) -> tuple[bytes, Lease]:
        return _leased(frame_size, lambda: encoded(index))

    first, lease = _leased(frame_size, lambda: encoded(0))
    try:
        apply_overrides(ds, item.overrides)
        if samples > 1:
            ds.PlanarConfiguration = 0
        _without_offset_tables(ds)
        parts = _codec_header(ds, uid, opener, item, pixels.value_offset + pixels.length,
                              stored == ImplicitVRLittleEndian, b"OB", edit)
    except BaseException:
        lease.release()
        raise
    if parts is None:
        lease.release()
        return None
    meta, header, trailing = parts
    header += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED)
    pieces = _encapsulated_value(first, lease, frames, following)
    del first  # the generator holds it until it is sent, and no longer
    return CodecPlan(uid, meta, header, pieces, trailing, ExitStack())


@dataclass
class _Decoding:
    """A stored object's compressed frames, each decoded on its own when
    asked: between two frames nothing of the last one is held (pydicom's
    frame iterator kept the last compressed and decoded frame, two or three
    times a frame, per response, while it was sent)."""

    ds: Dataset  # the stored header (up to Pixel Data)
    stored: UID
    frames: int
    frame_bytes: int  # one frame decoded, from the header (what codec_work counts)
    end: int  # where the encapsulated Pixel Data ends
    opener: Opener
    resources: ExitStack
    source: BinaryIO  # the stored file
    index: list[list[tuple[int, int]]]  # each frame's fragments: file offset, length
    options: dict[str, object]
    sop_uid: str

    def frame(self, number: int) -> tuple[np.ndarray, dict[str, object]]:
        """Frame *number* (from 0) decoded, and its pixel description; the
        caller holds :func:`codec_work`."""
        from pydicom.pixels import get_decoder

        try:
            data = _one_frame_encapsulated(self.source, self.index[number])
            return get_decoder(self.stored).as_array(data, index=0, as_rgb=self.stored not in LOSSLESS_SOURCES,
                                                     **self.options)
        except Exception as exc:
            raise TransferSyntaxError(f"cannot decode frame {number + 1} of {self.sop_uid} ({self.stored.name}): "
                                      f"{_one_line(exc)}") from exc


def _one_frame_encapsulated(f: BinaryIO, fragments: list[tuple[int, int]]) -> bytearray:
    """One frame's fragments read as the encapsulated value of a one-frame
    object (an empty Basic Offset Table, one item), what pydicom decodes."""
    size = sum(length for _, length in fragments)
    # Read in place: one buffer, not the fragments and then their join.
    out = bytearray(16 + size + size % 2)
    out[:16] = _ITEM + struct.pack("<HHI", 0xFFFE, 0xE000, size + size % 2)
    view, at = memoryview(out), 16
    for offset, length in fragments:
        f.seek(offset)
        if f.readinto(view[at:at + length]) != length:
            raise ValueError("a frame is truncated in storage")
        at += length
    view.release()
    return out


def _decoding(pacs: Pacs, item: RetrieveItem) -> _Decoding | None:
    """*item*'s encapsulated pixel data opened for decoding frame by frame
    (the stored file, a local copy of a remote object), its frames located
    as the frames of WADO-RS are (:func:`pacs.frames.frame_index`: offset
    tables, fragment headers, end-of-image markers); None when the object
    is not laid out for it."""
    from pydicom.pixels.utils import as_pixel_options

    from .frames import FrameError, frame_index, pixel_info

    stored = UID(item.transfer_syntax_uid)
    if not stored.is_encapsulated or item.pixel_offset is None:
        return None
    resources = ExitStack()
    try:
        path = resources.enter_context(pacs.store.local_path(item.storage_key))
        stream = resources.enter_context(open(path, "rb"))  # noqa: SIM115
        opener: Opener = lambda offset, length: _Range(stream, offset)  # noqa: E731
        pixels = _stored_pixels(opener, item)
        if pixels is None or pixels.length != _UNDEFINED:
            resources.close()
            return None
        end = _encapsulated_end_at(opener, pixels.value_offset, item.size)
        if end is None:
            resources.close()
            return None
        ds = dcmread(io.BytesIO(pixels.head))
        try:
            info = pixel_info(Path(path), item, ds)
            index = frame_index(Path(path), info, ds)[:info.frames]
        except (FrameError, AttributeError, TypeError, ValueError):
            resources.close()
            return None  # frames that cannot be told apart: the whole-object path says why
        options = as_pixel_options(ds, transfer_syntax_uid=stored)
        options.update(number_of_frames=1, pixel_keyword="PixelData", pixel_vr="OB")
        options.pop("extended_offsets", None)  # of the whole object, not of one frame
    except BaseException:
        resources.close()
        raise
    return _Decoding(ds, stored, info.frames, info.frame_bytes, end, opener, resources, stream, index, options,
                     item.sop_uid)


def _decoded_description(ds: Dataset, image_pixel: dict[str, object], frames: int) -> None:
    """*ds*'s Image Pixel attributes made to describe its decoded frames, as
    pydicom's decompress() sets them."""
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if int(str(image_pixel["samples_per_pixel"])) > 1:
        ds.PlanarConfiguration = int(str(image_pixel["planar_configuration"]))
    if "NumberOfFrames" in ds or frames > 1:
        ds.NumberOfFrames = frames
    _without_offset_tables(ds)


def decode_plan(pacs: Pacs, item: RetrieveItem, target: str, edit: Edit | None = None) -> CodecPlan | None:
    """Compressed pixel data decoded to native little endian *target* frame
    by frame; None when the object is not laid out for it. *edit*: as for
    :func:`stream_plan`."""
    uid = UID(target)
    if uid not in LITTLE_ENDIAN_NATIVE:
        return None
    source = _decoding(pacs, item)
    if source is None:
        return None
    described: list[dict[str, object]] = []

    def decoded(number: int) -> memoryview:
        with codec_work(source.frame_bytes):
            arr, image_pixel = source.frame(number)
            if not described:
                described.append(image_pixel)
            return _little_endian_view(arr)

    try:
        first, lease = _leased(source.frame_bytes, lambda: decoded(0))
        source.resources.callback(lease.release)  # given back on any failure below, too
        frame_size = len(first)
        total = frame_size * source.frames
        if total >= _UNDEFINED:
            raise TransferSyntaxError(f"{item.sop_uid} decoded is larger than a Pixel Data value can be")
        ds = source.ds
        apply_overrides(ds, item.overrides)
        _decoded_description(ds, described[0], source.frames)
        vr = b"OB" if _number(ds, "BitsAllocated", 8) <= 8 else b"OW"
        parts = _codec_header(ds, uid, source.opener, item, source.end, False, vr, edit)
        if parts is None:
            source.resources.close()
            return None
        meta, header, trailing = parts
        header += _element_header(_PIXEL_DATA, vr, total + total % 2, uid == ImplicitVRLittleEndian)
    except BaseException:
        source.resources.close()
        raise

    def pieces(data: memoryview, lease: Lease) -> Iterator[bytes]:
        # Each frame's lease is given back once it is sent, before the next
        # one is decoded; and when the body is abandoned (a client gone).
        try:
            for number in range(source.frames):
                if number:
                    data, lease = _leased(source.frame_bytes, lambda: decoded(number))
                if len(data) != frame_size:
                    raise TransferSyntaxError(f"{item.sop_uid}: frame {number + 1} decodes to another size")
                yield from held_pieces(data)
                data = memoryview(b"")  # not held while the next frame is decoded
                lease.release()
            if total % 2:
                yield b"\0"
        finally:
            lease.release()

    length = len(header) + total + total % 2 + len(trailing)
    plan = CodecPlan(uid, meta, header, pieces(first, lease), trailing, source.resources, length)
    del first, lease  # the generator holds them until the frame is sent, and no longer
    return plan


def recode_plan(pacs: Pacs, item: RetrieveItem, target: str, edit: Edit | None = None) -> CodecPlan | None:
    """Compressed pixel data in another lossless compression (JPEG-LS to
    JPEG 2000, JPEG Lossless to RLE...), frame by frame: each stored frame
    decoded, encoded to *target* at once and sent, so that memory holds a
    frame or two whatever the object's size. The result is what the
    whole-object path gives (decoded as pydicom's decompress() does, encoded
    as its compress() does), with an empty Basic Offset Table as
    :func:`encode_plan` writes. None when the object is not laid out for it.
    *edit*: as for :func:`stream_plan`."""
    from pydicom.pixels import get_encoder
    from pydicom.pixels.utils import as_pixel_options

    uid, stored = UID(target), UID(item.transfer_syntax_uid)
    if uid not in ENCODABLE or uid == stored:
        return None
    source = _decoding(pacs, item)
    if source is None:
        return None
    try:
        encoder = get_encoder(uid)
        ds = source.ds
        options: dict[str, object] = {}

        def encoded(arr: np.ndarray) -> bytes:
            try:
                # RLE from bytes: an array is checked against Bits Stored,
                # and RLE keeps every bit of each byte anyway.
                frame: np.ndarray | bytes = _little_endian_bytes(arr) if uid == RLELossless else arr
                with encoder_lock(uid):
                    return bytes(encoder.encode(frame, **options))
            except Exception as exc:
                raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {_one_line(exc)}") \
                    from exc

        described: list[dict[str, object]] = []

        def recoded(number: int) -> bytes:
            with codec_work(source.frame_bytes):
                arr, image_pixel = source.frame(number)
                if not described:
                    # The decoded frame's description, interleaved (what the decoder
                    # gives), as compress() reads it from the decompressed dataset.
                    described.append(image_pixel)
                    frame_ds = _one_frame(ds)
                    _decoded_description(frame_ds, image_pixel, 1)
                    if _number(frame_ds, "SamplesPerPixel", 1) > 1:
                        frame_ds.PlanarConfiguration = 0
                    options.update(as_pixel_options(frame_ds))
                return encoded(arr)

        first, lease = _leased(source.frame_bytes, lambda: recoded(0))
        source.resources.callback(lease.release)  # given back on any failure below, too
        apply_overrides(ds, item.overrides)
        _decoded_description(ds, described[0], source.frames)
        if _number(ds, "SamplesPerPixel", 1) > 1:
            ds.PlanarConfiguration = 0
        parts = _codec_header(ds, uid, source.opener, item, source.end, False, b"OB", edit)
        if parts is None:
            source.resources.close()
            return None
        meta, header, trailing = parts
        header += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED)
    except BaseException:
        source.resources.close()
        raise

    def following(number: int) -> tuple[bytes, Lease]:
        return _leased(source.frame_bytes, lambda: recoded(number))

    pieces = _encapsulated_value(first, lease, source.frames, following)
    del first, lease  # the generator holds them until the frame is sent, and no longer
    return CodecPlan(uid, meta, header, pieces, trailing, source.resources)


def _little_endian_bytes(arr: np.ndarray) -> bytes:
    return bytes(_little_endian_view(arr))


class _Range(io.RawIOBase):
    """A range of an open file from *offset* (the file is shared: each read seeks)."""

    def __init__(self, stream: BinaryIO, offset: int) -> None:
        self._stream, self._pos = stream, offset

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self._stream.seek(self._pos)
        data = self._stream.read(n)
        self._pos += len(data)
        return data

    def close(self) -> None:  # the shared file stays open
        pass


# -- whole-object conversion (codec changes) -----------------------------------------------
def _interleaved(ds: Dataset) -> None:
    """Native colour pixels stored plane by plane (Planar Configuration 1)
    rewritten pixel by pixel. pydicom's encoders read native pixel data as
    interleaved whatever the attribute says: RLE then put the bytes of the
    wrong plane in each segment (PS3.5 Annex G), scrambled "lossless"."""
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        arr = ds.pixel_array  # samples last, whatever the stored arrangement
        ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        ds.PlanarConfiguration = 0


def decompress(ds: Dataset, stored: UID) -> None:
    """*ds*'s compressed pixel data decoded in place; lossless sources keep
    their colour space (see LOSSLESS_SOURCES)."""
    ds.decompress(generate_instance_uid=False, as_rgb=stored not in LOSSLESS_SOURCES)


HIGH_BITS_IN_USE = "bits above Bits Stored are in use (an overlay or padding): they would be dropped"


def high_bits_in_use(ds: Dataset) -> bool:
    """Whether native pixel words carry bits above Bits Stored (an overlay in
    the high bits, padding values): JPEG-LS and JPEG 2000 encode Bits Stored
    bits per sample and would drop them, yet decode "identical" once pydicom
    has masked them away."""
    from pydicom.pixels import get_decoder

    allocated = int(ds.get("BitsAllocated", 0) or 0)
    stored_bits = int(ds.get("BitsStored", allocated) or allocated)
    if "PixelData" not in ds or not 0 < stored_bits < allocated:
        return False
    decoder = get_decoder(UID(ds.file_meta.TransferSyntaxUID))
    raw, _ = decoder.as_array(ds, as_rgb=False, correct_unused_bits=False)
    return _unused_bits_carry_data(raw, stored_bits, int(ds.get("PixelRepresentation", 0) or 0) == 1)


def _unused_bits_carry_data(raw: np.ndarray, bits_stored: int, signed: bool) -> bool:
    """Whether the bits above Bits Stored of *raw* (samples as stored) hold
    anything but zeros or, for signed samples, the sign's extension: padding
    of that kind is what a decoder writes back, anything else is data."""
    width = raw.dtype.itemsize * 8
    if not 0 < bits_stored < width:
        return False
    words = np.ascontiguousarray(raw).view(np.dtype(f"u{raw.dtype.itemsize}")).reshape(-1)
    extension = (1 << (width - bits_stored)) - 1
    # A slice at a time: the temporaries stay a few MB, not several times a
    # 10 MB tomosynthesis frame.
    for start in range(0, words.size, _UNUSED_BITS_STEP):
        part = words[start:start + _UNUSED_BITS_STEP]
        high = part >> bits_stored
        if not signed:
            if high.any():
                return True
            continue
        negative = ((part >> (bits_stored - 1)) & 1).astype(bool)
        if ((high != 0) & ~(negative & (high == extension))).any():
            return True
    return False


_UNUSED_BITS_STEP = 1 << 18


# pylibjpeg-openjpeg's encoder is not thread-safe: two JPEG 2000 encodes at
# once (two viewers, or routing beside a WADO request) crashed the whole
# process with SIGSEGV. Its decoder and the other codecs are safe.
_J2K_ENCODER = threading.Lock()


def encoder_lock(uid: UID) -> contextlib.AbstractContextManager[object]:
    """Held around an encode to *uid*: one JPEG 2000 encode in the process at a time."""
    return _J2K_ENCODER if "JPEG 2000" in UID(uid).name else contextlib.nullcontext()


def has_pixels(ds: Dataset) -> bool:
    """Whether *ds* holds pixel data of any kind (integer or float)."""
    return any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def convert_dataset(ds: Dataset, stored: UID, uid: UID) -> None:
    """*ds*, read from an object stored in *stored*, rewritten in place for
    *uid*: byte-swapped, decoded, encoded losslessly. Raises ValueError (or
    the codec's error) when that cannot be done without changing a sample."""
    if stored == ExplicitVRBigEndian:
        if uid not in LITTLE_ENDIAN_NATIVE and uid not in ENCODABLE:
            raise ValueError(f"big endian objects are not converted to {uid.name}")
        _to_little_endian(ds)
        if "PixelData" in ds:
            pixels = ds["PixelData"]
            bits = int(ds.get("BitsAllocated", 8) or 8)
            swap = bits // 8 if bits > 8 else (2 if pixels.VR == "OW" else 1)
            pixels.value = _swapped(pixels.value, swap)
            pixels.VR = "OW" if swap > 1 else "OB"
        ds.file_meta.TransferSyntaxUID = stored = ExplicitVRLittleEndian
        # What the dataset now is: pydicom and pynetdicom encode by it, not by the file meta.
        ds.set_original_encoding(uid == ImplicitVRLittleEndian, True, ds.original_character_set)
        if uid in LITTLE_ENDIAN_NATIVE:
            ds.file_meta.TransferSyntaxUID = uid
            return
    if uid != stored and stored.is_compressed and stored != DeflatedExplicitVRLittleEndian:
        decompress(ds, stored)
    if uid == stored:
        return
    if uid in ENCODABLE and "PixelData" in ds:
        if uid != RLELossless and high_bits_in_use(ds):  # RLE keeps every bit of each byte
            raise ValueError(HIGH_BITS_IN_USE)
        _interleaved(ds)
        with encoder_lock(uid):
            ds.compress(uid, generate_instance_uid=False)
    elif uid.is_encapsulated and has_pixels(ds):
        raise ValueError(f"no lossless encoder of these pixels for {uid.name}")
    else:
        # Without pixel data (reports, SR, PDF) a compressed syntax
        # encodes the dataset exactly as Explicit VR Little Endian.
        ds.file_meta.TransferSyntaxUID = uid


def _convert_whole(pacs: Pacs, item: RetrieveItem, uid: UID) -> BinaryIO:
    """The object converted to *uid*, in a rewound spooled temporary file.
    Holds one of the process's conversion slots while it works."""
    stored = UID(item.transfer_syntax_uid)
    out = tempfile.SpooledTemporaryFile(max_size=8 * CHUNK, prefix="pacs-convert-")  # noqa: SIM115
    try:
        with _WHOLE_CONVERSIONS, pacs.store.local_path(item.storage_key) as path:
            size = check_whole_size(path, item, uid)
            # Its pixels count in the process's budget while they are in
            # memory; the result waits in the spooled file, not counted.
            with PIXELS.lease(size):
                ds = dcmread(path)
                apply_overrides(ds, item.overrides)
                try:
                    convert_dataset(ds, stored, uid)
                    ds.save_as(out, enforce_file_format=True)
                except Exception as exc:
                    raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: "
                                              f"{_one_line(exc)}") from exc
                finally:
                    del ds
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def whole_size(path: str | os.PathLike[str], item: RetrieveItem) -> int:
    """About what converting *item* whole holds at once, once per copy: its
    data set inflated (Deflated), else the larger of its stored size and
    the decoded pixel data its header describes; 0 for an object without an
    image (a report, an encapsulated PDF or STL: its elements are re-encoded,
    nothing is decoded). Reads the header only (a deflated object is
    inflated as it is counted, not kept)."""
    if UID(item.transfer_syntax_uid) == DeflatedExplicitVRLittleEndian:
        return max(item.size, _inflated_size(path, MAX_WHOLE_DECODED))
    try:
        header = dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable here is unreadable for the conversion too: it says why
        return item.size
    if "Rows" not in header:
        return 0
    return max(item.size, _pixel_bytes(header))


def _inflated_size(path: str | os.PathLike[str], limit: int) -> int:
    """Bytes of a deflated object's data set, counted up to just past *limit*."""
    with open(path, "rb") as f:
        try:
            f.seek(_meta_length(read_exact(f, 144)))
        except TransferSyntaxError:
            return 0
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        size = 0
        while size <= limit and (chunk := f.read(CHUNK)):
            while chunk and size <= limit:
                try:
                    size += len(inflater.decompress(chunk, CHUNK))
                except zlib.error:
                    return size
                chunk = inflater.unconsumed_tail
        return size


def check_whole_size(path: str | os.PathLike[str], item: RetrieveItem, uid: UID) -> int:
    """Refuse (:class:`TransferSyntaxError`: HTTP 406, a failed C-STORE
    sub-operation with the reason) to convert whole an object larger than
    ``MAX_WHOLE_DECODED``: held several times over in memory, a big one
    could have the process killed, every client with it. Returns its
    :func:`whole_size`."""
    size = whole_size(path, item)
    if size > MAX_WHOLE_DECODED:
        raise TransferSyntaxError(
            f"cannot convert {item.sop_uid} to {uid.name}: this conversion is made in memory, and the object is "
            f"more than the {MAX_WHOLE_DECODED >> 20} MB decoded it may take; it is available as stored")
    return size


def _one_line(exc: Exception) -> str:
    """An error for a client: the last line only (a codec's message may carry
    a whole traceback with the server's paths)."""
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else repr(exc)


def _file_chunks(stream: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := stream.read(CHUNK):
            yield chunk
    finally:
        stream.close()


def converted(pacs: Pacs, item: RetrieveItem, target: str) -> bytes:
    """The object re-encoded in *target* (Part 10 bytes), corrections
    applied; whole in memory, for small objects and tests."""
    return b"".join(_prepare(pacs, item, target))


def needs_conversion(item: RetrieveItem, target: str | None) -> bool:
    """Whether *item* in *target* is re-encoded rather than streamed as stored.

    An object with corrections is re-encoded (in its stored syntax unless
    asked otherwise) so the client sees the index's values.
    """
    return target not in (None, "*", item.transfer_syntax_uid) or bool(item.overrides)


def _prepare(pacs: Pacs, item: RetrieveItem, target: str) -> Iterator[bytes]:
    """The work that can fail done now; the bytes streamed when iterated."""
    uid = UID(target)
    reason = unservable_reason(item, target)
    if reason:
        raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {reason}")
    # A damaged file is the store's fault (500), not an unconvertible object (406).
    check_stored_size(pacs, item)
    try:
        plan = conversion_plan(pacs, item, target)
    except (TransferSyntaxError, StorageError):
        raise  # a store that cannot be read is "later" (503), not "never" (406)
    except Exception as exc:
        raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {_one_line(exc)}") from exc
    if plan is not None:
        return plan.part10()
    return _file_chunks(_convert_whole(pacs, item, uid))


def prepared_dataset(pacs: Pacs, item: RetrieveItem, target: str, opener: Opener | None = None) -> Iterator[bytes]:
    """The data set of *item* in *target* (the bytes after the File Meta), for
    a DIMSE message: like :func:`prepared_bytes`, what can fail (no decoder or
    encoder, the first frame's decode or encode, a whole conversion) is done
    now and raises :class:`TransferSyntaxError` before any byte is sent;
    pixel data are then streamed frame by frame where the codec allows."""
    uid = UID(target)
    reason = unservable_reason(item, target)
    if reason:
        raise TransferSyntaxError(reason)
    try:
        plan = conversion_plan(pacs, item, target, opener)
    except (TransferSyntaxError, StorageError):
        raise
    except Exception as exc:
        raise TransferSyntaxError(f"cannot convert to {uid.name}: {_one_line(exc)}") from exc
    if plan is not None:
        return plan.dataset()
    converted = _convert_whole(pacs, item, uid)
    try:
        # pydicom wrote the File Meta with its group length: skip it.
        converted.seek(_meta_length(read_exact(converted, 144)))
    except BaseException:
        converted.close()
        raise
    return _file_chunks(converted)


def conversion_plan(pacs: Pacs, item: RetrieveItem, target: str,
                    opener: Opener | None = None) -> StreamPlan | CodecPlan | None:
    """*item* in *target* laid out to stream: its header re-encoded with the
    pixel data copied (or byte-swapped), or its frames encoded or decoded one
    at a time (decoded, encoded, or both: one compression to another). None
    when only the whole-object path can do it (unusual layouts, Deflated or
    Big Endian objects to a compression)."""
    opener = opener or _store_opener(pacs, item.storage_key)
    plan: StreamPlan | CodecPlan | None = stream_plan(opener, item, target)
    if plan is None:
        plan = encode_plan(opener, item, target)
    if plan is None:
        plan = decode_plan(pacs, item, target)
    if plan is None:
        plan = recode_plan(pacs, item, target)
    return plan


def instance_bytes(pacs: Pacs, item: RetrieveItem, target: str | None) -> Iterator[bytes]:
    """The object in *target* syntax (None/"*": as stored, streamed)."""
    if not needs_conversion(item, target):
        yield from stream_stored(pacs, item)
    else:
        as_stored = target in (None, "*")
        yield from _prepare(pacs, item, item.transfer_syntax_uid if as_stored else str(target))


def prepared_bytes(pacs: Pacs, item: RetrieveItem, target: str | None) -> Iterator[bytes]:
    """Like :func:`instance_bytes`, but what can fail (reading and re-encoding
    the header, a codec that cannot encode these pixels, a stored object that
    cannot be decoded) happens now, so that its :class:`TransferSyntaxError`
    is raised before a response's status is sent rather than as a broken
    body. Pixel data are streamed when the codec does not change; otherwise
    the one converted object waits in a spooled temporary file."""
    if not needs_conversion(item, target):
        # Opened and its size checked now: a store that cannot be read is a
        # 503, a damaged object a 500, before the status line, not a 200
        # whose body breaks off or, worse, ends short as if complete.
        return _stored_chunks(_open_checked(pacs, item), item)
    as_stored = target in (None, "*")
    return _prepare(pacs, item, item.transfer_syntax_uid if as_stored else str(target))
