"""Revocation takes effect at once on every node (scale-out review of
2026-12-05): a token revoked, a user disabled or a session ended by one
node or by the CLI is refused by every other process on its next request."""

from __future__ import annotations

from pathlib import Path

from .conftest import Backend, PacsServer


def test_a_token_revoked_elsewhere_is_refused_at_once(tmp_path: Path) -> None:
    """The CLI is another process on the index, as another node is. A
    5-second cache of principals let a leaked token go on reading there."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    try:
        emr = server.make_token("emr-leaked", "emr")
        reader = server.make_token("reader-gone", "radiologist")
        with server.http(emr) as http:
            assert http.get("/api/me").status_code == 200
        with server.http(reader) as http:
            assert http.get("/dicom-web/studies").status_code == 200
        server.cli("token", "revoke", "emr-leaked", "--name", "tests")
        server.cli("user", "disable", "reader-gone")
        with server.http(emr) as http:
            assert http.get("/api/me").status_code == 401
        with server.http(reader) as http:
            assert http.get("/dicom-web/studies").status_code == 401
    finally:
        server.stop()
