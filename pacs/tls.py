"""TLS contexts: DICOM over TLS (PS3.15 Annex B), HTTPS, and our own SCU.

One policy for every socket: TLS 1.2 or newer with the cipher suites of the
DICOM "Non-Downgrading BCP 195 TLS Secure Transport Connection Profile"
(PS3.15 B.9; DCMTK's default ``+py``), plus the ECDSA suites of the Extended
profile (B.10) so an EC certificate works too. TLS 1.3 suites are OpenSSL's
(all AEAD). Mutual TLS (``tls_require_client_cert``) verifies the peer
against ``tls_ca`` only, never the system store: a certificate any public CA
issued must not open the archive.

The DICOM server context defers the handshake from pynetdicom's accept loop
to the association's own thread (see :class:`_DicomServerContext`), so one
client that connects and stalls cannot stop the listener accepting others.
"""

from __future__ import annotations

import grp
import hashlib
import inspect
import logging
import os
import pwd
import re
import socket
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .periodic import Periodic
from .settings import Settings

if TYPE_CHECKING:
    from .aes import RemoteAE

log = logging.getLogger(__name__)

# OpenSSL names, strongest first (the server picks from its own order, as BCP 195 asks).
# TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_DHE_RSA_WITH_AES_256_GCM_SHA384,
# TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_DHE_RSA_WITH_AES_128_GCM_SHA256 (B.9),
# TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (B.10).
# GCM suites exist only in TLS 1.2, so even a context whose minimum version
# cannot be set (older uvicorn) negotiates nothing below TLS 1.2 with this list.
_SUITES = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES128-GCM-SHA256",
)
CIPHERS = ":".join(_SUITES)

#: Called with (peer host, reason, refused) when a TLS handshake with a client
#: fails: *refused* is True when we turned the client down, False when the
#: client turned us down (it sent an alert, e.g. about our expired certificate).
RefusalHook = Callable[[str, str, bool], None]

#: A server certificate this close to its notAfter is warned about at start and daily.
EXPIRY_WARNING = timedelta(days=30)
# RFC 7919 ffdhe2048: the DHE suites of the B.9 profile need a group, and
# OpenSSL has none by default for a server context (a DHE-only peer got
# NO_SHARED_CIPHER). A named public group: nothing secret to generate per install.
_DH_PARAMS = "ffdhe2048.pem"
# Alerts a client sent us: it ended the handshake, we did not refuse it.
_PEER_ALERT = ("SSLV3_ALERT_", "TLSV1_ALERT_")


class TLSConfigError(ValueError):
    """The TLS settings cannot work together; the message names the setting to fix."""


def _harden(ctx: ssl.SSLContext, *, server: bool) -> None:
    """Apply the one TLS policy to *ctx* (any side)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    # Compression leaks plaintext lengths (CRIME); renegotiation is an old attack surface.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _check_file(path: Path | None, setting: str) -> Path:
    if path is None:
        raise TLSConfigError(f"{setting} is not set")
    # The service runs as its own user (scripts/install-service.sh): a key made
    # 0600 by root, or a file inside a 0700 directory, failed the start with a
    # bare "Permission denied" naming neither the setting nor the file.
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TLSConfigError(f"{setting}: no such file {path}") from None
    except OSError as exc:
        raise TLSConfigError(f"{setting}: cannot reach {path} as user {_user()} ({exc.strerror}): "
                             "a directory on the way is not open to this user") from None
    if not stat.S_ISREG(mode):
        raise TLSConfigError(f"{setting}: no such file {path}")
    if not os.access(path, os.R_OK):
        raise TLSConfigError(f"{setting}: {path} is not readable by user {_user()}: let its group read it "
                             f"(chgrp {_group()} {path}; chmod 640 {path})")
    return path


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no passwd entry (containers)
        return str(os.geteuid())


def _group() -> str:
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def _identity(settings: Settings, needed_by: str) -> tuple[Path, Path | None]:
    """The certificate and key files, checked; *needed_by* names who asked."""
    if settings.tls_cert is None:
        raise TLSConfigError(f"{needed_by} needs a certificate: set tls_cert and tls_key (PACS_TLS_CERT, "
                             "PACS_TLS_KEY; make them with: pacs certs issue)")
    cert = _check_file(settings.tls_cert, "tls_cert")
    key = _check_file(settings.tls_key, "tls_key") if settings.tls_key is not None else None
    return cert, key


def _client_ca(settings: Settings) -> Path | None:
    """The CA bundle clients are verified against; required when mutual TLS is on."""
    if not settings.tls_require_client_cert:
        return None
    if settings.tls_ca is None:
        raise TLSConfigError("tls_require_client_cert needs tls_ca (PACS_TLS_CA): the CA that "
                             "issued the clients' certificates")
    return _check_file(settings.tls_ca, "tls_ca")


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")


def certificate_sha256(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, 64 lower-case hex digits."""
    return hashlib.sha256(der).hexdigest()


