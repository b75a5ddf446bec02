"""Query/retrieve conformance (PS3.4 C.2.2, C.4.2.1.4; PS3.18 8.3.4) found by
comparing C-FIND/C-GET/C-MOVE/QIDO-RS with DCMTK's dcmqrscp: qualifier and
unsupported optional keys, single value Patient ID and Issuer of Patient ID
in retrieves, TM values compared as times of day, empty values and ranges,
Other Patient IDs and SOP Classes in Study, QIDO limit=0. On SQLite and
PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove

from .conftest import Backend, PacsServer, free_port, run_dcmtk
from .peers import PG_ADMIN, create_database, drop_database
from .qr_corpus import ROOT, studies_of, study_uid, write_corpus
from .test_query_retrieve import findscu

R = ROOT + "77."

# (accession, patient ID, issuer, study date, study time, birth date)
EXTRA = [
    ("TM1015", "TIME1", "", "20250301", "1015", "19800101"),
    ("TM0830", "TIME2", "", "20250301", "0830", "19800101"),
    ("TM00", "TIME3", "", "20250301", "00", "19800101"),
    ("TM1600F", "TIME4", "", "20250301", "160000.5", "19800101"),
    ("TMEMPTY", "TIME5", "", "", "", ""),
    ("ISS0", "SAMEID", "HOSP_A", "20250202", "120000", "19900101"),
    ("ISS1", "SAMEID", "HOSP_B", "20250202", "120000", "19900101"),
]


def _write_extra(out: Path) -> None:
    """Studies with short, fractional and empty times and dates, and two
    patients sharing Patient ID SAMEID under two issuers."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (accession, pid, issuer, date, tm, birth) in enumerate(EXTRA):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = f"{R}3.{i}"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = f"{R}1.{i}"
        ds.SeriesInstanceUID = f"{R}2.{i}"
        ds.PatientID = pid
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.PatientName = f"Extra^{accession}"
        ds.PatientBirthDate = birth
        ds.Modality = "OT"
        ds.StudyDate, ds.StudyTime = date, tm
        ds.AccessionNumber = accession
        ds.save_as(out / f"extra{i}.dcm", enforce_file_format=True)


def _create_icu_database() -> str:
    """A database whose default collation is ICU Vietnamese: a time range's
    upper bound built as "16~" sorted before "160000.5" there."""
    name = f"pacs_test_icu_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu "
                     "ICU_LOCALE 'vi-VN' LOCALE 'C.UTF-8'")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="module", params=["sqlite", "pg", "pg-icu"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp(f"conf-{request.param}")
    pg = {"sqlite": None, "pg": create_database, "pg-icu": _create_icu_database}[request.param]
    pg = pg() if pg else None
    srv = PacsServer(tmp / "data", Backend(request.param, pg, None, {}))
    write_corpus(tmp / "in" / "corpus")
    _write_extra(tmp / "in" / "extra")
    srv.cli("import", str(tmp / "in"))
    srv.start()
    yield srv
    srv.stop()
    if pg:
        drop_database(pg)


def _accessions(server: PacsServer, tmp_path: Path, **keys: str) -> set[str]:
    rsp = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": "", "AccessionNumber": "TM*", **keys})
    return {str(r.AccessionNumber) for r in rsp}


# -- 1. qualifiers and optional keys we do not match on ---------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        {"(0008,0201)": "+0000"},  # Timezone Offset From UTC qualifies the times (C.2.2.2.5)
        {"RetrieveAETitle": "ELSEWHERE"},
        {"InstanceAvailability": "NEARLINE"},
        {"(0008,0053)": "CLASSIC"},  # Query/Retrieve View
        {"PatientAge": "040Y"},  # an optional key we do not match on (C.2.2.1.3)
        {"PatientWeight": "70"},
        {"NumberOfPatientRelatedStudies": "3"},  # a return-only key of ours
    ],
)
def test_keys_not_used_for_matching_are_ignored(server: PacsServer, tmp_path: Path, extra: dict[str, str]) -> None:
    """They were refused with 0xA900 "not a supported matching key"."""
    rsp = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": "", "StudyDate": "20240115", **extra})
    assert {str(r.StudyInstanceUID) for r in rsp} == studies_of("S1", "S5")


