"""Request bodies against a real `pacs serve`: one that stops coming is cut
off (http_body_stall_timeout), one too large for a JSON endpoint is refused
413 unread (even without a token), and neither touches STOW-RS uploads,
large or slow.

Before: 200 connections that sent a login's headers and half its body held
200 descriptors for good, and a 300 MB login body took the server from 199
to 808 MB before its 401.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from viewer_api.limits import MAX_BODY_BYTES
from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer, pydicom_file
from .peers import wait_until

STALL = 3  # seconds; the server's http_body_stall_timeout and dicom_timeout here
USER, PASSWORD = "limits-user", "limits-password-123"
GENEROUS = 10 * STALL  # how long a test waits for what should come after STALL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    data = tmp_path_factory.mktemp("limits") / "data"
    pacs = PacsServer(data, Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_HTTP_BODY_STALL_TIMEOUT": str(STALL), "PACS_DICOM_TIMEOUT": str(STALL)}).start()
    from pacs.auth import AuthService
    from pacs.index import create_index_engine

    engine = create_index_engine(f"sqlite:///{data}/index.sqlite", pool_size=0)
    try:
        AuthService(engine).add_user(USER, "radiologist", PASSWORD, USER)
    finally:
        engine.dispose()
    yield pacs
    pacs.stop()


def _pid(server: PacsServer) -> int:
    assert server.proc is not None
    return server.proc.pid


def _fds(server: PacsServer) -> int:
    """The server's open sockets: the descriptors a held connection takes
    (files the server opens meanwhile, its index's pooled connections, are
    not what these tests are about, and made them flaky under load)."""
    folder = f"/proc/{_pid(server)}/fd"
    sockets = 0
    for name in os.listdir(folder):
        try:
            sockets += os.readlink(f"{folder}/{name}").startswith("socket:")
        except FileNotFoundError:  # closed while listed
            continue
    return sockets


def _peak_rss(server: PacsServer) -> int:
    """The server's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{_pid(server)}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _connect(server: PacsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=GENEROUS)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket) -> bytes:
    """The server's answer: up to its Content-Length, or until it closes (or
    resets) the connection."""
    out = b""
    while True:
        head, sep, body = out.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.I)
        if sep and length is not None and len(body) >= int(length.group(1)):
            return out
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (after its answer)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> int:
    """Send *chunks* until the server answers or stops reading; bytes sent."""
    sent = 0
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    return sent


def _login_body(padding: int = 0) -> bytes:
    return json.dumps({"username": USER, "password": PASSWORD}).encode() + b" " * padding


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def test_a_body_that_stops_coming_is_cut_off_and_its_descriptor_freed(server: PacsServer) -> None:
    """Headers complete, half the body, then silence (no token needed): the
    connection is answered 408 and closed after the stall timeout, whatever
    the endpoint, and the server's descriptors come back down."""
    before = _fds(server)
    paths = ["/api/auth/login"] * 10 + ["/api/orders"] * 5 + ["/api/users"] * 5
    socks = []
    for path in paths:
        sock = _connect(server)
        sock.sendall(_head("POST", path, {"Content-Type": "application/json", "Content-Length": "1000"})
                     + b'{"username": "x", "pass')
        socks.append(sock)
    assert wait_until(lambda: _fds(server) >= before + len(socks), timeout=GENEROUS)
    try:
        for sock, path in zip(socks, paths, strict=True):
            answer = _answer(sock)  # the socket's timeout is GENEROUS
            assert _status(answer) == 408, (path, answer[:200])
            assert b"stalled" in answer
            assert _closed(sock)
    finally:
        for sock in socks:
            sock.close()
    assert wait_until(lambda: _fds(server) <= before + 2, timeout=GENEROUS), (before, _fds(server))


def test_a_slow_body_that_keeps_coming_is_not_cut(server: PacsServer) -> None:
    """A slow link: a login body a few bytes a second, taking twice the stall
    timeout in all but never silent that long, logs in."""
    body = _login_body()
    pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
    assert len(pieces) >= 6
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/api/auth/login", {"Content-Type": "application/json",
                                                       "Content-Length": str(len(body)),
                                                       "Connection": "close"}))
        for piece in pieces:
            time.sleep(STALL / 3)
            sock.sendall(piece)
        answer = _answer(sock)
    assert _status(answer) == 200, answer[:300]
    assert b'"token"' in answer


