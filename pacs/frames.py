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
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ImplicitVRLittleEndian

from .app import Pacs
from .errors import PacsError
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
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


class FrameError(PacsError):
    """A frame or bulk data request that cannot be served; carries the HTTP status."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


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

    @property
    def frame_bytes(self) -> int:
        samples = self.samples
        if self.photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") and samples == 3 and not self.encapsulated:
            # PS3.3 C.7.6.3.1.2: native 4:2:2 keeps Y for every pixel and one
            # CB, CR pair per two pixels: two samples per pixel, not three.
            samples = 2
        return self.rows * self.columns * samples * self.bits_allocated // 8

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
    if not UID(item.transfer_syntax_uid).is_deflated:
        return False
    return "PixelData" in dcmread(path, defer_size=1024)


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
    if explicit:
        vr = head[4:6].decode("ascii", "replace")
        length = struct.unpack(order + "L", head[8:12])[0]
        offset = item.pixel_offset + 12
    else:
        vr = ""
        length = struct.unpack(order + "L", head[4:8])[0]
        offset = item.pixel_offset + 8
    return _info(ds, item, ts, offset, length, vr)


def _info(ds: Dataset, item: RetrieveItem, ts: UID, offset: int, length: int, vr: str,
          inflated: bytes | None = None) -> PixelInfo:
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
    )


def _inflated_info(path: Path, item: RetrieveItem, ts: UID) -> PixelInfo:
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise FrameError(f"instance {item.sop_uid} has no pixel data", 404)
    data = ds.PixelData
    return _info(ds, item, ts, 0, len(data), str(ds["PixelData"].VR), inflated=data)


@contextmanager
def local_object(pacs: Pacs, item: RetrieveItem) -> Iterator[Path]:
    with pacs.store.local_path(item.storage_key) as path:
        yield path


def encapsulated_frame(path: Path, info: PixelInfo, number: int) -> bytes:
    """Frame *number* (1-based) of encapsulated pixel data, as stored."""
    with path.open("rb") as f:
        f.seek(info.value_offset)
        for index, frame in enumerate(generate_frames(f, number_of_frames=info.frames), start=1):
            if index == number:
                return frame
    raise FrameError(f"frame {number} not found in the encapsulated pixel data", 404)


def native_frame(path: Path, info: PixelInfo, number: int) -> bytes:
    """Frame *number* (1-based) of native pixel data, little endian."""
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


def _read_value(path: Path, info: PixelInfo, start: int, size: int) -> bytes:
    """*size* bytes of the Pixel Data value from *start* (fewer at its end)."""
    if info.inflated is not None:
        return info.inflated[start: start + size]
    with path.open("rb") as f:
        f.seek(info.value_offset + start)
        return f.read(size)


def decoded_frame(path: Path, number: int) -> bytes:
    """Frame *number* decoded to native little-endian pixel bytes.

    A frame the codecs cannot decode is a 406 (PS3.18 8.7: the uncompressed
    representation asked for cannot be produced; 415 is for request bodies):
    the client can still take the frame as stored."""
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(str(path), index=number - 1, raw=True)
    except Exception as exc:
        raise FrameError(
            f"cannot decode frame {number} to application/octet-stream ({type(exc).__name__}: {exc}); "
            'retrieve it as stored instead (Accept: multipart/related; type="application/octet-stream"; '
            "transfer-syntax=*)", 406) from exc
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


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