def test_unsupported_image_level_key_ignored_and_logged(server: PacsServer, tmp_path: Path) -> None:
    keys = {"StudyInstanceUID": study_uid("S1"), "SeriesInstanceUID": "", "SOPInstanceUID": "",
            "AcquisitionDateTime": "20240115083015"}
    rsp = findscu(server, tmp_path, "IMAGE", keys)
    assert len(rsp) == 3
    assert "not used for matching: AcquisitionDateTime" in server.log_text()


def test_wrong_level_and_invalid_values_still_refused(server: PacsServer, tmp_path: Path) -> None:
    # A UID list of backslashes alone was an IndexError answered 0xC000.
    for keys in ({"SeriesInstanceUID": "1.2.3"}, {"StudyDate": "2024-01-15"}, {"StudyTime": "25h"},
                 {"StudyInstanceUID": "\\"}):
        out = run_dcmtk("findscu", "-v", "-S", "-aec", server.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                        *[a for k, v in keys.items() for a in ("-k", f"{k}={v}")], "127.0.0.1", str(server.dicom_port))
        assert "DataSetDoesNotMatchSOPClass" in out.stderr or "a900" in out.stderr.lower(), (keys, out.stderr)


def test_qido_qualifier_and_unsupported_keys(server: PacsServer) -> None:
    with server.http() as http:
        # The archive's own offset (the server's zone here: no timezone setting) qualifies nothing to
        # adjust; another one with a date is refused (tests/test_leftovers_fixes.py has the details).
        from datetime import datetime

        from pacs.timezones import server_zone, utc_offset

        ours = utc_offset(datetime.now(server_zone()))
        other = "+0930" if ours != "+0930" else "+0000"
        tz = http.get("/dicom-web/studies", params={"TimezoneOffsetFromUTC": ours, "StudyDate": "20240115"})
        assert tz.status_code == 200, tz.text
        refused = http.get("/dicom-web/studies", params={"TimezoneOffsetFromUTC": other, "StudyDate": "20240115"})
        assert refused.status_code == 400 and "TimezoneOffsetFromUTC" in refused.json()["error"], refused.text
        assert {s["0020000D"]["Value"][0] for s in tz.json()} == studies_of("S1", "S5")
        assert "not supported" not in tz.headers.get("Warning", "")
        age = http.get("/dicom-web/studies", params={"PatientAge": "040Y", "StudyDate": "20240115"})
        assert age.status_code == 200, age.text
        assert {s["0020000D"]["Value"][0] for s in age.json()} == studies_of("S1", "S5")
        assert "PatientAge" in age.headers["Warning"]
        assert http.get("/dicom-web/studies", params={"NoSuchAttribute": "1"}).status_code == 400


# -- 2. Patient ID in a retrieve is single value matching ------------------------------------
def _getscu(server: PacsServer, out: Path, *keys: str) -> str:
    out.mkdir()
    result = run_dcmtk("getscu", "-v", "-P", "-aec", server.ae_title, "-od", str(out),
                       "-k", "QueryRetrieveLevel=PATIENT", *[a for k in keys for a in ("-k", k)],
                       "127.0.0.1", str(server.dicom_port))
    return result.stderr + result.stdout


@pytest.mark.parametrize("pid", ["0010*", "*", "?01085012345", "001085012345\\001077000222"])
def test_get_patient_id_wildcard_or_list_refused(server: PacsServer, tmp_path: Path, pid: str) -> None:
    log = _getscu(server, tmp_path / "got", f"PatientID={pid}")
    assert "DataSetDoesNotMatchSOPClass" in log, log
    assert not list((tmp_path / "got").iterdir())


def test_move_patient_id_wildcard_refused(server: PacsServer) -> None:
    server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(free_port()), check=False)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = "0010*"
    try:
        statuses = [int(s.Status) for s, _ in assoc.send_c_move(identifier, "MOVEDEST",
                                                                 PatientRootQueryRetrieveInformationModelMove) if s]
    finally:
        assoc.release()
    assert statuses == [0xA900]


def test_get_patient_id_exact(server: PacsServer, tmp_path: Path) -> None:
    _getscu(server, tmp_path / "got", "PatientID=001085012345")
    assert len(list((tmp_path / "got").iterdir())) == 4  # S1 (3) and S2 (1)


