"""Security tester's findings on logins, sessions, tokens and their audit:
password resets end sessions and tokens, sessions end when idle, logins are
throttled in the index, the session cookie is Secure over HTTPS, proxy
headers are believed from trusted proxies only, administration is audited
as what it is, zip exports are private, and a UID with a NUL is refused."""

from __future__ import annotations

import io
import json
import os
import ssl
import stat
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select, update

from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, free_port, wait_port
from .dicomfiles import make_ct
from .peers import PACS_COMMANDS, plain_http_ssl, wait_until

SQLITE = pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
PASSWORD = "first-password-1"


def _login(server: PacsServer, username: str, password: str, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30,
                      verify=plain_http_ssl()) as anonymous:
        return anonymous.post("/api/auth/login", json={"username": username, "password": password}, headers=headers)


def _me(server: PacsServer, token: str) -> int:
    with server.http(token=token) as http:
        return http.get("/api/me").status_code


def _session_cookie(server: PacsServer, username: str, password: str) -> str:
    answer = _login(server, username, password)
    assert answer.status_code == 200, answer.text
    return answer.cookies["pacs_session"]


def _cli_json(server: PacsServer, *args: str) -> dict[str, Any]:
    return json.loads(server.cli(*args, "--json").stdout)


def _audit(server: PacsServer, **params: str) -> list[dict[str, Any]]:
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": "5000", **params})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _engine(server: PacsServer) -> Any:
    from pacs.index import create_index_engine

    return create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)


# -- 1: a password reset or a disable ends what the old password opened ---------------------------
@SQLITE
def test_password_reset_ends_sessions_and_api_tokens(pacs_server: PacsServer) -> None:
    server = pacs_server
    server.cli("user", "add", "victim", "--role", "radiologist", "--password", PASSWORD)
    session = _session_cookie(server, "victim", PASSWORD)
    token = _cli_json(server, "token", "create", "victim", "--name", "workstation")["token"]
    assert _me(server, session) == 200 and _me(server, token) == 200

    reset = _cli_json(server, "user", "add", "victim", "--role", "radiologist", "--password", "second-password-2")
    assert reset["sessions_ended"] is True and reset["tokens_revoked"] is True
    # Other processes cache a token's answer for a few seconds at most.
    assert wait_until(lambda: _me(server, session) == 401 and _me(server, token) == 401, timeout=30)
    assert _me(server, _session_cookie(server, "victim", "second-password-2")) == 200

    # A system account's reset may keep its API tokens; its sessions end anyway.
    session = _session_cookie(server, "victim", "second-password-2")
    token = _cli_json(server, "token", "create", "victim", "--name", "workstation-2")["token"]
    kept = _cli_json(server, "user", "add", "victim", "--role", "radiologist", "--password", "third-password-3",
                     "--keep-tokens")
    assert kept["tokens_revoked"] is False
    assert wait_until(lambda: _me(server, session) == 401, timeout=30)
    assert _me(server, token) == 200


@SQLITE
def test_enabling_a_disabled_user_again_does_not_revive_old_sessions(pacs_server: PacsServer) -> None:
    server = pacs_server
    server.cli("user", "add", "victim", "--role", "radiologist", "--password", PASSWORD)
    session = _session_cookie(server, "victim", PASSWORD)
    server.cli("user", "disable", "victim")
    assert wait_until(lambda: _me(server, session) == 401, timeout=30)
    # Enabled again (same password, tokens kept: only the disable may have ended the session).
    server.cli("user", "add", "victim", "--role", "radiologist", "--password", PASSWORD, "--keep-tokens")
    assert _me(server, _session_cookie(server, "victim", PASSWORD)) == 200
    assert _me(server, session) == 401


@SQLITE
def test_session_ends_when_idle_and_use_keeps_it_alive_up_to_its_lifetime(pacs_server: PacsServer) -> None:
    from pacs.auth import SESSION_HOURS, SESSION_IDLE_MINUTES, _hash_token
    from pacs.index.models import ApiToken

    tokens = ApiToken.__table__
    server = pacs_server
    server.cli("user", "add", "reader", "--role", "radiologist", "--password", PASSWORD)
    engine = _engine(server)

    def window(token: str) -> tuple[datetime, datetime]:
        with engine.connect() as conn:
            row = conn.execute(select(tokens.c.created_at, tokens.c.expires_at)
                               .where(tokens.c.token_hash == _hash_token(token))).one()
        return tuple(v.replace(tzinfo=UTC) if v.tzinfo is None else v for v in row)  # type: ignore[return-value]

    def set_window(token: str, created: datetime, expires: datetime) -> None:
        with engine.begin() as conn:
            conn.execute(update(tokens).where(tokens.c.token_hash == _hash_token(token))
                         .values(created_at=created, expires_at=expires))

    idle = timedelta(minutes=SESSION_IDLE_MINUTES)
    try:
        # A new session lasts the idle timeout, not the whole lifetime.
        session = _session_cookie(server, "reader", PASSWORD)
        created, expires = window(session)
        assert expires - created <= idle + timedelta(seconds=5)
        # Unused for 28 minutes (two left): one use pushes its end a full idle period on.
        now = datetime.now(UTC)
        set_window(session, now - timedelta(minutes=28), now + timedelta(minutes=2))
        assert _me(server, session) == 200
        assert window(session)[1] >= now + idle - timedelta(minutes=1)
        # ...but never past the lifetime from login.
        other = _session_cookie(server, "reader", PASSWORD)
        now = datetime.now(UTC)
        set_window(other, now - timedelta(hours=SESSION_HOURS) + timedelta(minutes=3), now + timedelta(minutes=2))
        assert _me(server, other) == 200
        assert window(other)[1] <= now + timedelta(minutes=3, seconds=5)
        # Idle past its end: over.
        third = _session_cookie(server, "reader", PASSWORD)
        set_window(third, now - timedelta(minutes=31), now - timedelta(seconds=1))
        assert _me(server, third) == 401
    finally:
        engine.dispose()