def pem_certificate_sha256(path: Path) -> str:
    """The fingerprint of the (first) certificate in PEM file *path*; ``ValueError`` if it holds none."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"{path}: {exc}") from None
    # The first certificate, wherever it starts: exports (openssl pkcs12)
    # put "Bag Attributes" or comments before it, chain files more after.
    found = _PEM_CERTIFICATE.search(text)
    if found is None:
        raise ValueError(f"{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    try:
        der = ssl.PEM_cert_to_DER_cert(found.group(0))
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate ({exc})") from None
    return certificate_sha256(der)


_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def parse_fingerprint(text: str) -> str:
    """A SHA-256 certificate fingerprint as 64 lower-case hex digits (colons
    and case as ``openssl x509 -fingerprint -sha256`` prints them are accepted)."""
    value = text.strip().lower().removeprefix("sha256 fingerprint=").replace(":", "")
    if not _FINGERPRINT.match(value):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return value


def certificate_pin(value: str) -> str:
    """The SHA-256 fingerprint a ``--client-cert`` / ``client_cert`` value
    names: a PEM certificate file's, or the value itself as a fingerprint."""
    path = Path(value)
    return pem_certificate_sha256(path) if path.is_file() else parse_fingerprint(value)


def peer_certificate_sha256(sock: Any) -> str | None:
    """The fingerprint of the certificate the TLS peer on *sock* presented,
    or None (plain TCP, or no client certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
    except (ValueError, OSError):  # handshake not done or connection gone
        return None
    return certificate_sha256(der) if der else None


def _peer(sock: socket.socket) -> tuple[str, int]:
    try:
        host, port = sock.getpeername()[:2]
        return str(host), int(port)
    except OSError:
        return "?", 0


class _DicomTLSSocket(ssl.SSLSocket):
    """An SSLSocket that completes its server handshake on first read.

    pynetdicom wraps accepted sockets inside its accept loop; a handshake there
    would block every other connection while one peer dawdles. Here the first
    ``recv`` (already in the association's thread, under the socket timeout)
    does it; a refused peer reads as a closed connection, which pynetdicom
    handles quietly, and is reported once through the context's hook.
    """

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not getattr(self, "_pacs_handshake_done", False):
            self._pacs_handshake_done = True
            host, port = _peer(self)
            peer = f"{host}:{port}"
            try:
                self.do_handshake()
            except (ssl.SSLEOFError, ConnectionError, TimeoutError) as exc:
                # Port probes and clients that hung up: nothing to refuse.
                log.debug("DICOM TLS connection from %s closed before the handshake: %s", peer, exc)
                return b""
            except (ssl.SSLError, OSError) as exc:
                reason = str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc)
                refused = not reason.startswith(_PEER_ALERT)
                if refused:
                    detail = f"TLS handshake refused: {reason}"
                    log.warning("DICOM TLS handshake from %s refused: %s", peer, reason)
                else:
                    # An alert the client sent: it refused us (mostly our certificate:
                    # expired, unknown CA), which an operator must not read as a
                    # misbehaving modality.
                    about = ("the peer rejected our certificate" if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason
                             else "the peer ended the handshake")
                    detail = f"TLS handshake failed: {about}: {reason}"
                    log.error("DICOM TLS handshake from %s failed: %s: %s", peer, about, reason)
                hook = getattr(self.context, "on_refused", None)
                if hook is not None:
                    try:
                        # The host alone, as the other DICOM audit events record the client.
                        hook(host, detail, refused)
                    except Exception:  # an audit hiccup must not take the listener thread down
                        log.exception("TLS refusal hook failed")
                return b""
            if log.isEnabledFor(logging.DEBUG):
                cert: dict[str, Any] = dict(self.getpeercert() or {})
                names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
                log.debug("DICOM TLS from %s: %s, %s, client %s", peer, self.version(), self.cipher(),
                          names[0] if names else "(no certificate)")
        return super().recv(buflen, flags)


class _DicomServerContext(ssl.SSLContext):
    """Server context whose sockets defer the handshake (see :class:`_DicomTLSSocket`)."""

    sslsocket_class = _DicomTLSSocket
    #: Seconds a peer may stall a read (the handshake included) before it is dropped.
    io_timeout: float | None = 60.0
    on_refused: RefusalHook | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,  # type: ignore[override]
                    do_handshake_on_connect: bool = True, **kwargs: Any) -> ssl.SSLSocket:
        if server_side:
            # Accepted sockets are blocking: without a timeout a silent peer holds a thread forever.
            sock.settimeout(self.io_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=do_handshake_on_connect, **kwargs)


def dicom_server_context(settings: Settings, *, on_refused: RefusalHook | None = None) -> ssl.SSLContext | None:
    """The SSL context of the DICOM TLS listener, or None when ``dicom_tls_port`` is unset.

    Raises :class:`TLSConfigError` when the port is set but the certificate,
    key or (for mutual TLS) CA bundle is missing: a modality configured for
    TLS must not find a silently plain-only archive. *on_refused* is told of
    each client the handshake refused (for the audit trail).
    """
    if settings.dicom_tls_port is None:
        if not settings.dicom_plain:
            raise TLSConfigError("dicom_plain is false but dicom_tls_port is not set: no DICOM listener left")
        return None
    if settings.dicom_plain and settings.dicom_tls_port == settings.dicom_port:
        raise TLSConfigError(f"dicom_tls_port {settings.dicom_tls_port} is also the plain dicom_port")
    cert, key = _identity(settings, "dicom_tls_port")
    ca = _client_ca(settings)
    ctx = _DicomServerContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, server=True)
    _load_dh_params(ctx)
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=ca)
    ctx.io_timeout = settings.dicom_timeout
    ctx.on_refused = on_refused
    return ctx


def uvicorn_ssl_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for :class:`uvicorn.Config` serving HTTPS; ``{}`` unless ``http_tls``.

    With mutual TLS on, HTTPS clients (browsers included) need a certificate
    from ``tls_ca`` too.
    """
    if not settings.http_tls:
        return {}
    import uvicorn

    cert, key = _identity(settings, "http_tls")
    ca = _client_ca(settings)
    kwargs: dict[str, Any] = {
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key) if key is not None else None,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if ca is not None else ssl.CERT_NONE,
        "ssl_ca_certs": str(ca) if ca is not None else None,
        "ssl_ciphers": CIPHERS,
    }
    # uvicorn >= 0.40 lets us finish its context (minimum version, server
    # cipher order); older ones still get the TLS 1.2-only cipher list above.
    if "ssl_context_factory" in inspect.signature(uvicorn.Config.__init__).parameters:
        kwargs["ssl_context_factory"] = _finish_uvicorn_context
    return kwargs


