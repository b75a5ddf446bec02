"""Absolute links in responses (RetrieveURL, BulkDataURI, Content-Location)."""

from __future__ import annotations

from fastapi import Request


def base_url(request: Request) -> str:
    """Absolute URL of the app's root for links in responses (no trailing /).

    ``public_url`` (PACS_PUBLIC_URL) wins; otherwise the scheme and the Host
    header as the client sent them. A Host without a port means the
    scheme's default port (RFC 9110 7.2): a reverse proxy passing
    ``Host $host`` in front of us on 80/443 must get links to itself, never
    to our own listening port behind it.
    """
    public = request.app.state.pacs.settings.public_url
    if public:
        return public.rstrip("/")
    return str(request.base_url).rstrip("/")
