"""Absolute links in responses (RetrieveURL, BulkDataURI, Content-Location)."""

from __future__ import annotations

from fastapi import Request


def base_url(request: Request) -> str:
    """Absolute URL of the app's root for links in responses (no trailing /).

    ``public_url`` (PACS_PUBLIC_URL) wins, for a reverse proxy; otherwise the
    request's own, with the port put back when a client's Host header
    dropped it (dicomweb-client does).
    """
    public = request.app.state.pacs.settings.public_url
    if public:
        return public.rstrip("/")
    url = str(request.base_url).rstrip("/")
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1] not in (80, 443):
        url = url.replace(f"://{host}", f"://{host}:{server[1]}", 1)
    return url
