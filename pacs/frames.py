"""Frames and bulk data of stored objects, read without loading whole objects.

WADO-RS frames and rendering need one frame of what may be a 1 GB
multi-frame object: native pixel data is read by byte range, encapsulated
pixel data fragment by fragment from the stored file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian

from .app import Pacs
from .errors import RefusedRequest
from .retrieve import RetrieveItem

# PS3.18 Table 8.7.3-4 (and 8.7.4): media type of a compressed frame by transfer syntax.
FRAME_MEDIA_TYPE = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # PS3.18's current name; image/x-dicom-rle when asked so
}


PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00010, 0x7FE00008, 0x7FE00009
# The top-level pixel attributes (PS3.18 10.4.3.3.6: the Pixel Data resource
# is whichever of them the object holds) and the VR each always has; Pixel
# Data's is OB or OW by transfer syntax (:func:`pixel_element`).
PIXEL_TAGS = {FLOAT_PIXEL_DATA: "OF", DOUBLE_FLOAT_PIXEL_DATA: "OD", PIXEL_DATA: "OW"}
_PIXEL_KEYWORDS = {"FloatPixelData": FLOAT_PIXEL_DATA, "DoubleFloatPixelData": DOUBLE_FLOAT_PIXEL_DATA,
                   "PixelData": PIXEL_DATA}



class FrameError(RefusedRequest):
    """A frame or bulk data request that cannot be served; carries the HTTP status."""


@dataclass(frozen=True)
class PixelInfo:
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    transfer_syntax: UID
    value_offset: int  # file offset of the Pixel Data value
    value_length: int  # 0xFFFFFFFF when encapsulated
    photometric: str = ""
    pixel_vr: str = ""  # Pixel Data's VR where the file says it (explicit VR)
    # The Pixel Data value of a deflated object, inflated: such a file
    # cannot be read by byte range.
    inflated: bytes | None = None
    # Which pixel attribute the object holds: Pixel Data, or the Float /
    # Double Float Pixel Data of a Parametric Map (PS3.3 C.7.6.24, C.7.6.25).
    tag: int = PIXEL_DATA

    @property
    def frame_bytes(self) -> int:
        """Bytes of one native frame sent as its own value (1-bit frames
        padded to a whole byte)."""
        samples = self.samples
        if self.photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") and samples == 3 and not self.encapsulated:
            # PS3.3 C.7.6.3.1.2: native 4:2:2 keeps Y for every pixel and one
            # CB, CR pair per two pixels: two samples per pixel, not three.
            samples = 2
        return (self.rows * self.columns * samples * self.bits_allocated + 7) // 8

    @property
    def encapsulated(self) -> bool:
        return self.transfer_syntax.is_encapsulated


def header(path: Path) -> Dataset:
    """The stored object's header (everything before Pixel Data)."""
    return dcmread(path, stop_before_pixels=True)


def has_pixel_data(path: Path, item: RetrieveItem) -> bool:
    """Whether the stored object has Pixel Data. The index knows its offset,
    except in a deflated object, whose dataset is inflated to see."""
    if item.pixel_offset is not None:
        return True
    return pixel_element(path, item) is not None


def pixel_element(path: Path, item: RetrieveItem) -> tuple[int, str] | None:
    """The stored object's pixel attribute, as (tag, VR) for its metadata
    and BulkDataURI: Pixel Data (OB when encapsulated, else OW), Float
    Pixel Data (OF) or Double Float Pixel Data (OD); None without one. The
    tag is read where the index says the pixel data starts (a deflated
    object, which has no such offset, is inflated to see)."""
    ts = UID(item.transfer_syntax_uid)
    if ts.is_deflated:
        ds = dcmread(path, defer_size=1024)
        tag = next((t for k, t in _PIXEL_KEYWORDS.items() if k in ds), None)
    elif item.pixel_offset is None:
        return None
    else:
        with path.open("rb") as f:
            f.seek(item.pixel_offset)
            tag = _tag_of(f.read(4), ts)
    if tag is None:
        return None
    if tag == PIXEL_DATA:
        return tag, "OB" if ts.is_encapsulated else "OW"
    return tag, PIXEL_TAGS.get(tag, "OW")


def _tag_of(head: bytes, ts: UID) -> int | None:
    """The element tag the first 4 bytes of an element header give; a tag
    that is none of the pixel attributes reads as Pixel Data (the index's
    offset found it as one)."""
    if len(head) < 4:
        return None
    group, element = struct.unpack(("<" if ts.is_little_endian else ">") + "HH", head)
    tag = group << 16 | element
    return tag if tag in PIXEL_TAGS else PIXEL_DATA


