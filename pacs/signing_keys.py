"""Radiologists' signing certificates (chữ ký số) and their keys, kept sealed.

A Vietnamese CA issues a radiologist's certificate as a PKCS#12 file (or on
a USB token, which this module does not drive). `pacs user certificate
import` reads the file with its password and keeps, per user, in the index:

- the certificate (DER) and the CA certificates the file carried (PEM);
- the private key, PKCS#8, encrypted under a PIN the radiologist chooses
  (by default the PKCS#12 password) and the signing secret: scrypt (N=2^15,
  r=8, p=1: ~0.1 s and 32 MiB per try) of HMAC-SHA256(secret, PIN) derives
  an AES-256-GCM key; the user and the certificate's fingerprint are
  authenticated with it, so a sealed key moved to another user's row opens
  for no one.

The signing secret (a pepper) is kept out of the index and its backups:
``signing_secret`` (PACS_SIGNING_SECRET) or the file ``signing_secret_file``
(default DATA_DIR/secrets/signing.key, 32 random bytes, mode 0600, made at
the first import). A PIN is six digits or so: scrypt alone made a copy of
the index (or of a `pacs backup`) enough to find it offline in hours of CPU
and sign reports as the radiologist, a lock on wrong PINs stopping only the
server's own tries. Without the secret the copy opens nothing. Each sealed
key carries a check value of the secret (an HMAC of a constant under it),
so a server without the secret, or with another one (a node given another
file), says so (503, and a warning at start) rather than "wrong PIN", and
counts no try. A key sealed before the secret existed (version 1: the PIN
alone) still opens, and is sealed again with the secret when it does.

No usable private key is ever written to the index, a file or a log; it
exists in clear only in the memory of the request that signs, once the PIN
opened it. A PIN given when signing counts before it is checked (as a
login's password does, pacs.auth): five wrong ones in a row lock signing
for 15 minutes, each further lock twice as long (at most a day), as a share
link's birth year (pacs.shares). The count and the lock are columns of the
row, judged by the database's clock: every node sees them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import Engine, delete, select, update

from .atomic_files import create_once
from .errors import RefusedRequest
from .index.db import db_now, write_transaction
from .index.models import SigningCertificate, User
from .lockouts import lock_length
from .settings import MIN_SIGNING_SECRET, decode_signing_secret

log = logging.getLogger(__name__)

certs_t = SigningCertificate.__table__
users_t = User.__table__

# Wrong PINs before a lock (pacs.lockouts: how long, doubled per lock in a row).
PIN_TRIES = 5
# A PIN shorter than this is refused at import: the sealed key is only as strong as it.
MIN_PIN = 6
MAX_PIN = 256
# The sealed key's layout: version, log2(N), r, p, [the secret's check value: version 2],
# salt, nonce, AES-GCM ciphertext. Version 1: the PIN alone; 2: the PIN and the signing secret.
_PIN_ONLY = 1
_SEAL_VERSION = 2
_SCRYPT = (15, 8, 1)
_CHECK, _SALT, _NONCE = 16, 16, 12
# The secret a first import makes; messages an HMAC under it authenticates (the
# PIN's has a NUL, the check's none: one can never be the other).
SECRET_BYTES = 32
_CHECK_MESSAGE = b"filmless-signing-check"
_PIN_MESSAGE = b"filmless-pacs signing PIN\x00"


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


# -- the signing secret ---------------------------------------------------------------
@dataclass(frozen=True)
class SigningSecret:
    """The signing secret as this process finds it: *value* (None when there
    is none), *where* it is looked for (for messages), and why it is not
    there (*problem*; *absent* when its file does not exist yet)."""

    value: bytes | None
    where: str
    problem: str = ""
    absent: bool = False

    @property
    def check(self) -> bytes | None:
        """The check value a key sealed under this secret carries."""
        return None if self.value is None else _check_value(self.value)


def _check_value(secret: bytes) -> bytes:
    return hmac.new(secret, _CHECK_MESSAGE, hashlib.sha256).digest()[:_CHECK]


def secret_file(settings: Any) -> Path:
    """Where the signing secret's file is (``signing_secret_file``, default DATA_DIR/secrets/signing.key)."""
    configured = getattr(settings, "signing_secret_file", None)
    return Path(configured or Path(settings.data_dir) / "secrets" / "signing.key").absolute()


