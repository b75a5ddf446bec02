"""Review of the digital signature of reports (pacs.signing_keys,
pacs.report_signature): what real certificates, real DICOM consumers and a
forger do to it.

A root CA and an intermediate CA (as VNPT-CA, Viettel-CA issue under the
national root) sign the radiologists' certificates; the PKCS#12 files carry
the intermediate. A real `pacs serve` signs reports with the PIN; the
stored Encapsulated PDF instance is read back over WADO-URI as any DICOM
consumer reads it, turned into a file by DCMTK's dcm2pdf and checked by
poppler's pdfsig and pyHanko.
"""

from __future__ import annotations

import io
import subprocess
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
from pydicom import dcmread

from .conftest import Backend, PacsServer
from .test_report_digital_signature import FINDINGS, IMPRESSION, _serve, import_cert, pdf_instance, pdfsig

P12_PASSWORD = "mat-khau-p12"
PIN = "975312"
ROOT_CN = "Root CA Quốc gia thử nghiệm"
SUB_CN = "CA Thử nghiệm cấp 2"
pytestmark = pytest.mark.filterwarnings("ignore:.*DSA.*")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bệnh viện Đa khoa Tỉnh Nam Định"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: x509.Name, key: Any, ca_key: Any, issuer: x509.Name, *, ca: bool = False,
           usage: tuple[bool, bool] = (True, True), eku: list[x509.ObjectIdentifier] | None = None
           ) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:  # digitalSignature, nonRepudiation (contentCommitment) as asked
        builder = builder.add_extension(x509.KeyUsage(usage[0], usage[1], False, False, False, False, False,
                                                      False, False), critical=True)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


class Pki:
    """A root, an intermediate under it, and end-entity PKCS#12 files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _issue(_name(ROOT_CN), self.root_key, self.root_key, _name(ROOT_CN), ca=True)
        self.sub_key = ec.generate_private_key(ec.SECP256R1())
        self.sub = _issue(_name(SUB_CN), self.sub_key, self.root_key, _name(ROOT_CN), ca=True)
        self.root_pem = folder / "root.pem"  # the only trust root: the intermediate comes with the signature
        self.root_pem.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))

    def p12(self, name: str, cn: str, *, ecdsa: bool = False, usage: tuple[bool, bool] = (True, True),
            eku: list[x509.ObjectIdentifier] | None = None) -> Path:
        key = ec.generate_private_key(ec.SECP256R1()) if ecdsa else rsa.generate_private_key(65537, 2048)
        cert = _issue(_name(cn), key, self.sub_key, _name(SUB_CN), usage=usage, eku=eku)
        path = self.folder / f"{name}.p12"
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            name.encode(), key, cert, [self.sub], serialization.BestAvailableEncryption(P12_PASSWORD.encode())))
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("rv-pki"))
    pki.p12("both", "Trần Thị Bích Ngọc")
    pki.p12("ds", "Đỗ Minh Quân", usage=(True, False))
    pki.p12("ec", "Lương Thế Vinh", ecdsa=True,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION])
    pki.p12("tls", "pacs.bv-namdinh.vn", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    return pki


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("rv-kyso")
    server = _serve(tmp, Backend("sqlite-fs", None, None, {}),
                    {"PACS_REPORT_SIGNATURE": "radiologist", "PACS_REPORT_TRUST_ROOTS": str(pki.root_pem)})
    server.start()
    # Display names one letter apart: the signature dictionary's /Name, so
    # the two signed files differ in length by one byte (one is odd).
    server.tokens = {  # type: ignore[attr-defined]
        "a": server.make_token("bs.a", "radiologist", "BS. Ngọc A"),
        "ab": server.make_token("bs.ab", "radiologist", "BS. Ngọc AB"),
        "ds": server.make_token("bs.ds", "radiologist", "BS. Đỗ Minh Quân"),
        "ec": server.make_token("bs.ec", "radiologist", "BS. Lương Thế Vinh"),
        "tls": server.make_token("bs.tls", "radiologist", "BS. TLS"),
    }
    for user, p12 in (("bs.a", "both"), ("bs.ab", "both"), ("bs.ds", "ds"), ("bs.ec", "ec")):
        done = import_cert(server, user, pki.folder / f"{p12}.p12", f"{P12_PASSWORD}\n{PIN}\n")
        assert done.returncode == 0, done.stdout + done.stderr
    yield server
    server.stop()


def _sign(server: PacsServer, study_name: str, user: str) -> str:
    study = server.uids[study_name]  # type: ignore[attr-defined]
    with server.http(token=server.tokens[user]) as rad:  # type: ignore[attr-defined]
        saved = rad.put(f"/api/studies/{study}/report", json={"findings": FINDINGS, "impression": IMPRESSION})
        assert saved.status_code == 200, saved.text
        signed = rad.post(f"/api/studies/{study}/report/sign", json={"pin": PIN})
        assert signed.status_code == 200, signed.text
    return str(study)


def _signature(server: PacsServer, study: str) -> dict[str, Any]:
    with server.http() as http:
        answer = http.get(f"/api/studies/{study}/report/signature")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_signed_pdf_in_the_dicom_instance_needs_no_pad_byte(archive: PacsServer, tmp_path: Path) -> None:
    """DICOM pads an odd-length Encapsulated Document with a NUL byte. A
    consumer that takes the element's value as the document (a script's
    pydicom ds.EncapsulatedDocument, a DICOMweb bulk data read, a CD viewer
    that does not look at EncapsulatedDocumentLength) then had a PDF with
    one byte after the signed range: pdfsig "Not total document signed",
    Adobe "modified after signing". The signed file is made even in length,
    so the instance holds it byte for byte with nothing after it; DCMTK's
    dcm2pdf and pdfsig agree."""
    for study_name, user in (("sign", "a"), ("pin", "ab")):
        study = _sign(archive, study_name, user)
        series, sop = pdf_instance(archive, study)
        where = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
        with archive.http() as http:
            served = http.get(f"/api/studies/{study}/report/pdf").content
            wado_pdf = http.get("/wado", params={**where, "contentType": "application/pdf"}).content
            instance = http.get("/wado", params={**where, "contentType": "application/dicom"}).content
        ds = dcmread(io.BytesIO(instance))
        document = bytes(ds.EncapsulatedDocument)
        assert int(ds.EncapsulatedDocumentLength) == len(document), (user, len(served))
        assert served == wado_pdf == document
        dicom_file = tmp_path / f"{user}.dcm"
        dicom_file.write_bytes(instance)
        extracted = tmp_path / f"{user}.pdf"
        subprocess.run(["dcm2pdf", str(dicom_file), str(extracted)], check=True, capture_output=True, timeout=60)
        said = pdfsig(extracted.read_bytes(), tmp_path)
        assert "Signature is Valid." in said and "Total document signed" in said, said
        found = _signature(archive, study)
        assert found["intact"] and found["trusted"] and found["signatures"][0]["covers_whole_file"], found


def test_a_certificate_for_digital_signature_only_verifies(archive: PacsServer) -> None:
    """Import accepts a certificate whose Key Usage is digitalSignature
    without nonRepudiation (the law asks either; some CAs' certificates for
    organizations and staff have only the first). Verification (pyHanko's
    default wants nonRepudiation) called its every signature "does not chain
    to report_trust_roots", though it does."""
    study = _sign(archive, "amend", "ds")
    found = _signature(archive, study)
    (one,) = found["signatures"]
    assert found["intact"] and found["trusted"], found
    assert one["signer"] == "Đỗ Minh Quân" and "problem" not in one, one


