"""Part 10 framing for datasets received over the network.

DIMSE and some STOW clients deliver a bare dataset; we store Part 10 files
(preamble, ``DICM``, File Meta Information, then the dataset bytes exactly as
received). :class:`Part10Stream` presents that file as one seekable stream
without copying the (possibly large) dataset buffer.
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__

# Our implementation class UID: a 2.25 UUID-derived root, fixed for the product.
IMPLEMENTATION_CLASS_UID = "2.25.132483746928734634197305713452769384211"
IMPLEMENTATION_VERSION = f"FILMLESS_{__version__.replace('.', '')}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    tag = struct.pack("<HH", 0x0002, group_elem)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """Encode preamble + ``DICM`` + File Meta Information for one object.

    Hand-encoded (explicit VR little endian, PS3.10 7.1) because it runs once
    per received object and pydicom's general writer costs ~0.3 ms.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
            _element(0x0016, b"AE", source_ae.strip()[:16].encode("ascii", "replace")) if source_ae.strip() else b"",
        )
    )
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def dataset_start(stream: BinaryIO) -> tuple[int, str] | None:
    """(offset of the dataset, Transfer Syntax UID) of a Part 10 object read
    from the start of *stream*, from its File Meta Group Length (0002,0000);
    None when it has none or is no Part 10 object. The File Meta is framing
    a receiver writes (its AE title, its version): not the object."""
    head = _read_exactly(stream, 144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (length,) = struct.unpack("<L", head[140:144])
    if length > 1 << 16:
        return None
    meta = _read_exactly(stream, length)
    if len(meta) < length:
        return None
    pos, syntax = 0, ""
    while pos + 8 <= len(meta):
        group, element = struct.unpack("<HH", meta[pos : pos + 4])
        vr = meta[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            size, value_at = struct.unpack("<L", meta[pos + 8 : pos + 12])[0], pos + 12
        else:
            size, value_at = struct.unpack("<H", meta[pos + 6 : pos + 8])[0], pos + 8
        if (group, element) == (0x0002, 0x0010):
            syntax = meta[value_at : value_at + size].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + size
    return 144 + length, syntax


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    """*n* bytes (fewer only at the end): a raw or network stream may give less per read."""
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class PositionedReader(io.RawIOBase):
    """A read-only, seekable stream that keeps its own position (``_pos``)."""

    _pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos


class _Seekable(PositionedReader):
    """A read-only stream of *size* bytes that keeps its own position."""

    size = 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos


class Part10Stream(_Seekable):
    """Read-only, seekable concatenation of a small prefix and a large body."""

    def __init__(self, prefix: bytes, body: bytes | bytearray | memoryview) -> None:
        self._parts = (memoryview(prefix), memoryview(body).cast("B"))
        self._split = len(prefix)
        self.size = self._split + len(self._parts[1])
        self._pos = 0

    def dataset_view(self) -> tuple[int, memoryview]:
        """(offset in the object, the body's bytes): the received dataset,
        for readers that scan memory instead of reading a stream."""
        return self._split, self._parts[1]

    def reopen(self) -> Part10Stream:
        """A new reader over the same bytes, from the start."""
        return Part10Stream(self._parts[0], self._parts[1])

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        written = 0
        while written < len(out) and self._pos < self.size:
            if self._pos < self._split:
                src = self._parts[0][self._pos :]
            else:
                src = self._parts[1][self._pos - self._split :]
            n = min(len(src), len(out) - written)
            out[written : written + n] = src[:n]
            written += n
            self._pos += n
        return written

    def readall(self) -> bytes:
        return self.read(self.size - self._pos)

    def read(self, size: int | None = -1) -> bytes:
        # Fast path without a temporary buffer: pydicom reads tag by tag.
        if size is None or size < 0:
            size = self.size - self._pos
        pos = self._pos
        end = min(self.size, pos + size)
        self._pos = end
        if end <= self._split:
            return self._parts[0][pos:end].tobytes()
        if pos >= self._split:
            return self._parts[1][pos - self._split : end - self._split].tobytes()
        return self._parts[0][pos:].tobytes() + self._parts[1][: end - self._split].tobytes()


class Source(Protocol):
    """Where an object's bytes can be read from, as often as needed."""

    size: int

    def open(self) -> BinaryIO: ...


class BufferSource:
    """A received object held in memory: a Part 10 prefix plus the dataset."""

    def __init__(self, prefix: bytes, body: bytes | bytearray | memoryview) -> None:
        self._prefix = prefix
        self._body = body
        self.size = len(prefix) + memoryview(body).nbytes

    def open(self) -> Part10Stream:
        """A new independent reader over the object."""
        return Part10Stream(self._prefix, self._body)


class FileSource:
    """An object in a file (import, STOW spool)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)

    def open(self) -> io.BufferedReader:
        return open(self.path, "rb")  # noqa: SIM115 - the caller closes it


class _PreadStream(_Seekable):
    """Read-only, seekable: a small prefix, then *length* bytes of an open
    file from *offset*, read with ``pread`` (readers over one file descriptor
    never move each other's position)."""

    def __init__(self, prefix: bytes, fd: int, offset: int, length: int) -> None:
        self._prefix, self._fd, self._offset = memoryview(prefix), fd, offset
        self._split = len(prefix)
        self.size = self._split + length
        self._pos = 0

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")[: max(0, self.size - self._pos)]
        written = 0
        if self._pos < self._split and len(out):
            n = min(len(out), self._split - self._pos)
            out[:n] = self._prefix[self._pos : self._pos + n]
            written = n
        while written < len(out):
            n = os.preadv(self._fd, [out[written:]], self._offset + self._pos + written - self._split)
            if n <= 0:
                break  # the file is shorter than it was: the reader sees its end
            written += n
        self._pos += written
        return written


class FileBodySource:
    """A received dataset kept in a file (one too large to hold in memory):
    our Part 10 header, then the file's bytes from *offset* on. The file is
    the caller's, open for the source's lifetime."""

    def __init__(self, prefix: bytes, fd: int, offset: int, length: int) -> None:
        self._prefix, self._fd, self._offset, self._length = prefix, fd, offset, length
        self.size = len(prefix) + length

    def open(self) -> _PreadStream:
        """A new independent reader over the object."""
        return _PreadStream(self._prefix, self._fd, self._offset, self._length)


def new_instance(sop_class_uid: str) -> Dataset:
    """A new object this archive makes (a report's PDF, a key image note):
    Explicit VR Little Endian, ISO_IR 192, *sop_class_uid* and a new SOP
    Instance UID, in the dataset and its File Meta Information alike."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