def load_secret(settings: Any) -> SigningSecret:
    """The signing secret: ``signing_secret`` (PACS_SIGNING_SECRET) when set,
    else the file's bytes. Read at each use: a secret put in place (copied
    from the node that made it) serves without a restart."""
    configured = getattr(settings, "signing_secret", None)
    if configured:
        return SigningSecret(decode_signing_secret(configured), "PACS_SIGNING_SECRET (signing_secret)")
    path = secret_file(settings)
    where = f"signing_secret_file {path}"
    try:
        value = path.read_bytes()
    except FileNotFoundError:
        return SigningSecret(None, where, f"{path} does not exist", absent=True)
    except OSError as exc:
        return SigningSecret(None, where, f"{path} cannot be read ({exc.strerror}; it must be readable by the "
                                          "service user only)")
    if len(value) < MIN_SIGNING_SECRET:
        return SigningSecret(None, where, f"{path} holds {len(value)} bytes, not a signing secret")
    return SigningSecret(value, where)


def _make_secret(settings: Any) -> SigningSecret:
    """The file's secret, made (32 random bytes, 0600, in a 0700 folder) when
    there is none; of two imports at once, the first one's is kept."""
    path = secret_file(settings)
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # whatever the umask: the folder of secrets is the service user's
    if create_once(path, secrets.token_bytes(SECRET_BYTES), 0o600):
        log.info("signing secret made in %s", path)
    return load_secret(settings)


def _no_secret(secret: SigningSecret, username: str) -> SigningKeyError:
    return SigningKeyError(
        f"this server does not have the signing secret {username}'s signing key is sealed with ({secret.problem}): "
        "every server that signs needs the secret of the one where the certificate was imported (the same "
        "signing_secret_file, or PACS_SIGNING_SECRET); ask the administrator. The report stays unsigned", 503)


def _other_secret(secret: SigningSecret, username: str) -> SigningKeyError:
    return SigningKeyError(
        f"the signing secret of this server ({secret.where}) is not the one {username}'s signing key was sealed "
        "with: every server that signs needs the same secret (signing_secret_file or PACS_SIGNING_SECRET), or "
        "the certificate is imported again; ask the administrator. The report stays unsigned", 503)


# -- sealing --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sealed:
    """A sealed key's parts."""

    version: int
    scrypt: tuple[int, int, int]
    check: bytes | None
    salt: bytes
    nonce: bytes
    ciphertext: bytes


def _parse(blob: bytes) -> _Sealed:
    version = blob[0] if blob else 0
    if version not in (_PIN_ONLY, _SEAL_VERSION) or len(blob) < 4:
        raise SigningKeyError("the stored signing key has an unknown format: import the certificate again", 500)
    n_log2, r, p = blob[1:4]
    pos, check = 4, None
    if version >= 2:
        check, pos = blob[pos:pos + _CHECK], pos + _CHECK
    salt, nonce = blob[pos:pos + _SALT], blob[pos + _SALT:pos + _SALT + _NONCE]
    return _Sealed(version, (n_log2, r, p), check, salt, nonce, blob[pos + _SALT + _NONCE:])


def _sealed_under(blob: bytes, secret: SigningSecret) -> bool | None:
    """Whether *blob* opens under *secret* as far as its check value says
    (None: a version 1 key, which needs none; False also without a secret)."""
    check = _parse(blob).check
    if check is None:
        return None
    mine = secret.check
    return mine is not None and hmac.compare_digest(check, mine)


def _aad(version: int, username: str, cert_sha256: str) -> bytes:
    return f"filmless-pacs signing key v{version}|{username}|{cert_sha256}".encode()


def _derive(password: bytes, salt: bytes, n_log2: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**n_log2, r=r, p=p).derive(password)


