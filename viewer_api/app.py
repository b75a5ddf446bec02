"""The HTTP application (FastAPI): health now; DICOMweb, WADO-URI, FHIR,
the JSON API and the web viewer mount here as they land."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pacs import __version__
from pacs.app import Pacs, health

from . import errors, orders_api, qido, stow, wado, wado_uri
from .rendering import RenderCache


def create_app(pacs: Pacs) -> FastAPI:
    """Build the HTTP app around one :class:`~pacs.app.Pacs`."""
    app = FastAPI(
        title="filmless-pacs",
        version=__version__,
        description="PACS and DICOM routing appliance: DICOMweb, WADO-URI, FHIR and JSON API.",
    )
    app.state.pacs = pacs
    app.state.render_cache = RenderCache(pacs.settings.render_cache_bytes)
    errors.install(app)
    for module in (qido, wado, stow, wado_uri, orders_api):
        app.include_router(module.router)

    @app.get("/health", tags=["system"], summary="Liveness and dependency health")
    def get_health() -> JSONResponse:
        checks = health(pacs)
        healthy = all(v == "ok" for v in checks.values())
        body = {
            "status": "ok" if healthy else "degraded",
            "version": __version__,
            "ae_title": pacs.settings.ae_title,
            **checks,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    return app
