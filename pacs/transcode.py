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
G), compressed pixel data is decoded one frame at a time from the stored
file. The first frame is converted before a response starts, so a codec's
refusal is still an error status. What remains (a compressed object to
another compression, unusual layouts) is converted whole: at most
``MAX_WHOLE_CONVERSIONS`` at once in the process, each written to a spooled
temporary file and released before its bytes are sent.
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
from typing import BinaryIO

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
# Whole-object conversions (codec changes) running at once in this process.
MAX_WHOLE_CONVERSIONS = 2
_WHOLE_CONVERSIONS = threading.BoundedSemaphore(MAX_WHOLE_CONVERSIONS)
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


def _trailing(opener: Opener, start: int, item: RetrieveItem, implicit: bool, target_implicit: bool) -> bytes | None:
    """The elements after Pixel Data re-encoded (little endian source), or
    None when there are too many bytes of them to hold."""
    if item.size - start > MAX_TRAILING:
        return None
    if item.size <= start:
        return b""
    with opener(start, item.size - start) as stream:
        rest = read_exact(stream, item.size - start)
    return _reencoded(rest, implicit, True, target_implicit)


def encode_plan(opener: Opener, item: RetrieveItem, target: str) -> CodecPlan | None:
    """Native little endian pixel data encoded to *target* (RLE, JPEG-LS,
    JPEG 2000 lossless) frame by frame, each read from storage by range;
    None when the object is not laid out for it."""
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
    frame_ds = Dataset()
    for keyword in _PIXEL_MODULE:
        if keyword in ds:
            setattr(frame_ds, keyword, ds[keyword].value)
    frame_ds.NumberOfFrames = 1
    read_options = as_pixel_options(frame_ds, transfer_syntax_uid=ExplicitVRLittleEndian)
    read_options["pixel_keyword"] = "PixelData"
    if samples > 1:
        frame_ds.PlanarConfiguration = 0
    options = as_pixel_options(frame_ds)

    def encoded(index: int) -> bytes:
        with opener(pixels.value_offset + index * frame_size, frame_size) as stream:
            data = read_exact(stream, frame_size)
        if len(data) != frame_size:
            raise TransferSyntaxError(f"{item.sop_uid}: frame {index + 1} is truncated in storage")
        try:
            # Every stored bit, bits above Bits Stored included: RLE keeps them
            # (encoded from bytes: an array is checked against Bits Stored), the
            # others are refused rather than drop any that carry data.
            raw, _ = native.as_array(data, as_rgb=False, **{**read_options, "correct_unused_bits": False})
            source: np.ndarray | bytes = raw
            if uid == RLELossless:
                source = _little_endian_bytes(raw)
            elif keeps_high_bits:
                if _unused_bits_carry_data(raw, bits_stored, signed):
                    raise ValueError(HIGH_BITS_IN_USE)
                source, _ = native.as_array(data, as_rgb=False, **read_options)
            with encoder_lock(uid):
                frame = encoder.encode(source, **options)
        except Exception as exc:
            raise TransferSyntaxError(f"cannot encode {item.sop_uid} as {uid.name}: {exc}") from exc
        return frame + b"\0" * (len(frame) % 2)

    first = encoded(0)
    trailing = _trailing(opener, pixels.value_offset + pixels.length, item, stored == ImplicitVRLittleEndian, False)
    if trailing is None:
        return None
    apply_overrides(ds, item.overrides)
    if samples > 1:
        ds.PlanarConfiguration = 0
    for tag in (0x7FE00001, 0x7FE00002):  # an extended offset table of other pixels
        if tag in ds:
            del ds[tag]
    meta, header = _encoded_header(ds, uid)

    def pieces() -> Iterator[bytes]:
        yield _ITEM  # an empty Basic Offset Table
        for index in range(frames):
            frame = first if index == 0 else encoded(index)
            yield struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame
        yield _SEQUENCE_END

    header += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, _UNDEFINED)
    return CodecPlan(uid, meta, header, pieces(), trailing, ExitStack())


