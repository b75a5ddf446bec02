"""Radiologists' signing certificates (chữ ký số) and their keys, kept sealed.

A Vietnamese CA issues a radiologist's certificate as a PKCS#12 file (or on
a USB token, which this module does not drive). `pacs user certificate
import` reads the file with its password and keeps, per user, in the index:

- the certificate (DER) and the CA certificates the file carried (PEM);
- the private key, PKCS#8, encrypted under a PIN the radiologist chooses
  (by default the PKCS#12 password): scrypt (N=2^15, r=8, p=1: ~0.1 s and
  32 MiB per try, so a stolen index is slow to guess) derives an AES-256-GCM
  key; the user and the certificate's fingerprint are authenticated with
  it, so a sealed key moved to another user's row opens for no one.

No usable private key is ever written to the index, a file or a log; it
exists in clear only in the memory of the request that signs, once the PIN
opened it. A PIN given when signing counts before it is checked (as a
login's password does, pacs.auth): five wrong ones in a row lock signing
for 15 minutes, each further lock twice as long (at most a day), as a share
link's birth year (pacs.shares). The count and the lock are columns of the
row, judged by the database's clock: every node sees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import Engine, delete, select, update

from .errors import RefusedRequest
from .index.db import db_now, write_transaction
from .index.models import SigningCertificate, User

certs_t = SigningCertificate.__table__
users_t = User.__table__

# Wrong PINs before a lock; the first lock's length, doubled per lock in a row up to MAX_LOCK.
PIN_TRIES = 5
LOCK = timedelta(minutes=15)
MAX_LOCK = timedelta(days=1)
# A PIN shorter than this is refused at import: the sealed key is only as strong as it.
MIN_PIN = 6
MAX_PIN = 256
# The sealed key's layout: version, log2(N), r, p, salt, nonce, AES-GCM ciphertext.
_SEAL_VERSION = 1
_SCRYPT = (15, 8, 1)
_SALT, _NONCE = 16, 12


class SigningKeyError(RefusedRequest):
    """A certificate import or a signature refused, with the HTTP status a client sees."""


class WrongPin(SigningKeyError):
    """A wrong PIN (403): *tries_left* before a lock, or the lock this one set."""

    def __init__(self, tries_left: int, locked_until: datetime | None) -> None:
        if locked_until is not None:
            message = (f"wrong PIN for your signing certificate; signing is locked until "
                       f"{locked_until:%Y-%m-%d %H:%M} UTC after {PIN_TRIES} wrong PINs")
        else:
            message = f"wrong PIN for your signing certificate ({tries_left} tries left before signing is locked)"
        super().__init__(message, 403)
        self.tries_left = tries_left
        self.locked_until = locked_until


class PinLocked(SigningKeyError):
    """Signing locked by earlier wrong PINs (429): nothing checked until *locked_until*."""

    def __init__(self, locked_until: datetime, now: datetime) -> None:
        super().__init__(f"signing with your certificate is locked after {PIN_TRIES} wrong PINs, until "
                         f"{locked_until:%Y-%m-%d %H:%M} UTC; the report stays unsigned", 429)
        self.locked_until = locked_until
        self.retry_after = max(1, int((locked_until - now).total_seconds()) + 1)


def lock_length(lockouts: int) -> timedelta:
    """The lock after the *lockouts*-th run of wrong PINs (1: the first)."""
    return min(LOCK * 2 ** min(max(lockouts - 1, 0), 16), MAX_LOCK)


@dataclass(frozen=True)
class SigningMaterial:
    """What signs: the key (in memory only), its certificate and the chain."""

    key: Any
    certificate: x509.Certificate
    chain: list[x509.Certificate]


@dataclass(frozen=True)
class CertificateInfo:
    """A stored certificate as `pacs user certificate show` prints it."""

    username: str
    subject: str
    issuer: str
    serial: str
    sha256: str
    not_before: datetime
    not_after: datetime
    imported_at: datetime
    imported_by: str
    locked_until: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (times ISO 8601, UTC)."""
        data: dict[str, Any] = dict(self.__dict__)
        for name in ("not_before", "not_after", "imported_at", "locked_until"):
            data[name] = data[name].isoformat() if data[name] else None
        return data


# -- certificates ---------------------------------------------------------------------
def name_text(name: x509.Name) -> str:
    """A distinguished name as RFC 4514 text, Vietnamese letters kept as they are."""
    return name.rfc4514_string()


