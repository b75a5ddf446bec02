"""Shortcomings earlier work left, each reproduced against real peers and fixed:

1. an SR (and a study's dose and key images) whose indexed object is gone
   from the store: answered as WADO-RS answers a missing object (500 naming
   it, ``pacs verify``; one log line, no traceback);
2. HL7 v2 enhanced acknowledgment mode: the application ACK MSH-16 asks for
   (AL; ER on an error, SU on success) is sent, also when MSH-15 asks for no
   accept ACK (NE^ER on a failing message got no answer at all);
3. the signing PIN is Unicode-normalised (NFC): Vietnamese typed as NFD on
   one keyboard and NFC on another is one PIN;
4. the overwrite policy: a byte-identical resend writes nothing;
5. QIDO-RS ``TimezoneOffsetFromUTC``: accepted when it is the archive's own
   offset, refused (400 naming it) when dates and times would need adjusting.

One `pacs serve` for the module (SQLite + filesystem, overwrite policy,
report signing on), DCMTK's storescu, raw MLLP sockets, the HTTP API and the CLI.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_hl7_review import CR, FS, VT, connect, fields, msa, orm, read_frame, with_modes
from .test_report_digital_signature import P12_PASSWORD, Pki, import_cert
from .test_sr_view import _new_study, comprehensive_sr, ct_dose_sr, ct_slices, key_objects

# pyHanko imports cryptography's DSA module, deprecated (the product filters it: pacs.report_signature).
pytestmark = pytest.mark.filterwarnings("ignore:.*DSA.*")

PIN_NFC = unicodedata.normalize("NFC", "Mật khẩu")
PIN_NFD = unicodedata.normalize("NFD", "Mật khẩu")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.p12("vy", "Hoàng Thị Vy")
    return pki


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("leftovers")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_DUPLICATE_POLICY": "overwrite", "PACS_REPORT_SIGNATURE": "radiologist",
        "PACS_REPORT_TRUST_ROOTS": str(pki.ca_pem), "PACS_TIMEZONE": "Asia/Ho_Chi_Minh",
    })
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _object_files(server: PacsServer, sop: str) -> list[Path]:
    return [p for p in (server.data_dir / "objects").rglob(f"{sop}*.dcm")]


# -- 1. an SR missing from the store ------------------------------------------------------------
def test_sr_dose_and_key_images_of_objects_missing_from_the_store(server: PacsServer, tmp_path: Path) -> None:
    study = _new_study()
    files = [*ct_slices(study, tmp_path), comprehensive_sr(study, tmp_path), ct_dose_sr(study, tmp_path),
             key_objects(study, tmp_path)]
    sent = server.storescu(*(str(p) for p in files))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    sr, rdsr, kos = (str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[3:])
    with server.http() as http:
        assert http.get(f"/api/instances/{sr}/sr").status_code == 200
        for sop in (sr, rdsr, kos):
            for path in _object_files(server, sop):
                path.unlink()
        since = server.log_path.stat().st_size
        for sop in (sr, rdsr, kos):
            gone = http.get(f"/api/instances/{sop}/sr")
            assert gone.status_code == 500, gone.text
            assert "missing from the archive's store" in gone.json()["error"] and "pacs verify" in gone.json()["error"]
        dose = http.get(f"/api/studies/{study.uid}/dose")
        assert dose.status_code == 200, dose.text
        # The study's other reads go on: the lost report is named, with what is wrong.
        assert [r["sop_uid"] for r in dose.json()["reports"]] == [rdsr]
        assert "missing from the archive's store (pacs verify)" in dose.json()["reports"][0]["error"]
        keys = http.get(f"/api/studies/{study.uid}/key-images")
        assert keys.status_code == 200, keys.text
        assert [d["sop_uid"] for d in keys.json()["documents"]] == [kos]
        assert "missing from the archive's store (pacs verify)" in keys.json()["documents"][0]["error"]
        assert http.get("/health").status_code == 200
    log = server.log_text(since)
    assert "Traceback" not in log, log
    # One line per object read: the three SR reads, the two the dose summary read, the KOS.
    assert sum("missing from the archive's store" in line for line in log.splitlines()) == 6, log


# -- 2. HL7 enhanced acknowledgment mode: application ACKs ---------------------------------------
def _answers(server: PacsServer, *messages: str) -> list[tuple[str, str, str]]:
    """(MSA-1, MSA-2, MSH-15 of the ACK) of every ACK to *messages* sent on
    one connection, read up to the ACK of an original-mode probe sent last."""
    probe = orm(f"PRB{generate_uid()[-8:]}", "RLOPROBE", pid="BN7100^^^BVDK^MR")
    got: list[tuple[str, str, str]] = []
    with connect(server) as sock:
        for message in (*messages, probe):
            sock.sendall(VT + message.encode() + FS + CR)
        probe_control = fields(probe, "MSH")[9]
        while not got or got[-1][1] != probe_control:
            ack = read_frame(sock)
            got.append((*msa(ack), (fields(ack, "MSH") + [""] * 16)[14]))
    return got[:-1]


def test_hl7_application_acks_follow_msh16(server: PacsServer) -> None:
    """HL7 v2.5 2.9.3: MSH-16 asks for the application ACK (AA/AE/AR), sent
    after the accept ACK MSH-15 asks for (CA/CE/CR), as its own message
    asking no ACK back (MSH-15 NE); both empty is original mode (AA/AE/AR)."""
    pid = "BN7101^^^BVDK^MR"

    def both(accept: str, application: str, n: int) -> list[tuple[str, str, str]]:
        """A new order (G*n*) and one with ORC-1 ZZ (B*n*: not in table 0119, AE 103), on one connection."""
        good = orm(f"G{n}", f"RLO{n:03d}", pid=pid)
        bad = orm(f"B{n}", f"RLOB{n:03d}", pid=pid, order_control="ZZ")
        return _answers(server, with_modes(good, accept, application), with_modes(bad, accept, application))

    # The case reported: NE^ER, the message failing, got no answer at all.
    assert both("NE", "ER", 1) == [("AE", "B1", "NE")]
    assert both("NE", "AL", 2) == [("AA", "G2", "NE"), ("AE", "B2", "NE")]
    assert both("NE", "SU", 3) == [("AA", "G3", "NE")]
    assert both("NE", "NE", 4) == []
    assert both("AL", "AL", 5) == [("CA", "G5", ""), ("AA", "G5", "NE"), ("CE", "B5", ""), ("AE", "B5", "NE")]
    assert both("ER", "ER", 6) == [("CE", "B6", ""), ("AE", "B6", "NE")]
    assert both("AL", "NE", 7) == [("CA", "G7", ""), ("CE", "B7", "")]
    assert both("SU", "", 8) == [("CA", "G8", "")]  # MSH-16 empty: no application ACK asked
    assert both("", "ER", 9) == [("AE", "B9", "NE")]  # MSH-15 empty: no accept ACK asked
    assert both("", "", 10) == [("AA", "G10", ""), ("AE", "B10", "")]  # original mode


# -- 3. the signing PIN in NFC and NFD ----------------------------------------------------------
def test_signing_pin_typed_as_nfd_or_nfc_is_one_pin(server: PacsServer, pki: Pki, tmp_path: Path) -> None:
    assert PIN_NFC != PIN_NFD
    token = server.make_token("bs.vy", "radiologist", "BS. Hoàng Thị Vy")
    studies = []
    for n in range(3):
        path = make_ct(tmp_path / f"sign{n}.dcm", PatientID=f"BN-PIN-{n}", PatientName="Đặng^Văn Sơn",
                       SpecificCharacterSet="ISO_IR 192")
        assert server.storescu(str(path)).returncode == 0
        studies.append(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    done = import_cert(server, "bs.vy", pki.folder / "vy.p12", f"{P12_PASSWORD}\n{PIN_NFD}\n")
    assert done.returncode == 0, done.stdout + done.stderr
    with server.http(token=token) as rad:
        for study, pin in zip(studies, (PIN_NFC, PIN_NFD, PIN_NFC)):
            assert rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.",
                                                                 "impression": "Không bất thường."}).status_code == 200
            signed = rad.post(f"/api/studies/{study}/report/sign", json={"pin": pin})
            assert signed.status_code == 200, signed.text


def test_a_key_sealed_under_an_nfc_pin_before_still_opens(pki: Pki) -> None:
    """Seals made before the PIN was normalised: an NFC PIN (what most
    keyboards type) opens them as before; one sealed under NFD bytes opens
    with the PIN typed either way."""
    from pacs.signing_keys import SigningSecret, open_key

    secret = SigningSecret(b"s" * 32, "test")
    key = pki.keys["vy"]
    for sealed_as in (PIN_NFC, PIN_NFD):
        blob = _old_seal(key, sealed_as, b"s" * 32)
        for typed in (PIN_NFC, PIN_NFD):
            assert open_key(blob, typed, "bs.vy", "ab" * 32, secret) is not None, (sealed_as == PIN_NFC, typed)
        assert open_key(blob, "Mat khau", "bs.vy", "ab" * 32, secret) is None


def _old_seal(key: Any, pin: str, secret: bytes) -> bytes:
    """A seal as the code before normalisation made it: the PIN's bytes as typed."""
    import hashlib
    import hmac
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pacs import signing_keys as sk

    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, nonce = os.urandom(sk._SALT), os.urandom(sk._NONCE)
    n_log2, r, p = sk._SCRYPT
    password = hmac.new(secret, sk._PIN_MESSAGE + pin.encode("utf-8"), hashlib.sha256).digest()
    aead = AESGCM(sk._derive(password, salt, n_log2, r, p))
    sealed = aead.encrypt(nonce, der, sk._aad(sk._SEAL_VERSION, "bs.vy", "ab" * 32))
    return bytes([sk._SEAL_VERSION, n_log2, r, p]) + sk._check_value(secret) + salt + nonce + sealed


