"""Patient identity review: an Issuer of Patient ID qualifies the Patient ID
it comes with (C-FIND, QIDO-RS, worklist); other IDs on a later study of a
known patient are indexed; UTF-8 under a declared Latin-1 set (DICOM
ISO_IR 100, HL7 8859/1) is read as UTF-8 while real Latin-1 stays Latin-1;
undeclared UTF-8 in Other Patient IDs items reads alike over STOW-RS and
DIMSE; the worklist fills Other Patient IDs (0010,1000).

Real peers: DCMTK storescu/findscu, pynetdicom, python-hl7's MLLP client,
`pacs serve` on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

from .conftest import Backend, PacsServer
from .dicomfiles import image_dataset
from .peers import create_database, drop_database, wait_until
from .test_worklist_ris import msa, send, worklist

_NAME, _ISSUER = 0x00100010, 0x00100021
# What the server logs (once per association, request or message) for UTF-8 under a Latin-1 label.
DICOM_WARNING = "text declared ISO_IR 100 (Latin-1) is UTF-8"
HL7_WARNING = "declares MSH-18 8859/1 but its text is UTF-8"


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    pacs = PacsServer(tmp_path_factory.mktemp(f"identity-{request.param}") / "data",
                      Backend(request.param, pg, None, {})).start()
    yield pacs
    pacs.stop()
    if pg:
        drop_database(pg)


def ct(path: Path, pid: str, name: str | bytes, *, charset: str | None = "ISO_IR 192", issuer: str = "",
       others: tuple[tuple[str, str | bytes], ...] = (), accession: str = "", study_uid: str = "") -> Path:
    """A small CT object. Bytes (a name, an other ID's issuer) are written as
    given, whatever the declared character set (how mislabelling senders write)."""
    ds = image_dataset(SpecificCharacterSet=charset, PatientName=None, PatientID=pid,
                       IssuerOfPatientID=issuer or None, AccessionNumber=accession, StudyDate="20240105",
                       Rows=2, Columns=2, BitsStored=12, HighBit=11, PixelData=bytes(8))
    if study_uid:
        ds.StudyInstanceUID = study_uid
    ds.add(DataElement(_NAME, "PN", name))
    if others:
        items = []
        for value, other_issuer in others:
            item = Dataset()
            item.PatientID = value
            item.add(DataElement(_ISSUER, "LO", other_issuer))
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        ds.OtherPatientIDsSequence = Sequence(items)
    ds.save_as(path, enforce_file_format=True)
    return path


def store(server: PacsServer, *paths: Path) -> None:
    """All *paths* over one DCMTK storescu association."""
    result = server.storescu(*(str(p) for p in paths))
    assert result.returncode == 0, result.stderr


def stow(server: PacsServer, path: Path) -> None:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    with server.http() as http:
        response = http.post("/dicom-web/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert response.status_code == 200, response.text


def patients(server: PacsServer, **keys: str) -> list[Dataset]:
    """PATIENT-level C-FIND (Patient Root) answers, each with its Other Patient IDs."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = query.PatientID = query.IssuerOfPatientID = ""
    query.OtherPatientIDsSequence = Sequence([])
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    try:
        return [m for s, m in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)
                if s is not None and s.Status == 0xFF00]
    finally:
        assoc.release()


def ids(server: PacsServer, **keys: str) -> list[str]:
    """The Patient IDs a PATIENT-level C-FIND answers, sorted."""
    return sorted(str(m.PatientID) for m in patients(server, **keys))


def qido_ids(server: PacsServer, **params: str) -> list[str]:
    with server.http() as http:
        response = http.get("/dicom-web/studies", params=params)
    assert response.status_code in (200, 204), response.text
    return sorted(m["00100020"]["Value"][0] for m in (response.json() if response.status_code == 200 else []))


def worklist_ids(server: PacsServer, tmp_path: Path, *keys: str) -> list[str]:
    return sorted(str(item.PatientID) for item in worklist(server, tmp_path, "PatientName", *keys))


def orm(control: str, pid3: str, name: str, accession: str) -> str:
    return (f"MSH|^~\\&|HIS|BV|PACS|BV|20240105130000||ORM^O01|{control}|P|2.5|||||VNM|UNICODE UTF-8\n"
            f"PID|1||{pid3}||{name}||19900101|F\nPV1|1|O\nORC|NW|O{accession}|{accession}||SC\n"
            f"OBR|1|O{accession}|{accession}|CT001^CT ngực^L" + "|" * 20 + "CT")  # OBR-24: the modality


