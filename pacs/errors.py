"""Errors that carry the status a peer will see.

DIMSE statuses follow PS3.4 Annex B (Storage) and PS3.7 C; the HTTP code is
what DICOMweb and the JSON API answer for the same failure.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from typing import Any


class Status(IntEnum):
    """C-STORE statuses used by the ingest path (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    OBJECT_TOO_LARGE = 0xA701
    STORAGE_FAILED = 0xA702
    INDEX_FAILED = 0xA703
    INVALID_DATASET = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    PROCESSING_FAILURE = 0x0110
    # Another object already holds this SOP Instance UID (PS3.7 C.4.2.1.4).
    DUPLICATE_SOP_INSTANCE = 0x0111
    # A rejection note (IHE IOCM) withdrew this instance: dcm4chee's
    # "subsequent occurrence of rejected object", which modalities and
    # routers that meet dcm4chee archives already know.
    REJECTED_INSTANCE = 0xA771


HTTP_FOR_STATUS: dict[int, int] = {
    Status.OUT_OF_RESOURCES: 503,
    Status.OBJECT_TOO_LARGE: 413,
    Status.STORAGE_FAILED: 503,
    Status.INDEX_FAILED: 503,
    Status.INVALID_DATASET: 400,
    Status.CANNOT_UNDERSTAND: 400,
    Status.SOP_CLASS_NOT_SUPPORTED: 415,
    Status.NOT_AUTHORIZED: 403,
    Status.PROCESSING_FAILURE: 500,
    Status.DUPLICATE_SOP_INSTANCE: 409,
    Status.REJECTED_INSTANCE: 409,
}


class PacsError(Exception):
    """Base of errors raised by the core."""


class RefusedRequest(PacsError):
    """A request the core refused, with the HTTP status a client is answered
    (the HTTP entry points turn it into that answer)."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class IngestError(PacsError):
    """An object was refused; ``status`` is the DICOM status to answer.
    ``header`` is the refused object's parsed header (a
    :class:`pacs.header.InstanceHeader`) when it could be read: which study
    and patient the refusal concerns, for the audit trail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = int(status)
        self.reason = reason
        self.header: Any = None

    @property
    def http_status(self) -> int:
        return HTTP_FOR_STATUS.get(self.status, 500)

    def __str__(self) -> str:
        return f"0x{self.status:04X}: {self.reason}"


def query_failure(log: logging.Logger, what: str, exc: Exception) -> tuple[int, str]:
    """The C-FIND status and comment for a query that raised *exc*.

    An unreachable index is "out of resources, try again" (A700), one log
    line per query; anything else is our bug: C000 and the traceback.
    """
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        log.warning("%s refused, the index is unavailable: %s", what, str(exc).splitlines()[0][:200])
        return Status.OUT_OF_RESOURCES, "the archive's index is unavailable; try again later"
    log.exception("%s failed", what)
    return Status.CANNOT_UNDERSTAND, f"{what} failed: {exc}"