# -- 4. an identical resend under the overwrite policy ------------------------------------------
def test_an_identical_resend_under_overwrite_writes_nothing(server: PacsServer, tmp_path: Path) -> None:
    path = make_ct(tmp_path / "resend.dcm", PatientID="BN-RESEND")
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert server.storescu(str(path)).returncode == 0
    first = _object_files(server, sop)
    assert [p.name for p in first] == [f"{sop}.dcm"]
    stamp = first[0].stat().st_mtime_ns
    for _ in range(2):
        again = server.storescu(str(path))
        assert again.returncode == 0 and "Failed" not in again.stderr, again.stderr
    assert [(p.name, p.stat().st_mtime_ns) for p in _object_files(server, sop)] == [(f"{sop}.dcm", stamp)]
    # A changed resend is still a correction: written beside it, the row switched.
    changed = make_ct(tmp_path / "changed.dcm", sop_uid=sop, PatientID="BN-RESEND",
                      StudyInstanceUID=str(dcmread(path).StudyInstanceUID),
                      SeriesInstanceUID=str(dcmread(path).SeriesInstanceUID), SeriesDescription="sửa lại",
                      SpecificCharacterSet="ISO_IR 192")
    assert server.storescu(str(changed)).returncode == 0
    core = server.core()
    try:
        assert core.reader.instance_key(sop).endswith(f"{sop}.resent.dcm")
    finally:
        core.close()