def test_an_issuer_qualifies_the_patient_id_it_comes_with(server: PacsServer, tmp_path: Path) -> None:
    """A's hospital number 0123456789 (issuer BV) is also B's old ID card
    number (issuer CMND), one of B's other IDs: ID and issuer together name
    one patient, by its own ID or an other ID, in C-FIND, QIDO-RS and the
    worklist."""
    store(server,
          ct(tmp_path / "a.dcm", "0123456789", "Lý^Thị A", issuer="BV"),
          ct(tmp_path / "b.dcm", "B001", "Võ^Văn B", issuer="BV", others=(("0123456789", "CMND"),)),
          ct(tmp_path / "c.dcm", "079201000001", "Nguyễn^Văn An", others=(("DN4010123456789", "BHXH"),)),
          # An ID kept without issuer: its issuer is unknown.
          ct(tmp_path / "d.dcm", "D0555", "Trần^Thị D"))
    assert msa(send(server, orm("ORM-A", "0123456789^^^BV^MR", "Lý^Thị A", "ACCA2")))[0] == "AA"
    assert msa(send(server, orm("ORM-B", "B001^^^BV^MR~0123456789^^^CMND^NI", "Võ^Văn B", "ACCB2")))[0] == "AA"

    assert ids(server, PatientID="0123456789", IssuerOfPatientID="BV") == ["0123456789"]
    assert ids(server, PatientID="0123456789", IssuerOfPatientID="CMND") == ["B001"]
    assert ids(server, PatientID="DN4010123456789", IssuerOfPatientID="BHXH") == ["079201000001"]
    # Without issuer, the ID is anyone's own or other ID; the issuer alone is the patient's own issuer.
    assert ids(server, PatientID="0123456789") == ["0123456789", "B001"]
    assert ids(server, IssuerOfPatientID="BV") == ["0123456789", "B001"]
    # Conservative: an ID stored without issuer is not taken for the ID under an issuer asked for.
    assert ids(server, PatientID="D0555", IssuerOfPatientID="BV") == []
    assert ids(server, PatientID="D0555") == ["D0555"]

    assert qido_ids(server, PatientID="0123456789", IssuerOfPatientID="BV") == ["0123456789"]
    assert qido_ids(server, PatientID="0123456789", IssuerOfPatientID="CMND") == ["B001"]
    assert qido_ids(server, PatientID="DN4010123456789", IssuerOfPatientID="BHXH") == ["079201000001"]

    assert worklist_ids(server, tmp_path, "PatientID=0123456789", "IssuerOfPatientID=BV") == ["0123456789"]
    assert worklist_ids(server, tmp_path, "PatientID=0123456789", "IssuerOfPatientID=CMND") == ["B001"]


def test_other_ids_of_a_later_study_of_a_known_patient_are_indexed(server: PacsServer, tmp_path: Path) -> None:
    """A patient's first study came without citizen ID and insurance number,
    a later one with them in Other Patient IDs Sequence: they are found,
    whether the patient's key was cached (same server run) or looked up
    again (after a restart)."""
    cached = ct(tmp_path / "y2.dcm", "BNY01", "Đỗ^Văn Y", others=(("001066000888", "CCCD"),))
    store(server, ct(tmp_path / "y1.dcm", "BNY01", "Đỗ^Văn Y"))
    store(server, cached)
    store(server, ct(tmp_path / "z1.dcm", "BNZ01", "Đỗ^Văn Z"))
    server.stop()
    server.start()
    store(server, ct(tmp_path / "z2.dcm", "BNZ01", "Đỗ^Văn Z",
                     others=(("001066000777", "CCCD"), ("HN4019000111222", "BHXH"))))

    assert ids(server, PatientID="001066000888") == ["BNY01"]
    assert ids(server, PatientID="001066000777") == ["BNZ01"]
    assert ids(server, PatientID="HN4019000111222") == ["BNZ01"]
    (z,) = patients(server, PatientID="BNZ01")
    assert [(str(o.PatientID), str(o.IssuerOfPatientID)) for o in z.OtherPatientIDsSequence] == [
        ("001066000777", "CCCD"), ("HN4019000111222", "BHXH")]
    with server.http() as http:
        bundle = http.get("/fhir/Patient", params={"identifier": "CCCD|001066000777"}).json()
    assert bundle["total"] == 1


def _warnings(server: PacsServer, text: str) -> list[str]:
    return [line for line in server.log_text().splitlines() if text in line]