def normal_pin(pin: str) -> str:
    """*pin* in Unicode NFC: Vietnamese letters one keyboard (or input
    method) types precomposed ("ậ") and another decomposed ("a" + two
    combining marks) are one PIN. Applied at import and at signing."""
    return unicodedata.normalize("NFC", pin)


def _pin_forms(pin: str) -> list[str]:
    """The PIN bytes a key may be sealed under, most likely first: NFC (every
    seal made since PINs are normalised, and an NFC PIN of before), then the
    PIN as typed and in NFD (a seal made before from a decomposed PIN)."""
    forms = [normal_pin(pin)]
    for other in (pin, unicodedata.normalize("NFD", pin)):
        if other not in forms:
            forms.append(other)
    return forms


def _password(pin: str, secret: bytes | None) -> bytes:
    """scrypt's password: the PIN keyed by the secret (version 2), or the PIN (1)."""
    raw = pin.encode("utf-8")
    return raw if secret is None else hmac.new(secret, _PIN_MESSAGE + raw, hashlib.sha256).digest()


def seal_key(key: Any, pin: str, username: str, cert_sha256: str, secret: bytes) -> bytes:
    """*key* as PKCS#8 DER encrypted under *pin* and the signing *secret* (scrypt, AES-256-GCM)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    n_log2, r, p = _SCRYPT
    aead = AESGCM(_derive(_password(normal_pin(pin), secret), salt, n_log2, r, p))
    sealed = aead.encrypt(nonce, der, _aad(_SEAL_VERSION, username, cert_sha256))
    return bytes([_SEAL_VERSION, n_log2, r, p]) + _check_value(secret) + salt + nonce + sealed


def open_key(blob: bytes, pin: str, username: str, cert_sha256: str, secret: SigningSecret) -> Any | None:
    """The private key sealed in *blob*, or None when *pin* is not its PIN
    (in any Unicode normalisation form: :func:`_pin_forms`); 503 when the
    key needs a signing secret this server lacks or has another of."""
    opened = _open_key(blob, pin, username, cert_sha256, secret)
    return opened[0] if opened else None


def _open_key(blob: bytes, pin: str, username: str, cert_sha256: str,
              secret: SigningSecret) -> tuple[Any, bool] | None:
    """(the key, whether it was sealed under the NFC form of *pin*), or None."""
    sealed = _parse(blob)
    if sealed.version >= 2:
        if secret.value is None:
            raise _no_secret(secret, username)
        if not _sealed_under(blob, secret):
            raise _other_secret(secret, username)
    for n, form in enumerate(_pin_forms(pin)):
        password = _password(form, secret.value if sealed.version >= 2 else None)
        try:
            der = AESGCM(_derive(password, sealed.salt, *sealed.scrypt)).decrypt(
                sealed.nonce, sealed.ciphertext, _aad(sealed.version, username, cert_sha256))
        except InvalidTag:
            continue
        return serialization.load_der_private_key(der, password=None), n == 0
    return None


# -- the index ------------------------------------------------------------------------
def _user_pk(conn: Any, username: str) -> tuple[int, str]:
    row = conn.execute(select(users_t.c.pk, users_t.c.role).where(users_t.c.username == username)).first()
    if row is None:
        raise SigningKeyError(f"no user {username!r} (pacs user add {username} --role radiologist)", 404)
    return int(row.pk), str(row.role)


def _sealed_keys(engine: Engine) -> list[tuple[str, bytes]]:
    """Every stored certificate's user and sealed key."""
    with engine.connect() as conn:
        rows = conn.execute(select(users_t.c.username, certs_t.c.sealed_key)
                            .join(users_t, users_t.c.pk == certs_t.c.user_pk).order_by(users_t.c.username)).all()
    return [(str(row.username), bytes(row.sealed_key)) for row in rows]


