"""Issue 8 (TLS): DICOM over TLS with DCMTK as the modality, mutual TLS,
HTTPS for the API, and the `pacs certs` CA helper. Real sockets, real
`pacs serve` processes, certificates made by the CLI itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs.aes import AeRegistry

from .conftest import PACS, Backend, PacsServer, free_port, run_dcmtk, wait_port
from .dicomfiles import make_ct
from .peers import PACS_COMMANDS, wait_until


def pacs_cli(*args: str) -> dict[str, object]:
    """Run `pacs ... --json` and return its one JSON object."""
    result = PACS_COMMANDS.run([*args, "--json"], dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path
    outputs: dict[str, dict[str, object]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    outputs = {
        "ca": pacs_cli("certs", "init-ca", "--out", str(root / "ca"), "--name", "Test Hospital CA"),
        "server": pacs_cli("certs", "issue", "pacs", "--ca", str(root / "ca"), "--out", str(root / "server"),
                           "--dns", "localhost", "--dns", "pacs.hospital.local", "--ip", "127.0.0.1"),
        "client": pacs_cli("certs", "issue", "CT_ROOM1", "--ca", str(root / "ca"), "--out", str(root / "ct1"),
                           "--client"),
        "rogue-ca": pacs_cli("certs", "init-ca", "--out", str(root / "rogue-ca")),
        "rogue": pacs_cli("certs", "issue", "CT_ROOM1", "--ca", str(root / "rogue-ca"), "--out",
                          str(root / "rogue"), "--client"),
    }
    return Pki(
        ca=root / "ca" / "ca.pem",
        server_cert=root / "server" / "pacs.pem",
        server_key=root / "server" / "pacs.key",
        client_cert=root / "ct1" / "CT_ROOM1.pem",
        client_key=root / "ct1" / "CT_ROOM1.key",
        rogue_cert=root / "rogue" / "CT_ROOM1.pem",
        rogue_key=root / "rogue" / "CT_ROOM1.key",
        outputs=outputs,
    )


def tls_env(pki: Pki, tls_port: int, **extra: str) -> dict[str, str]:
    return {
        "PACS_DICOM_TLS_PORT": str(tls_port),
        "PACS_TLS_CERT": str(pki.server_cert),
        "PACS_TLS_KEY": str(pki.server_key),
        "PACS_TLS_CA": str(pki.ca),
        **extra,
    }


def start_server(data_dir: Path, env: dict[str, str], **kwargs: object) -> PacsServer:
    server = PacsServer(data_dir, Backend("sqlite-fs", None, None, {}), extra_env=env, **kwargs)  # type: ignore[arg-type]
    try:
        return server.start()
    except Exception:
        print(server.log_text()[-5000:])
        server.stop()
        raise


def stop_server(server: PacsServer) -> None:
    server.stop()
    if server.proc is not None and server.proc.returncode not in (0, -signal.SIGTERM):
        print(server.log_text()[-5000:])


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[PacsServer, int]]:
    """A server with both DICOM ports, HTTPS, and mutual TLS on."""
    tls_port = free_port()
    env = tls_env(pki, tls_port, PACS_TLS_REQUIRE_CLIENT_CERT="true", PACS_HTTP_TLS="true")
    server = start_server(tmp_path_factory.mktemp("mtls") / "data", env)
    wait_port(tls_port, proc=server.proc)
    yield server, tls_port
    stop_server(server)


def storescu_tls(port: int, *tls_args: str, files: list[Path], calling: str = "CT_ROOM1") -> subprocess.CompletedProcess[str]:
    """DCMTK storescu to *port*; *tls_args* are its TLS options (none: plain TCP)."""
    return run_dcmtk("storescu", *tls_args, "-aet", calling, "-aec", "FILMLESS", "127.0.0.1", str(port),
                     *map(str, files), timeout=60)


def with_cert(pki: Pki) -> tuple[str, ...]:
    # +tls KEY CERT: authenticated TLS with our client certificate; +cf: trust our CA for the server's.
    return ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))


def https_context(pki: Pki, *, client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def https(server: PacsServer, pki: Pki, *, client_cert: bool = True) -> httpx.Client:
    return httpx.Client(base_url=f"https://localhost:{server.http_port}", timeout=30,
                        verify=https_context(pki, client_cert=client_cert), headers=server.auth_headers)


# -- (1) DCMTK over TLS ---------------------------------------------------------------
def test_dcmtk_storescu_with_certificate_stores_over_tls(mtls: tuple[PacsServer, int], pki: Pki,
                                                         tmp_path: Path) -> None:
    server, tls_port = mtls
    before = server.stats()["instances"]
    ct = make_ct(tmp_path / "ct.dcm", PatientID="TLS1")
    result = storescu_tls(tls_port, *with_cert(pki), files=[ct])
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.stats()["instances"] == before + 1
    # Indexed: found by QIDO (over HTTPS, with the same client certificate).
    with https(server, pki) as client:
        found = client.get("/dicom-web/studies", params={"PatientID": "TLS1"})
    assert found.status_code == 200, found.text
    assert len(found.json()) == 1


# -- (2) mutual TLS refuses the rest, and keeps serving ------------------------------
def test_mutual_tls_refuses_clients_without_a_valid_certificate(mtls: tuple[PacsServer, int], pki: Pki,
                                                                tmp_path: Path) -> None:
    server, tls_port = mtls
    before = server.stats()["instances"]
    # A peer that connects and never speaks must not hold up the listener for the others.
    stalled = socket.create_connection(("127.0.0.1", tls_port))
    try:
        attempts = {
            # +tla: TLS without a client certificate.
            "no certificate": ("+tla", "+cf", str(pki.ca)),
            # A certificate for the same name from another CA.
            "other CA": ("+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)),
            # Plain DICOM to the TLS port.
            "no TLS": (),
        }
        for what, args in attempts.items():
            ct = make_ct(tmp_path / f"refused-{uuid.uuid4().hex}.dcm")
            result = storescu_tls(tls_port, *args, files=[ct])
            assert result.returncode != 0, f"{what}: {result.stdout}{result.stderr}"
        assert server.stats()["instances"] == before, "a refused client stored something"
        assert server.alive(), server.log_text()[-3000:]

        good = make_ct(tmp_path / "good.dcm")
        result = storescu_tls(tls_port, *with_cert(pki), files=[good])
        assert result.returncode == 0, result.stdout + result.stderr
        assert server.stats()["instances"] == before + 1
    finally:
        stalled.close()
    # Each refusal is in the audit trail, with the reason: written by the
    # handshake's thread, which may finish after storescu has exited.
    def tls_refusals() -> list[dict]:
        events = json.loads(server.cli("audit", "--format", "json").stdout)
        return [e for e in events if e["action"] == "denied" and "TLS handshake refused" in e["detail"]]

    wait_until(lambda: len(tls_refusals()) >= 3, timeout=30)
    refusals = tls_refusals()
    assert len(refusals) >= 3, refusals
    assert all(e["client"] == "127.0.0.1" and e["protocol"] == "dicom" for e in refusals)


def test_our_scu_client_context_talks_to_a_mutual_tls_peer(mtls: tuple[PacsServer, int], pki: Pki,
                                                           tmp_path: Path) -> None:
    """pacs.tls.client_context: what forwarding and remote Q/R will use."""
    from pacs.settings import load_settings
    from pacs.tls import client_context

    _, tls_port = mtls

    def echo(ctx: ssl.SSLContext, hostname: str) -> bool:
        ae = AE(ae_title="PACS_SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", tls_port, ae_title="FILMLESS", tls_args=(ctx, hostname))
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    ours = load_settings(data_dir=tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    assert echo(client_context(ours), "127.0.0.1")
    assert echo(client_context(ours), "localhost")
    # Without our certificate the peer (mutual TLS) refuses us.
    anonymous = load_settings(data_dir=tmp_path, tls_ca=pki.ca)
    assert not echo(client_context(anonymous), "127.0.0.1")
    # A name the peer's certificate does not carry fails the hostname check.
    assert not echo(client_context(ours), "pacs.elsewhere.example")



def test_move_and_remote_echo_reach_a_registered_tls_peer(mtls: tuple[PacsServer, int], pki: Pki,
                                                          tmp_path: Path) -> None:
    """`pacs ae add --tls`: our own associations to that AE (C-MOVE
    sub-operations, remote Q/R, routing) speak DICOM TLS, with our
    certificate for the peer's mutual TLS and its certificate checked."""
    peer, tls_port = mtls
    identity = {"PACS_TLS_CERT": str(pki.server_cert), "PACS_TLS_KEY": str(pki.server_key),
                "PACS_TLS_CA": str(pki.ca)}
    ours = PacsServer(tmp_path / "ours", Backend("sqlite-fs", None, None, {}), ae_title="HOSPITAL_A",
                      extra_env=identity)
    ours.start()
    try:
        # The peer answers as FILMLESS: registered under that title, at its TLS port.
        added = json.loads(ours.cli("ae", "add", "FILMLESS", "--host", "localhost", "--port", str(tls_port),
                                    "--tls", "--json").stdout)
        assert added["tls"] is True
        listed = json.loads(ours.cli("ae", "list", "--json").stdout)
        assert [ae["tls"] for ae in listed if ae["title"] == "FILMLESS"] == [True]
        assert ours.cli("remote", "echo", "FILMLESS", "--json", check=False).returncode == 0

        ct = make_ct(tmp_path / "move.dcm", PatientID="TLSMOVE")
        assert ours.storescu(str(ct)).returncode == 0
        before = peer.stats()["instances"]
        moved = run_dcmtk("movescu", "-aet", "VIEWER", "-aec", "HOSPITAL_A", "-aem", "FILMLESS", "-S",
                          "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLSMOVE",
                          "127.0.0.1", str(ours.dicom_port), timeout=60)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert peer.stats()["instances"] == before + 1
        with https(peer, pki) as client:
            found = client.get("/dicom-web/studies", params={"PatientID": "TLSMOVE"})
        assert found.status_code == 200 and len(found.json()) == 1, found.text

        # The same peer without --tls: plain DICOM to a TLS port gets nowhere.
        ours.cli("ae", "add", "FILMLESS", "--host", "localhost", "--port", str(tls_port), "--json")
        time.sleep(AeRegistry.CACHE_SECONDS + 0.5)  # the running server re-reads the registry
        assert ours.cli("remote", "echo", "FILMLESS", "--json", check=False).returncode != 0
        refused = run_dcmtk("movescu", "-aet", "VIEWER", "-aec", "HOSPITAL_A", "-aem", "FILMLESS", "-S",
                            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLSMOVE",
                            "127.0.0.1", str(ours.dicom_port), timeout=60)
        assert peer.stats()["instances"] == before + 1, refused.stdout + refused.stderr
        assert ours.alive()
    finally:
        stop_server(ours)

