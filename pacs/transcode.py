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
    """Whether *item* can be produced in *target* (None or "*": as stored)."""
    if target in (None, "*", item.transfer_syntax_uid):
        return True
    uid = UID(target)
    return uid in UNCOMPRESSED or uid in ENCODABLE


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
        elif uid in ENCODABLE:
            ds.compress(uid, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = uid
    except Exception as exc:
        raise TransferSyntaxError(f"cannot convert {item.sop_uid} to {uid.name}: {exc}") from exc
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def instance_bytes(pacs: Pacs, item: RetrieveItem, target: str | None) -> Iterator[bytes]:
    """The object in *target* syntax (None/"*": as stored, streamed).

    An object with corrections is re-encoded (in its stored syntax unless
    asked otherwise) so the client sees the index's values.
    """
    as_stored = target in (None, "*", item.transfer_syntax_uid)
    if as_stored and not item.overrides:
        yield from stream_stored(pacs, item)
    else:
        yield converted(pacs, item, item.transfer_syntax_uid if as_stored else str(target))