def _not_opening(keys: list[tuple[str, bytes]], secret: SigningSecret) -> list[str]:
    """The users of *keys* sealed under a secret other than *secret* (or any, without one)."""
    found = []
    for username, blob in keys:
        try:
            if _sealed_under(blob, secret) is False:
                found.append(username)
        except SigningKeyError:  # an unknown format: says so at its own signing
            continue
    return found


def _opens_under(blob: bytes, secret: SigningSecret) -> bool:
    try:
        return bool(_sealed_under(blob, secret))
    except SigningKeyError:
        return False


def _names(users: list[str]) -> str:
    shown = ", ".join(users[:5])
    return shown + (f" and {len(users) - 5} more" if len(users) > 5 else "")


def secret_problem(engine: Engine, settings: Any) -> str | None:
    """Why some stored signing keys cannot be opened on this server (the
    signing secret they were sealed with is missing or another), naming
    their users and the setting; None when every one can. For `pacs serve`'s
    start and `pacs restore`."""
    secret = load_secret(settings)
    users = _not_opening(_sealed_keys(engine), secret)
    if not users:
        return None
    names = _names(users)
    if secret.value is None:
        what = f"the signing secret is missing ({secret.problem}): the signing keys of {names} are sealed with it"
    else:
        what = f"the signing secret ({secret.where}) is not the one the signing keys of {names} were sealed with"
    return (f"{what} and cannot be opened here: give this server the secret of the server where they were imported "
            "(the same signing_secret_file, or PACS_SIGNING_SECRET, on every node; a copy kept apart from the "
            "backups), or import their certificates again (pacs user certificate import USER FILE.p12 --new-secret)")


def certificates_stored(engine: Engine) -> int:
    """How many signing certificates (sealed keys) the index holds."""
    return len(_sealed_keys(engine))


def _secret_for_import(engine: Engine, settings: Any, username: str, new_secret: bool) -> bytes:
    """The secret a new key is sealed under: this server's, made when there is
    none. Refused (409) when other radiologists' keys are sealed under another
    secret and none under this one, unless *new_secret*: a node that lacks
    the cluster's secret would otherwise make its own, and each node open
    only some of the keys. (Once a key is sealed under this server's secret,
    the others left are ones to import again.)"""
    secret = load_secret(settings)
    if secret.value is None and not secret.absent:
        raise SigningKeyError(f"the signing secret cannot be used: {secret.problem}", 500)
    keys = _sealed_keys(engine)
    others = _not_opening([(u, b) for u, b in keys if u != username], secret)
    # Their own key (a renewal) counts: this server's secret is the one in use.
    ours = secret.value is not None and any(_opens_under(b, secret) for _, b in keys)
    if others and not ours and not new_secret:
        lacking = f"is missing ({secret.problem})" if secret.value is None else f"({secret.where}) is another one"
        raise SigningKeyError(
            f"the signing keys of {_names(others)} are sealed with a signing secret that this server {lacking}: "
            "give it the secret of the server where they were imported (signing_secret_file, or "
            "PACS_SIGNING_SECRET), then import again; if that secret is lost (a restore on a new machine), "
            "--new-secret seals this key with this server's own, and the others import theirs again", 409)
    if secret.value is None:
        secret = _make_secret(settings)
        if secret.value is None:
            raise SigningKeyError(f"the signing secret cannot be used: {secret.problem}", 500)
    return secret.value