# -- 2: login throttling, in the index ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite-fs", "pg-fs"], indirect=True)
def test_failed_logins_lock_the_username_for_a_short_growing_time(pacs_server: PacsServer) -> None:
    from pacs.index.models import LoginThrottle

    throttle = LoginThrottle.__table__
    server = pacs_server
    server.cli("user", "add", "victim", "--role", "admin", "--password", PASSWORD)
    answers = [_login(server, "victim", f"guess-{n}").status_code for n in range(5)]
    assert answers == [401, 401, 401, 401, 429]
    # Locked: the right password is not even checked.
    locked = _login(server, "victim", PASSWORD)
    assert locked.status_code == 429
    first_wait = int(locked.headers["Retry-After"])
    assert 0 < first_wait <= 60
    # In the index: another process (a restarted server, another node) sees it.
    server.stop()
    server.start()
    assert _login(server, "victim", PASSWORD).status_code == 429
    lockouts = [e for e in _audit(server, action="login-lockout") if e["user"] == "victim"]
    assert lockouts and lockouts[0]["outcome"] == "denied" and "victim" in lockouts[0]["detail"]

    engine = _engine(server)
    try:
        def lock_over() -> None:
            with engine.begin() as conn:
                conn.execute(update(throttle).values(locked_until=datetime.now(UTC) - timedelta(seconds=1)))
        # A short lock, not a permanent one: once over, the right password works.
        lock_over()
        assert _login(server, "victim", PASSWORD).status_code == 200
        # The next lock in a row is longer.
        assert [_login(server, "victim", "wrong-again").status_code for _ in range(5)][-1] == 429
        lock_over()
        for _ in range(5):
            answer = _login(server, "victim", "wrong-once-more")
        assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > first_wait
        # An admin's reset lifts the name's lock.
        server.cli("user", "add", "victim", "--role", "admin", "--password", "reset-password-9")
        assert _login(server, "victim", "reset-password-9").status_code == 200
    finally:
        engine.dispose()


@SQLITE
def test_failed_logins_lock_the_client_address(pacs_server: PacsServer) -> None:
    from pacs.auth import ADDRESS_FAILURES

    server = pacs_server
    server.cli("user", "add", "someone", "--role", "radiologist", "--password", PASSWORD)
    # One guess per name: no name is locked, the address is.
    answers = [_login(server, f"spray-{n}", "password1").status_code for n in range(ADDRESS_FAILURES)]
    assert answers[:-1] == [401] * (ADDRESS_FAILURES - 1) and answers[-1] == 429
    refused = _login(server, "someone", PASSWORD)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert any("127.0.0.1" in e["detail"] for e in _audit(server, action="login-lockout"))


# -- 3: the session cookie is Secure over HTTPS --------------------------------------------------
def _pacs_cli(*args: str) -> None:
    result = PACS_COMMANDS.run(list(args), dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_session_cookie_is_secure_over_https(tmp_path: Path) -> None:
    _pacs_cli("certs", "init-ca", "--out", str(tmp_path / "ca"), "--name", "Cookie CA")
    _pacs_cli("certs", "issue", "pacs", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "server"),
              "--dns", "localhost", "--ip", "127.0.0.1")
    env = {"PACS_HTTP_TLS": "true", "PACS_TLS_CERT": str(tmp_path / "server" / "pacs.pem"),
           "PACS_TLS_KEY": str(tmp_path / "server" / "pacs.key"), "PACS_TLS_CA": str(tmp_path / "ca" / "ca.pem"),
           "PACS_DICOM_TLS_PORT": str(free_port())}
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env=env).start()
    try:
        server.cli("user", "add", "reader", "--role", "radiologist", "--password", PASSWORD)
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
        with httpx.Client(base_url=f"https://localhost:{server.http_port}", timeout=30, verify=trust) as client:
            answer = client.post("/api/auth/login", json={"username": "reader", "password": PASSWORD})
        assert answer.status_code == 200, answer.text
        cookie = answer.headers["set-cookie"].lower()
        assert "pacs_session=" in cookie and "; secure" in cookie and "httponly" in cookie
    finally:
        server.stop()