def decode_plan(pacs: Pacs, item: RetrieveItem, target: str) -> CodecPlan | None:
    """Compressed pixel data decoded to native little endian *target* frame
    by frame (pydicom + pylibjpeg reading the stored file, a local copy of a
    remote object); None when the object is not laid out for it."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    uid, stored = UID(target), UID(item.transfer_syntax_uid)
    if uid not in LITTLE_ENDIAN_NATIVE or not stored.is_encapsulated or item.pixel_offset is None:
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
        options = as_pixel_options(ds, transfer_syntax_uid=stored)
        options["pixel_keyword"] = "PixelData"
        options["pixel_vr"] = "OB"
        frames = int(options.get("number_of_frames", 1) or 1)
        source = resources.enter_context(open(path, "rb"))  # noqa: SIM115
        source.seek(pixels.value_offset)
        try:
            decoded = get_decoder(stored).iter_array(source, validate=True, as_rgb=stored not in LOSSLESS_SOURCES,
                                                     **options)
            arr, image_pixel = next(decoded)
        except Exception as exc:
            raise TransferSyntaxError(f"cannot decode {item.sop_uid} ({stored.name}): {exc}") from exc
        first = _little_endian_bytes(arr)
        frame_size = len(first)
        total = frame_size * frames
        if total >= _UNDEFINED:
            raise TransferSyntaxError(f"{item.sop_uid} decoded is larger than a Pixel Data value can be")
        trailing = _trailing(opener, end, item, False, uid == ImplicitVRLittleEndian)
        if trailing is None:
            resources.close()
            return None
        apply_overrides(ds, item.overrides)
        # What pydicom's decompress() sets.
        ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
        if int(image_pixel["samples_per_pixel"]) > 1:
            ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
        if "NumberOfFrames" in ds or frames > 1:
            ds.NumberOfFrames = frames
        for tag in (0x7FE00001, 0x7FE00002):  # the extended offset table of the compressed frames
            if tag in ds:
                del ds[tag]
        meta, header = _encoded_header(ds, uid)
        implicit = uid == ImplicitVRLittleEndian
        vr = b"OB" if _number(ds, "BitsAllocated", 8) <= 8 else b"OW"
        header += _element_header(_PIXEL_DATA, vr, total + total % 2, implicit)
    except BaseException:
        resources.close()
        raise

    def pieces() -> Iterator[bytes]:
        yield first
        count = 1
        for arr, _ in decoded:
            data = _little_endian_bytes(arr)
            if len(data) != frame_size:
                raise TransferSyntaxError(f"{item.sop_uid}: frame {count + 1} decodes to another size")
            count += 1
            yield data
        if count != frames:
            raise TransferSyntaxError(f"{item.sop_uid}: {count} frames decoded, {frames} expected")
        if total % 2:
            yield b"\0"

    length = len(header) + total + total % 2 + len(trailing)
    return CodecPlan(uid, meta, header, pieces(), trailing, resources, length)


def _little_endian_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


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
    words = np.ascontiguousarray(raw).view(np.dtype(f"u{raw.dtype.itemsize}"))
    high = words >> bits_stored
    if not signed:
        return bool(high.any())
    negative = ((words >> (bits_stored - 1)) & 1).astype(bool)
    extension = (1 << (width - bits_stored)) - 1
    return bool(((high != 0) & ~(negative & (high == extension))).any())


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
        with _WHOLE_CONVERSIONS:
            with pacs.store.local_path(item.storage_key) as path:
                ds = dcmread(path)
            apply_overrides(ds, item.overrides)
            try:
                convert_dataset(ds, stored, uid)
                ds.save_as(out, enforce_file_format=True)
            except Exception as exc:
                raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {_one_line(exc)}") from exc
            finally:
                del ds
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


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
    at a time. None when only the whole-object path can do it (another
    compression as target of a compressed object, unusual layouts)."""
    opener = opener or _store_opener(pacs, item.storage_key)
    plan: StreamPlan | CodecPlan | None = stream_plan(opener, item, target)
    if plan is None:
        plan = encode_plan(opener, item, target)
    if plan is None:
        plan = decode_plan(pacs, item, target)
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
