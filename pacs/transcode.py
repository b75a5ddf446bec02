"""Stored objects in the transfer syntax a client asked for.

As stored when it matches (streamed, never in memory); otherwise decoded with
pydicom + pylibjpeg and, for the syntaxes pydicom can encode losslessly
(RLE, JPEG-LS, JPEG 2000 lossless), re-encoded. One object in memory at a
time, only when converting.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from .app import Pacs
from .errors import PacsError
from .retrieve import RetrieveItem, apply_overrides

CHUNK = 1 << 20
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
# Lossless encoders pydicom has with the codecs we ship.
ENCODABLE = {RLELossless, JPEGLSLossless, JPEG2000Lossless}


class TransferSyntaxError(PacsError):
    """The object cannot be given in the requested syntax (HTTP 406)."""

    http_status = 406


def can_serve(item: RetrieveItem, target: str | None) -> bool:
    """Whether *item* can be produced in *target* (None or "*": as stored).

    Decided from the index alone, before a response starts: a conversion that
    would fail once the 200 is sent cannot be reported to the client.
    """
    if target in (None, "*", item.transfer_syntax_uid):
        return True
    uid = UID(target)
    if not (uid in UNCOMPRESSED or uid in ENCODABLE):
        return False
    # pydicom refuses to re-encode between byte orders (save_as raises): a
    # byte swap of every OW/OF/... value it does not do. Big Endian is retired
    # (PS3.5 A.3), so a 406 (PS3.18 8.7.3) is the honest answer both ways.
    return _big_endian(item.transfer_syntax_uid) == _big_endian(uid)


def _big_endian(transfer_syntax: str) -> bool:
    return transfer_syntax == ExplicitVRBigEndian


def stream_stored(pacs: Pacs, item: RetrieveItem) -> Iterator[bytes]:
    """The stored Part 10 bytes, chunk by chunk."""
    with pacs.store.open(item.storage_key) as stream:
        while chunk := stream.read(CHUNK):
            yield chunk


def converted(pacs: Pacs, item: RetrieveItem, target: str) -> bytes:
    """The object re-encoded in *target* (Part 10 bytes), corrections applied."""
    uid = UID(target)
    if not can_serve(item, target):
        raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}")
    ds = apply_overrides(dcmread(io.BytesIO(pacs.store.read_bytes(item.storage_key))), item.overrides)
    stored = UID(item.transfer_syntax_uid)
    try:
        if uid != stored and stored.is_compressed:
            ds.decompress(generate_instance_uid=False)
        if uid == stored:
            pass
        elif uid in ENCODABLE and "PixelData" in ds:
            ds.compress(uid, generate_instance_uid=False)
        else:
            # Without pixel data (reports, SR, PDF) a compressed syntax
            # encodes the dataset exactly as Explicit VR Little Endian.
            ds.file_meta.TransferSyntaxUID = uid
    except Exception as exc:
        raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {exc}") from exc
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError) as exc:
        # pydicom's encoding refusals (byte order, values it cannot write).
        raise TransferSyntaxError(f"cannot write {item.sop_uid} as {uid.name}: {exc}") from exc
    return out.getvalue()


def needs_conversion(item: RetrieveItem, target: str | None) -> bool:
    """Whether *item* in *target* is re-encoded rather than streamed as stored.

    An object with corrections is re-encoded (in its stored syntax unless
    asked otherwise) so the client sees the index's values.
    """
    return target not in (None, "*", item.transfer_syntax_uid) or bool(item.overrides)


def instance_bytes(pacs: Pacs, item: RetrieveItem, target: str | None) -> Iterator[bytes]:
    """The object in *target* syntax (None/"*": as stored, streamed)."""
    if not needs_conversion(item, target):
        yield from stream_stored(pacs, item)
    else:
        as_stored = target in (None, "*")
        yield converted(pacs, item, item.transfer_syntax_uid if as_stored else str(target))


def prepared_bytes(pacs: Pacs, item: RetrieveItem, target: str | None) -> Iterator[bytes]:
    """Like :func:`instance_bytes`, but a conversion happens now, so that its
    :class:`TransferSyntaxError` (a codec that cannot encode these pixels, a
    stored object that cannot be decoded) is raised before a response's
    status is sent rather than as a broken body. Streams when no conversion
    is needed; at most one object is held in memory."""
    if not needs_conversion(item, target):
        return stream_stored(pacs, item)
    as_stored = target in (None, "*")
    return iter([converted(pacs, item, item.transfer_syntax_uid if as_stored else str(target))])