def _finish_uvicorn_context(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    _harden(ctx, server=True)
    _load_dh_params(ctx)
    return ctx


def _load_dh_params(ctx: ssl.SSLContext) -> None:
    """Give a server context the ffdhe2048 group its DHE suites need."""
    with resources.as_file(resources.files(__package__ or "pacs").joinpath(_DH_PARAMS)) as path:
        ctx.load_dh_params(str(path))


def certificate_not_after(path: Path) -> datetime:
    """The notAfter (UTC) of the first certificate in PEM file *path*."""
    from cryptography import x509

    found = _PEM_CERTIFICATE.search(path.read_text(encoding="ascii", errors="replace"))
    if found is None:
        raise ValueError(f"{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    return x509.load_pem_x509_certificate(found.group(0).encode("ascii")).not_valid_after_utc


def check_certificate_expiry(settings: Settings, now: datetime | None = None) -> None:
    """Log an error when ``tls_cert`` has expired, a warning within
    :data:`EXPIRY_WARNING` of it; nothing without ``tls_cert``.

    Peers refuse an expired certificate at every handshake (DICOM TLS,
    HTTPS, and our own outbound associations), so this is said before they
    start failing. The certificate is read once at start: a renewed one is
    served only after ``pacs serve`` is restarted.
    """
    if settings.tls_cert is None:
        return
    try:
        not_after = certificate_not_after(settings.tls_cert)
    except (OSError, ValueError) as exc:
        log.warning("tls_cert %s: cannot read its expiry: %s", settings.tls_cert, exc)
        return
    left = not_after - (now or datetime.now(UTC))
    renew = "renew it (pacs certs issue ... --force) and restart pacs serve"
    if left <= timedelta(0):
        log.error("tls_cert %s EXPIRED on %s: peers refuse DICOM TLS and HTTPS with this server; %s",
                  settings.tls_cert, not_after.isoformat(timespec="minutes"), renew)
    elif left <= EXPIRY_WARNING:
        log.warning("tls_cert %s expires on %s (in %d days): %s", settings.tls_cert,
                    not_after.isoformat(timespec="minutes"), left.days, renew)


class CertificateExpiryWatch(Periodic):
    """Repeats :func:`check_certificate_expiry` every *interval* seconds (a
    day) while serving: a server runs for months, past the 30-day warning."""

    thread_name = "tls-expiry-watch"

    def __init__(self, settings: Settings, *, interval: float = 86400.0) -> None:
        super().__init__(interval)
        self.settings = settings

    def round(self) -> None:
        check_certificate_expiry(self.settings)


def client_context(settings: Settings, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The context our own SCU (forwarding, remote Q/R) opens TLS associations with.

    Peers are verified against ``tls_ca`` when set, else the system store;
    ``tls_cert``/``tls_key``, when set, are presented as our client
    certificate (peers with mutual TLS need it). Use it with pynetdicom as
    ``ae.associate(host, port, tls_args=(client_context(s), host))``: the
    host name given there is checked against the peer certificate's
    subjectAltName unless *check_hostname* is False (some modalities' certificates
    name no address; the CA check still applies).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks by default
    _harden(ctx, server=False)
    if settings.tls_ca is not None:
        ctx.load_verify_locations(cafile=_check_file(settings.tls_ca, "tls_ca"))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.tls_cert is not None:
        cert, key = _identity(settings, "client TLS")
        ctx.load_cert_chain(cert, key)
    ctx.check_hostname = check_hostname
    return ctx


def association_tls(settings: Settings, remote: RemoteAE) -> dict[str, Any]:
    """pynetdicom ``associate()`` keywords for an association we open to
    *remote*: ``tls_args`` with :func:`client_context` when the AE registry
    says it speaks DICOM TLS (``pacs ae add --tls``), else nothing.

    The peer certificate must name the registered host (subjectAltName DNS
    or IP) and chain to ``tls_ca`` (the system store without it): studies
    leave the archive only to the peer they were meant for.
    """
    if not remote.tls:
        return {}
    return {"tls_args": (client_context(settings), remote.host)}
