"""TLS review fixes: an expired server certificate is reported as ours (at
start, daily, and when a modality rejects it), STOW-RS routing trusts the
hospital CA and presents our certificate, unreadable TLS files name their
setting, `pacs certs` never loses a CA or silently replaces a leaf, and the
DHE suites of the BCP 195 profile work. Real `pacs serve` processes, DCMTK
and certificates made by the CLI."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import PacsServer, free_port, wait_port
from .dicomfiles import make_ct
from .peers import PACS_COMMANDS, wait_until
from .test_tls import Pki, pki, start_server, stop_server, storescu_tls, tls_env  # noqa: F401 (pki: fixture)


def make_leaf(pki: Pki, out: Path, *, not_before: datetime, not_after: datetime) -> tuple[Path, Path]:
    """A server certificate for localhost/127.0.0.1 from the test CA, with the validity given."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.with_name("ca.key").read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "pacs.pem", out / "pacs.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def audit_events(server: PacsServer) -> list[dict[str, str]]:
    return json.loads(server.cli("audit", "--format", "json").stdout)


# -- (1) an expired server certificate -------------------------------------------------
def test_expired_server_certificate_is_reported_as_ours(pki: Pki, tmp_path: Path) -> None:
    cert, key = make_leaf(pki, tmp_path / "old", not_before=datetime(2020, 1, 1, tzinfo=UTC),
                          not_after=datetime(2021, 1, 1, tzinfo=UTC))
    tls_port = free_port()
    server = start_server(tmp_path / "data", tls_env(pki, tls_port, PACS_TLS_CERT=str(cert), PACS_TLS_KEY=str(key)))
    try:
        wait_port(tls_port, proc=server.proc)
        assert "EXPIRED on 2021-01-01" in server.log_text(), server.log_text()[-3000:]
        # The modality checks our certificate (+cf) and rejects it with an alert.
        result = storescu_tls(tls_port, "+tla", "+cf", str(pki.ca), files=[make_ct(tmp_path / "ct.dcm")])
        assert result.returncode != 0, result.stdout + result.stderr
        assert wait_until(lambda: "the peer rejected our certificate" in server.log_text(), timeout=30), \
            server.log_text()[-3000:]
        assert "refused: SSLV3_ALERT" not in server.log_text()

        def ours() -> list[dict[str, str]]:
            return [e for e in audit_events(server) if "the peer rejected our certificate" in e["detail"]]

        assert wait_until(lambda: bool(ours()), timeout=30), audit_events(server)
        event = ours()[0]
        assert event["outcome"] == "failure" and event["client"] == "127.0.0.1", event
        assert not [e for e in audit_events(server) if "TLS handshake refused" in e["detail"]]
        assert server.alive()
    finally:
        stop_server(server)