# -- (3) HTTPS -----------------------------------------------------------------------
def test_https_health_and_mutual_tls(mtls: tuple[PacsServer, int], pki: Pki) -> None:
    server, _ = mtls
    with https(server, pki) as client:
        response = client.get("/health")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ok"
    with https(server, pki, client_cert=False) as client, pytest.raises(httpx.TransportError):
        client.get("/health")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=10) as plain, \
            pytest.raises(httpx.TransportError):
        plain.get("/health")


# -- (4) the plain port stays for legacy modalities ----------------------------------
def test_plain_port_still_works_alongside_tls(mtls: tuple[PacsServer, int], tmp_path: Path) -> None:
    server, _ = mtls
    before = server.stats()["instances"]
    result = server.storescu(str(make_ct(tmp_path / "legacy.dcm")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.stats()["instances"] == before + 1


def test_a_pinned_client_certificate_ties_the_title_to_one_device(mtls: tuple[PacsServer, int], pki: Pki,
                                                                  tmp_path: Path) -> None:
    """`pacs ae add CT_PINNED --client-cert CT_ROOM1.pem`: another device with
    a certificate from the same hospital CA (valid for mutual TLS) cannot
    call as CT_PINNED, nor can anyone over plain TCP; the pinned device can,
    and the other device under its own title too. Refusals are A-ASSOCIATE-RJ
    (calling AE not recognised) and audited."""
    server, tls_port = mtls
    pacs_cli("certs", "issue", "CT_ROOM2", "--ca", str(pki.ca.parent), "--out", str(tmp_path / "ct2"), "--client")
    second = ("+tls", str(tmp_path / "ct2" / "CT_ROOM2.key"), str(tmp_path / "ct2" / "CT_ROOM2.pem"), "+cf", str(pki.ca))
    # As `openssl pkcs12` exports it: attributes before the certificate.
    exported = tmp_path / "CT_ROOM1-export.pem"
    exported.write_text("Bag Attributes\n    localKeyID: 01 00 00 00\nsubject=CN = CT_ROOM1\n\n"
                        + pki.client_cert.read_text())
    pinned = server.cli("ae", "add", "CT_PINNED", "--host", "127.0.0.1", "--port", "104",
                        "--client-cert", str(exported))
    assert "warning" not in pinned.stderr  # mutual TLS is on here: the pin can be met
    try:
        time.sleep(AeRegistry.CACHE_SECONDS + 0.5)  # the running server re-reads the registry
        before = server.stats()["instances"]
        pinned = storescu_tls(tls_port, *with_cert(pki), files=[make_ct(tmp_path / "a.dcm")], calling="CT_PINNED")
        assert pinned.returncode == 0, pinned.stdout + pinned.stderr
        impostor = storescu_tls(tls_port, *second, files=[make_ct(tmp_path / "b.dcm")], calling="CT_PINNED")
        assert impostor.returncode != 0 and "Rejected" in impostor.stdout + impostor.stderr, impostor.stderr
        plain = storescu_tls(server.dicom_port, files=[make_ct(tmp_path / "c.dcm")], calling="CT_PINNED")
        assert plain.returncode != 0 and "Rejected" in plain.stdout + plain.stderr, plain.stderr
        own = storescu_tls(tls_port, *second, files=[make_ct(tmp_path / "d.dcm")], calling="CT_ROOM2")
        assert own.returncode == 0, own.stdout + own.stderr
        assert server.stats()["instances"] == before + 2
        deadline = time.monotonic() + 20
        while True:
            events = json.loads(server.cli("audit", "--user", "CT_PINNED", "--format", "json").stdout)
            denied = sorted(e["detail"] for e in events if e["action"] == "associate" and e["outcome"] == "denied")
            if len(denied) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(denied) == 2 and "must call over DICOM TLS" in denied[0] and "another TLS client" in denied[1], denied
        assert server.alive()
    finally:
        server.cli("ae", "remove", "CT_PINNED")


def test_tls_only_without_client_certificates(tmp_path: Path, pki: Pki) -> None:
    """dicom_plain=false: one TLS port; no mutual TLS, so a modality without a certificate may store."""
    tls_port = free_port()
    server = start_server(tmp_path / "data", tls_env(pki, tls_port, PACS_DICOM_PLAIN="false"),
                          dicom_port=tls_port)
    try:
        ct = make_ct(tmp_path / "anon.dcm")
        result = storescu_tls(tls_port, "+tla", "+cf", str(pki.ca), files=[ct])
        assert result.returncode == 0, result.stdout + result.stderr
        assert server.stats()["instances"] == 1
        assert storescu_tls(tls_port, files=[make_ct(tmp_path / "plain.dcm")]).returncode != 0
        assert server.stats()["instances"] == 1
        # HTTP stays plain unless http_tls is set.
        with server.http() as client:
            assert client.get("/health").status_code == 200
        assert "DICOM over TLS on" in server.log_text()
    finally:
        stop_server(server)


def test_tls_port_without_certificate_fails_the_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [PACS, "serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(free_port()),
         "--http-port", str(free_port()), "--hl7-port", str(free_port()), "--dicom-tls-port", str(free_port())],
        check=False, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PACS_OFFER_SAMPLES": "false"},
    )
    assert result.returncode == 1
    assert "tls_cert" in result.stderr


# -- (5) pacs certs --------------------------------------------------------------------
def test_certs_cli_json_files_and_permissions(pki: Pki, tmp_path: Path) -> None:
    ca_out = pki.outputs["ca"]
    assert ca_out["kind"] == "ca" and ca_out["files"] == [str(pki.ca), str(pki.ca.with_name("ca.key"))]
    assert "Test Hospital CA" in str(ca_out["subject"])
    server_out = pki.outputs["server"]
    assert server_out["files"] == [str(pki.server_cert), str(pki.server_key)]
    assert server_out["dns"] == ["localhost", "pacs.hospital.local"] and server_out["ip"] == ["127.0.0.1"]
    assert pki.outputs["client"]["kind"] == "client"

    # Private keys 0600, certificates world-readable, the CA directory private.
    for key in (pki.ca.with_name("ca.key"), pki.server_key, pki.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (pki.ca, pki.server_cert, pki.client_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert stat.S_IMODE(pki.ca.parent.stat().st_mode) == 0o700
    assert not list(pki.ca.parent.glob(".*.tmp"))

    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "pacs.hospital.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert set(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert server_out["sha256_fingerprint"] == server.fingerprint(hashes.SHA256()).hex(":").upper()

    # An existing CA is never replaced; bad input writes nothing (exit 2).
    key_before = pki.ca.with_name("ca.key").read_bytes()
    again = subprocess.run([PACS, "certs", "init-ca", "--out", str(pki.ca.parent)], check=False, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert pki.ca.with_name("ca.key").read_bytes() == key_before
    for bad in (["bad/name"], ["ok", "--ip", "300.1.2.3"]):
        result = subprocess.run([PACS, "certs", "issue", *bad, "--ca", str(pki.ca.parent), "--out", str(tmp_path)],
                                check=False, capture_output=True, text=True)
        assert result.returncode == 2, result.stdout + result.stderr
    assert not list(tmp_path.iterdir())
    missing = subprocess.run([PACS, "certs", "issue", "x", "--ca", str(tmp_path / "none"), "--out", str(tmp_path)],
                             check=False, capture_output=True, text=True)
    assert missing.returncode == 2 and "init-ca" in missing.stderr