# -- 4: X-Forwarded-For is believed from trusted proxies only -------------------------------------
@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "proxied", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_TRUSTED_PROXIES": "127.0.0.1"}).start()
    yield server
    server.stop()


@SQLITE
def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(pacs_server: PacsServer, proxied: PacsServer) -> None:
    forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    for server in (pacs_server, proxied):
        server.cli("user", "add", "reader", "--role", "radiologist", "--password", PASSWORD)
    plain = _login(pacs_server, "reader", PASSWORD, **forged)
    behind_proxy = _login(proxied, "reader", PASSWORD, **forged)
    assert plain.status_code == 200 and behind_proxy.status_code == 200
    logins = {e["client"] for e in _audit(pacs_server, action="login") if e["user"] == "reader"}
    assert logins == {"127.0.0.1"}
    logins = {e["client"] for e in _audit(proxied, action="login") if e["user"] == "reader"}
    assert logins == {"6.6.6.6"}
    assert "secure" not in plain.headers["set-cookie"].lower()
    # A TLS-terminating proxy in front: the cookie must be Secure too.
    assert "; secure" in behind_proxy.headers["set-cookie"].lower()


# -- 5: administration is audited as what it is ----------------------------------------------------
@SQLITE
def test_user_and_token_administration_is_audited_with_target_and_role(pacs_server: PacsServer) -> None:
    server = pacs_server
    with server.http() as http:
        assert http.post("/api/users", json={"username": "newbie", "role": "referring",
                                             "password": PASSWORD}).status_code == 201
        reset = http.post("/api/users", json={"username": "newbie", "role": "radiologist", "password": PASSWORD})
        assert reset.status_code == 201
        assert http.post("/api/tokens", json={"username": "newbie", "name": "ris-link", "days": 30}).status_code == 201
        assert http.delete("/api/tokens/newbie/ris-link").json() == {"revoked": 1}
    server.cli("user", "add", "clerk", "--role", "his", "--password", PASSWORD)
    server.cli("token", "create", "clerk", "--name", "his-feed")
    server.cli("token", "revoke", "clerk", "--name", "his-feed")
    server.cli("user", "disable", "clerk")
    events = _audit(server)
    assert not [e for e in events if e["action"] == "patient-update"]

    def of(action: str, protocol: str) -> list[str]:
        return [e["detail"] for e in events
                if e["action"] == action and e["protocol"] == protocol and e["outcome"] == "success"]

    # Over HTTP by the admin who called, from the CLI by the account that ran it.
    assert any(e["action"] == "user-add" and e["user"] == "pacs-test" for e in events)
    added = of("user-add", "http")
    assert any("newbie" in d and "referring" in d and "created" in d for d in added)
    assert any("newbie" in d and "referring -> radiologist" in d and "tokens revoked" in d for d in added)
    assert any("newbie" in d and "ris-link" in d and "radiologist" in d for d in of("token-create", "http"))
    assert any("newbie" in d and "ris-link" in d for d in of("token-revoke", "http"))
    assert any("clerk" in d and "his" in d for d in of("user-add", "cli"))
    assert any("clerk" in d and "his-feed" in d and "his" in d for d in of("token-create", "cli"))
    assert any("clerk" in d and "his-feed" in d for d in of("token-revoke", "cli"))
    assert any("clerk" in d and "his" in d for d in of("user-disable", "cli"))
    assert not [e for e in events if e["action"] == "login" and e["user"] == "pacs-test"]
    assert reset.json()["tokens_revoked"] is True


# -- 6: a zip export is private --------------------------------------------------------------------
@SQLITE
def test_zip_export_is_owner_only(pacs_server: PacsServer, tmp_path: Path) -> None:
    server = pacs_server
    ct = make_ct(tmp_path / "ct.dcm")
    assert server.storescu(str(ct)).returncode == 0
    study = str(dcmread(ct).StudyInstanceUID)
    out = tmp_path / "out" / "study.zip"
    # A leftover partial of an interrupted run, world-readable, is not reused as it was.
    out.parent.mkdir()
    stale = out.with_name(out.name + ".partial")
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    server.cli("export", study, "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0
    with zipfile.ZipFile(out) as archive:
        assert len(archive.namelist()) == 1


# -- 7: a UID with a NUL inside is refused, not indexed without it ---------------------------------
@SQLITE
def test_uid_with_nul_is_refused_by_stow_and_c_store(pacs_server: PacsServer, tmp_path: Path) -> None:
    server = pacs_server
    bad = make_ct(tmp_path / "nul.dcm", StudyInstanceUID="1.2.3\x00.4")
    body, content_type = build_multipart_related([("application/dicom", bad.read_bytes())])
    with server.http() as http:
        answer = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 409, answer.text
    failed = answer.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] & 0xFF00 for f in failed] == [0xA900]

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dcmread(bad))
    finally:
        assoc.release()
    assert status.Status & 0xFF00 == 0xA900
    assert server.stats()["instances"] == 0
    with server.http() as http:
        assert http.get("/dicom-web/studies/1.2.3.4/metadata").status_code == 404
