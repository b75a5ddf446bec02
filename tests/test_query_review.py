"""Query review fixes (C-FIND, QIDO-RS, the web study list, the worklist):

1. a C-FIND identifier labelled ISO_IR 100 whose text is UTF-8 is read as
   UTF-8, as ingest reads such objects (Q/R and worklist);
2. a name stored Family^Given^Middle ("Trịnh^Bình^Văn") is found as it is
   read and typed, family middle given ("Trịnh Văn Bình");
3. DA/TM values in the pre-3.0 forms ("2024.01.15", "10:15:00", "08:30")
   are indexed in the DICOM form, and migration 0021 rewrites existing rows;
4. matches of a query with optional keys the archive does not match on are
   pending 0xFF01, not 0xFF00 (PS3.4 Table C.4-1), on every sending path;
5. the Referring Physician's Name is found by its words ("Do Thanh Tung");
6. "*" is universal matching on any key: a number key, a lower level's;
7. non-ASCII text in CS elements (Patient's Sex "Nữ") is indexed in the
   data set's character set, not as Latin-1 mojibake, and answered so.

One real `pacs serve` per database for the module, holding the Q/R corpus
(tests/qr_corpus.py) and a few objects sent with DCMTK storescu; C-FIND with
pynetdicom and findscu, QIDO-RS and the study list over HTTP, orders over
HL7 and the JSON API.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from pacs.header import parse_header
from pacs.index import create_index_engine, upgrade_schema

from .conftest import Backend, PacsServer
from .peers import create_database, drop_database
from .qr_corpus import ROOT, import_corpus, studies_of, study_uid
from .test_query_retrieve import findscu
from .test_worklist_ris import orm, send

# Legacy DA/TM forms and non-ASCII CS values are sent on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

R = ROOT + "96."
PNORDER_STUDY, LEGACY_STUDY, CS_STUDY = f"{R}1.1", f"{R}1.2", f"{R}1.4"


def _object(path: Path, n: int, charset: str | None, **values: Any) -> Path:
    """A Secondary Capture object of study/series/instance *n* under R."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{R}3.{n}"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{R}1.{n}", f"{R}2.{n}"
    ds.Modality = "OT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_extras(out: Path) -> list[Path]:
    """The objects the findings are about, sent with storescu (the scanned
    header path); the corpus is imported (pydicom's path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy DA/TM forms are written on purpose
        pnorder = _object(out / "pnorder.dcm", 1, "ISO_IR 192", PatientID="PNORDER", PatientName="Trịnh^Bình^Văn",
                          AccessionNumber="PNORD1", ReferringPhysicianName="Lý^Quang^Minh",
                          StudyDate="20241121", StudyTime="090000")
        legacy = [
            _object(out / "legacy1.dcm", 2, None, PatientID="LEG1", PatientName="Legacy^One", AccessionNumber="LEGACY1",
                    PatientBirthDate="1985.01.01", StudyDate="2024.01.15", StudyTime="10:15:00",
                    SeriesDate="2024.01.15", SeriesTime="10:15:00.5", ContentDate="2024.01.15", ContentTime="10:15"),
            _object(out / "legacy2.dcm", 3, None, PatientID="LEG2", PatientName="Legacy^Two", AccessionNumber="LEGACY2",
                    StudyDate="2025.03.01", StudyTime="08:30"),
        ]
    latin1 = _object(out / "latin1.dcm", 5, "ISO_IR 100", PatientID="LATIN1", PatientName="Müller^Anna",
                     AccessionNumber="LATIN1")
    return [pnorder, *legacy, _cs_object(out / "cs.dcm"), latin1]


def _cs_object(path: Path) -> Path:
    """Patient's Sex "Nữ" and Body Part Examined "NGỰC" in UTF-8 under
    ISO_IR 192 (invalid CS, sent by local modalities and RIS)."""
    _object(path, 4, "ISO_IR 192", PatientID="CSNONASCII", PatientName="Phạm^Thị Lan", AccessionNumber="CSACC",
            PatientSex="NQQQ", BodyPartExamined="NGZZZC", StudyDate="20250310")
    path.write_bytes(path.read_bytes().replace(b"NQQQ", "Nữ".encode()).replace(b"NGZZZC", "NGỰC".encode()))
    return path


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp(f"qreview-{request.param}")
    pg = create_database() if request.param == "pg" else None
    srv = PacsServer(tmp / "data", Backend(request.param, pg, None, {}))
    import_corpus(srv, tmp / "corpus")
    srv.start()
    extras = _write_extras(tmp / "extras")
    sent = srv.storescu(*map(str, extras))
    assert sent.returncode == 0, sent.stderr
    srv.extras = {p.stem: p for p in extras}  # type: ignore[attr-defined]
    yield srv
    srv.stop()
    if pg:
        drop_database(pg)


# -- helpers ------------------------------------------------------------------------------------
PENDING = (0xFF00, 0xFF01)


def cfind(server: PacsServer, identifier: Dataset, model: str = STUDY_ROOT,
          syntax: str = ExplicitVRLittleEndian) -> tuple[list[int], list[Dataset]]:
    """C-FIND with pynetdicom in *syntax*: every status in order, and the matches."""
    ae = AE(ae_title="REVIEWSCU")
    ae.add_requested_context(model, [syntax])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    statuses: list[int] = []
    matches: list[Dataset] = []
    try:
        for status, found in assoc.send_c_find(identifier, model):
            statuses.append(int(status.Status))
            if int(status.Status) in PENDING:
                matches.append(found)
    finally:
        assoc.release()
    return statuses, matches


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def study_uids(server: PacsServer, **keys: Any) -> set[str]:
    statuses, matches = cfind(server, ident("STUDY", StudyInstanceUID="", **keys))
    assert statuses[-1] == 0, hex(statuses[-1])
    return {str(m.StudyInstanceUID) for m in matches}


def qido(server: PacsServer, path: str, **params: str) -> list[dict[str, Any]]:
    with server.http() as http:
        answer = http.get(f"/dicom-web{path}", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def qido_studies(server: PacsServer, **params: str) -> set[str]:
    return {m["0020000D"]["Value"][0] for m in qido(server, "/studies", **params)}


def raw_identifier(elements: list[tuple[int, int, str, bytes]]) -> Dataset:
    """An identifier read from explicit VR little endian bytes, as the SCP
    receives it (the values' bytes exactly as given)."""
    data = b""
    for group, element, vr, value in elements:
        value += b" " if len(value) % 2 else b""
        data += struct.pack("<HH", group, element) + vr.encode() + struct.pack("<H", len(value)) + value
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def worklist_find(server: PacsServer, identifier: Dataset) -> tuple[list[int], list[Dataset]]:
    return cfind(server, identifier, ModalityWorklistInformationFind)


def place(server: PacsServer, accession: str, patient: dict[str, Any], **fields: Any) -> None:
    """An order over the JSON API."""
    body = {"patient": patient, "accession_number": accession, "modality": "CT", "station_ae_title": "CT_ROOM1",
            "start_date": "20261205", "start_time": "080000", **fields}
    with server.http() as http:
        created = http.post("/api/orders", json=body)
    assert created.status_code == 201, created.text


# -- 1. UTF-8 labelled ISO_IR 100 in an identifier ----------------------------------------------
def test_utf8_identifier_labelled_latin1_is_read_as_utf8(server: PacsServer) -> None:
    """It was decoded as Latin-1 ("NguyÃ¡»...") and found nothing, while the
    same bytes undeclared or labelled ISO_IR 192 found the three studies."""
    name = "Nguyễn^Văn*".encode()
    for charset in (b"ISO_IR 192", None, b"ISO_IR 100"):
        elements = [(0x0008, 0x0005, "CS", charset)] if charset is not None else []
        elements += [(0x0008, 0x0052, "CS", b"STUDY"), (0x0010, 0x0010, "PN", name), (0x0020, 0x000D, "UI", b"")]
        statuses, matches = cfind(server, raw_identifier(elements))
        assert statuses[-1] == 0
        assert {str(m.StudyInstanceUID) for m in matches} == studies_of("S1", "S2", "S5"), charset
    # Real Latin-1 stays Latin-1 ("Müller": 0xFC alone is no UTF-8).
    latin1 = [(0x0008, 0x0005, "CS", b"ISO_IR 100"), (0x0008, 0x0052, "CS", b"STUDY"),
              (0x0010, 0x0010, "PN", "Müller*".encode("latin-1")), (0x0020, 0x000D, "UI", b"")]
    _, matches = cfind(server, raw_identifier(latin1))
    assert [str(m.StudyInstanceUID) for m in matches] == [f"{R}1.5"]
    # The worklist reads its keys alike.
    place(server, "MISLAB1", {"id": "BNMISLAB1", "issuer": "BVDK", "name": "Nguyễn^Thị Mai"})
    worklist_query = [(0x0008, 0x0005, "CS", b"ISO_IR 100"), (0x0008, 0x0050, "SH", b"MISLAB1"),
                      (0x0010, 0x0010, "PN", "Nguyễn^Thị*".encode())]
    statuses, matches = worklist_find(server, raw_identifier(worklist_query))
    assert (statuses[-1], [str(m.AccessionNumber) for m in matches]) == (0, ["MISLAB1"])


# -- 2. names in reading order ------------------------------------------------------------------
def test_names_are_found_in_the_order_they_are_read(server: PacsServer) -> None:
    """"Trịnh^Bình^Văn" (Family^Given^Middle) is "Trịnh Văn Bình": only the
    component order ("TRINH BINH VAN") found it, in C-FIND, QIDO-RS, the
    web study list and the worklist."""
    for typed in ("Trịnh Văn Bình", "TRINH VAN BINH", "Trinh Van*", "trinh van binh", "TRINH BINH VAN",
                  "Trịnh^Bình^Văn", "Trinh *Binh"):
        assert study_uids(server, PatientName=typed) == {PNORDER_STUDY}, typed
        assert qido_studies(server, PatientName=typed) == {PNORDER_STUDY}, typed
    for typed in ("Trinh Van", "Trinh Van An", "Van Trinh*"):
        assert study_uids(server, PatientName=typed) == set(), typed
    for term in ("trinh van", "van binh", "trinh"):
        found = qido_studies(server, PatientName=term, fuzzymatching="true", AccessionNumber="PNORD1")
        assert found == {PNORDER_STUDY}, term
    assert qido_studies(server, PatientName="binh van", fuzzymatching="true") == {PNORDER_STUDY}
    with server.http() as http:
        listed = http.get("/api/worklist", params={"q": "Trịnh Văn Bình"}).json()
    assert [s["study_uid"] for s in listed["items"]] == [PNORDER_STUDY]
    # An HL7 order (PID-5 in XPN order) is on the worklist under the name as read.
    ack = send(server, orm("PNO1", "PNORD2", name="Trịnh^Bình^Văn", pid="HNPNORD2"))
    assert "|AA|" in ack, ack
    for typed in ("Trịnh Văn Bình", "TRINH VAN*"):
        item = Dataset()
        item.ScheduledProcedureStepStatus = ""
        statuses, matches = worklist_find(server, ident("", AccessionNumber="PNORD2", PatientName=typed,
                                                        ScheduledProcedureStepSequence=Sequence([item])))
        assert (statuses[-1], [str(m.PatientName) for m in matches]) == (0, ["Trịnh^Bình^Văn"]), typed


# -- 3. dates and times in the pre-3.0 forms ----------------------------------------------------
def test_legacy_dates_and_times_are_indexed_in_the_dicom_form(server: PacsServer, tmp_path: Path) -> None:
    """"2024.01.15" and "10:15:00" were indexed as received: 20240115 found
    nothing, 20231231-20240101 found 15 January, QIDO-RS answered an invalid DA."""
    expected = {
        "StudyDate=20240115": {"LEGACY1"}, "StudyDate=20240101-20240131": {"LEGACY1"},
        "StudyDate=20231231-20240101": set(), "StudyDate=20250101-": {"LEGACY2"}, "StudyDate=-20241231": {"LEGACY1"},
        "StudyTime=1015": {"LEGACY1"}, "StudyTime=0830": {"LEGACY2"}, "StudyTime=0800-0900": {"LEGACY2"},
        "PatientBirthDate=19850101": {"LEGACY1"},
    }
    for query, accessions in expected.items():
        key, value = query.split("=")
        found = findscu(server, tmp_path, "STUDY", {"AccessionNumber": "LEGACY*", "StudyInstanceUID": "", key: value})
        assert {str(r.AccessionNumber) for r in found} == accessions, query
    [study] = qido(server, "/studies", AccessionNumber="LEGACY1", includefield="PatientBirthDate")
    assert (study["00080020"]["Value"], study["00080030"]["Value"], study["00100030"]["Value"]) == (
        ["20240115"], ["101500"], ["19850101"])
    [series] = qido(server, f"/studies/{LEGACY_STUDY}/series")
    assert (series["00080021"]["Value"], series["00080031"]["Value"]) == (["20240115"], ["101500.5"])
    [instance] = qido(server, f"/studies/{LEGACY_STUDY}/instances", includefield="ContentDate,ContentTime")
    assert (instance["00080023"]["Value"], instance["00080033"]["Value"]) == (["20240115"], ["1015"])
    # The stored object keeps the bytes it was received with.
    with server.http() as http:
        metadata = http.get(f"/dicom-web/studies/{LEGACY_STUDY}/metadata").json()
    assert metadata[0]["00080020"]["Value"] == ["2024.01.15"]


def _insert(conn: sa.Connection, table: str, **values: Any) -> int:
    """A row written as an index at revision 0020 holds it (no model: the
    models are the newest revision's)."""
    columns = ", ".join(values)
    marks = ", ".join(f":{c}" for c in values)
    inserted = conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING pk"), values)
    return int(inserted.scalar_one())


def _migrate_0021(engine: sa.Engine) -> None:
    """An index at 0020 with legacy dates and Family^Given^Middle names, upgraded."""
    from datetime import UTC, datetime

    upgrade_schema(engine, "0020")
    now = datetime.now(UTC).replace(tzinfo=None)
    stamps = {"created_at": now, "updated_at": now}
    with engine.begin() as conn:
        def patient(pid: str, name: str, folded: str, birth: str) -> int:
            return _insert(conn, "patients", patient_id=pid, issuer="", name=name, name_folded=folded,
                           name_words=" ".join(folded.replace("^", " ").split()), birth_date=birth, sex="", **stamps)

        def study(patient_pk: int, uid: str, date: str, time: str, referring: str, folded: str) -> int:
            return _insert(conn, "studies", patient_pk=patient_pk, study_uid=uid, study_date=date, study_time=time,
                           accession_number="", study_id="", referring_physician=referring,
                           referring_physician_folded=folded, description="", institution="", modalities="",
                           num_series=0, num_instances=0, size_bytes=0, **stamps)

        trinh = patient("P1", "Trịnh^Bình^Văn", "TRINH^BINH^VAN", "1985.01.01")
        nguyen = patient("P2", "Nguyễn^Văn An", "NGUYEN^VAN AN", "19900101")
        patient("P3", "Trần^Văn Bình=ちば^ていこ", "TRAN^VAN BINH=ちば^ていこ", "")
        old = study(trinh, "1.2.1", "2024.01.15", "10:15:00.123", "Đỗ^Thanh Tùng", "DO^THANH TUNG")
        study(nguyen, "1.2.2", "20240115", "101500", "Lý^Quang^Minh", "LY^QUANG^MINH")
        study(nguyen, "1.2.3", "2024-01-15", "10:15:00:00", "Hoàng^^Minh", "HOANG^^MINH")
        series_pk = _insert(conn, "series", study_pk=old, series_uid="1.2.1.1", modality="OT", series_number=1,
                            description="", body_part="", station_name="", series_date="2024.01.15",
                            series_time="08:30", num_instances=0, size_bytes=0, **stamps)
        _insert(conn, "instances", series_pk=series_pk, sop_uid="1.2.1.1.1", sop_class_uid=SecondaryCaptureImageStorage,
                transfer_syntax_uid=ExplicitVRLittleEndian, photometric="", charset="", content_date="2024.01.15",
                content_time="10:15:00", size_bytes=1, sha256="0" * 64, storage_key="k", source="test",
                calling_ae="", remote_host="", received_at=now)
    upgrade_schema(engine)


def _rows(engine: sa.Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


@pytest.mark.parametrize("database", ["sqlite", "pg"])
def test_migration_0021_rewrites_legacy_dates_and_fills_the_name_forms(database: str, tmp_path: Path) -> None:
    """Existing rows get what new rows get: DA/TM in the DICOM form (other
    malformed values left alone), the names' reading order (the words of the
    alphabetic group, family middle given), the word forms of the Referring
    Physician's Name."""
    url = create_database(empty=True) if database == "pg" else f"sqlite:///{tmp_path}/index.sqlite"
    engine = create_index_engine(url)
    try:
        _migrate_0021(engine)
        assert _rows(engine, "SELECT patient_id, birth_date, name_reading FROM patients ORDER BY pk") == [
            ("P1", "19850101", "TRINH VAN BINH"), ("P2", "19900101", "NGUYEN VAN AN"), ("P3", "", "TRAN VAN BINH")]
        assert _rows(engine, "SELECT study_uid, study_date, study_time, referring_physician_words, "
                             "referring_physician_reading FROM studies ORDER BY pk") == [
            ("1.2.1", "20240115", "101500.123", "DO THANH TUNG", "DO THANH TUNG"),
            ("1.2.2", "20240115", "101500", "LY QUANG MINH", "LY MINH QUANG"),
            ("1.2.3", "2024-01-15", "10:15:00:00", "HOANG MINH", "HOANG MINH")]
        assert _rows(engine, "SELECT series_date, series_time FROM series") == [("20240115", "0830")]
        assert _rows(engine, "SELECT content_date, content_time FROM instances") == [("20240115", "101500")]
    finally:
        engine.dispose()
        if database == "pg":
            drop_database(url)


# -- 4. FF01 for optional keys not supported ----------------------------------------------------
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["direct", "pynetdicom"])
def test_matches_say_ff01_when_optional_keys_were_not_matched(server: PacsServer, syntax: str) -> None:
    """The keys were ignored (and logged so) but every match said FF00:
    "optional keys were supported in the same manner as required keys"."""
    other = Dataset()
    other.PatientID = "NOSUCHID"
    for extra in ({"PatientAge": "099Y"}, {"NameOfPhysiciansReadingStudy": "NOBODY^READS"},
                  {"SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.88.22"},
                  {"OtherPatientIDsSequence": Sequence([other])}):
        statuses, matches = cfind(server, ident("STUDY", StudyInstanceUID="", AccessionNumber="ACC00*", **extra),
                                  syntax=syntax)
        assert statuses == [0xFF01] * 5 + [0], extra
        assert {str(m.StudyInstanceUID) for m in matches} == studies_of("S1", "S2", "S3", "S5", "S6")
    # Keys all matched on, or given "*" (universal, nothing to support): FF00.
    for extra in ({}, {"PatientAge": "*"}, {"PatientAge": ""}):
        statuses, _ = cfind(server, ident("STUDY", StudyInstanceUID="", AccessionNumber="ACC00*", **extra),
                            syntax=syntax)
        assert statuses == [0xFF00] * 5 + [0], extra


def test_worklist_matches_say_ff01_when_optional_keys_were_not_matched(server: PacsServer) -> None:
    place(server, "FF01WL", {"id": "BNFF01WL", "issuer": "BVDK", "name": "Lê^Văn Tám"})
    for extra, status in (({"PatientWeight": "70"}, 0xFF01), ({}, 0xFF00)):
        statuses, _ = worklist_find(server, ident("", AccessionNumber="FF01WL", PatientName="", **extra))
        assert statuses == [status, 0], extra


# -- 5. Referring Physician's Name as words -----------------------------------------------------
def test_referring_physician_is_found_by_the_words_of_the_name(server: PacsServer) -> None:
    """"Do Thanh Tung" found nothing ("Đỗ^Thanh Tùng" stored), while the worklist found the same doctor so."""
    for typed in ("Do Thanh Tung", "Đỗ Thanh Tùng", "do thanh*", "DO^THANH TUNG", "Đỗ^Thanh*"):
        assert study_uids(server, ReferringPhysicianName=typed) == studies_of("S1"), typed
        assert qido_studies(server, ReferringPhysicianName=typed) == studies_of("S1"), typed
    assert qido_studies(server, ReferringPhysicianName="tung", fuzzymatching="true") == studies_of("S1")
    assert study_uids(server, ReferringPhysicianName="Hoang Minh") == studies_of("S2", "S3")
    assert study_uids(server, ReferringPhysicianName="Thanh Do*") == set()
    # "Lý^Quang^Minh" as read: Lý Minh Quang.
    assert study_uids(server, ReferringPhysicianName="Ly Minh Quang") == {PNORDER_STUDY}
    assert qido_studies(server, ReferringPhysicianName="ly minh", fuzzymatching="true") == {PNORDER_STUDY}


# -- 6. "*" is universal on any key ---------------------------------------------------------------
def test_referring_physician_brought_by_a_later_series_is_found_by_its_words(server: PacsServer,
                                                                              tmp_path: Path) -> None:
    """The study's first series had no Referring Physician's Name and the
    second brought it: the name was filled but not its word forms, so
    "Do Van Hai" found nothing, unlike the same name on the first series."""
    study = f"{R}1.7"
    first = _object(tmp_path / "r1.dcm", 7, "ISO_IR 192", PatientID="REFLATE", PatientName="Mai^Lan")
    second = _object(tmp_path / "r2.dcm", 8, "ISO_IR 192", PatientID="REFLATE", PatientName="Mai^Lan",
                     StudyInstanceUID=study, ReferringPhysicianName="Đỗ^Văn^Hải")
    for path in (first, second):  # one association each: the second series joins the stored study
        sent = server.storescu(str(path))
        assert sent.returncode == 0, sent.stderr
    for typed in ("Do Van Hai", "Đỗ Hải Văn", "do van*"):
        assert study in study_uids(server, ReferringPhysicianName=typed), typed
        assert study in qido_studies(server, ReferringPhysicianName=typed), typed


def test_lone_asterisk_is_universal_matching_on_any_key(server: PacsServer) -> None:
    """A900 "DataSetDoesNotMatchSOPClass" for "*" in a number key or a key
    of a level below the query's (int('*'), the level checked first)."""
    s1 = study_uid("S1").encode()
    ui = (0x0020, 0x000D, "UI", s1)
    cases = [  # (model, identifier, matches); an IS value "*" pydicom would not write: raw bytes
        (STUDY_ROOT, [(0x0008, 0x0052, "CS", b"SERIES"), ui, (0x0020, 0x000E, "UI", b""),
                      (0x0020, 0x0011, "IS", b"*")], 2),
        (STUDY_ROOT, [(0x0008, 0x0052, "CS", b"STUDY"), ui, (0x0020, 0x1208, "IS", b"*")], 1),
        (STUDY_ROOT, [(0x0008, 0x0052, "CS", b"STUDY"), (0x0008, 0x0060, "CS", b"*"), ui], 1),
        (STUDY_ROOT, [(0x0008, 0x0052, "CS", b"STUDY"), ui, (0x0020, 0x000E, "UI", b"*")], 1),
        (STUDY_ROOT, [(0x0008, 0x0018, "UI", b""), (0x0008, 0x0052, "CS", b"IMAGE"), ui,
                      (0x0020, 0x000E, "UI", b"*"), (0x0020, 0x0013, "IS", b"**"), (0x0028, 0x0010, "US", b"")], 3),
        (PATIENT_ROOT, [(0x0008, 0x0020, "DA", b"*"), (0x0008, 0x0052, "CS", b"PATIENT"),
                        (0x0010, 0x0020, "LO", b"001085012345")], 1),
    ]
    for model, elements, count in cases:
        statuses, matches = cfind(server, raw_identifier(elements), model)
        assert (statuses[-1], len(matches), set(statuses[:-1])) == (0, count, {0xFF00}), elements
    # A value that is no universal match is still refused there.
    statuses, _ = cfind(server, raw_identifier([(0x0008, 0x0052, "CS", b"STUDY"), ui, (0x0020, 0x0011, "IS", b"1")]))
    assert statuses == [0xA900]
    uid = s1.decode()
    assert qido_studies(server, StudyInstanceUID=uid, SeriesNumber="*", Modality="*") == {uid}
    assert len(qido(server, f"/studies/{uid}/series", SeriesNumber="*", NumberOfSeriesRelatedInstances="*")) == 2


# -- 7. CS text in the data set's character set -------------------------------------------------
def test_cs_text_is_read_in_the_character_set_of_the_data_set(server: PacsServer) -> None:
    """Patient's Sex "Nữ" was indexed as "Ná»¯" (Latin-1): QIDO-RS answered
    that, and PatientSex=Nữ found nothing."""
    [study] = qido(server, "/studies", AccessionNumber="CSACC")
    assert study["00100040"]["Value"] == ["Nữ"]
    [series] = qido(server, f"/studies/{CS_STUDY}/series")
    assert series["00180015"]["Value"] == ["NGỰC"]
    assert qido_studies(server, PatientSex="Nữ") == {CS_STUDY}
    assert len(qido(server, f"/studies/{CS_STUDY}/series", BodyPartExamined="NGỰC")) == 1
    # pydicom's path (a file) reads it alike.
    with open(server.extras["cs"], "rb") as f:  # type: ignore[attr-defined]
        header = parse_header(f, server.extras["cs"].stat().st_size)  # type: ignore[attr-defined]
    assert (header.sex, header.body_part, header.mislabelled_utf8) == ("Nữ", "NGỰC", False)
    # C-FIND answers it in UTF-8, as received (ISO_IR 192 declared), on both sending paths.
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian):
        statuses, matches = cfind(server, ident("STUDY", StudyInstanceUID="", AccessionNumber="CSACC", PatientSex=""),
                                  syntax=syntax)
        assert statuses[-1] == 0
        assert [_raw_value(m, 0x00100040) for m in matches] == ["Nữ".encode()], syntax
    # So does the worklist, for an order of that patient.
    place(server, "CSWL1", {"id": "CSNONASCII", "issuer": ""})
    statuses, matches = worklist_find(server, ident("", AccessionNumber="CSWL1", PatientSex=""))
    assert statuses[-1] == 0
    assert [_raw_value(m, 0x00100040) for m in matches] == ["Nữ".encode()]


def _raw_value(ds: Dataset, tag: int) -> bytes:
    """The bytes of a value as received (pydicom read CS as Latin-1, if it read it already)."""
    value = ds.get_item(tag).value
    return (value if isinstance(value, bytes) else value.encode("latin-1")).rstrip(b" ")

