"""HTTP errors with a clear JSON body, for every route of the app."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pacs.errors import IngestError
from pacs.frames import FrameError
from pacs.query import QueryError
from pacs.transcode import TransferSyntaxError

from .mediatypes import NotAcceptable
from .multipart import MultipartError


class HTTPProblem(Exception):
    """An error answered as ``{"error": ..., "status": ...}`` with that status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def install(app: FastAPI) -> None:
    """Map core and protocol errors to HTTP answers."""

    @app.exception_handler(HTTPProblem)
    async def _problem(_request: Request, exc: HTTPProblem) -> JSONResponse:
        return problem(exc.status, exc.message)

    @app.exception_handler(QueryError)
    async def _query(_request: Request, exc: QueryError) -> JSONResponse:
        return problem(400, str(exc))

    @app.exception_handler(FrameError)
    async def _frame(_request: Request, exc: FrameError) -> JSONResponse:
        return problem(exc.http_status, str(exc))

    @app.exception_handler(IngestError)
    async def _ingest(_request: Request, exc: IngestError) -> JSONResponse:
        return problem(exc.http_status, str(exc))

    @app.exception_handler(NotAcceptable)
    async def _not_acceptable(_request: Request, exc: NotAcceptable) -> JSONResponse:
        return problem(406, str(exc))

    @app.exception_handler(MultipartError)
    async def _multipart(_request: Request, exc: MultipartError) -> JSONResponse:
        return problem(exc.http_status, str(exc))

    @app.exception_handler(TransferSyntaxError)
    async def _transfer_syntax(_request: Request, exc: TransferSyntaxError) -> JSONResponse:
        return problem(406, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem(400, f"bad request parameters: {details}")

