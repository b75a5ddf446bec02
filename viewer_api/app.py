"""The HTTP application (FastAPI): DICOMweb, WADO-URI, FHIR R4, the JSON
API, the web viewer and /health, every route behind its role check."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs import __version__
from pacs.app import Pacs, health
from pacs.auth import ROLES
from pacs.pixel_memory import PIXELS

from . import (
    activity_api, annotations_api, claims_api, critical_api, errors, fhir, key_images_api, measure_api, metrics_api,
    orders_api, qido, rejections_api, share_api, share_page, sr_api, stow, templates_api, ui_api, wado, wado_uri,
)
from .http_metrics import HttpMetrics, RouteNote
from .limits import BodyLimit
from .rendering import RenderCache
from .security import (
    HEAD_SCOPE_KEY,
    READERS,
    AuditMiddleware,
    CsrfMiddleware,
    SecurityHeaders,
    requires,
    searched_study,
)

STATIC = Path(__file__).resolve().parent / "static"


def create_app(pacs: Pacs) -> FastAPI:
    """Build the HTTP app around one :class:`~pacs.app.Pacs`."""
    app = FastAPI(
        title="filmless-pacs",
        version=__version__,
        description="PACS and DICOM routing appliance: DICOMweb, WADO-URI, FHIR and JSON API.",
        # Served below to signed-in users only: the API's map is no one else's business.
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.pacs = pacs
    app.state.render_cache = RenderCache(pacs.settings.render_cache_bytes)
    errors.install(app)
    fhir.install(app)  # OperationOutcome errors under /fhir
    metrics_api.install(app, pacs)
    # Innermost: tells HttpMetrics (outermost) which route template answered.
    app.add_middleware(RouteNote)
    app.add_middleware(AuditMiddleware)
    # Before the access check: a control character in /api or /fhir is a 400.
    app.add_middleware(errors.ControlCharacters)
    app.add_middleware(HeadAsGet)
    app.add_middleware(CsrfMiddleware)
    # Before any route, its access check and its JSON parsing: a body over
    # 1 MiB is refused (413) unread, with or without a token; STOW-RS excepted.
    app.add_middleware(BodyLimit)
    origins = [o.strip().rstrip("/") for o in pacs.settings.cors_origins.split(",") if o.strip()]
    if origins:
        # Outside the role and cross-site checks, so a browser's preflight is
        # answered first (it carries no credentials); the real request is checked.
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Content-Location", "Warning", "Content-Disposition"], max_age=600,
        )
    # Outermost but the request counting: every answer carries them, a CORS preflight's and an error's too.
    app.add_middleware(SecurityHeaders)
    # Around everything: every request is counted, the refused ones too (/metrics).
    app.add_middleware(HttpMetrics, counters=app.state.http_counters)
    # Who may do what (the table tests/test_access_control.py checks).
    # study_of: the study each API serves, for the referring check and the audit.
    app.include_router(qido.router, dependencies=requires("radiologist", "admin", "emr", action="query",
                                                          study_of=searched_study))
    app.include_router(wado.router, dependencies=requires(*READERS, action="retrieve"))
    app.include_router(wado_uri.router, dependencies=requires(*READERS, action="retrieve",
                                                              study_of=wado_uri.requested_study))
    app.include_router(stow.router, dependencies=requires("modality", "admin", action="store"))
    # Share links: made by staff (guarded per route), opened by the patient
    # with the link's token alone (share_page: every access audited as share:<id>).
    # Before the orders: /api/orders/{accession:path} would take ".../shares" as an accession.
    app.include_router(share_api.router)
    app.include_router(orders_api.router)
    app.include_router(ui_api.router)
    app.include_router(measure_api.router)
    # Structured reports and dose summaries: guarded per route (the study of an instance).
    app.include_router(sr_api.router)
    # Key images (Key Object Selections): read by the reading roles, saved by radiologists (guarded per route).
    app.include_router(key_images_api.router)
    app.include_router(annotations_api.router)
    app.include_router(templates_api.router)
    # Reading claims ("đang đọc"): radiologists and administrators (guarded per route).
    app.include_router(claims_api.router)
    app.include_router(rejections_api.router)
    app.include_router(activity_api.router)
    app.include_router(critical_api.router)
    app.include_router(share_page.router)
    app.include_router(fhir.router)
    app.include_router(metrics_api.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    # Every role but the monitoring system's, which reads /metrics and /health only.
    docs_access = requires(*(role for role in ROLES if role != "monitor"), action="api-docs")

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_access)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_access)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="filmless-pacs API")

    @app.get("/redoc", include_in_schema=False, dependencies=docs_access)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="filmless-pacs API")

    @app.get("/health", tags=["system"], summary="Liveness and dependency health")
    def get_health() -> JSONResponse:
        checks = health(pacs)
        healthy = all(v == "ok" for v in checks.values())
        body = {
            "status": "ok" if healthy else "degraded",
            "version": __version__,
            "ae_title": pacs.settings.ae_title,
            **checks,
            # Decoded pixels conversions hold now, at most since the start,
            # and conversions waiting for room (settings: conversion_memory_bytes).
            "conversion_memory": PIXELS.stats(),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    return app


class _HeadDone(Exception):
    """Stops a GET's body once a HEAD has its status and headers."""


class HeadAsGet:
    """HEAD wherever GET exists (RFC 9110 9.3.2): the GET route answers,
    status and headers are sent, and the body is not made: a streamed body
    (a whole study) is stopped at its first chunk rather than read to the
    end. The server (uvicorn) itself never writes a body for HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # A copy: the server's own scope keeps HEAD (no body written). The
        # audit records it as the HEAD it is, complete once the headers are out.
        get_scope = dict(scope, method="GET")
        get_scope[HEAD_SCOPE_KEY] = True  # the audit trail says HEAD (security.request_target)
        finished = False

        async def head_send(message: Message) -> None:
            nonlocal finished
            if finished:
                raise _HeadDone
            if message["type"] != "http.response.body":
                await send(message)
                return
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if message.get("more_body", False):
                raise _HeadDone

        try:
            await self.app(get_scope, receive, head_send)
        except _HeadDone:
            pass
