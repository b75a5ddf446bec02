"""Digital signatures on reports (chữ ký số; pacs.signing_keys,
pacs.report_signature, `pacs user certificate`, `pacs report verify`).

A test CA, radiologists' certificates (Vietnamese names in UTF-8 in the
subject), a hospital seal and a time-stamping authority are made here with
`cryptography`; the radiologist's PKCS#12 is imported with the CLI, the
report signed over HTTP with the PIN by a real `pacs serve` (SQLite +
filesystem and PostgreSQL + SeaweedFS S3), and the PDF read back over the
report API and WADO-URI is verified by pyHanko and by an independent
verifier, poppler's pdfsig. Wrong PINs, locks, expired certificates, a
tampered byte, amendments, the seal and an RFC 3161 time-stamp (B-T, from a
small local responder), report_signature = off, and the viewer's PIN dialog
and badge in headless Chromium.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port, shared_backend
from .dicomfiles import image_dataset
from .peers import PACS
from .test_clock_review import FAKETIME_LIB
from .test_web_viewer import browsing, sign_in

SIGNER_CN = "Nguyễn Thị Hồng Nhung"
DISPLAY_NAME = "BS. Nguyễn Thị Hồng Nhung"
HOSPITAL = "Bệnh viện Đa khoa Tỉnh Thái Bình"
P12_PASSWORD = "mật-khẩu-p12"
PIN = "246810"
WRONG_PIN = "135799"
FINDINGS = "Gan không to, nhu mô đều. Túi mật không sỏi."
IMPRESSION = "Siêu âm ổ bụng chưa phát hiện bất thường."
REASON = "Ký duyệt kết quả chẩn đoán hình ảnh"
STUDIES = ("sign", "pin", "tamper", "browser", "amend")
PDFSIG = "/usr/bin/pdfsig"
# pyHanko imports cryptography's DSA module, deprecated (the product filters it: pacs.report_signature).
pytestmark = pytest.mark.filterwarnings("ignore:.*DSA.*")


# -- a small PKI ------------------------------------------------------------------------
def _name(cn: str, org: str = HOSPITAL) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: x509.Name, key: Any, ca_key: Any, issuer: x509.Name, *, ca: bool = False,
           days: tuple[float, float] = (-1, 365), eku: Any = None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                                        critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=True)
    return builder.sign(ca_key, hashes.SHA256())


class Pki:
    """A CA with radiologists' certificates, a seal and a TSA, as files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = _name("CA Thử nghiệm Chữ ký số", "Tổ chức chứng thực thử nghiệm")
        self.ca = _issue(self.ca_name, self.ca_key, self.ca_key, self.ca_name, ca=True, days=(-30, 3650))
        self.ca_pem = folder / "ca.pem"
        self.ca_pem.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        self.keys: dict[str, Any] = {}
        self.certs: dict[str, x509.Certificate] = {}

    def p12(self, name: str, cn: str, password: str = P12_PASSWORD, days: tuple[float, float] = (-1, 365),
            eku: Any = None, rsa_key: bool = True) -> Path:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key \
            else ec.generate_private_key(ec.SECP256R1())
        cert = _issue(_name(cn), key, self.ca_key, self.ca_name, days=days, eku=eku)
        self.keys[name], self.certs[name] = key, cert
        path = self.folder / f"{name}.p12"
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            name.encode(), key, cert, [self.ca], serialization.BestAvailableEncryption(password.encode())))
        return path

    def key_der(self, name: str) -> bytes:
        return self.keys[name].private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.p12("nhung", SIGNER_CN)
    pki.p12("khoa", "Lê Đăng Khoa", rsa_key=False)  # ECDSA
    pki.p12("old", "Trần Văn Cũ", days=(-400, -1))
    pki.p12("future", "Võ Thị Sau", days=(10, 400))
    pki.p12("seal", HOSPITAL, password="mật-khẩu-con-dấu")
    return pki


