"""Review of GET /metrics (Prometheus): bugs found by a hostile tester, one test each."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import wait_until

Samples = list[tuple[str, dict[str, str], float]]


def _scrape(server: PacsServer, token: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", headers={"Authorization": f"Bearer {token}"},
                     timeout=60)


def _samples(text: str) -> Samples:
    """Every sample of an exposition, as Prometheus's text parser reads it."""
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


class _StoppableLink:
    """127.0.0.1:*port* -> 127.0.0.1:*target* (the PostgreSQL server); stop()
    closes every connection and refuses new ones, as a database server that
    was stopped (or crashed) does."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self._lock:
                self._socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        # shutdown() first: a close() alone leaves the thread blocked in accept() listening.
        for s in [self._listener, *self._socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_scrape_with_a_token_while_the_index_is_down_answers_index_up_0(tmp_path: Path, pg_url: str) -> None:
    """Before: tokens are checked in the index, so once PostgreSQL was down
    every scrape with the monitor's token (the way the README sets up
    Prometheus) answered 503, and the documented ``pacs_index_up 0`` was
    never seen by anyone. Now a token that passed the scrape check lately
    still reads this node's figures while the index cannot be read; a token
    never seen to pass is not let in."""
    port = free_port()
    link = _StoppableLink(port, 5432)
    url = pg_url.replace(":5432/", f":{port}/")
    server = PacsServer(tmp_path / "data", Backend("pg-fs", url, None, {}),
                        extra_env={"PACS_METRICS_CACHE_SECONDS": "0"}).start()
    try:
        token = server.make_token("prometheus", "monitor")
        other = server.make_token("zabbix", "monitor")
        radiologist = server.make_token("bs.lan", "radiologist")
        assert _scrape(server, radiologist).status_code == 403
        up = _scrape(server, token)
        assert up.status_code == 200 and ("pacs_index_up", 1.0) in [(n, v) for n, _, v in _samples(up.text)]
        link.stop()
        down = _scrape(server, token)
        assert down.status_code == 200, down.text
        samples = _samples(down.text)
        assert [v for n, _, v in samples if n == "pacs_index_up"] == [0.0]
        assert [v for n, labels, v in samples if n == "pacs_health_ok" and labels["check"] == "index"] == [0.0]
        assert not [n for n, _, _ in samples if n in ("pacs_instances", "pacs_instances_received_total")]
        # Only a token seen to pass: not one that never scraped, nor a role refused before.
        assert _scrape(server, other).status_code == 503
        assert _scrape(server, radiologist).status_code == 503
        assert _scrape(server, "made-up-token").status_code == 503
    finally:
        link.stop()
        server.stop()


def test_routing_destinations_differing_only_in_credentials_are_one_series(tmp_path: Path) -> None:
    """Before: two DICOMweb routes to the same server with different
    credentials (or query strings) in their URLs gave two samples with the
    same labels once the credentials were cut off: a duplicate series,
    of which Prometheus keeps one and drops the other ("duplicate sample
    for timestamp"), so the dead jobs of one could hide behind the other's
    zero. Now the jobs of both are added up in one series per state."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_METRICS_CACHE_SECONDS": "0"}).start()
    try:
        token = server.make_token("prometheus", "monitor")
        port = free_port()  # nobody listens: the jobs wait
        server.cli("route", "add", "to-a", "--if", "Modality=CT", "--to-url",
                   f"http://dept-a:pw-a@127.0.0.1:{port}/dicom-web")
        server.cli("route", "add", "to-b", "--if", "Modality=CT", "--to-url",
                   f"http://127.0.0.1:{port}/dicom-web?tenant=b")
        assert server.storescu(str(make_ct(tmp_path / "ct.dcm"))).returncode == 0
        destination = f"http://127.0.0.1:{port}/dicom-web"

        def queued() -> Samples:
            return [s for s in _samples(_scrape(server, token).text)
                    if s[0] == "pacs_routing_jobs" and s[1]["destination"] == destination]

        assert wait_until(lambda: sum(v for _, _, v in queued()) == 2, timeout=30)
        series = [(name, tuple(sorted(labels.items()))) for name, labels, _ in queued()]
        assert len(series) == len(set(series)) == 3, series  # pending, sending, dead: once each
        text = _scrape(server, token).text
        every = [(name, tuple(sorted(labels.items()))) for name, labels, _ in _samples(text)]
        assert len(every) == len(set(every)), "duplicate series"
        assert "pw-a" not in text and "tenant" not in text
    finally:
        server.stop()