def _number(ds: Dataset, keyword: str, default: int) -> int:
    """An IS/US value as int; *default* when absent, empty or invalid ('1A')."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def pixel_info(path: Path, item: RetrieveItem, ds: Dataset | None = None) -> PixelInfo:
    ts = UID(item.transfer_syntax_uid)
    if ts.is_deflated:
        # Deflated Explicit VR Little Endian: no byte offsets into the file;
        # the object is inflated (pydicom) and its frames cut from the value.
        return _inflated_info(path, item, ts)
    if item.pixel_offset is None:
        raise FrameError(f"instance {item.sop_uid} has no pixel data", 404)
    ds = ds if ds is not None else header(path)
    explicit = ts != ImplicitVRLittleEndian
    order = "<" if ts.is_little_endian else ">"
    with path.open("rb") as f:
        f.seek(item.pixel_offset)
        head = f.read(12)
    if explicit and head[4:6] not in _PIXEL_VRS and head[4:8] == b"\xff\xff\xff\xff":
        # Written in Implicit VR under an explicit syntax's name (pydicom's
        # SC_rgb_jpeg.dcm; pydicom reads such headers too): the value
        # follows the length, not a VR. Read as explicit, the offsets were
        # 4 bytes off (a 500: "unexpected tag (0000,0000)").
        explicit = False
    if explicit:
        vr = head[4:6].decode("ascii", "replace")
        length = struct.unpack(order + "L", head[8:12])[0]
        offset = item.pixel_offset + 12
    else:
        vr = ""
        length = struct.unpack(order + "L", head[4:8])[0]
        offset = item.pixel_offset + 8
    return _info(ds, item, ts, offset, length, vr, tag=_tag_of(head[:4], ts) or PIXEL_DATA)


def _info(ds: Dataset, item: RetrieveItem, ts: UID, offset: int, length: int, vr: str,
          inflated: bytes | None = None, tag: int = PIXEL_DATA) -> PixelInfo:
    return PixelInfo(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples=_number(ds, "SamplesPerPixel", 1),
        bits_allocated=int(ds.BitsAllocated),
        frames=_number(ds, "NumberOfFrames", item.frames or 1),
        transfer_syntax=ts,
        value_offset=offset,
        value_length=length,
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
        pixel_vr=vr,
        inflated=inflated,
        tag=tag,
    )


def _inflated_info(path: Path, item: RetrieveItem, ts: UID) -> PixelInfo:
    ds = dcmread(path)
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise FrameError(f"instance {item.sop_uid} has no pixel data", 404)
    data = ds[keyword].value
    return _info(ds, item, ts, 0, len(data), str(ds[keyword].VR), inflated=data, tag=_PIXEL_KEYWORDS[keyword])


@contextmanager
def local_object(pacs: Pacs, item: RetrieveItem) -> Iterator[Path]:
    with pacs.store.local_path(item.storage_key) as path:
        yield path


_PIXEL_VRS = {b"OB", b"OW", b"UN", b"OF", b"OD", b"OL", b"OV"}
_ITEM = 0xE000FFFE  # (FFFE,E000) read as a little-endian uint32
_SEQUENCE_END = 0xE0DDFFFE
_UNDEFINED = 0xFFFFFFFF
# JPEG markers that end a frame's codestream (EOI; J2K's EOC is the same bytes).
_END_OF_IMAGE = b"\xff\xd9"

Fragment = tuple[int, int]  # file offset of a fragment's value, its length


def frame_index(path: Path, info: PixelInfo, ds: Dataset | None = None) -> list[list[Fragment]]:
    """Where each frame of encapsulated pixel data is: its fragments' file
    offsets and lengths, found once per request (reading a frame is then one
    seek, whatever its number).

    One pass over the item headers, seeking past each fragment's value; the
    fragments are then grouped into frames by the Extended Offset Table or
    the Basic Offset Table when it agrees with the fragments found, else one
    fragment per frame when the counts match, else by the end-of-image
    marker at the end of a frame's last fragment (as pydicom does). A
    stream that cannot be cut into its frames is a :class:`FrameError` 422,
    never a 500."""
    if info.inflated is not None:
        raise FrameError("encapsulated pixel data in a deflated object is not supported", 422)
    with path.open("rb") as f:
        bot, fragments, starts = _walk_fragments(f, info)
        frames = _grouped(f, info, ds, fragments, starts, bot)
    if len(frames) < info.frames:
        raise FrameError(f"the encapsulated pixel data holds {len(frames)} frame(s), "
                         f"not the {info.frames} the object declares", 422)
    return frames


def fragments(path: Path, info: PixelInfo) -> list[Fragment]:
    """Every fragment of encapsulated pixel data, in order (file offset of
    its value, its length): one pass over the item headers. A video's
    stream (PS3.5 8.2.5-8.2.7: one stream over all fragments) is their
    values concatenated."""
    if info.inflated is not None:
        raise FrameError("encapsulated pixel data in a deflated object is not supported", 422)
    with path.open("rb") as f:
        return _walk_fragments(f, info)[1]


def _walk_fragments(f: BinaryIO, info: PixelInfo) -> tuple[list[int], list[Fragment], dict[int, int]]:
    """The Basic Offset Table, the fragments, and each fragment's index by
    the offset of its item from the first fragment's (what offset tables
    count): :class:`FrameError` 422 when the items are malformed."""
    f.seek(info.value_offset)
    tag, length = _item_header(f)
    if tag != _ITEM or length == _UNDEFINED or length % 4:
        raise FrameError("the encapsulated pixel data does not start with an offset table item "
                         "(PS3.5 A.4): its frames cannot be found", 422)
    table = f.read(length)
    bot = list(struct.unpack(f"<{length // 4}L", table)) if len(table) == length else []
    first = f.tell()
    found: list[Fragment] = []
    starts: dict[int, int] = {}  # offset from the first fragment's item -> fragment index
    while True:
        at = f.tell()
        tag, length = _item_header(f)
        if tag == _SEQUENCE_END or tag is None:
            break  # the end (a file cut short ends the list too: frames found so far)
        if tag != _ITEM or length == _UNDEFINED:
            raise FrameError(f"unexpected element ({tag & 0xFFFF:04X},{tag >> 16:04X}) among the pixel data "
                             "fragments: the encapsulated pixel data is malformed", 422)
        starts[at - first] = len(found)
        found.append((at + 8, length))
        f.seek(length, 1)
    return bot, found, starts


def read_span(path: Path, pieces: list[Fragment], start: int, end: int,
              chunk: int = 1 << 20) -> Iterator[bytes]:
    """Bytes *start* .. *end* - 1 of the pieces' values laid end to end,
    read from the file a chunk at a time (a video of several GB is never
    in memory). A piece shorter in the file than its length is a
    :class:`FrameError` 500: the stored object is truncated."""
    with path.open("rb") as f:
        base = 0
        for offset, length in pieces:
            lo, hi = max(start, base), min(end, base + length)
            base += length
            if lo >= hi:
                continue
            f.seek(offset + lo - (base - length))
            left = hi - lo
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise FrameError("the pixel data is truncated in storage", 500)
                left -= len(data)
                yield data


def _item_header(f: BinaryIO) -> tuple[int | None, int]:
    head = f.read(8)
    if len(head) < 8:
        return None, 0
    tag, length = struct.unpack("<LL", head)
    return tag, length


def _by_offsets(offsets: list[int], fragments: list[Fragment], starts: dict[int, int]) -> list[list[Fragment]] | None:
    """Fragments grouped at the given item offsets; None when they are not
    increasing offsets of fragments found (an offset table not to trust)."""
    if not offsets or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
        return None
    indexes = [starts.get(o) for o in offsets]
    if any(i is None for i in indexes):
        return None
    bounds = [*indexes, len(fragments)]
    return [fragments[bounds[n]:bounds[n + 1]] for n in range(len(offsets))]  # type: ignore[misc]


def _grouped(f: BinaryIO, info: PixelInfo, ds: Dataset | None, fragments: list[Fragment],
             starts: dict[int, int], bot: list[int]) -> list[list[Fragment]]:
    count = info.frames
    if ds is not None and "ExtendedOffsetTable" in ds:
        raw = ds.ExtendedOffsetTable
        if isinstance(raw, bytes) and len(raw) == 8 * count:
            grouped = _by_offsets(list(struct.unpack(f"<{count}Q", raw)), fragments, starts)
            if grouped is not None:
                return grouped
    if len(bot) == count:
        grouped = _by_offsets(bot, fragments, starts)
        if grouped is not None:
            return grouped
    if count == 1:
        return [fragments] if fragments else []
    if len(fragments) == count:
        return [[fragment] for fragment in fragments]
    # More fragments than frames, no table to trust: a frame ends with the
    # fragment whose data ends with an end-of-image marker (padding allowed).
    frames: list[list[Fragment]] = []
    current: list[Fragment] = []
    for offset, length in fragments:
        current.append((offset, length))
        f.seek(offset + max(0, length - 4))
        if _END_OF_IMAGE in f.read(min(length, 4)):
            frames.append(current)
            current = []
    if current and frames:
        frames[-1].extend(current)
    elif current:
        frames.append(current)
    if len(frames) != count:
        raise FrameError(f"the {len(fragments)} pixel data fragments cannot be told apart into {count} frames "
                         "(no valid offset table, no end-of-image markers to follow)", 422)
    return frames


def read_fragments(f: BinaryIO, fragments: list[Fragment]) -> bytes:
    """One frame's bytes: its fragments' values, concatenated."""
    parts = []
    for offset, length in fragments:
        f.seek(offset)
        data = f.read(length)
        if len(data) < length:
            raise FrameError("a frame is truncated in storage", 500)
        parts.append(data)
    return b"".join(parts)


class FrameReader:
    """The frames of one stored object, for one request: the encapsulated
    frames' offsets are found once (:func:`frame_index`), each frame is
    then read by offset, one in memory at a time."""


    def __init__(self, path: Path, info: PixelInfo, ds: Dataset | None = None) -> None:
        self.path = path
        self.info = info
        self._ds = ds
        self._index: list[list[Fragment]] | None = None

    @property
    def header(self) -> Dataset:
        if self._ds is None:
            self._ds = header(self.path)
        return self._ds

    @property
    def index(self) -> list[list[Fragment]]:
        if self._index is None:
            self._index = frame_index(self.path, self.info, self.header)
        return self._index

    def stored(self, number: int) -> bytes:
        """Frame *number* (1-based) as stored: native bytes or the codestream."""
        if not self.info.encapsulated:
            return native_frame(self.path, self.info, number)
        with self.path.open("rb") as f:
            return read_fragments(f, self.index[number - 1])

    def decoded(self, number: int) -> bytes | memoryview:
        """Frame *number* as native little-endian pixels, as the instance
        converted to Explicit VR Little Endian has them (lossy YBR sources
        as RGB); a decoded frame is a view of the decoder's array (no copy)."""
        if not self.info.encapsulated:
            return native_frame(self.path, self.info, number)
        return decode_frame(self.stored(number), self.header, self.info.transfer_syntax, number)