# -- the archive ------------------------------------------------------------------------
def _write_studies(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for n, name in enumerate(STUDIES, 1):
        ds = image_dataset(StudyInstanceUID=generate_uid(), PatientName="Phạm^Văn Đức", PatientID=f"BN-KYSO-{n}",
                           PatientBirthDate="19800512", InstitutionName=HOSPITAL, SpecificCharacterSet="ISO_IR 192",
                           StudyDescription="Siêu âm ổ bụng", Modality="US", StudyDate="20261205")
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        found[name] = str(ds.StudyInstanceUID)
    return found


def _serve(tmp: Path, backend: Backend, env: dict[str, str]) -> PacsServer:
    server = PacsServer(tmp / "data", backend, extra_env=env)
    server.uids = _write_studies(tmp / "in")  # type: ignore[attr-defined]
    server.cli("import", str(tmp / "in"))
    return server


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PacsServer]:
    """report_signature = radiologist, trusting the test CA; bs.nhung's
    certificate imported with the CLI (its PIN chosen at import)."""
    tmp = tmp_path_factory.mktemp(f"kyso-{request.param}")
    with shared_backend(request.param, request, "kyso") as backend:
        server = _serve(tmp, backend, {"PACS_REPORT_SIGNATURE": "radiologist",
                                       "PACS_REPORT_TRUST_ROOTS": str(pki.ca_pem)})
        server.start()
        server.tokens = {  # type: ignore[attr-defined]
            "nhung": server.make_token("bs.nhung", "radiologist", DISPLAY_NAME),
            "khoa": server.make_token("bs.khoa", "radiologist", "BS. Lê Đăng Khoa"),
            "emr": server.make_token("emr", "emr", "EMR"),
        }
        done = import_cert(server, "bs.nhung", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n")
        assert done.returncode == 0, done.stdout + done.stderr
        yield server
        server.stop()


def uid(server: PacsServer, name: str) -> str:
    return server.uids[name]  # type: ignore[no-any-return,attr-defined]


def token(server: PacsServer, user: str) -> str:
    return server.tokens[user]  # type: ignore[no-any-return,attr-defined]


def import_cert(server: PacsServer, user: str, p12: Path, secrets: str,
                *extra: str) -> subprocess.CompletedProcess[str]:
    """`pacs user certificate import`, the secrets on standard input (one a line)."""
    return subprocess.run([PACS, "user", "certificate", "import", user, str(p12), *extra, *server.common_args()],
                          input=secrets, capture_output=True, text=True, env=server.env, timeout=120)


def cli_json(server: PacsServer, *args: str, check: bool = True) -> tuple[int, Any]:
    done = server.cli(*args, "--json", check=check)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None


def trail(server: PacsServer, **filters: str) -> list[dict[str, Any]]:
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": 10000, **filters})
    assert answer.status_code == 200, answer.text
    return list(reversed(answer.json()))


def write_draft(server: PacsServer, study: str, user: str = "nhung") -> None:
    with server.http(token=token(server, user)) as rad:
        saved = rad.put(f"/api/studies/{study}/report", json={"findings": FINDINGS, "impression": IMPRESSION})
        assert saved.status_code == 200, saved.text


def sign(server: PacsServer, study: str, pin: str | None, user: str = "nhung") -> Any:
    with server.http(token=token(server, user)) as rad:
        return rad.post(f"/api/studies/{study}/report/sign", json={} if pin is None else {"pin": pin})


def pdfsig(pdf: bytes, folder: Path) -> str:
    """poppler's pdfsig on *pdf*: what an independent verifier says."""
    if not Path(PDFSIG).exists():
        pytest.fail("pdfsig is missing: apt-get install -y poppler-utils (bash scripts/test.sh does it)")
    path = folder / f"report-{os.urandom(4).hex()}.pdf"
    path.write_bytes(pdf)
    done = subprocess.run([PDFSIG, str(path)], capture_output=True, timeout=60)
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def pyhanko_statuses(pdf: bytes, pki: Pki) -> list[Any]:
    """pyHanko's own validation of every signature, trusting the test CA."""
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    root = asn1_x509.Certificate.load(pki.ca.public_bytes(serialization.Encoding.DER))
    found = []
    for embedded in PdfFileReader(io.BytesIO(pdf)).embedded_signatures:
        context = ValidationContext(trust_roots=[root], allow_fetching=False)
        found.append(validate_pdf_signature(embedded, context))
    return found


def pdf_instance(server: PacsServer, study: str, version: int | None = None) -> tuple[str, str]:
    """(series, SOP Instance UID) of the report's Encapsulated PDF."""
    with server.http() as http:
        report = http.get(f"/api/studies/{study}/report").json()
    wanted = [v for v in report["versions"] if v["status"] == "signed" and version in (None, v["version"])][-1]
    core = server.core()
    try:
        stored = core.reader.stored_instance(wanted["pdf_sop_uid"])
        with core.engine.connect() as conn:
            from sqlalchemy import text

            series = conn.execute(text("SELECT s.series_uid FROM instances i JOIN series s ON s.pk = i.series_pk "
                                       "WHERE i.sop_uid = :u"), {"u": wanted["pdf_sop_uid"]}).scalar_one()
    finally:
        core.close()
    assert stored is not None
    return str(series), wanted["pdf_sop_uid"]


# -- certificates -----------------------------------------------------------------------
def test_certificate_import_show_remove_and_what_is_refused(archive: PacsServer, pki: Pki) -> None:
    """Import keeps the certificate and a key sealed under the PIN, never in
    clear; show gives subject, issuer, serial and validity; a wrong password,
    an expired or not yet valid certificate and a non-radiologist are refused
    with a clear message; remove forgets it; each is audited."""
    code, shown = cli_json(archive, "user", "certificate", "show", "bs.nhung")
    cert = pki.certs["nhung"]
    assert shown["subject"] == cert.subject.rfc4514_string() and SIGNER_CN in shown["subject"]
    assert shown["issuer"] == cert.issuer.rfc4514_string() and "CA Thử nghiệm Chữ ký số" in shown["issuer"]
    assert shown["serial"] == format(cert.serial_number, "x")
    assert shown["not_after"] == cert.not_valid_after_utc.isoformat()
    assert shown["not_before"] == cert.not_valid_before_utc.isoformat()
    text_view = archive.cli("user", "certificate", "show", "bs.nhung").stdout
    assert SIGNER_CN in text_view and "valid" in text_view and shown["serial"] in text_view

    # No usable key in the index: neither the key's bytes nor the secrets that open it.
    core = archive.core()
    try:
        from sqlalchemy import text

        with core.engine.connect() as conn:
            rows = [bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode()
                    for row in conn.execute(text("SELECT * FROM signing_certificates")) for v in row if v is not None]
    finally:
        core.close()
    blob = b"".join(rows)
    for secret in (pki.key_der("nhung")[-64:], PIN.encode(), P12_PASSWORD.encode()):
        assert secret not in blob
    key_numbers = pki.keys["nhung"].private_numbers()
    assert key_numbers.d.to_bytes(256, "big").lstrip(b"\0")[:32] not in blob

    # Refusals: nothing stored, each says why.
    wrong = import_cert(archive, "bs.khoa", pki.folder / "khoa.p12", "not-the-password\n\n")
    assert wrong.returncode == 2 and "password is wrong" in wrong.stderr
    expired = import_cert(archive, "bs.khoa", pki.folder / "old.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert expired.returncode == 2 and "expired on" in expired.stderr, expired.stderr
    future = import_cert(archive, "bs.khoa", pki.folder / "future.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert future.returncode == 2 and "not valid before" in future.stderr, future.stderr
    short = import_cert(archive, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n123\n")
    assert short.returncode == 2 and "at least 6 characters" in short.stderr
    not_radiologist = import_cert(archive, "emr", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert not_radiologist.returncode == 2 and "only radiologists sign reports" in not_radiologist.stderr
    assert archive.cli("user", "certificate", "show", "bs.khoa", check=False).returncode == 1

    # The PKCS#12 password as the PIN (no second line), then removed.
    done = import_cert(archive, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n", "--pin-is-password")
    assert done.returncode == 0, done.stderr
    assert "Lê Đăng Khoa" in done.stdout
    assert cli_json(archive, "user", "certificate", "remove", "bs.khoa")[1] == {"removed": True}
    assert archive.cli("user", "certificate", "remove", "bs.khoa", check=False).returncode == 1

    events = [e for e in trail(archive) if e["action"].startswith("certificate-")]
    outcomes = [(e["action"], e["outcome"]) for e in events]
    assert ("certificate-import", "success") in outcomes and ("certificate-remove", "success") in outcomes
    assert [e for e in events if e["outcome"] == "failure" and "expired on" in e["detail"]]
    assert any(SIGNER_CN in e["detail"] for e in events if e["outcome"] == "success")
    for e in trail(archive):
        assert PIN not in json.dumps(e, ensure_ascii=False) and P12_PASSWORD not in json.dumps(e, ensure_ascii=False)


# -- signing and verifying --------------------------------------------------------------
def test_signed_report_pdf_verifies_with_pyhanko_and_pdfsig(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """Signed over HTTP with the PIN: the PDF of the report API and the
    Encapsulated PDF instance over WADO-URI are the same signed bytes; pyHanko
    and pdfsig find one intact PAdES signature over the whole file by
    Nguyễn Thị Hồng Nhung; GET .../signature and `pacs report verify` say so."""
    study = uid(archive, "sign")
    write_draft(archive, study)
    without = sign(archive, study, None)
    assert without.status_code == 422 and "PIN" in without.json()["error"]
    with archive.http(token=token(archive, "nhung")) as rad:
        report = rad.get(f"/api/studies/{study}/report").json()
    assert report["status"] == "draft"
    assert report["digital_signature"] == {"mode": "radiologist", "pin_required": True}

    signed = sign(archive, study, PIN)
    assert signed.status_code == 200, signed.text
    assert signed.json()["status"] == "signed"
    with archive.http() as http:
        pdf = http.get(f"/api/studies/{study}/report/pdf").content
        series, sop = pdf_instance(archive, study)
        wado = http.get("/wado", params={"requestType": "WADO", "studyUID": study, "seriesUID": series,
                                         "objectUID": sop, "contentType": "application/pdf"})
    assert wado.status_code == 200 and wado.headers["content-type"] == "application/pdf"
    assert wado.content == pdf  # the instance's document is the signed file, byte for byte

    (status,) = pyhanko_statuses(pdf, pki)
    assert status.intact and status.valid and status.trusted and status.bottom_line
    assert status.coverage.name == "ENTIRE_FILE"
    assert SIGNER_CN in status.signing_cert.subject.human_friendly

    said = pdfsig(pdf, tmp_path)
    assert "Signature #1" in said and "Signature #2" not in said, said
    assert "Signature Validation: Signature is Valid." in said
    assert "Total document signed" in said
    assert f"Signer Certificate Common Name: {SIGNER_CN}" in said
    assert "ETSI.CAdES.detached" in said  # PAdES

    # The signature dictionary: signer, reason, location, time.
    from pyhanko.pdf_utils.reader import PdfFileReader

    (embedded,) = PdfFileReader(io.BytesIO(pdf)).embedded_signatures
    assert str(embedded.sig_object["/Name"]) == DISPLAY_NAME
    assert str(embedded.sig_object["/Reason"]) == REASON
    assert str(embedded.sig_object["/Location"]) == HOSPITAL  # the study's Institution Name
    assert embedded.self_reported_timestamp is not None

    with archive.http(token=token(archive, "emr")) as emr:
        found = emr.get(f"/api/studies/{study}/report/signature").json()
    assert found["signed"] is True and found["intact"] is True and found["trusted"] is True
    (one,) = found["signatures"]
    assert one["signer"] == SIGNER_CN and SIGNER_CN in one["signer_subject"]
    assert one["certificate_valid_at_signing"] is True and one["kind"] == "radiologist"
    assert one["reason"] == REASON and one["time_source"] == "signer"

    code, verified = cli_json(archive, "report", "verify", study)
    assert code == 0 and verified["intact"] and verified["trusted"]
    assert verified["signatures"][0]["signer"] == SIGNER_CN
    plain = archive.cli("report", "verify", study).stdout
    assert "intact, trusted" in plain and SIGNER_CN in plain

    events = [e for e in trail(archive, study=study) if e["action"] == "report-sign"]
    assert [e["outcome"] for e in events] == ["failure", "success"]
    assert "digitally signed" in events[-1]["detail"] and SIGNER_CN in events[-1]["detail"]
    assert any(e["action"] == "view" and "pacs report verify" in e["detail"] for e in trail(archive, study=study))


def test_amendment_is_signed_again(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """An amendment is a new version with a new signature; the first stays verifiable."""
    study = uid(archive, "amend")
    write_draft(archive, study)
    assert sign(archive, study, PIN).status_code == 200
    with archive.http(token=token(archive, "nhung")) as rad:
        assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        assert rad.put(f"/api/studies/{study}/report",
                       json={"findings": FINDINGS + " Bổ sung: gan nhiễm mỡ nhẹ.", "impression": IMPRESSION}
                       ).status_code == 200
    assert sign(archive, study, PIN).status_code == 200
    with archive.http() as http:
        first = http.get(f"/api/studies/{study}/report/pdf", params={"version": 1}).content
        second = http.get(f"/api/studies/{study}/report/pdf").content
        v2 = http.get(f"/api/studies/{study}/report/signature").json()
        v1 = http.get(f"/api/studies/{study}/report/signature", params={"version": 1}).json()
    assert first != second and v1["version"] == 1 and v2["version"] == 2
    assert v1["intact"] and v2["intact"] and v1["signatures"][0]["serial"] == v2["signatures"][0]["serial"]
    assert all(s.intact and s.valid for s in pyhanko_statuses(second, pki))
    assert "Signature is Valid." in pdfsig(second, tmp_path)
    assert cli_json(archive, "report", "verify", study, "--version", "1")[1]["version"] == 1


def test_wrong_pin_is_refused_audited_and_locks(archive: PacsServer, pki: Pki) -> None:
    """A wrong PIN is a 403 saying how many tries are left, the report stays
    unsigned and the attempt is audited; the fifth locks signing (audited as
    signature-lockout), and while locked even the right PIN gets 429 with
    Retry-After. A new import of the certificate lifts the lock."""
    done = import_cert(archive, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert done.returncode == 0, done.stderr
    study = uid(archive, "pin")
    write_draft(archive, study, "khoa")
    log_start = archive.log_path.stat().st_size
    for left in (4, 3, 2, 1):
        refused = sign(archive, study, WRONG_PIN, "khoa")
        assert refused.status_code == 403, refused.text
        assert f"{left} tries left" in refused.json()["error"]
    locking = sign(archive, study, WRONG_PIN, "khoa")
    assert locking.status_code == 403 and "locked until" in locking.json()["error"]
    locked = sign(archive, study, PIN, "khoa")
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert "locked" in locked.json()["error"]
    with archive.http(token=token(archive, "khoa")) as rad:
        assert rad.get(f"/api/studies/{study}/report").json()["status"] == "draft"
    assert "signing locked" in archive.cli("user", "certificate", "show", "bs.khoa").stdout

    events = trail(archive, study=study)
    signs = [e for e in events if e["action"] == "report-sign"]
    assert [e["outcome"] for e in signs] == ["denied"] * 5 + ["failure"]
    assert all("wrong signing PIN" in e["detail"] for e in signs[:5]) and "locked" in signs[5]["detail"]
    lockouts = [e for e in events if e["action"] == "signature-lockout"]
    assert len(lockouts) == 1 and lockouts[0]["user"] == "bs.khoa"
    for text_seen in (json.dumps(events, ensure_ascii=False), archive.log_text(log_start)):
        assert PIN not in text_seen and WRONG_PIN not in text_seen

    # Re-imported (the radiologist came to IT): the lock is lifted, the right PIN signs.
    assert import_cert(archive, "bs.khoa", pki.folder / "khoa.p12", f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    assert sign(archive, study, PIN, "khoa").status_code == 200
    code, verified = cli_json(archive, "report", "verify", study)
    assert code == 0 and verified["signatures"][0]["signer"] == "Lê Đăng Khoa"  # an ECDSA certificate


def test_a_tampered_byte_breaks_the_signature(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """One byte of the stored PDF changed: `pacs report verify`, the API,
    pyHanko and pdfsig all say the signature no longer holds."""
    study = uid(archive, "tamper")
    write_draft(archive, study)
    assert sign(archive, study, PIN).status_code == 200
    _, sop = pdf_instance(archive, study)
    core = archive.core()
    try:
        key = core.reader.stored_instance(sop).storage_key
        data = core.store.read_bytes(key)
        at = data.index(b"/Producer (") + len(b"/Producer (")
        tampered = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
        core.store.put(key, io.BytesIO(tampered), len(tampered))
    finally:
        core.close()
    code, verified = cli_json(archive, "report", "verify", study, check=False)
    assert code == 1 and verified["signed"] is True and verified["intact"] is False
    assert "changed after it was signed" in verified["problem"]
    assert "BROKEN" in archive.cli("report", "verify", study, check=False).stdout
    with archive.http() as http:
        pdf = http.get(f"/api/studies/{study}/report/pdf").content
        assert http.get(f"/api/studies/{study}/report/signature").json()["intact"] is False
    (status,) = pyhanko_statuses(pdf, pki)
    assert not status.intact
    said = pdfsig(pdf, tmp_path)
    assert "Signature is Valid." not in said and "Digest Mismatch" in said, said


def test_viewer_asks_the_pin_and_shows_the_badge(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """The viewer signs through a PIN dialog (a wrong PIN is said, nothing
    signed) and shows "Đã ký số: <name>" / "Digitally signed by <name>"
    under the page's strict CSP, with no script error."""
    from playwright.sync_api import expect

    study = uid(archive, "browser")
    archive.cli("user", "add", "bs.an", "--role", "radiologist", "--password", "Secret-123",
                "--display-name", DISPLAY_NAME)
    assert import_cert(archive, "bs.an", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    with browsing(archive) as (page, errors):
        sign_in(page, "bs.an", "Secret-123")
        expect(page).to_have_url(re.compile(r"#/worklist$"))
        page.goto(f"/#/study/{study}")
        page.fill("#findings", FINDINGS)
        page.fill("#impression", IMPRESSION)
        page.click("#sign-report")
        dialog = page.locator("#sign-pin-dialog")
        expect(dialog).to_be_visible()
        expect(dialog.locator("h3")).to_have_text("Ký số báo cáo")
        page.fill("#sign-pin", WRONG_PIN)
        page.screenshot(path=str(tmp_path / "pin-dialog.png"))
        page.click("#sign-pin-ok")
        expect(page.locator("#report-error")).to_contain_text("wrong PIN")
        expect(page.locator("#report-status")).to_have_text("Bản nháp")
        page.click("#sign-report")
        page.fill("#sign-pin", PIN)
        page.click("#sign-pin-ok")
        badge = page.locator("#report-digital-signature")
        expect(badge).to_have_text(f"Đã ký số: {SIGNER_CN}")
        expect(badge).to_have_attribute("data-state", "ok")
        page.screenshot(path=str(tmp_path / "badge-vi.png"))
        page.click("#lang-toggle")
        expect(badge).to_have_text(f"Digitally signed by {SIGNER_CN}")
        assert not errors, errors


# -- the certificate expired since its import -------------------------------------------
def test_a_certificate_expired_since_import_is_refused_at_signing(tmp_path: Path, pki: Pki) -> None:
    """Imported while valid; the server's clock 400 days later (libfaketime),
    past the certificate's end: signing is refused with a clear message and
    the report stays unsigned (the PIN itself was right)."""
    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y libfaketime "
                    "(bash scripts/test.sh does it)")
    server = _serve(tmp_path, Backend("sqlite-fs", None, None, {}), {"PACS_REPORT_SIGNATURE": "radiologist"})
    server.tokens = {"nhung": server.make_token("bs.nhung", "radiologist", DISPLAY_NAME)}  # type: ignore[attr-defined]
    assert import_cert(server, "bs.nhung", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    server.extra_env.update({"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+400d"})  # the server only
    server.start()
    try:
        study = uid(server, "sign")
        write_draft(server, study)
        refused = sign(server, study, PIN)
        assert refused.status_code == 422, refused.text
        expiry = pki.certs["nhung"].not_valid_after_utc
        assert f"expired on {expiry:%Y-%m-%d %H:%M} UTC" in refused.json()["error"]
        assert "import the renewed certificate" in refused.json()["error"]
        with server.http(token=token(server, "nhung")) as rad:
            assert rad.get(f"/api/studies/{study}/report").json()["status"] == "draft"
    finally:
        server.stop()


# -- the hospital's seal, and an RFC 3161 time-stamp ------------------------------------
class _TsaHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        from asn1crypto import tsp

        body = self.rfile.read(int(self.headers["Content-Length"]))
        stamper = self.server.stamper  # type: ignore[attr-defined]
        answer = stamper.request_tsa_response(tsp.TimeStampReq.load(body)).dump()
        self.server.asked += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/timestamp-reply")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def _tsa(pki: Pki) -> http.server.ThreadingHTTPServer:
    """A small RFC 3161 responder on loopback: pyHanko's test time-stamper
    behind HTTP, its certificate (EKU timeStamping) issued by the test CA."""
    from asn1crypto import keys as asn1_keys
    from asn1crypto import x509 as asn1_x509
    from pyhanko.sign.timestamps import DummyTimeStamper
    from pyhanko_certvalidator.registry import SimpleCertificateStore

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # pyHanko's test TSA signs RSA only
    cert = _issue(_name("Máy chủ cấp dấu thời gian thử nghiệm"), key, pki.ca_key, pki.ca_name,
                  eku=ExtendedKeyUsageOID.TIME_STAMPING)

    def asn1(c: x509.Certificate) -> Any:
        return asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _TsaHandler)
    server.stamper = DummyTimeStamper(  # type: ignore[attr-defined]
        tsa_cert=asn1(cert), tsa_key=asn1_keys.PrivateKeyInfo.load(key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        certs_to_embed=SimpleCertificateStore.from_certs([asn1(pki.ca)]))
    server.asked = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("mode", ["organization", "both"])
def test_the_hospital_seal_signs_alone_or_counter_signs(mode: str, tmp_path: Path, pki: Pki) -> None:
    """organization: the seal alone signs, no PIN asked. both: the
    radiologist's signature, then the seal's over the whole file, each with
    a time-stamp from the TSA (PAdES B-T); pdfsig and pyHanko find both valid."""
    tsa = _tsa(pki) if mode == "both" else None
    env = {"PACS_REPORT_SIGNATURE": mode, "PACS_REPORT_TRUST_ROOTS": str(pki.ca_pem),
           "PACS_REPORT_SEAL_PKCS12": str(pki.folder / "seal.p12"), "PACS_REPORT_SEAL_PASSWORD": "mật-khẩu-con-dấu",
           "PACS_REPORT_SIGNATURE_LOCATION": "Khoa Chẩn đoán hình ảnh, " + HOSPITAL}
    if tsa is not None:
        env["PACS_REPORT_TSA_URL"] = f"http://127.0.0.1:{tsa.server_address[1]}/tsa"
    server = _serve(tmp_path, Backend("sqlite-fs", None, None, {}), env)
    server.tokens = {"nhung": server.make_token("bs.nhung", "radiologist", DISPLAY_NAME)}  # type: ignore[attr-defined]
    assert import_cert(server, "bs.nhung", pki.folder / "nhung.p12", f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    server.start()
    try:
        study = uid(server, "sign")
        write_draft(server, study)
        with server.http(token=token(server, "nhung")) as rad:
            pin_required = rad.get(f"/api/studies/{study}/report").json()["digital_signature"]["pin_required"]
        assert pin_required is (mode == "both")
        signed = sign(server, study, PIN if mode == "both" else None)
        assert signed.status_code == 200, signed.text
        with server.http() as http:
            pdf = http.get(f"/api/studies/{study}/report/pdf").content
            found = http.get(f"/api/studies/{study}/report/signature").json()
        said = pdfsig(pdf, tmp_path)
        statuses = pyhanko_statuses(pdf, pki)
        assert all(s.intact and s.valid and s.trusted for s in statuses)
        assert found["intact"] and found["trusted"]
        signers = [s["signer"] for s in found["signatures"]]
        if mode == "organization":
            assert signers == [HOSPITAL] and [s["kind"] for s in found["signatures"]] == ["organization"]
            assert "Signature #2" not in said and f"Signer Certificate Common Name: {HOSPITAL}" in said
            assert found["signatures"][0]["reason"] == REASON
        else:
            assert signers == [SIGNER_CN, HOSPITAL]
            assert [s["kind"] for s in found["signatures"]] == ["radiologist", "organization"]
            assert said.count("Signature Validation: Signature is Valid.") == 2, said
            assert f"Signer Certificate Common Name: {SIGNER_CN}" in said
            assert f"Signer Certificate Common Name: {HOSPITAL}" in said
            # The radiologist's covers its revision, the seal's the whole file.
            assert [s["covers_whole_file"] for s in found["signatures"]] == [False, True]
            assert said.rstrip().count("Total document signed") == 1
            assert all(s["time_source"] == "timestamp" and s["timestamp_trusted"] for s in found["signatures"])
            assert all(s.timestamp_validity is not None and s.timestamp_validity.valid for s in statuses)
            assert tsa is not None and tsa.asked >= 2  # (pyHanko may ask once more to size its estimate)
        assert all(s["location"] == "Khoa Chẩn đoán hình ảnh, " + HOSPITAL for s in found["signatures"])
        assert "Total document signed" in said
        assert server.cli("report", "verify", study).returncode == 0
        assert "reports cannot be signed" not in server.log_text()
    finally:
        server.stop()
        if tsa is not None:
            tsa.shutdown()
    # Why a seal cannot sign: what pacs serve warns of at its start.
    from pacs.report_signature import seal_problem
    from pacs.settings import load_settings

    wrong = load_settings(data_dir=tmp_path / "data", report_signature=mode, report_seal_password="sai",
                          report_seal_pkcs12=pki.folder / "seal.p12")
    assert "PKCS#12 password is wrong" in (seal_problem(wrong) or "")
    assert "not set" in (seal_problem(load_settings(data_dir=tmp_path / "data", report_signature=mode)) or "")


# -- off: today's behaviour -------------------------------------------------------------
def test_off_signs_as_before_without_a_digital_signature(tmp_path: Path) -> None:
    """report_signature = off (the default): no PIN, the PDF carries no
    signature (pdfsig finds none), the API and `pacs report verify` say so."""
    server = _serve(tmp_path, Backend("sqlite-fs", None, None, {}), {})
    server.tokens = {"nhung": server.make_token("bs.nhung", "radiologist", DISPLAY_NAME)}  # type: ignore[attr-defined]
    server.start()
    try:
        study = uid(server, "sign")
        write_draft(server, study)
        with server.http(token=token(server, "nhung")) as rad:
            signed = rad.post(f"/api/studies/{study}/report/sign")
        assert signed.status_code == 200, signed.text
        assert signed.json()["digital_signature"] == {"mode": "off", "pin_required": False}
        with server.http() as http:
            pdf = http.get(f"/api/studies/{study}/report/pdf").content
            found = http.get(f"/api/studies/{study}/report/signature").json()
        assert pdf.startswith(b"%PDF") and b"/ByteRange" not in pdf
        assert "does not contain any signatures" in pdfsig(pdf, tmp_path)
        assert found["signed"] is False and found["signatures"] == []
        done = server.cli("report", "verify", study, check=False)
        assert done.returncode == 1 and "NOT digitally signed" in done.stdout
    finally:
        server.stop()