def test_utf8_under_a_latin1_label_is_read_as_utf8_and_real_latin1_stays(server: PacsServer, tmp_path: Path) -> None:
    """DICOM ISO_IR 100 and HL7 8859/1 holding UTF-8 (Vietnamese, which
    Latin-1 cannot write) are read as UTF-8, over DIMSE (the scanner) and
    STOW-RS (pydicom's reader), with one warning per association, request
    or message that names no patient; a real Latin-1 "Müller" (0xFC) stays
    Müller."""
    before = len(_warnings(server, DICOM_WARNING))
    store(server,
          ct(tmp_path / "p5a.dcm", "LAT0005", "Phạm^Văn Đông".encode(), charset="ISO_IR 100"),
          ct(tmp_path / "p5b.dcm", "LAT0005", "Phạm^Văn Đông".encode(), charset="ISO_IR 100"),
          ct(tmp_path / "p6.dcm", "LAT0006", "Müller^Hans".encode("latin-1"), charset="ISO_IR 100"))
    stow(server, ct(tmp_path / "p7.dcm", "LAT0007", "Bùi^Thị Thu".encode(), charset="ISO_IR 100"))

    assert [str(m.PatientName) for m in patients(server, PatientID="LAT0005")] == ["Phạm^Văn Đông"]
    assert [str(m.PatientName) for m in patients(server, PatientID="LAT0006")] == ["Müller^Hans"]
    assert [str(m.PatientName) for m in patients(server, PatientID="LAT0007")] == ["Bùi^Thị Thu"]
    assert ids(server, PatientName="Pham*") == ["LAT0005"]
    assert ids(server, PatientName="muller*") == ["LAT0006"]
    # One for the association of three objects, one for the STOW-RS request.
    assert wait_until(lambda: len(_warnings(server, DICOM_WARNING)) == before + 2, timeout=10)
    assert not [w for w in _warnings(server, DICOM_WARNING) if "Phạm" in w or "LAT000" in w]

    hl7_before = len(_warnings(server, HL7_WARNING))
    a04 = ("MSH|^~\\&|HIS|BV108|PACS|BV108|20240105100000||ADT^A04|{control}|P|2.5|||||VNM|8859/1\n"
           "EVN|A04|20240105100000\nPID|1||{pid}^^^BV108^MR||{name}||19700101|M")
    assert msa(send(server, a04.format(control="A04-2", pid="BN1002", name="Phạm^Văn Đông")))[0] == "AA"
    with MLLPClient("127.0.0.1", server.hl7_port, encoding="latin-1") as client:  # real Latin-1 bytes
        ack = client.send_message(a04.format(control="A04-3", pid="BN1003", name="Müller^Hans").replace("\n", "\r"))
    assert msa(ack.decode("latin-1").strip("\x0b\x1c\r"))[0] == "AA"
    assert [str(m.PatientName) for m in patients(server, PatientID="BN1002")] == ["Phạm^Văn Đông"]
    assert [str(m.PatientName) for m in patients(server, PatientID="BN1003")] == ["Müller^Hans"]
    assert ids(server, PatientName="Pham^Van*") == ["BN1002", "LAT0005"]
    assert wait_until(lambda: len(_warnings(server, HL7_WARNING)) == hl7_before + 1, timeout=10)
    assert not [w for w in _warnings(server, HL7_WARNING) if "Phạm" in w or "BN100" in w]


def test_undeclared_utf8_in_other_ids_items_reads_alike_over_stow_and_dimse(server: PacsServer,
                                                                           tmp_path: Path) -> None:
    """No Specific Character Set and an other ID's issuer in UTF-8: STOW-RS
    (pydicom's reader) indexes the issuer as DIMSE (the scanner) does."""
    issuer = "Cục Cảnh sát QLHC"
    stow(server, ct(tmp_path / "s1.dcm", "STOW002", b"BUI^THI THU", charset=None,
                    others=(("00107700011", issuer.encode()),)))
    store(server, ct(tmp_path / "d1.dcm", "DIMSE002", b"BUI^THI THU", charset=None,
                     others=(("00107700012", issuer.encode()),)))
    for pid, other in (("STOW002", "00107700011"), ("DIMSE002", "00107700012")):
        (found,) = patients(server, PatientID=pid)
        assert [(str(o.PatientID), str(o.IssuerOfPatientID)) for o in found.OtherPatientIDsSequence] == [
            (other, issuer)], pid


def test_the_worklist_fills_other_patient_ids(server: PacsServer, tmp_path: Path) -> None:
    """Other Patient IDs (0010,1000) holds the values of Other Patient IDs
    Sequence, as the Q/R C-FIND answers it."""
    assert msa(send(server, orm("ORM-O", "BN1001^^^BV108^MR~001088000555^^^CCCD^NI~DN4019876543210^^^BHXH^HC",
                                "Nguyễn^Thị Mai", "ACC1001")))[0] == "AA"
    (item,) = worklist(server, tmp_path, "PatientID=BN1001", "(0010,1000)", "OtherPatientIDsSequence")
    assert list(item.OtherPatientIDs) == ["001088000555", "DN4019876543210"]
    assert [str(o.PatientID) for o in item.OtherPatientIDsSequence] == ["001088000555", "DN4019876543210"]