def import_pkcs12(engine: Engine, username: str, data: bytes, password: str, pin: str | None,
                  by: str, *, settings: Any, new_secret: bool = False) -> CertificateInfo:
    """Keep *username*'s certificate from a PKCS#12 file, its key sealed under
    *pin* (None: the PKCS#12 password) and the signing secret of *settings*
    (made when there is none), replacing any certificate they had (and its
    wrong-PIN count and lock). Only a radiologist signs reports."""
    from_password = pin is None
    pin = normal_pin(password if pin is None else pin)
    if len(pin) < MIN_PIN:
        raise SigningKeyError(f"the PIN must be at least {MIN_PIN} characters"
                              + (" (the PKCS#12 password is shorter: choose a PIN)" if from_password else ""), 400)
    if len(pin) > MAX_PIN:
        raise SigningKeyError(f"the PIN is at most {MAX_PIN} characters", 400)
    material = load_pkcs12(data, password)
    cert = material.certificate
    sha = fingerprint(cert)
    secret = _secret_for_import(engine, settings, username, new_secret)
    values = dict(
        certificate=cert.public_bytes(serialization.Encoding.DER), chain_pem=chain_pem(material.chain),
        subject=name_text(cert.subject), issuer=name_text(cert.issuer), serial=format(cert.serial_number, "x"),
        sha256=sha, not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        sealed_key=seal_key(material.key, pin, username, sha, secret), imported_at=datetime.now(UTC), imported_by=by,
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


def _count_try(engine: Engine, username: str, secret: SigningSecret) -> tuple[Any, datetime | None]:
    """Count one PIN try before it is checked (tries sent at once, to several
    nodes, are each counted): the row, and the lock this try set when it is
    the PIN_TRIES-th wrong one in a row (lifted again if the PIN is right).
    PinLocked while a lock holds; nothing is counted then, nor when the key
    needs a signing secret this server lacks (503: the server's fault)."""
    with write_transaction(engine) as conn:
        row = conn.execute(select(certs_t).join(users_t, users_t.c.pk == certs_t.c.user_pk)
                           .where(users_t.c.username == username).with_for_update(of=certs_t)).first()
        if row is None:
            raise SigningKeyError(f"no signing certificate for {username}: an administrator imports it with "
                                  f"pacs user certificate import {username} FILE.p12", 422)
        if _sealed_under(bytes(row.sealed_key), secret) is False:
            raise _no_secret(secret, username) if secret.value is None else _other_secret(secret, username)
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


def unlock(engine: Engine, username: str, pin: str | None, *, secret: SigningSecret,
           at: datetime | None = None) -> SigningMaterial:
    """*username*'s key, certificate and chain, opened with *pin* and the
    signing *secret* (load_secret). 422 without a PIN (not counted) or for a
    certificate no longer valid *at* (now); 422 when they have none; 503
    when the key is sealed under a secret this server lacks or has another
    of (not counted); WrongPin (403) or PinLocked (429). A key sealed with
    the PIN alone (version 1) is sealed again with the secret, when there is one."""
    if not pin:
        raise SigningKeyError("the PIN of your signing certificate is required to sign (report_signature is on)", 422)
    if len(normal_pin(pin)) > MAX_PIN:
        raise SigningKeyError(f"the PIN is at most {MAX_PIN} characters", 400)
    row, lock = _count_try(engine, username, secret)
    blob = bytes(row.sealed_key)
    opened = _open_key(blob, pin, username, row.sha256, secret)
    if opened is None:
        raise WrongPin(0 if lock else PIN_TRIES - (row.failed_pins + 1), lock)
    key, normalised = opened
    resealed = None
    if (_parse(blob).version == _PIN_ONLY or not normalised) and secret.value is not None:
        # Sealed with the PIN alone, or under a PIN's decomposed form (before PINs were normalised):
        # sealed again with the secret and the PIN in NFC, which every later try opens at once.
        resealed = seal_key(key, pin, username, row.sha256, secret.value)
    with write_transaction(engine) as conn:  # the right PIN: the count (and a lock this try set) starts afresh
        conn.execute(update(certs_t).where(certs_t.c.pk == row.pk)
                     .values(failed_pins=0, locked_until=None, lockouts=0))
        if resealed is not None:
            # Only the key this PIN opened: a certificate imported meanwhile is kept as it is.
            done = conn.execute(update(certs_t).where(certs_t.c.pk == row.pk, certs_t.c.sealed_key == blob)
                                .values(sealed_key=resealed)).rowcount
            if done:
                log.info("the signing key of %s is now sealed with the signing secret and the PIN in NFC", username)
    cert = x509.load_der_x509_certificate(row.certificate)
    check_validity(cert, at or datetime.now(UTC), "the signing certificate")
    return SigningMaterial(key, cert, load_chain(row.chain_pem))