def test_expiry_is_checked_again_while_serving(pki: Pki, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The daily re-check (a server runs for months, past the 30-day warning)."""
    from pacs.settings import load_settings
    from pacs.tls import CertificateExpiryWatch

    now = datetime.now(UTC)
    cert, key = make_leaf(pki, tmp_path / "soon", not_before=now - timedelta(days=1),
                          not_after=now + timedelta(days=10))
    settings = load_settings(data_dir=tmp_path, tls_cert=cert, tls_key=key, tls_ca=pki.ca)
    caplog.set_level(logging.WARNING, logger="pacs.tls")
    watch = CertificateExpiryWatch(settings, interval=0.05).start()
    try:
        assert wait_until(lambda: sum("expires on" in r.getMessage() for r in caplog.records) >= 2, timeout=30)
    finally:
        watch.stop()
    warning = next(r for r in caplog.records if "expires on" in r.getMessage())
    assert warning.levelno == logging.WARNING and "in 9 days" in warning.getMessage()


# -- (2) STOW-RS routing to an HTTPS server of the hospital CA, with mutual TLS ---------
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[PacsServer, int]]:
    """DICOM TLS, HTTPS and mutual TLS, certificates from the hospital CA."""
    tls_port = free_port()
    server = start_server(tmp_path_factory.mktemp("hub") / "data",
                          tls_env(pki, tls_port, PACS_TLS_REQUIRE_CLIENT_CERT="true", PACS_HTTP_TLS="true"))
    wait_port(tls_port, proc=server.proc)
    yield server, tls_port
    stop_server(server)


def test_stow_routing_trusts_the_hospital_ca_and_presents_our_certificate(
        hub: tuple[PacsServer, int], pki: Pki, tmp_path: Path) -> None:
    target, _ = hub
    identity = {"PACS_TLS_CERT": str(pki.server_cert), "PACS_TLS_KEY": str(pki.server_key),
                "PACS_TLS_CA": str(pki.ca)}
    source = start_server(tmp_path / "source", identity)
    try:
        source.cli("route", "add", "to-hub", "--if", "PatientID=STOWTLS", "--to-url",
                   f"https://localhost:{target.http_port}/dicom-web", "--auth", f"Bearer {target.token}")
        before = target.stats()["instances"]
        assert source.storescu(str(make_ct(tmp_path / "stow.dcm", PatientID="STOWTLS"))).returncode == 0
        arrived = wait_until(lambda: target.stats()["instances"] == before + 1, timeout=60)
        jobs = source.cli("route", "list", "--json").stdout
        assert arrived, jobs + source.log_text()[-3000:]
    finally:
        stop_server(source)


# -- (3) TLS files the service user cannot read ----------------------------------------
def test_unreadable_key_names_the_setting_and_path(pki: Pki) -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to run pacs serve as another user")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code_root = Path(__import__("pacs").__file__).resolve().parent.parent
    # Outside pytest's 0700 tmp directories: the service user must reach the rest.
    work = Path(tempfile.mkdtemp(prefix="pacs-tls-user-"))
    try:
        work.chmod(0o755)
        (work / "tls").mkdir(mode=0o755)
        cert, key = work / "tls" / "pacs.pem", work / "tls" / "pacs.key"
        shutil.copy(pki.server_cert, cert)
        cert.chmod(0o644)
        shutil.copy(pki.server_key, key)
        key.chmod(0o600)  # root's, as `pacs certs issue` run with sudo leaves it
        ca = work / "tls" / "ca.pem"
        shutil.copy(pki.ca, ca)
        ca.chmod(0o644)
        (work / "data").mkdir()
        shutil.chown(work / "data", "nobody")
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin", "PACS_ENV_FILE=",
             "PACS_OFFER_SAMPLES=false", f"PYTHONPATH={code_root}:{site}",
             f"PACS_DICOM_TLS_PORT={free_port()}", f"PACS_TLS_CERT={cert}", f"PACS_TLS_KEY={key}",
             f"PACS_TLS_CA={ca}", f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
             "-m", "pacs.cli", "serve", "--data-dir", str(work / "data"), "--dicom-port", str(free_port()),
             "--http-port", str(free_port()), "--hl7-port", str(free_port())],
            check=False, capture_output=True, text=True, timeout=120, cwd=work,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        message = " ".join(result.stderr.split())
        assert "tls_key" in message and str(key) in message and "not readable by user nobody" in message, message
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- (4) pacs certs ---------------------------------------------------------------------
def certs(*args: str) -> subprocess.CompletedProcess[str]:
    return PACS_COMMANDS.run(["certs", *args], {**os.environ, "PACS_ENV_FILE": ""}, timeout=120)


def test_certs_issue_never_loses_the_ca_nor_replaces_a_leaf_silently(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert certs("init-ca", "--out", str(ca)).returncode == 0
    ca_key, ca_pem = (ca / "ca.key").read_bytes(), (ca / "ca.pem").read_bytes()

    # A leaf named "ca" into the CA directory would replace the CA's key.
    result = certs("issue", "ca", "--ca", str(ca), "--out", str(ca))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (ca / "ca.key").read_bytes() == ca_key and (ca / "ca.pem").read_bytes() == ca_pem

    # An existing leaf is replaced only with --force.
    assert certs("issue", "pacs", "--ca", str(ca), "--out", str(tmp_path / "tls")).returncode == 0
    key = (tmp_path / "tls" / "pacs.key").read_bytes()
    again = certs("issue", "pacs", "--ca", str(ca), "--out", str(tmp_path / "tls"))
    assert again.returncode == 2 and "--force" in again.stderr, again.stdout + again.stderr
    assert (tmp_path / "tls" / "pacs.key").read_bytes() == key
    forced = certs("issue", "pacs", "--ca", str(ca), "--out", str(tmp_path / "tls"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "tls" / "pacs.key").read_bytes() != key

    # A directory whose ca.pem is a leaf is no CA.
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(tmp_path / "tls" / "pacs.pem", fake / "ca.pem")
    shutil.copy(tmp_path / "tls" / "pacs.key", fake / "ca.key")
    leaf_ca = certs("issue", "x", "--ca", str(fake), "--out", str(tmp_path / "x"))
    assert leaf_ca.returncode == 2 and "not a CA" in leaf_ca.stderr, leaf_ca.stdout + leaf_ca.stderr
    assert not (tmp_path / "x").exists()

    # Validity of less than a day is bad input (exit 2), nothing written.
    for days in ("0", "-30"):
        bad = certs("issue", f"d{days}", "--ca", str(ca), "--out", str(tmp_path / "days"), "--days", days)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        bad_ca = certs("init-ca", "--out", str(tmp_path / f"ca{days}"), "--days", days)
        assert bad_ca.returncode == 2, bad_ca.stdout + bad_ca.stderr
    assert not (tmp_path / "days").exists() and not (tmp_path / "ca0").exists()
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600


# -- (5) the DHE suites of PS3.15 B.9 -------------------------------------------------------
def test_a_dhe_only_peer_completes_the_handshake(hub: tuple[PacsServer, int], pki: Pki) -> None:
    server, tls_port = hub
    for port in (tls_port, server.http_port):
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            cipher = sock.cipher()
        assert cipher is not None and cipher[0].startswith("DHE-RSA-AES"), (port, cipher)