def test_a_password_with_a_slash_unencoded_is_not_in_the_destination_label(tmp_path: Path) -> None:
    """Before: the destination label cut the credentials off the URL's
    authority as urlsplit reads it, but a password typed with a "/", "?"
    or "#" not percent-encoded (generated passwords have them) ends the
    authority early: ``http://pacs:Ab/x9#q@host/dicom-web`` was shown with
    its password, in every scrape while the route's jobs waited or died
    (such a URL never works). Now everything up to the last "@" goes."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_METRICS_CACHE_SECONDS": "0"}).start()
    try:
        token = server.make_token("prometheus", "monitor")
        port = free_port()
        server.cli("route", "add", "to-cloud", "--if", "Modality=CT", "--to-url",
                   f"https://pacs:Pw9/Zq#Kx@127.0.0.1:{port}/dicom-web")
        assert server.storescu(str(make_ct(tmp_path / "ct.dcm"))).returncode == 0

        def destinations() -> set[str]:
            return {labels["destination"] for name, labels, _ in _samples(_scrape(server, token).text)
                    if name == "pacs_routing_jobs"}

        assert wait_until(lambda: bool(destinations()), timeout=30)
        assert destinations() == {f"https://127.0.0.1:{port}/dicom-web"}
        text = _scrape(server, token).text
        for secret in ("Pw9", "Zq", "Kx", "pacs:"):
            assert secret not in text, secret
    finally:
        server.stop()


def test_a_local_proxy_that_sends_only_x_forwarded_proto_is_not_local(tmp_path: Path) -> None:
    """Before: with metrics_local_unauthenticated, a request from 127.0.0.1
    was taken for a local agent unless it carried X-Forwarded-For,
    Forwarded or X-Real-IP; a TLS-terminating proxy on the machine that
    sets X-Forwarded-Proto only (what the README has the secure cookie
    follow), X-Forwarded-Host or Via relayed any host's request to
    /metrics without a token. Now any of a proxy's headers makes the
    request not local."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_METRICS_LOCAL_UNAUTHENTICATED": "true",
                                   "PACS_TRUSTED_PROXIES": "127.0.0.1"}).start()
    try:
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        assert httpx.get(url).status_code == 200  # the local agent
        for header in ({"X-Forwarded-Proto": "https"}, {"X-Forwarded-Host": "pacs.bvdk.vn"},
                       {"X-Forwarded-Port": "443"}, {"X-Forwarded-Server": "proxy"}, {"Via": "1.1 proxy"}):
            assert httpx.get(url, headers=header).status_code == 401, header
    finally:
        server.stop()


def test_index_health_on_a_full_index_disk_is_0_as_health_says(tmp_path: Path) -> None:
    """Before: with the SQLite index's disk nearly full (every C-STORE then
    refused 0xA703) /health answered 503 "index": "error: disk full ...",
    while pacs_health_ok{check="index"}, documented "as /health", stayed
    1: the check lived in the HTTP route only. Now both read one check."""
    assert os.geteuid() == 0, "mounting a small tmpfs needs root"
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(index_dir)], check=True)
    try:
        backend = Backend("sqlite-fs", f"sqlite:///{index_dir / 'index.sqlite'}", None, {})
        server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_METRICS_CACHE_SECONDS": "0"}).start()
        try:
            token = server.make_token("prometheus", "monitor")

            def index_ok() -> list[float]:
                return [v for n, labels, v in _samples(_scrape(server, token).text)
                        if n == "pacs_health_ok" and labels["check"] == "index"]

            assert index_ok() == [1.0]
            st = os.statvfs(index_dir)
            filler = index_dir / "filler.bin"
            with open(filler, "wb") as f:  # about 8 MB left free
                f.truncate(0)
                remaining = st.f_bavail * st.f_frsize - 8 * 1024 * 1024
                while remaining > 0:
                    f.write(b"\0" * min(1024 * 1024, remaining))
                    remaining -= 1024 * 1024
            with server.http() as http:
                assert http.get("/health").json()["index"].startswith("error"), "the check itself"
            assert index_ok() == [0.0]
            filler.unlink()
            assert index_ok() == [1.0]
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(index_dir)], check=False)


def test_a_local_agent_on_a_dual_stack_listener_scrapes_without_a_token(tmp_path: Path) -> None:
    """Before: with host "::" (IPv6 and IPv4 on one socket) a local agent
    scraping http://127.0.0.1 arrives as ::ffff:127.0.0.1, which Python
    3.11 does not call loopback: metrics_local_unauthenticated refused it
    401. Now an IPv4-mapped address is judged as the IPv4 one."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_METRICS_LOCAL_UNAUTHENTICATED": "true", "PACS_HOST": "::"}).start()
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert httpx.get(f"http://{host}:{server.http_port}/metrics").status_code == 200, host
        assert httpx.get(f"http://127.0.0.1:{server.http_port}/api/worklist").status_code == 401
    finally:
        server.stop()
