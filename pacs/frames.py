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

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated // 8

    @property
    def encapsulated(self) -> bool:
        return self.transfer_syntax.is_encapsulated


def header(path: Path) -> Dataset:
    """The stored object's header (everything before Pixel Data)."""
    return dcmread(path, stop_before_pixels=True)


def pixel_info(path: Path, item: RetrieveItem, ds: Dataset | None = None) -> PixelInfo:
    if item.pixel_offset is None:
        raise FrameError(f"instance {item.sop_uid} has no pixel data", 404)
    ds = ds if ds is not None else header(path)
    ts = UID(item.transfer_syntax_uid)
    if ts.is_deflated:
        raise FrameError("frames of deflated objects are not served", 406)
    explicit = ts != ImplicitVRLittleEndian
    order = "<" if ts.is_little_endian else ">"
    with path.open("rb") as f:
        f.seek(item.pixel_offset)
        head = f.read(12)
    if explicit:
        length = struct.unpack(order + "L", head[8:12])[0]
        offset = item.pixel_offset + 12
    else:
        length = struct.unpack(order + "L", head[4:8])[0]
        offset = item.pixel_offset + 8
    return PixelInfo(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.BitsAllocated),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        transfer_syntax=ts,
        value_offset=offset,
        value_length=length,
    )


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
    with path.open("rb") as f:
        f.seek(info.value_offset + (number - 1) * size)
        data = f.read(size)
    if len(data) != size:
        raise FrameError(f"frame {number} is truncated in storage", 500)
    if not info.transfer_syntax.is_little_endian and info.bits_allocated > 8:
        dtype = {16: ">u2", 32: ">u4"}.get(info.bits_allocated)
        if dtype:
            data = np.frombuffer(data, dtype=dtype).astype(dtype.replace(">", "<")).tobytes()
    return data


def decoded_frame(path: Path, number: int) -> bytes:
    """Frame *number* decoded to native little-endian pixel bytes."""
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(str(path), index=number - 1, raw=True)
    except Exception as exc:
        raise FrameError(f"cannot decode frame {number}: {exc}", 415) from exc
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