def encapsulated_frame(path: Path, info: PixelInfo, number: int) -> bytes:
    """Frame *number* (1-based) of encapsulated pixel data, as stored (one
    frame: several use a :class:`FrameReader`, which indexes them once)."""
    return FrameReader(path, info).stored(number)


def native_frame(path: Path, info: PixelInfo, number: int) -> bytes:
    """Frame *number* (1-based) of native pixel data, little endian."""
    if info.bits_allocated == 1:
        return _one_bit_native_frame(path, info, number)
    size = info.frame_bytes
    start = (number - 1) * size
    big_endian = not info.transfer_syntax.is_little_endian
    # OW in Big Endian is byte-swapped per 16-bit word even when the pixels
    # are 8-bit (PS3.5 7.3): read whole words around the frame, swap, cut.
    words = big_endian and info.bits_allocated == 8 and info.pixel_vr == "OW"
    first = start - start % 2 if words else start
    end = start + size + (start + size) % 2 if words else start + size
    data = _read_value(path, info, first, end - first)
    if len(data) < start + size - first:
        raise FrameError(f"frame {number} is truncated in storage", 500)
    if words:
        data = data[: len(data) - len(data) % 2]
        data = np.frombuffer(data, dtype="<u2").byteswap().tobytes()[start - first: start - first + size]
    elif big_endian and info.bits_allocated > 8:
        dtype = {16: ">u2", 32: ">u4", 64: ">u8"}.get(info.bits_allocated)
        if dtype:
            data = np.frombuffer(data, dtype=dtype).astype(dtype.replace(">", "<")).tobytes()
    return data