# -- 5. QIDO-RS TimezoneOffsetFromUTC -------------------------------------------------------------
def test_qido_timezone_offset_is_ours_or_refused(server: PacsServer, tmp_path: Path) -> None:
    path = make_ct(tmp_path / "tz.dcm", PatientID="BN-TZ", StudyDate="20240301", StudyTime="083000")
    assert server.storescu(str(path)).returncode == 0
    study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    with server.http() as http:
        def uids(params: dict[str, str]) -> set[str]:
            answer = http.get("/dicom-web/studies", params={"PatientID": "BN-TZ", **params})
            assert answer.status_code == 200, answer.text
            return {s["0020000D"]["Value"][0] for s in answer.json()}

        # The archive's own offset (the hospital's zone, Asia/Ho_Chi_Minh): nothing to adjust.
        assert uids({"TimezoneOffsetFromUTC": "+0700", "StudyDate": "20240301"}) == {study}
        assert uids({"TimezoneOffsetFromUTC": "+0700", "StudyDate": "20240301", "StudyTime": "0800-0900"}) == {study}
        # Another offset without dates or times to adjust: nothing to do either.
        assert uids({"TimezoneOffsetFromUTC": "+0000"}) == {study}
        for params in ({"StudyDate": "20240301"}, {"StudyTime": "0100-0200"},
                       {"SeriesDate": "20240301-"}, {"00080020": "20240301"}):
            refused = http.get("/dicom-web/studies", params={"PatientID": "BN-TZ", "TimezoneOffsetFromUTC": "+0000",
                                                              **params})
            assert refused.status_code == 400, (params, refused.text)
            assert "TimezoneOffsetFromUTC" in refused.json()["error"] and "+0700" in refused.json()["error"]
        for bad in ("0700", "+07", "+2500", "UTC", "+07:00"):
            refused = http.get("/dicom-web/studies", params={"TimezoneOffsetFromUTC": bad})
            assert refused.status_code == 400 and "TimezoneOffsetFromUTC" in refused.json()["error"], bad