@pytest.mark.parametrize("path", ["/api/auth/login", "/api/orders"])
def test_a_declared_body_over_the_limit_is_refused_unread(server: PacsServer, path: str) -> None:
    """Content-Length 300 MB, no token: 413 at once, the connection closed,
    the body never read into memory (the client cannot push it in)."""
    peak = _peak_rss(server)
    with _connect(server) as sock:
        sock.sendall(_head("POST", path, {"Content-Type": "application/json",
                                          "Content-Length": str(300 * 1024 * 1024)}))
        sent = _send_until_answered(sock, (b" " * (1 << 20) for _ in range(64)))
        answer = _answer(sock)
        assert _closed(sock)
    assert _status(answer) == 413, answer[:300]
    assert b"too large" in answer
    assert b"connection: close" in answer.lower()
    assert sent < 48 << 20, sent  # the server stopped taking it (kernel buffers hold a few MB)
    assert _peak_rss(server) - peak < 24 << 20, (peak, _peak_rss(server))
    # A client asking before it sends is told no, with no "100 Continue".
    with _connect(server) as sock:
        sock.sendall(_head("POST", path, {"Content-Type": "application/json", "Expect": "100-continue",
                                          "Content-Length": str(300 * 1024 * 1024)}))
        answer = _answer(sock)
    assert _status(answer) == 413, answer[:300]


def _chunked(payload: Iterator[bytes]) -> Iterator[bytes]:
    for piece in payload:
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def test_a_chunked_body_growing_past_the_limit_is_refused(server: PacsServer) -> None:
    """No declared length: counted as it comes, 413 once past the limit, long
    before the client is done; a chunked body under the limit is served."""
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/api/auth/login", {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked"}))
        sent = _send_until_answered(sock, _chunked(b"[" + b" " * 65535 for _ in range(256)))  # 16 MiB
        answer = _answer(sock)
    assert _status(answer) == 413, answer[:300]
    assert sent < 12 << 20, sent
    # Just under the limit, chunked: an ordinary login.
    body = _login_body(MAX_BODY_BYTES - len(_login_body()) - 10)
    with _connect(server) as sock:
        sock.sendall(_head("POST", "/api/auth/login", {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked", "Connection": "close"}))
        sock.sendall(b"".join(_chunked(body[i:i + 65536] for i in range(0, len(body), 65536))))
        answer = _answer(sock)
    assert _status(answer) == 200, answer[:300]


def _object(pixels: int = 0) -> tuple[bytes, str]:
    """A CT object (CT_small's header), with *pixels* x *pixels* 16-bit pixels if given."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if pixels:
        ds.Rows = ds.Columns = pixels
        ds.PixelData = np.random.default_rng(7).integers(0, 4000, (pixels, pixels), dtype=np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), str(ds.SOPInstanceUID)


def _stored(answer: bytes) -> list[str]:
    result = json.loads(answer.partition(b"\r\n\r\n")[2])
    return [r["00081155"]["Value"][0] for r in result.get("00081199", {}).get("Value", [])]


def test_stow_of_a_large_object_is_not_capped(server: PacsServer) -> None:
    """STOW-RS keeps its own limits: an 8 MB object is stored."""
    data, uid = _object(2048)
    assert len(data) > 8 * MAX_BODY_BYTES
    body, content_type = build_multipart_related([("application/dicom", data)])
    with server.http() as http:
        response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text[:300]
    assert [r["00081155"]["Value"][0] for r in response.json()["00081199"]["Value"]] == [uid]


def test_stow_over_a_slow_link(server: PacsServer) -> None:
    """A STOW-RS upload that takes twice the stall timeout, sending every
    second, is stored; one that goes silent still gets the upload's own
    answer (its report), not a bare cut."""
    data, uid = _object()
    body, content_type = build_multipart_related([("application/dicom", data)])
    head = _head("POST", "/dicom-web/studies", {"Authorization": f"Bearer {server.token}",
                                                "Content-Type": content_type,
                                                "Content-Length": str(len(body)), "Connection": "close"})
    step = len(body) // 6 + 1
    with _connect(server) as sock:
        sock.sendall(head)
        for i in range(0, len(body), step):
            time.sleep(STALL / 3)
            sock.sendall(body[i:i + step])
        answer = _answer(sock)
    assert _status(answer) == 200, answer[:300]
    assert _stored(answer) == [uid]
    # Silent halfway: the STOW handler's own 408 (dicom_timeout), with its reason.
    with _connect(server) as sock:
        sock.sendall(head.replace(b"Connection: close\r\n", b"") + body[: len(body) // 2])
        answer = _answer(sock)
    assert _status(answer) == 408, answer[:300]
    assert b"upload stalled" in answer, answer[:300]