# -- 3. Issuer of Patient ID restricts a retrieve ----------------------------------------------
def test_get_restricted_to_issuer(server: PacsServer, tmp_path: Path) -> None:
    found = findscu(server, tmp_path, "PATIENT", {"PatientID": "SAMEID", "IssuerOfPatientID": "HOSP_B"}, "-P")
    assert [str(r.IssuerOfPatientID) for r in found] == ["HOSP_B"]
    _getscu(server, tmp_path / "b", "PatientID=SAMEID", "IssuerOfPatientID=HOSP_B")
    got = list((tmp_path / "b").iterdir())
    assert len(got) == 1 and dcmread(got[0]).IssuerOfPatientID == "HOSP_B"
    _getscu(server, tmp_path / "both", "PatientID=SAMEID")
    assert len(list((tmp_path / "both").iterdir())) == 2


# -- 4/5. TM values compared as times of day, collation-independent ----------------------------
@pytest.mark.parametrize(
    ("study_time", "expected"),
    [
        ("101500-101600", {"TM1015"}),
        ("101500", {"TM1015"}),
        ("1015", {"TM1015"}),
        ("083000", {"TM0830"}),
        ("0830", {"TM0830"}),
        ("000000-000059", {"TM00"}),
        ("00", {"TM00"}),
        ("160000", {"TM1600F"}),
        ("-16", {"TM1015", "TM0830", "TM00", "TM1600F"}),
        ("1600-1600", {"TM1600F"}),
        ("160000.5", {"TM1600F"}),
        ("160000.6-", set()),
        ("-155959", {"TM1015", "TM0830", "TM00"}),
        ("0900-", {"TM1015", "TM1600F"}),
    ],
)
def test_time_matching(server: PacsServer, tmp_path: Path, study_time: str, expected: set[str]) -> None:
    assert _accessions(server, tmp_path, StudyTime=study_time) == expected


def test_time_matching_on_corpus_times(server: PacsServer, tmp_path: Path) -> None:
    """The corpus stores 6-digit times: "0830" finds 083000 (and the extra
    study stored as "0830"), "1015" finds 101500."""
    rsp = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": "", "StudyTime": "0830"})
    assert {str(r.StudyInstanceUID) for r in rsp} == studies_of("S1") | {f"{R}1.1"}
    rsp = findscu(server, tmp_path, "SERIES", {"StudyInstanceUID": study_uid("S2"), "SeriesInstanceUID": "",
                                              "SeriesTime": "1015-1015"})
    assert len(rsp) == 1


# -- 6. empty values never match a range -------------------------------------------------------
@pytest.mark.parametrize(
    "keys",
    [
        {"StudyDate": "-20260101"},
        {"StudyTime": "-2359"},
        {"StudyTime": "-0001"},
        {"PatientBirthDate": "-20000101"},
    ],
)
def test_empty_values_do_not_match_ranges(server: PacsServer, tmp_path: Path, keys: dict[str, str]) -> None:
    assert "TMEMPTY" not in _accessions(server, tmp_path, **keys)
    # ...while universal matching still returns the study.
    assert "TMEMPTY" in _accessions(server, tmp_path, **{k: "" for k in keys})


# -- 7. Other Patient IDs, SOP Classes in Study --------------------------------------------------
def test_other_patient_ids_and_sop_classes_returned(server: PacsServer, tmp_path: Path) -> None:
    rsp = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": study_uid("S1"), "(0010,1000)": "",
                                              "SOPClassesInStudy": ""})
    assert len(rsp) == 1
    assert rsp[0].OtherPatientIDs == "DN4797912345678"
    assert sorted(rsp[0].SOPClassesInStudy) == sorted([CTImageStorage, MRImageStorage])
    with server.http() as http:
        studies = http.get("/dicom-web/studies", params={"StudyInstanceUID": study_uid("S1"),
                                                         "includefield": "SOPClassesInStudy,00101000"}).json()
    assert sorted(studies[0]["00080062"]["Value"]) == sorted([CTImageStorage, MRImageStorage])
    assert studies[0]["00101000"]["Value"] == ["DN4797912345678"]


# -- 8. QIDO limit=0 -------------------------------------------------------------------------
def test_qido_limit_zero_is_no_limit(server: PacsServer) -> None:
    with server.http() as http:
        response = http.get("/dicom-web/studies", params={"limit": "0"})
        unlimited = http.get("/dicom-web/studies")
    assert response.status_code == 200
    assert len(response.json()) == len(unlimited.json()) > 0
    assert "additional results" not in response.headers.get("Warning", "")