def common_name(cert: x509.Certificate) -> str:
    """The subject's CN (the signer's name), or the whole subject."""
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else name_text(cert.subject)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def check_validity(cert: x509.Certificate, at: datetime, what: str = "the certificate") -> None:
    """422 when *cert* is not valid at *at* (expired, or not yet valid)."""
    if at > cert.not_valid_after_utc:
        raise SigningKeyError(f"{what} of {common_name(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                              "UTC: import the renewed certificate (pacs user certificate import)", 422)
    if at < cert.not_valid_before_utc:
        raise SigningKeyError(f"{what} of {common_name(cert)} is not valid before "
                              f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", 422)


# Extended Key Usages that let a certificate sign a document: any; a person's
# (emailProtection, clientAuth: what Vietnamese CAs put in staff and
# organization certificates); documentSigning (RFC 9336); Microsoft's and
# Adobe's document signing. Another purpose alone (a web server's TLS
# certificate, a time-stamping or OCSP responder's) is refused at import:
# pdfsig and Adobe reject its signatures.
_SIGNING_EKUS = {
    x509.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, x509.ExtendedKeyUsageOID.EMAIL_PROTECTION,
    x509.ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),
    x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.12"), x509.ObjectIdentifier("1.2.840.113583.1.1.5"),
}

_EKU_NAMES = {
    x509.ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", x509.ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    x509.ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping", x509.ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def _check_signing_use(cert: x509.Certificate) -> None:
    """422 for a certificate whose Key Usage or Extended Key Usage forbids signing documents."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not (usage.digital_signature or usage.content_commitment):
        raise SigningKeyError(f"the certificate of {common_name(cert)} is not for signatures (its Key Usage has "
                              "neither digitalSignature nor nonRepudiation)", 422)
    try:
        purposes = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    if not _SIGNING_EKUS.intersection(purposes):
        names = ", ".join(_EKU_NAMES.get(p, p.dotted_string) for p in purposes)
        raise SigningKeyError(f"the certificate of {common_name(cert)} is not for signing documents (its Extended "
                              f"Key Usage is {names}): ask the CA for a digital signature certificate", 422)


def load_pkcs12(data: bytes, password: str, *, at: datetime | None = None) -> SigningMaterial:
    """The key, certificate and chain of a PKCS#12 file, checked: the password
    opens it (400 otherwise), it holds a key and its certificate, the key is
    of a kind PDF signatures use, the certificate is valid *at* (now) and
    may sign documents (422 otherwise)."""
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password.encode("utf-8"))
    except ValueError:
        raise SigningKeyError("the PKCS#12 password is wrong, or the file is not a PKCS#12 (.p12/.pfx)", 400) from None
    if key is None or cert is None:
        raise SigningKeyError("the PKCS#12 file holds no private key with its certificate", 400)
    if isinstance(key, dsa.DSAPrivateKey):
        raise SigningKeyError("a DSA key cannot sign PDF reports: ask the CA for an RSA or ECDSA certificate", 422)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise SigningKeyError("the PKCS#12 file's private key is not the one of its certificate", 400)
    check_validity(cert, at or datetime.now(UTC))
    _check_signing_use(cert)
    return SigningMaterial(key, cert, list(extra or []))


def chain_pem(chain: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain)


def load_chain(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode("ascii")) if pem.strip() else []


# -- sealing --------------------------------------------------------------------------
def _aad(username: str, cert_sha256: str) -> bytes:
    return f"filmless-pacs signing key v{_SEAL_VERSION}|{username}|{cert_sha256}".encode()


def _derive(pin: str, salt: bytes, n_log2: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**n_log2, r=r, p=p).derive(pin.encode("utf-8"))


def seal_key(key: Any, pin: str, username: str, cert_sha256: str) -> bytes:
    """*key* as PKCS#8 DER encrypted under *pin* (scrypt, AES-256-GCM)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    n_log2, r, p = _SCRYPT
    sealed = AESGCM(_derive(pin, salt, n_log2, r, p)).encrypt(nonce, der, _aad(username, cert_sha256))
    return bytes([_SEAL_VERSION, n_log2, r, p]) + salt + nonce + sealed


def open_key(blob: bytes, pin: str, username: str, cert_sha256: str) -> Any | None:
    """The private key sealed in *blob*, or None when *pin* is not its PIN."""
    version, n_log2, r, p = blob[:4]
    if version != _SEAL_VERSION:
        raise SigningKeyError("the stored signing key has an unknown format: import the certificate again", 500)
    salt, nonce, sealed = blob[4:4 + _SALT], blob[4 + _SALT:4 + _SALT + _NONCE], blob[4 + _SALT + _NONCE:]
    try:
        der = AESGCM(_derive(pin, salt, n_log2, r, p)).decrypt(nonce, sealed, _aad(username, cert_sha256))
    except InvalidTag:
        return None
    return serialization.load_der_private_key(der, password=None)


# -- the index ------------------------------------------------------------------------
def _user_pk(conn: Any, username: str) -> tuple[int, str]:
    row = conn.execute(select(users_t.c.pk, users_t.c.role).where(users_t.c.username == username)).first()
    if row is None:
        raise SigningKeyError(f"no user {username!r} (pacs user add {username} --role radiologist)", 404)
    return int(row.pk), str(row.role)


def import_pkcs12(engine: Engine, username: str, data: bytes, password: str, pin: str | None,
                  by: str) -> CertificateInfo:
    """Keep *username*'s certificate from a PKCS#12 file, its key sealed under
    *pin* (None: the PKCS#12 password), replacing any certificate they had
    (and its wrong-PIN count and lock). Only a radiologist signs reports."""
    pin = password if pin is None else pin
    if len(pin) < MIN_PIN:
        raise SigningKeyError(f"the PIN must be at least {MIN_PIN} characters"
                              + (" (the PKCS#12 password is shorter: choose a PIN)" if pin == password else ""), 400)
    if len(pin) > MAX_PIN:
        raise SigningKeyError(f"the PIN is at most {MAX_PIN} characters", 400)
    material = load_pkcs12(data, password)
    cert = material.certificate
    sha = fingerprint(cert)
    values = dict(
        certificate=cert.public_bytes(serialization.Encoding.DER), chain_pem=chain_pem(material.chain),
        subject=name_text(cert.subject), issuer=name_text(cert.issuer), serial=format(cert.serial_number, "x"),
        sha256=sha, not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        sealed_key=seal_key(material.key, pin, username, sha), imported_at=datetime.now(UTC), imported_by=by,
        failed_pins=0, locked_until=None, lockouts=0,
    )
    with write_transaction(engine) as conn:
        user_pk, role = _user_pk(conn, username)
        if role != "radiologist":
            raise SigningKeyError(f"{username} is a {role} user: only radiologists sign reports", 400)
        if conn.execute(select(certs_t.c.pk).where(certs_t.c.user_pk == user_pk)).first() is None:
            conn.execute(certs_t.insert().values(user_pk=user_pk, **values))
        else:
            conn.execute(update(certs_t).where(certs_t.c.user_pk == user_pk).values(**values))
    info = show(engine, username)
    assert info is not None
    return info


def show(engine: Engine, username: str) -> CertificateInfo | None:
    """*username*'s stored certificate (never the key), or None."""
    with engine.connect() as conn:
        row = conn.execute(select(certs_t).join(users_t, users_t.c.pk == certs_t.c.user_pk)
                           .where(users_t.c.username == username)).first()
    if row is None:
        return None
    return CertificateInfo(username, row.subject, row.issuer, row.serial, row.sha256, row.not_before, row.not_after,
                           row.imported_at, row.imported_by, row.locked_until)


def remove(engine: Engine, username: str) -> bool:
    """Forget *username*'s certificate and sealed key; False when there was none."""
    with write_transaction(engine) as conn:
        user_pk, _ = _user_pk(conn, username)
        return bool(conn.execute(delete(certs_t).where(certs_t.c.user_pk == user_pk)).rowcount)


def _count_try(engine: Engine, username: str) -> tuple[Any, datetime | None]:
    """Count one PIN try before it is checked (tries sent at once, to several
    nodes, are each counted): the row, and the lock this try set when it is
    the PIN_TRIES-th wrong one in a row (lifted again if the PIN is right).
    PinLocked while a lock holds; nothing is counted then."""
    with write_transaction(engine) as conn:
        row = conn.execute(select(certs_t).join(users_t, users_t.c.pk == certs_t.c.user_pk)
                           .where(users_t.c.username == username).with_for_update(of=certs_t)).first()
        if row is None:
            raise SigningKeyError(f"no signing certificate for {username}: an administrator imports it with "
                                  f"pacs user certificate import {username} FILE.p12", 422)
        now = db_now(conn)
        if row.locked_until is not None and row.locked_until > now:
            raise PinLocked(row.locked_until, now)
        tries = row.failed_pins + 1
        lock = None
        if tries >= PIN_TRIES:
            lock = now + lock_length(row.lockouts + 1)
            conn.execute(update(certs_t).where(certs_t.c.pk == row.pk)
                         .values(failed_pins=0, locked_until=lock, lockouts=row.lockouts + 1))
        else:
            conn.execute(update(certs_t).where(certs_t.c.pk == row.pk).values(failed_pins=tries))
        return row, lock


def unlock(engine: Engine, username: str, pin: str | None, *, at: datetime | None = None) -> SigningMaterial:
    """*username*'s key, certificate and chain, opened with *pin*. 422 without
    a PIN (not counted) or for a certificate no longer valid *at* (now);
    409 when they have none; WrongPin (403) or PinLocked (429)."""
    if not pin:
        raise SigningKeyError("the PIN of your signing certificate is required to sign (report_signature is on)", 422)
    if len(pin) > MAX_PIN:
        raise SigningKeyError(f"the PIN is at most {MAX_PIN} characters", 400)
    row, lock = _count_try(engine, username)
    key = open_key(row.sealed_key, pin, username, row.sha256)
    if key is None:
        raise WrongPin(0 if lock else PIN_TRIES - (row.failed_pins + 1), lock)
    with write_transaction(engine) as conn:  # the right PIN: the count (and a lock this try set) starts afresh
        conn.execute(update(certs_t).where(certs_t.c.pk == row.pk)
                     .values(failed_pins=0, locked_until=None, lockouts=0))
    cert = x509.load_der_x509_certificate(row.certificate)
    check_validity(cert, at or datetime.now(UTC), "the signing certificate")
    return SigningMaterial(key, cert, load_chain(row.chain_pem))
