"""Review of the sealing of radiologists' signing keys (pacs.signing_keys):
a copy of the index, or of a `pacs backup`, must not be enough to sign
reports as a radiologist.

The key was sealed under the PIN alone (scrypt + AES-256-GCM): with the
index, a six-digit PIN falls offline in hours of CPU, the server's lock on
wrong PINs never seeing a try. It is now sealed under the PIN and a signing
secret kept out of the index (signing_secret_file, PACS_SIGNING_SECRET).
Real `pacs serve` processes sign over HTTP (SQLite + filesystem; two nodes
on one PostgreSQL + SeaweedFS S3), the index copied or backed up and
restored elsewhere without the secret, with another one, then with it.
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .conftest import Backend, PacsServer
from .peers import S3_ACCESS, S3_SECRET, create_database, drop_database
from .test_report_digital_signature import (
    DISPLAY_NAME, P12_PASSWORD, PIN, WRONG_PIN, Pki, _serve, import_cert, sign, uid, write_draft,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*DSA.*")
SIGNING = {"PACS_REPORT_SIGNATURE": "radiologist"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pepper-pki"))
    pki.p12("nhung", "Nguyễn Thị Hồng Nhung")
    pki.p12("khoa", "Lê Đăng Khoa")
    return pki


def _tokens(server: PacsServer) -> None:
    server.tokens = {"nhung": server.make_token("bs.nhung", "radiologist", DISPLAY_NAME)}  # type: ignore[attr-defined]


def _signs(server: PacsServer, study: str, user: str = "nhung") -> Any:
    write_draft(server, uid(server, study), user)
    return sign(server, uid(server, study), PIN, user)


def _status(server: PacsServer, study: str) -> str:
    with server.http(token=server.tokens["nhung"]) as rad:  # type: ignore[attr-defined]
        answer = rad.get(f"/api/studies/{uid(server, study)}/report")
    assert answer.status_code == 200, answer.text
    return str(answer.json()["status"])


def _sealed(index: Path, user: str = "bs.nhung") -> tuple[bytes, str]:
    with sqlite3.connect(index) as db:
        row = db.execute("SELECT c.sealed_key, c.sha256 FROM signing_certificates c JOIN users u ON u.pk = c.user_pk "
                         "WHERE u.username = ?", (user,)).fetchone()
    return bytes(row[0]), str(row[1])


def _pin_only_blob(pki: Pki, user: str, sha: str) -> bytes:
    """A key sealed as before the signing secret (version 1: scrypt of the PIN alone)."""
    salt, nonce = os.urandom(16), os.urandom(12)
    key = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(PIN.encode())
    aad = f"filmless-pacs signing key v1|{user}|{sha}".encode()
    return bytes([1, 15, 8, 1]) + salt + nonce + AESGCM(key).encrypt(nonce, pki.key_der("nhung"), aad)


def _offline_guess_fails(blob: bytes, user: str, sha: str) -> None:
    """What a thief of the index did: scrypt of the right PIN, for every layout; nothing opens."""
    key_of = {}
    for start in (4, 20):  # after the header; after the header and a 16-byte field
        salt, nonce, sealed = blob[start:start + 16], blob[start + 16:start + 28], blob[start + 28:]
        for version in (1, 2):
            key_of.setdefault(salt, Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(PIN.encode()))
            with pytest.raises(InvalidTag):
                AESGCM(key_of[salt]).decrypt(nonce, sealed, f"filmless-pacs signing key v{version}|{user}|{sha}"
                                             .encode())


def test_a_copy_of_the_index_without_the_signing_secret_signs_nothing(tmp_path: Path, pki: Pki) -> None:
    """The first import makes DATA_DIR/secrets/signing.key (0600 in a 0700
    folder); a key sealed with the PIN alone (version 1) still opens and is
    sealed again with the secret. The SQLite index copied to another
    machine with the objects, not the secret: the right PIN opens nothing
    offline, the server warns at start and answers 503 naming the setting,
    counting no PIN try; an import there is refused rather than making a
    second secret. The secret file copied in: it signs, without a restart.
    Another PACS_SIGNING_SECRET (which wins over the file): 503 again."""
    a = _serve(tmp_path / "a", Backend("sqlite-fs", None, None, {}), SIGNING)
    _tokens(a)
    done = import_cert(a, "bs.nhung", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert done.returncode == 0, done.stdout + done.stderr
    secret_file = a.data_dir / "secrets" / "signing.key"
    assert str(secret_file) in done.stderr and "apart from the backups" in done.stderr, done.stderr
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    secret = secret_file.read_bytes()
    assert len(secret) == 32
    index = a.data_dir / "index.sqlite"
    blob, sha = _sealed(index)
    assert blob[0] == 2

    a.start()
    try:
        assert _signs(a, "sign").status_code == 200
        # A key sealed before the secret existed: opened, then sealed with it.
        with sqlite3.connect(index) as db:
            db.execute("UPDATE signing_certificates SET sealed_key = ? WHERE sha256 = ?",
                       (_pin_only_blob(pki, "bs.nhung", sha), sha))
        assert _signs(a, "pin").status_code == 200
        assert _sealed(index)[0][0] == 2
        assert _signs(a, "tamper").status_code == 200
    finally:
        a.stop()
    blob, sha = _sealed(index)
    _offline_guess_fails(blob, "bs.nhung", sha)

    # The index (a consistent copy of the file) and the objects on another machine; not the secret.
    b = PacsServer(tmp_path / "b" / "data", a.backend, extra_env=dict(SIGNING))
    b.uids, b.tokens = a.uids, a.tokens  # type: ignore[attr-defined]
    b.data_dir.mkdir(parents=True)
    with sqlite3.connect(index) as source, sqlite3.connect(b.data_dir / "index.sqlite") as copy:
        source.backup(copy)
    shutil.copytree(a.data_dir / "objects", b.data_dir / "objects")
    b.start()
    try:
        logged = b.log_text()
        assert "WARNING" in logged and "signing secret is missing" in logged and "bs.nhung" in logged, logged
        write_draft(b, uid(b, "browser"))
        for _ in range(7):  # more wrong PINs than lock signing: none is counted
            refused = sign(b, uid(b, "browser"), WRONG_PIN)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert "signing_secret_file" in error and "PACS_SIGNING_SECRET" in error, error
        assert _status(b, "browser") == "draft"
        assert b.alive()
        # An import here would seal with a new secret of its own: refused, nothing made.
        b.make_token("bs.khoa", "radiologist", "BS. Lê Đăng Khoa")
        other = import_cert(b, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n")
        assert other.returncode == 2 and "--new-secret" in other.stderr and "bs.nhung" in other.stderr, other.stderr
        assert not (b.data_dir / "secrets").exists()

        # The secret copied from the first machine: it signs, the server unchanged.
        (b.data_dir / "secrets").mkdir(mode=0o700)
        (b.data_dir / "secrets" / "signing.key").write_bytes(secret)
        os.chmod(b.data_dir / "secrets" / "signing.key", 0o600)
        assert _signs(b, "browser").status_code == 200
    finally:
        b.stop()

    b.extra_env["PACS_SIGNING_SECRET"] = os.urandom(32).hex()
    b.start()
    try:
        assert "is not the one the signing keys of bs.nhung were sealed with" in b.log_text()
        refused = _signs(b, "amend")
        assert refused.status_code == 503 and "is not the one" in refused.json()["error"], refused.text
        assert _status(b, "amend") == "draft"
    finally:
        b.stop()

    # A malformed secret is a clear error of the setting, its value not repeated.
    b.extra_env["PACS_SIGNING_SECRET"] = "c2hvcnQ="
    shown = b.cli("user", "certificate", "show", "bs.nhung", check=False)
    assert shown.returncode != 0 and "signing_secret" in shown.stderr and "c2hvcnQ=" not in shown.stderr, \
        shown.stderr


def test_two_nodes_share_the_secret_and_a_restore_elsewhere_needs_it(
        tmp_path: Path, pki: Pki, postgres: str, pg_url: str, s3_bucket_url: str) -> None:
    """Two nodes on one PostgreSQL index and one bucket, each given the
    same PACS_SIGNING_SECRET (hex on one, base64 on the other): both sign,
    and no secret file is made. `pacs backup` leaves the secret out and
    says to keep it apart. Restored into a fresh database on a machine
    without it: restore and serve warn, signing answers 503; a radiologist
    whose certificate is imported again (--new-secret) signs; the others
    sign again once PACS_SIGNING_SECRET is given."""
    secret = os.urandom(32)
    s3 = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    backend = Backend("pg-s3", pg_url, s3_bucket_url, s3)
    a = _serve(tmp_path / "a", backend, {**SIGNING, "PACS_SIGNING_SECRET": secret.hex()})
    b = PacsServer(tmp_path / "b" / "data", backend,
                   extra_env={**SIGNING, "PACS_SIGNING_SECRET": base64.b64encode(secret).decode()})
    b.data_dir.mkdir(parents=True)
    _tokens(a)
    b.uids, b.tokens = a.uids, a.tokens  # type: ignore[attr-defined]
    done = import_cert(a, "bs.nhung", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (a.data_dir / "secrets").exists() and "signing secret was made" not in done.stderr
    backup = tmp_path / "backups" / "index.dump"
    backup.parent.mkdir()
    a.start()
    b.start()
    try:
        assert _signs(a, "sign").status_code == 200
        assert _signs(b, "pin").status_code == 200
        for node in (a, b):
            assert "signing secret" not in node.log_text()
        backed_up = a.cli("backup", "--out", str(backup))
        assert "signing secret (PACS_SIGNING_SECRET" in backed_up.stdout and "NOT in the backup" in backed_up.stdout
    finally:
        a.stop()
        b.stop()
    for path in backup.parent.iterdir():
        data = path.read_bytes()
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in data, path

    index = create_database(postgres)
    try:
        c = PacsServer(tmp_path / "c" / "data", Backend("pg-s3", index, s3_bucket_url, s3), extra_env=dict(SIGNING))
        c.uids = a.uids  # type: ignore[attr-defined]
        c.data_dir.mkdir(parents=True)
        restored = c.cli("restore", str(backup), "--yes")
        assert "signing secret is missing" in restored.stderr and "bs.nhung" in restored.stderr, restored.stderr
        c.tokens = {**a.tokens, "khoa": c.make_token("bs.khoa", "radiologist", "BS. Lê Đăng Khoa")}  # type: ignore
        c.start()
        try:
            assert "signing secret is missing" in c.log_text()
            refused = _signs(c, "tamper")
            assert refused.status_code == 503 and "PACS_SIGNING_SECRET" in refused.json()["error"], refused.text
            # The secret lost: a radiologist imports again, sealed with this machine's own.
            again = import_cert(c, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n", "--new-secret")
            assert again.returncode == 0, again.stderr
            assert stat.S_IMODE((c.data_dir / "secrets" / "signing.key").stat().st_mode) == 0o600
            assert _signs(c, "tamper", "khoa").status_code == 200
            # This machine's secret is the one in use now: a renewal needs no flag.
            renewed = import_cert(c, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n")
            assert renewed.returncode == 0, renewed.stderr
            assert _signs(c, "browser").status_code == 503
        finally:
            c.stop()
        c.extra_env["PACS_SIGNING_SECRET"] = base64.b64encode(secret).decode()
        c.start()
        try:
            assert _signs(c, "browser").status_code == 200
        finally:
            c.stop()
    finally:
        drop_database(index, postgres)
