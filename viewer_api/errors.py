"""HTTP errors with a clear JSON body, for every route of the app."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sqlalchemy.exc import OperationalError

from pacs.errors import IngestError, RefusedRequest
from pacs.index.db import ConcurrentChange, is_transient
from pacs.frames import FrameError
from pacs.header import valid_uid
from pacs.pixel_memory import PixelMemoryBusy
from pacs.query import QueryError
from pacs.transcode import TransferSyntaxError

from storage import ObjectDamaged, ObjectNotFound, StorageError

from .mediatypes import NotAcceptable
from .multipart import MultipartError

log = logging.getLogger(__name__)
INTERNAL_ERROR = "internal server error: the server's log has the details"
# A transaction that lost to others at the same moment every time it was run
# (pacs.index.db.retry_transaction): nothing is down, the request may be resent.
BUSY = "the archive was busy with a conflicting change of the same data; try again"
# Ours to repair, not the client's to retry (a 500, not a 503): the
# administrator finds and repairs such objects with `pacs verify`.
MISSING_OBJECT = "an indexed object is missing from the archive's store (pacs verify)"
DAMAGED_OBJECT = "an indexed object is damaged in the archive's store (pacs verify)"


class HTTPProblem(Exception):
    """An error answered as ``{"error": ..., "status": ...}`` with that status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def refused_as_problem(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """*fn*(*args, **kwargs), a request the core refused (RefusedRequest) answered
    with the HTTP status it carries."""
    try:
        return fn(*args, **kwargs)
    except RefusedRequest as exc:
        raise HTTPProblem(exc.http_status, str(exc)) from None


def require_uids(*uids: str | None, name: str = "UID") -> None:
    """400 for the first UID of a request path or query that is not a valid
    UID (PS3.5 9.1) exactly as given; None (absent) is skipped."""
    for uid in uids:
        if uid is not None and not valid_uid(uid):
            raise HTTPProblem(400, f"invalid {name} {uid[:80]!r}")


class JsonBody(BaseModel):
    """A JSON request body of the API (an order, a user, a token): no text
    value of it holds NUL or a lone surrogate (``"\\ud800"``, which JSON
    can write and UTF-8 cannot), a 400 naming the field. Either reached
    the index and was a 500 (PostgreSQL refuses NUL in text; no database
    driver encodes a surrogate), which a HIS sends again and again
    (:class:`ControlCharacters` checks the path and query; a body's other
    control characters, a line break in an order's reason, are kept as sent)."""

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("holds the control character U+0000: no value of this API contains one")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # Pydantic refuses it only in fields with a length constraint.
                raise ValueError("holds a lone UTF-16 surrogate (\\udXXX): not a character") from None
        return value


def path_for_log(scope: Any) -> str:
    """What a log line names of a request: its route's template
    (``/fhir/Patient/{id}``), not its path, which can hold patient data (a
    patient's ID in a FHIR id, an accession); a request no route took (yet),
    its first segment. The audit trail, not the log, records who read what."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    segments = str(scope.get("path", "")).split("/")
    return "/".join(segments[:2]) + ("/..." if len(segments) > 2 else "")


def problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


# An API with its own error body (FHIR's OperationOutcome) registers it for
# its path prefix; every other route answers with :func:`problem`.
ErrorFormat = Callable[[int, str], Response]


def register_format(app: FastAPI, prefix: str, build: ErrorFormat) -> None:
    """Errors of the routes under *prefix* are answered with *build*."""
    app.state.error_formats[prefix.rstrip("/")] = build


def _format_of(request: Request) -> ErrorFormat | None:
    path = request.url.path
    for prefix, build in request.app.state.error_formats.items():
        if path == prefix or path.startswith(prefix + "/"):
            return build  # type: ignore[no-any-return]
    return None


def answer(request: Request, status: int, message: str) -> Response:
    """The error answer for *request*'s API."""
    build = _format_of(request)
    response = build(status, message) if build else problem(status, message)
    if status == 401:
        # RFC 9110 11.6.1: a 401 names the scheme the client must use.
        response.headers["WWW-Authenticate"] = 'Bearer realm="filmless-pacs"'
    return response


def install(app: FastAPI) -> None:
    """Map core and protocol errors to HTTP answers."""
    # Each error type and the status it answers with.
    statuses: dict[type[Exception], Callable[[Any], int]] = {
        HTTPProblem: lambda e: e.status,
        QueryError: lambda e: 400,
        FrameError: lambda e: e.http_status,
        IngestError: lambda e: e.http_status,
        NotAcceptable: lambda e: 406,
        MultipartError: lambda e: e.http_status,
        TransferSyntaxError: lambda e: 406,
        # Converting for other clients takes every byte allowed: try again later.
        PixelMemoryBusy: lambda e: 503,
        # The store or the index is down: try again later, not a bug of ours.
        StorageError: lambda e: 503,
        OperationalError: lambda e: 503,
        ConcurrentChange: lambda e: 503,
        ObjectNotFound: lambda e: 500,
        ObjectDamaged: lambda e: 500,
    }

    app.state.error_formats = {}

    def handler(status_of: Callable[[Any], int]) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handle(request: Request, exc: Exception) -> Response:
            message = exc.message if isinstance(exc, HTTPProblem) else str(exc)
            status = status_of(exc)
            if isinstance(exc, PixelMemoryBusy):
                log.warning("%s %s answered 503: %s", request.method, path_for_log(request.scope), message)
                busy = answer(request, status, message)
                busy.headers["Retry-After"] = str(exc.retry_after)  # RFC 9110 15.6.4
                return busy
            if isinstance(exc, ObjectNotFound | ObjectDamaged):
                # An indexed object gone from the store or cut short.
                message = MISSING_OBJECT if isinstance(exc, ObjectNotFound) else DAMAGED_OBJECT
                log.error("%s %s: %s: %s", request.method, path_for_log(request.scope), message, exc)
            elif isinstance(exc, OperationalError | StorageError | ConcurrentChange):
                # One line per refused request during an outage, no traceback;
                # the client is not told the database's connection details.
                log.warning("%s %s answered %d: %s", request.method, path_for_log(request.scope), status,
                            str(exc).splitlines()[0][:200])
                message = BUSY if is_transient(exc) else "the archive's storage or index is unavailable; try again later"
            return answer(request, status, message)

        return handle

    for error_type, status_of in statuses.items():
        app.add_exception_handler(error_type, handler(status_of))  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return answer(request, 400, f"bad request parameters: {details}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Reached only for an error raised once the answer had started (then
        # nothing can be sent; Starlette re-raises and the server drops the
        # connection, which tells the client the body is incomplete).
        return answer(request, 500, INTERNAL_ERROR)

    app.add_middleware(UnexpectedErrors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths and methods: the framework's answer, except under an
        # API with its own error format (an unknown FHIR resource type).
        if _format_of(request) is not None:
            return answer(request, exc.status_code, str(exc.detail))
        return await http_exception_handler(request, exc)


class UnexpectedErrors:
    """A 500 for an unexpected error before the answer started, sent by us.

    Starlette's own handler (ServerErrorMiddleware) sends the 500 and then
    re-raises, and uvicorn then closes the keep-alive connection without
    ``Connection: close``: the next request a pooled client sends on it gets
    a reset. Here the error is logged and answered, and the connection
    stays usable. An error after the answer started is re-raised: the
    dropped connection is then the only way to say the body is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            # Our own fault: the log has the traceback; the client gets its
            # API's error body (an OperationOutcome under /fhir), never our internals.
            log.error("unexpected error answering %s %s", scope.get("method"), path_for_log(scope), exc_info=exc)
            response = answer(Request(scope), 500, INTERNAL_ERROR)
            await response(scope, receive, send)


# Control characters other than tab: no search value, identifier or path
# segment of the JSON and FHIR APIs holds one, and NUL made PostgreSQL
# refuse the statement (a 500: psycopg DataError).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
CHECKED_PREFIXES = ("/api/", "/fhir/")


def control_character_refusal(path: str, query_string: bytes) -> str | None:
    """Why a request whose path or query holds a control character is
    refused (400), or None."""
    if (bad := _CONTROL.search(path)) is not None:
        where = "the path"
    else:
        query = unquote_plus(query_string.decode("latin-1"), errors="replace") if query_string else ""
        bad = _CONTROL.search(query)
        where = "a query parameter"
    if bad is None:
        return None
    return f"{where} holds the control character U+{ord(bad.group()):04X}: no value of this API contains one"


class ControlCharacters:
    """400 for a control character in the path or query of the JSON API
    (``/api``) and FHIR (``/fhir``), before any route reads the index: one
    check for every parameter of every route (QIDO-RS's are checked by
    :meth:`pacs.query.Query.validate`, as C-FIND's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(CHECKED_PREFIXES):
            refusal = control_character_refusal(str(scope["path"]), scope.get("query_string", b""))
            if refusal is not None:
                await answer(Request(scope), 400, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)