def test_extended_key_usage_is_checked_at_import(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """A certificate whose Extended Key Usage is for something else (a web
    server's TLS certificate, serverAuth only) is refused at import: its
    signatures are rejected by pdfsig and Adobe. A Vietnamese CA's usual
    personal certificate (ECDSA P-256, clientAuth + emailProtection, issued
    by an intermediate CA the PKCS#12 carries) is accepted, and its
    signature chains to the root through the intermediate in the CMS."""
    refused = import_cert(archive, "bs.tls", pki.folder / "tls.p12", f"{P12_PASSWORD}\n{PIN}\n")
    assert refused.returncode == 2 and "Extended Key Usage" in refused.stderr, refused.stderr
    assert archive.cli("user", "certificate", "show", "bs.tls", check=False).returncode == 1

    study = _sign(archive, "browser", "ec")
    found = _signature(archive, study)
    assert found["intact"] and found["trusted"], found
    with archive.http() as http:
        pdf = http.get(f"/api/studies/{study}/report/pdf").content
    said = pdfsig(pdf, tmp_path)
    assert "Signature is Valid." in said and "Signer Certificate Common Name: Lương Thế Vinh" in said, said


def test_content_changed_after_signing_then_signed_again_is_broken(archive: PacsServer) -> None:
    """Someone with access to the storage draws over the findings of the
    signed PDF in a new revision, then adds a signature of their own so
    that the last signature covers the whole file. The radiologist's
    signature no longer covers what the page shows: verification must say
    so (it said intact, as Adobe does not)."""
    from pyhanko.pdf_utils import generic
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

    from pacs.report_signature import ORGANIZATION_FIELD, REASON, Signature, sign_pdf
    from pacs.signing_keys import SigningMaterial

    study = _sign(archive, "tamper", "a")
    assert _signature(archive, study)["intact"]
    _, sop = pdf_instance(archive, study)
    core = archive.core()
    try:
        key = core.reader.stored_instance(sop).storage_key
        ds = dcmread(io.BytesIO(core.store.read_bytes(key)))
        signed = bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
        writer = IncrementalPdfFileWriter(io.BytesIO(signed))
        cover = generic.StreamObject(stream_data=b"q 1 1 1 rg 40 380 520 300 re f Q")
        writer.add_stream_to_page(0, writer.add_object(cover))
        changed = io.BytesIO()
        writer.write(changed)
        forger_key = ec.generate_private_key(ec.SECP256R1())
        forger = _issue(_name("Ai đó"), forger_key, forger_key, _name("Ai đó"))
        forged = sign_pdf(changed.getvalue(), [Signature(SigningMaterial(forger_key, forger, []),
                                                         ORGANIZATION_FIELD, "Ai đó", REASON)])
        ds.EncapsulatedDocument = forged + (b"\0" if len(forged) % 2 else b"")
        ds.EncapsulatedDocumentLength = len(forged)
        out = io.BytesIO()
        ds.save_as(out)
        core.store.put(key, io.BytesIO(out.getvalue()), len(out.getvalue()))
    finally:
        core.close()
    found = _signature(archive, study)
    radiologist = found["signatures"][0]
    assert radiologist["kind"] == "radiologist" and radiologist["intact"] is False, radiologist
    assert found["intact"] is False and "changed after" in found["problem"], found
    done = archive.cli("report", "verify", study, check=False)
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stdout


def test_verifying_an_untrusted_signature_logs_no_traceback(archive: PacsServer, pki: Pki, tmp_path: Path) -> None:
    """A signer that does not chain to report_trust_roots (or none
    configured, the default) is an answer of the verification ("not
    trusted"), not a server fault: the viewer asks it each time a signed
    report is shown, and each time pyHanko wrote a warning with a traceback
    into the server's log."""
    from .dicomfiles import image_dataset

    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _issue(_name("CA khác"), other_key, other_key, _name("CA khác"), ca=True)
    key = rsa.generate_private_key(65537, 2048)
    cert = _issue(_name("Hoàng Văn Khác"), key, other_key, _name("CA khác"))
    p12 = tmp_path / "other.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"other", key, cert, [other], serialization.BestAvailableEncryption(P12_PASSWORD.encode())))
    archive.tokens["other"] = archive.make_token("bs.other", "radiologist", "BS. Khác")  # type: ignore[attr-defined]
    assert import_cert(archive, "bs.other", p12, f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    (tmp_path / "in").mkdir()
    ds = image_dataset(PatientID="BN-KHAC", Modality="CT", SpecificCharacterSet="ISO_IR 192")
    ds.save_as(tmp_path / "in" / "other.dcm", enforce_file_format=True)
    archive.cli("import", str(tmp_path / "in"))
    archive.uids["other"] = str(ds.StudyInstanceUID)  # type: ignore[attr-defined]
    study = _sign(archive, "other", "other")
    start = archive.log_path.stat().st_size
    for _ in range(2):
        found = _signature(archive, study)
        assert found["intact"] and not found["trusted"], found
        assert "does not chain" in found["signatures"][0]["problem"]
    logged = archive.log_text(start)
    assert "Traceback" not in logged and "pyhanko" not in logged, logged


def test_signing_on_a_server_whose_tz_is_a_posix_rule(tmp_path: Path, pki: Pki) -> None:
    """TZ=ICT-7 (a POSIX rule, as some images and embedded set-ups have it)
    is a zone the rest of the server reads (pacs.timezones); pyHanko asks
    tzlocal for the local zone when it signs, and tzlocal refuses such a
    rule: every signature was a 500. It signs, the signing time the right
    instant."""
    server = _serve(tmp_path, Backend("sqlite-fs", None, None, {}),
                    {"PACS_REPORT_SIGNATURE": "radiologist", "PACS_REPORT_TRUST_ROOTS": str(pki.root_pem),
                     "TZ": "ICT-7"})
    server.tokens = {"a": server.make_token("bs.a", "radiologist", "BS. Ngọc")}  # type: ignore[attr-defined]
    assert import_cert(server, "bs.a", pki.folder / "both.p12", f"{P12_PASSWORD}\n{PIN}\n").returncode == 0
    server.start()
    try:
        before = datetime.now(UTC)
        study = _sign(server, "sign", "a")
        found = _signature(server, study)
        assert found["intact"] and found["trusted"], found
        signed_at = datetime.fromisoformat(found["signatures"][0]["signing_time"])
        assert abs(signed_at - before) < timedelta(hours=1)  # the instant, not 7 hours off
    finally:
        server.stop()