def one_bit_pixels(packed: bytes, first: int, count: int) -> np.ndarray:
    """Pixels *first* .. *first* + *count* - 1 of 1-bit pixel data (one
    0/1 byte each; fewer where the data ends). The pixels of all frames are
    packed end to end, least significant bit first (PS3.5 8.1.1), so a frame
    of a size not a multiple of 8 starts inside a byte."""
    data = np.frombuffer(packed, dtype=np.uint8)[first // 8: (first + count + 7) // 8]
    return np.unpackbits(data, bitorder="little")[first % 8: first % 8 + count]


def _one_bit_native_frame(path: Path, info: PixelInfo, number: int) -> bytes:
    """Frame *number* of 1-bit pixel data as a value of its own (PS3.18
    frames), its first pixel in bit 0 (PS3.5 8.1.1). Cut at whole bytes of
    the packed frames, a 5x5 SEG's frame 1 lost its last bit and frames 2
    on were bit-shifted."""
    count = info.rows * info.columns * info.samples
    first = (number - 1) * count
    data = _read_value(path, info, first // 8, (first % 8 + count + 7) // 8)
    pixels = one_bit_pixels(data, first % 8, count)
    if pixels.size < count:
        raise FrameError(f"frame {number} is truncated in storage", 500)
    return np.packbits(pixels, bitorder="little").tobytes()


def _read_value(path: Path, info: PixelInfo, start: int, size: int) -> bytes:
    """*size* bytes of the Pixel Data value from *start* (fewer at its end)."""
    if info.inflated is not None:
        return info.inflated[start: start + size]
    with path.open("rb") as f:
        f.seek(info.value_offset + start)
        return f.read(size)


def decode_frame(data: bytes, ds: Dataset, ts: UID, number: int) -> memoryview:
    """One compressed frame decoded to native little-endian pixel bytes,
    as instance conversion decodes it (:func:`pacs.transcode.decode_plan`:
    YBR of lossy sources as RGB, lossless ones' samples as they are): a
    view of the decoder's array, not a copy (a 17 MB frame was held two or
    three times while it was made).

    A frame the codecs cannot decode is a 406 (PS3.18 8.7: the uncompressed
    representation asked for cannot be produced; 415 is for request bodies):
    the client can still take the frame as stored."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    from .transcode import LOSSLESS_SOURCES, codec_work

    frame_bytes = (_number(ds, "Rows", 0) * _number(ds, "Columns", 0) * _number(ds, "SamplesPerPixel", 1)
                   * _number(ds, "BitsAllocated", 8) + 7) // 8
    # Takes its turn with the conversions of whole objects (pacs.transcode).
    with codec_work(frame_bytes):
        try:
            options = as_pixel_options(ds, transfer_syntax_uid=ts)
            options.update(number_of_frames=1, pixel_keyword="PixelData", pixel_vr="OB")
            arr, _ = get_decoder(ts).as_array(encapsulate([data]), index=0, as_rgb=ts not in LOSSLESS_SOURCES,
                                              **options)
        except Exception as exc:
            raise _undecodable(number, exc) from exc
        return _native_view(arr)


def _undecodable(number: int, exc: Exception) -> FrameError:
    """A frame the codecs cannot decode: 406 (PS3.18 8.7), the client can take it as stored."""
    return FrameError(
        f"cannot decode frame {number} to application/octet-stream ({type(exc).__name__}: {exc}); "
        'retrieve it as stored instead (Accept: multipart/related; type="application/octet-stream"; '
        "transfer-syntax=*)", 406)


def _native_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def _native_view(arr: np.ndarray) -> memoryview:
    """*arr*'s samples as little-endian bytes, copied only when they are not already."""
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return memoryview(little).cast("B")


def decoded_frame(path: Path, number: int) -> bytes:
    """Frame *number* decoded to native little-endian pixel bytes.

    A frame the codecs cannot decode is a 406 (PS3.18 8.7: the uncompressed
    representation asked for cannot be produced; 415 is for request bodies):
    the client can still take the frame as stored."""
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(str(path), index=number - 1, raw=True)
    except Exception as exc:
        raise _undecodable(number, exc) from exc
    return _native_bytes(arr)


def check_numbers(info: PixelInfo, numbers: list[int]) -> None:
    bad = [n for n in numbers if n < 1 or n > info.frames]
    if bad:
        raise FrameError(f"frame numbers {bad} out of range 1..{info.frames}", 404)


def copy_range(stream: BinaryIO, length: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield *length* bytes of *stream* in chunks."""
    left = length
    while left > 0:
        data = stream.read(min(chunk, left))
        if not data:
            return
        left -= len(data)
        yield data
