"""The digital signature (chữ ký số) of a signed report's PDF: PAdES, with pyHanko.

Vietnamese EMR rules (Thông tư 46/2018/TT-BYT, Nghị định 130/2018) want an
imaging report to carry a digital signature that anyone verifies (Adobe
Reader, Foxit, the Ministry's tools). With ``report_signature`` on, the PDF
rendered at signing is signed before it is stored as the study's
Encapsulated PDF instance, so the instance's document is the signed file
byte for byte:

- ``radiologist``: by the radiologist's certificate (pacs.signing_keys),
  opened with the PIN they give when signing;
- ``organization``: by the hospital's seal (chữ ký số tổ chức), a PKCS#12
  named by ``report_seal_pkcs12`` with its password in
  ``PACS_REPORT_SEAL_PASSWORD``;
- ``both``: the radiologist's, then the seal's counter-signature (a second
  signature over the whole file, the first one included).

Signatures are PAdES B-B (ETSI.CAdES.detached, the signing time the
signer's); with ``report_tsa_url`` an RFC 3161 time-stamp makes them B-T.
:func:`verify_pdf` says, per signature: who signed, whether the
certificate was valid at the signing time, whether the bytes are intact
and whether it chains to ``report_trust_roots``.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .settings import Settings
from .signing_keys import SigningKeyError, SigningMaterial, common_name, load_pkcs12, name_text
from .timezones import server_zone

log = logging.getLogger(__name__)

REASON = "Ký duyệt kết quả chẩn đoán hình ảnh"
SEAL_REASON = "Xác nhận của cơ sở khám bệnh, chữa bệnh (chữ ký số tổ chức)"
# The signature fields: which signature is whose, for a verifier and for us.
RADIOLOGIST_FIELD = "ChuKySo_BacSi"
ORGANIZATION_FIELD = "ChuKySo_ToChuc"
_KINDS = {RADIOLOGIST_FIELD: "radiologist", ORGANIZATION_FIELD: "organization"}
MODES = ("off", "radiologist", "organization", "both")


def _pyhanko() -> None:
    """pyHanko imports cryptography's DSA module, deprecated: a warning on
    every command's stderr otherwise. Imported at the first signature or
    verification, not at every start.

    pyHanko's validation also logs, with a traceback, every signer it finds
    no path to a trust root for (each report shown, where report_trust_roots
    is not set) and every revision its diff cannot explain: answers of the
    verification that :func:`verify_pdf` returns ("not trusted", "changed
    after it was signed"), not faults of the server."""
    warnings.filterwarnings("ignore", message=".*DSA.*", module="pyhanko")
    for name in ("pyhanko.sign.validation", "pyhanko.sign.diff_analysis"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _tzlocal_fallback()


def _tzlocal_fallback() -> None:
    """pyHanko takes the signing time's zone from tzlocal, which refuses a
    TZ that is a POSIX rule ("ICT-7"): every signature failed (500) on a
    server the rest of the PACS runs on (pacs.timezones reads that rule).
    tzlocal's answer is kept where it has one, else the server's zone as
    pacs.timezones reads it (the instant is the same; only its offset shows)."""
    import tzlocal

    original = tzlocal.get_localzone
    if getattr(original, "pacs_fallback", False):
        return

    def get_localzone() -> Any:
        try:
            return original()
        except KeyError:  # zoneinfo.ZoneInfoNotFoundError
            return server_zone()

    get_localzone.pacs_fallback = True  # type: ignore[attr-defined]
    tzlocal.get_localzone = get_localzone


def needs_radiologist(settings: Settings) -> bool:
    """Whether signing a report needs the radiologist's certificate and PIN."""
    return settings.report_signature in ("radiologist", "both")


def needs_seal(settings: Settings) -> bool:
    return settings.report_signature in ("organization", "both")


@dataclass(frozen=True)
class Signature:
    """One signature to put on the PDF."""

    material: SigningMaterial
    field: str
    name: str
    reason: str


def load_seal(settings: Settings, at: datetime | None = None) -> SigningMaterial:
    """The hospital's seal from ``report_seal_pkcs12``; 503 when it is not
    configured or cannot be read (the server's set-up, not the signer's
    fault), 422 when its certificate is not valid now."""
    path = settings.report_seal_pkcs12
    if path is None:
        raise SigningKeyError(f"report_signature is {settings.report_signature!r} but report_seal_pkcs12 (the "
                              "hospital's seal) is not set: ask the administrator", 503)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"the hospital's seal {path} cannot be read ({exc.strerror}): ask the administrator",
                              503) from None
    try:
        return load_pkcs12(data, settings.report_seal_password or "", at=at)
    except SigningKeyError as exc:
        status = 503 if exc.http_status == 400 else exc.http_status
        raise SigningKeyError(f"the hospital's seal ({path}): {exc} (PACS_REPORT_SEAL_PASSWORD)", status) from None


def seal_problem(settings: Settings) -> str | None:
    """Why the configured seal cannot sign (not set, unreadable, wrong
    password, expired), or None (also when no seal is needed)."""
    if not needs_seal(settings):
        return None
    try:
        load_seal(settings)
    except SigningKeyError as exc:
        return str(exc)
    return None


# Tries at an even-length signed file (see sign_pdf); a time-stamp's size may vary between tries.
_EVEN_TRIES = 4


def sign_pdf(pdf: bytes, signatures: list[Signature], *, location: str = "", tsa_url: str = "") -> bytes:
    """*pdf* signed by each of *signatures* in turn (PAdES B-B; B-T with a
    time-stamp from *tsa_url*): incremental updates, the last covering the
    whole file. 502 when the time-stamping authority fails.

    The signed file is of even length: DICOM pads an odd-length Encapsulated
    Document with a NUL byte, and a consumer that takes the PDF out of the
    instance without EncapsulatedDocumentLength (pydicom's value, a DICOMweb
    bulk data read, a CD viewer) would find a byte after the last signature
    ("not the whole document signed", Adobe's "modified after signing"). An
    odd result is signed again from the unsigned file with one more
    end-of-line after its %%EOF (legal whitespace, outside every signature),
    which moves the parity."""
    signed = pdf
    for extra in range(_EVEN_TRIES):
        signed = _sign_each(pdf + b"\n" * extra, signatures, location, tsa_url)
        if len(signed) % 2 == 0:
            break
    return signed


def _sign_each(pdf: bytes, signatures: list[Signature], location: str, tsa_url: str) -> bytes:
    """*pdf* signed by each of *signatures* in turn (see sign_pdf)."""
    _pyhanko()
    from asn1crypto import keys as asn1_keys
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import signers
    from pyhanko.sign.fields import SigSeedSubFilter
    from pyhanko.sign.timestamps import HTTPTimeStamper, TimestampRequestError
    from pyhanko_certvalidator.registry import SimpleCertificateStore

    def asn1(cert: x509.Certificate) -> Any:
        return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))

    timestamper = HTTPTimeStamper(tsa_url, timeout=15) if tsa_url else None
    for signature in signatures:
        material = signature.material
        # PKCS#8 in this process's memory only, for pyHanko's own key type.
        key = asn1_keys.PrivateKeyInfo.load(material.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        chain = SimpleCertificateStore.from_certs([asn1(c) for c in material.chain])
        signer = signers.SimpleSigner(signing_cert=asn1(material.certificate), signing_key=key, cert_registry=chain)
        meta = signers.PdfSignatureMetadata(
            field_name=signature.field, md_algorithm="sha256", subfilter=SigSeedSubFilter.PADES,
            reason=signature.reason, location=location or None, name=signature.name or None,
        )
        try:
            pdf = signers.sign_pdf(IncrementalPdfFileWriter(io.BytesIO(pdf)), meta, signer=signer,
                                   timestamper=timestamper).getvalue()
        except TimestampRequestError as exc:
            raise SigningKeyError(f"the time-stamping authority {tsa_url} did not give a time-stamp ({exc}); "
                                  "the report stays unsigned, try again", 502) from None
    return pdf


def signatures_for(engine: Any, settings: Settings, username: str, display_name: str,
                   pin: str | None) -> list[Signature]:
    """The signatures ``report_signature`` asks of *username*'s report ([]
    when off). The seal is read first: a server set-up fault costs the
    radiologist no PIN try. Then the radiologist's key is opened with *pin*
    (counted, locked after wrong ones: pacs.signing_keys.unlock)."""
    from .signing_keys import load_secret, unlock

    found: list[Signature] = []
    seal = None
    if needs_seal(settings):
        seal = load_seal(settings)
    if needs_radiologist(settings):
        material = unlock(engine, username, pin, secret=load_secret(settings))
        found.append(Signature(material, RADIOLOGIST_FIELD, display_name or common_name(material.certificate),
                               REASON))
    if seal is not None:
        found.append(Signature(seal, ORGANIZATION_FIELD, common_name(seal.certificate),
                               REASON if not found else SEAL_REASON))
    return found


# -- verification ---------------------------------------------------------------------
def trust_roots(settings: Settings) -> list[x509.Certificate]:
    """The CA certificates of ``report_trust_roots`` (PEM files); a file that
    cannot be read is logged and skipped (the signature then shows untrusted)."""
    roots: list[x509.Certificate] = []
    for path in settings.report_trust_roots:
        try:
            roots.extend(x509.load_pem_x509_certificates(Path(path).read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning("report_trust_roots: %s cannot be read as PEM certificates: %s", path, exc)
    return roots


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _one(embedded: Any, roots: list[Any]) -> dict[str, Any]:
    """The verification of one embedded signature."""
    from pyhanko.sign.diff_analysis import ModificationLevel
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko.sign.validation.settings import KeyUsageConstraints
    from pyhanko.sign.validation.status import SignatureCoverageLevel
    from pyhanko_certvalidator import ValidationContext

    field = str(embedded.field_name or "")
    sig = embedded.sig_object
    claimed = embedded.self_reported_timestamp
    result: dict[str, Any] = {
        "field": field, "kind": _KINDS.get(field, "other"), "name": str(sig.get("/Name", "") or ""),
        "reason": str(sig.get("/Reason", "") or ""), "location": str(sig.get("/Location", "") or ""),
        "signing_time": _iso(claimed), "time_source": "signer",
    }
    try:
        cert = x509.load_der_x509_certificate(embedded.signer_cert.dump())
    except Exception:  # a signature whose certificate cannot be read is no one's
        cert = None
    if cert is not None:
        result.update(signer=common_name(cert), signer_subject=name_text(cert.subject), issuer=name_text(cert.issuer),
                      serial=format(cert.serial_number, "x"), not_before=_iso(cert.not_valid_before_utc),
                      not_after=_iso(cert.not_valid_after_utc))
    # The chain is judged at the signing time, not today: a certificate that
    # expired since still made a valid signature while it was valid.
    context = ValidationContext(trust_roots=roots, allow_fetching=False, revocation_mode="soft-fail",
                                moment=claimed)
    # Either usage signs a document (as import accepts, pacs.signing_keys):
    # pyHanko's default wants nonRepudiation, and called a certificate with
    # digitalSignature alone untrusted.
    usage = KeyUsageConstraints(key_usage={"digital_signature", "non_repudiation"})
    try:
        status = validate_pdf_signature(embedded, context, key_usage_settings=usage)
    except Exception as exc:  # a damaged signature or PDF: broken, never a 500
        result.update(intact=False, trusted=False, covers_whole_file=False,
                      problem=f"the signature cannot be checked: {type(exc).__name__}: {exc}"[:300])
        result["certificate_valid_at_signing"] = None
        return result
    when = claimed
    timestamp = getattr(status, "timestamp_validity", None)
    if timestamp is not None and timestamp.intact and timestamp.valid:
        when = timestamp.timestamp
        result.update(signing_time=_iso(when), time_source="timestamp", timestamp_trusted=bool(timestamp.trusted))
    # A later revision that changes more than signatures and form fields (a
    # page's content drawn over) breaks this signature, even when a later
    # signature covers the whole file: what it signed is not what is shown.
    modified = status.docmdp_ok is False or status.modification_level == ModificationLevel.OTHER
    result["intact"] = bool(status.intact and status.valid) and not modified
    result["trusted"] = bool(status.trusted)
    result["covers_whole_file"] = status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    if cert is not None and when is not None:
        result["certificate_valid_at_signing"] = cert.not_valid_before_utc <= when <= cert.not_valid_after_utc
    else:
        result["certificate_valid_at_signing"] = None
    if modified:
        result["problem"] = ("the PDF was changed after it was signed (a later revision changes its content, "
                             "not only adds signatures)")
    elif not result["intact"]:
        result["problem"] = "the PDF was changed after it was signed (its digest no longer matches)"
    elif status.coverage not in (SignatureCoverageLevel.ENTIRE_FILE, SignatureCoverageLevel.ENTIRE_REVISION):
        result["problem"] = "the signature does not cover its revision of the PDF"
    elif not result["trusted"]:
        result["problem"] = ("the certificate does not chain to report_trust_roots" if roots
                             else "no report_trust_roots configured: the signer is not checked against a CA")
    return result


def verify_pdf(pdf: bytes, roots: list[x509.Certificate]) -> dict[str, Any]:
    """Every signature of *pdf*, and the document's verdict: *signed*;
    *intact* (every signature's digest matches, and the last covers the
    whole file: nothing was appended after it); *trusted* (every signer
    chains to *roots*)."""
    _pyhanko()
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader

    try:
        embedded = PdfFileReader(io.BytesIO(pdf), strict=False).embedded_signatures
    except Exception as exc:  # not even a readable PDF any more
        return {"signed": None, "intact": False, "trusted": False, "signatures": [],
                "problem": f"the PDF cannot be read: {type(exc).__name__}: {exc}"[:300]}
    if not embedded:
        return {"signed": False, "intact": None, "trusted": None, "signatures": []}
    anchors = [asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in roots]
    found = [_one(e, anchors) for e in embedded]
    intact = all(s["intact"] for s in found) and bool(found[-1]["covers_whole_file"])
    answer: dict[str, Any] = {"signed": True, "intact": intact, "trusted": all(s["trusted"] for s in found),
                              "signatures": found}
    if not intact:
        answer["problem"] = next((s["problem"] for s in found if not s["intact"]),
                                 "bytes were added to the PDF after its last signature")
    return answer
