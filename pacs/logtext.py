"""Text a network peer sent, as a log line may carry it (CWE-117).

A DICOM peer chooses its AE titles, its implementation version name, the
UIDs of its requests, and pynetdicom quotes them in its error messages: a
newline in one of them wrote whole forged lines into the server log (dated,
levelled, naming any logger), a NUL byte made ``grep`` call the log binary,
and a 65,000-character value was written twice per request, so that one
client grew the log about 24 MB a second before any AE title was checked.

:func:`peer_text` is the one way a log line of ours quotes such a value:
escaped (``\\n``, ``\\x00``, a backslash doubled) and cut short.
:class:`OneLineFilter`, installed once on the log handlers
(:func:`install`), does the same to every record of the loggers that
echo peer data and are not ours to change (pynetdicom's), and to ours as a
safety net: the message, and the message of a logged exception, become one
printable, bounded line.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

# Characters of one quoted value (an AE title is 16, a UID 64).
VALUE_LIMIT = 64
# Characters of a whole message from a peer-facing logger.
LINE_LIMIT = 1000
# Loggers whose messages may quote what a DICOM peer sent: pynetdicom's, the
# DIMSE services (C-STORE, Q/R, worklist, MPPS, commitment) and the ingest
# they feed (its refusals quote the object's values).
PEER_FACING = ("pynetdicom", "dicom_scp", "worklist", "pacs.ingest")


def _escape(text: str) -> str:
    """*text* with every non-printable character escaped as Python writes it
    in a string literal, and backslashes doubled (so an escape cannot be
    forged either)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() else repr(ch)[1:-1]
        for ch in text
    )


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} characters)"


def peer_text(value: Any, limit: int = VALUE_LIMIT) -> str:
    """*value* (or its ``str``), sent by a peer, for a log line: one line of
    printable characters, at most *limit* of them before a
    ``...(N characters)`` marker. Bytes are read as Latin-1 (every byte
    shows)."""
    if isinstance(value, bytes | bytearray | memoryview):
        text, total = bytes(value[:limit]).decode("latin-1"), len(value)
    else:
        text = str(value)
        total = len(text)
    shown = _escape(text[:limit])
    return shown if total <= limit else f"{shown}...({total} characters)"


def association_peer(assoc: Any) -> str:
    """The other end of a pynetdicom association, for a log line: its
    address and AE title (the calling one when it asked us, the called one
    when we asked it), escaped; ``?`` for what is not known yet."""
    acceptor = bool(getattr(assoc, "is_acceptor", True))
    peer = getattr(assoc, "requestor" if acceptor else "acceptor", None)
    address = peer_text(str(getattr(peer, "address", "") or "?"), 64)
    title = peer_text(str(getattr(peer, "ae_title", "") or "").strip(), 16) or "?"
    return f"{address} ({'calling' if acceptor else 'called'} {title})"


def _exception_text(exc_info: Any) -> str:
    """The traceback of *exc_info* with each exception's message escaped and
    bounded; the frames (our code's and libraries' file names and source
    lines) are kept as they are."""
    _, exc, _ = exc_info
    parts: list[str] = []
    seen: set[int] = set()
    chain: list[tuple[BaseException, str]] = []
    note = ""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append((exc, note))
        if exc.__cause__ is not None:
            exc, note = exc.__cause__, "\nThe above exception was the direct cause of the following exception:\n\n"
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, note = exc.__context__, "\nDuring handling of the above exception, another exception occurred:\n\n"
        else:
            exc = None
    for exc, note in reversed(chain):
        if exc.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(exc.__traceback__))
        kind = type(exc)
        name = kind.__qualname__
        if kind.__module__ not in ("builtins", "__main__"):
            name = f"{kind.__module__}.{name}"
        message = peer_text(exc, LINE_LIMIT)
        parts.append(f"{name}: {message}\n" if message else f"{name}\n")
        parts.append(note)
    return "".join(parts).rstrip("\n")


class OneLineFilter(logging.Filter):
    """A handler filter: a record of a logger named in *prefixes* (or below
    one) leaves as one printable line of at most ``LINE_LIMIT`` characters,
    and its exception's message too. Other records pass untouched (some of
    our own lines are meant to span several, like an HL7 failure's
    traceback)."""

    def __init__(self, prefixes: tuple[str, ...] = PEER_FACING) -> None:
        super().__init__()
        self._prefixes = prefixes

    def _applies(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self._prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._applies(record.name):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format: logging reports it itself
            return True
        if not message.isprintable() or len(message) > LINE_LIMIT:
            record.msg, record.args = _cut(_escape(message), LINE_LIMIT), None
        if record.exc_info and record.exc_info[1] is not None and not getattr(record, "_one_line_exc", False):
            record.exc_text = _exception_text(record.exc_info)
            record._one_line_exc = True  # several handlers: done once
        return True


def install(prefixes: tuple[str, ...] = PEER_FACING) -> None:
    """Put :class:`OneLineFilter` on every handler of the root logger
    (those records of the peer-facing loggers reach); idempotent."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OneLineFilter) for f in handler.filters):
            handler.addFilter(OneLineFilter(prefixes))
