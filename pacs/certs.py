"""A small local certificate authority for a hospital network.

Hospitals rarely have a PKI their modalities can use; DICOM TLS (PS3.15
Annex B) needs certificates on both ends anyway. ``pacs certs init-ca``
creates a CA (key + self-signed certificate) and ``pacs certs issue``
signs server certificates (this PACS, with the DNS names and IP addresses
modalities dial) and client certificates (one per modality, for mutual TLS).

Everything is PEM. Private keys are written with mode 0600 from the moment
they exist (created 0600, then renamed into place), never world-readable.
Keys are RSA: the DICOM Non-Downgrading BCP 195 profile's cipher suites
(TLS_ECDHE_RSA_*, TLS_DHE_RSA_*) authenticate with RSA, and every modality
TLS stack speaks it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .atomic_files import write_atomic

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
# 3072-bit RSA: NIST SP 800-57's level for use beyond 2030, still fast to handshake.
DEFAULT_KEY_SIZE = 3072
CA_DAYS = 3650
# 825 days: the longest leaf lifetime clients commonly accept (and a yearly-ish renewal).
LEAF_DAYS = 825
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertError(ValueError):
    """Bad input for the CA (name, address, existing files); the message says what."""


@dataclass
class Issued:
    """What was written: paths and the facts an operator checks."""

    kind: str
    subject: str
    cert: str
    key: str
    ca: str
    not_after: str
    sha256_fingerprint: str
    dns: list[str] = field(default_factory=list)
    ip: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        """The files this operation wrote (a leaf's CA certificate is only read)."""
        return [self.cert, self.key]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form, with the list of files written."""
        return {**asdict(self), "files": self.files}


def _new_key(key_size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    # Unencrypted PKCS#8: services start unattended (DCMTK would otherwise prompt);
    # the 0600 mode is the protection.
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _describe(kind: str, cert: x509.Certificate, cert_path: Path, key_path: Path, ca_path: Path,
              dns: list[str], ips: list[str]) -> Issued:
    return Issued(
        kind=kind,
        subject=cert.subject.rfc4514_string(),
        cert=str(cert_path.absolute()),
        key=str(key_path.absolute()),
        ca=str(ca_path.absolute()),
        not_after=cert.not_valid_after_utc.isoformat(),
        sha256_fingerprint=_fingerprint(cert),
        dns=dns,
        ip=ips,
    )


def _check_days(days: int) -> None:
    # 0 made a certificate expired at once, a negative count a bare ValueError (exit 1).
    if days < 1:
        raise CertError(f"--days {days}: a certificate must be valid for at least 1 day")


def init_ca(out: Path, name: str = "filmless-pacs local CA", *, days: int = CA_DAYS,
            key_size: int = DEFAULT_KEY_SIZE) -> Issued:
    """Create a CA in *out* (``ca.pem``, ``ca.key``); refuses to replace an existing one.

    Replacing a CA key silently would invalidate every certificate already
    installed on the modalities, so an existing ``ca.key`` is an error.
    """
    _check_days(days)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if key_path.exists() or cert_path.exists():
        raise CertError(f"a CA already exists in {out} (remove {CA_KEY} and {CA_CERT} to replace it)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _new_key(key_size)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "filmless-pacs"),
    ])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little: a modality whose clock lags must not see "not yet valid".
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a cert without its key is useless, a key without a cert is re-creatable.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return _describe("ca", cert, cert_path, key_path, cert_path, [], [])


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """The CA certificate and key from a directory made by :func:`init_ca`."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise CertError(f"no CA in {ca_dir} (expected {CA_CERT} and {CA_KEY}; run: pacs certs init-ca --out DIR)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    # A leaf written over ca.pem (or any non-CA certificate) signs
    # certificates no peer accepts, with exit 0: refuse it here.
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{cert_path} is not a CA certificate (no BasicConstraints CA:TRUE): "
                        "not a directory made by pacs certs init-ca")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertError(f"{key_path} is not an RSA key")
    return cert, key


def issue(name: str, ca_dir: Path, out: Path, *, dns: list[str] | None = None, ips: list[str] | None = None,
          client: bool = False, days: int = LEAF_DAYS, key_size: int = DEFAULT_KEY_SIZE,
          force: bool = False) -> Issued:
    """Issue ``NAME.pem`` and ``NAME.key`` in *out*, signed by the CA in *ca_dir*.

    A server certificate (the default) is good for TLS server and client
    authentication: the PACS also calls out (C-MOVE destinations, routing)
    with the same identity. It names *dns* and *ips* as subjectAltName
    (hostname checks look only there); with neither, NAME itself is the DNS
    name. A *client* certificate (a modality) is good for client
    authentication only, with NAME (e.g. the AE title) as its common name.

    Existing ``NAME.pem``/``NAME.key`` are replaced only with *force*
    (renewal); ``ca.pem``/``ca.key`` never.
    """
    if not _SAFE_NAME.match(name):
        raise CertError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it names the files)")
    _check_days(days)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    # Issuing "ca" into the CA directory replaced the CA key with a leaf's: the CA was lost.
    if cert_path.name == CA_CERT or key_path.name == CA_KEY:
        raise CertError(f"name {name!r} would write {CA_CERT} and {CA_KEY}, the CA's file names: choose another")
    if not force and (cert_path.exists() or key_path.exists()):
        raise CertError(f"{cert_path} or {key_path} exists (to renew it, add --force; "
                        "the running pacs serve uses the new one after a restart)")
    dns = list(dns or [])
    try:
        ip_values = [ipaddress.ip_address(v) for v in (ips or [])]
    except ValueError as exc:
        raise CertError(str(exc)) from None
    if not client and not dns and not ip_values:
        dns = [name]
    ca_cert, ca_key = load_ca(ca_dir)
    key = _new_key(key_size)
    now = datetime.now(UTC)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "filmless-pacs"),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if dns or ip_values:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ip) for ip in ip_values]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return _describe("client" if client else "server", cert, cert_path, key_path, ca_dir / CA_CERT,
                     dns, [str(ip) for ip in ip_values])
