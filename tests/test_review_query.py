"""Query review (C-FIND and QIDO-RS on the one query model), on SQLite and
PostgreSQL:

1. QIDO-RS matches a StudyDate and a StudyTime range (SeriesDate/Time,
   ContentDate/Time) of the same form as one date-time range (PS3.18
   8.3.4.1.1, PS3.4 C.2.2.2.5.4): "20250101-20250102" with "1800-0800" is
   the night shift, which matched apart found nothing. C-FIND, which offers
   no extended negotiation of combined date-time matching, matches them apart;
2. QIDO-RS returns the attributes it matched on (PS3.18 10.6.3.3: "all other
   ... Attributes passed as match ... parameters"), as C-FIND returns every
   key of its identifier;
3. the emptyvaluematching and multiplevaluematching parameters every origin
   server takes (PS3.18 Table 8.3.4-1) are answered, with a Warning when
   asked for, not refused 400.

One real `pacs serve` per database, objects sent with DCMTK storescu, C-FIND
with findscu, QIDO-RS over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from .conftest import Backend, PacsServer
from .peers import create_database, drop_database
from .qr_corpus import ROOT
from .test_query_retrieve import findscu

R = ROOT + "98."

# accession -> (study date, study time); one series each, its date and time the study's.
# The night shift runs from 2025-01-01 18:00 to 2025-01-02 08:00.
STUDIES = {
    "NOON1": ("20250101", "120000"),
    "EVE1": ("20250101", "2200"),
    "LATE1": ("20250101", "235959.5"),
    "EARLY2": ("20250102", "030000.25"),
    "EIGHT2": ("20250102", "0800"),
    "NINE2": ("20250102", "090000"),
    "NOTIME1": ("20250101", ""),  # a day of the range, time unknown
    "NOTIME3": ("20250103", ""),
    "DAY3": ("20250103", "200000"),
    "DAY5": ("20250105", "100000"),
}


def _object(path: Path, n: int, accession: str, date: str, time: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{R}3.{n}"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{R}1.{n}", f"{R}2.{n}"
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = f"SHIFT{n}", "HOSP_A", f"Shift^{accession}"
    ds.Modality, ds.AccessionNumber = "OT", accession
    ds.StudyDate, ds.StudyTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstitutionName, ds.StationName = "Bệnh viện Shift", f"STATION{n}"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp(f"rquery-{request.param}")
    pg = create_database() if request.param == "pg" else None
    srv = PacsServer(tmp / "data", Backend(request.param, pg, None, {}))
    srv.start()
    files = [_object(tmp / "in" / f"{a}.dcm", n, a, *dt) for n, (a, dt) in enumerate(STUDIES.items())]
    sent = srv.storescu(*map(str, files))
    assert sent.returncode == 0, sent.stderr
    yield srv
    srv.stop()
    if pg:
        drop_database(pg)


def qido(server: PacsServer, path: str, **params: str) -> tuple[list[dict[str, Any]], str]:
    with server.http() as http:
        answer = http.get(f"/dicom-web{path}", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json()), answer.headers.get("Warning", "")


def qido_accessions(server: PacsServer, path: str, **params: str) -> set[str]:
    return {m["00080050"]["Value"][0] for m in qido(server, path, includefield="AccessionNumber", **params)[0]}


def cfind_accessions(server: PacsServer, tmp_path: Path, level: str, **keys: str) -> set[str]:
    keys = {"AccessionNumber": "", "StudyInstanceUID": "", **keys}
    if level != "STUDY":
        keys["SeriesInstanceUID"] = ""
    return {str(r.AccessionNumber) for r in findscu(server, tmp_path, level, keys)}


# -- 1. combined date-time matching in QIDO-RS ----------------------------------------------------
NIGHT = {"EVE1", "LATE1", "EARLY2", "EIGHT2"}


@pytest.mark.parametrize(
    ("dates", "times", "expected"),
    [
        # The night shift: matched apart, 18:00-08:00 crosses midnight and matched nothing.
        ("20250101-20250102", "1800-0800", NIGHT),
        # From the 1st at 22:00 to the 3rd at 20:00: all of the 2nd is in it
        # (matched apart, a time from 22:00 to 20:00 is none).
        ("20250101-20250103", "2200-200000", {"EVE1", "LATE1", "EARLY2", "EIGHT2", "NINE2", "DAY3"}),
        # Open ends: from the 2nd at 08:00 on; up to the 1st at 12:00.
        ("20250102-", "0800-", {"EIGHT2", "NINE2", "NOTIME3", "DAY3", "DAY5"}),
        ("-20250101", "-12", {"NOON1"}),
        # Fractions of a second on the bounds' days.
        ("20250101-20250102", "235959.6-030000.25", {"EARLY2"}),
        ("20250101-20250102", "235959.5-030000.1", {"LATE1"}),
    ],
)
def test_qido_matches_a_date_and_time_range_as_one(server: PacsServer, dates: str, times: str,
                                                  expected: set[str]) -> None:
    """A day strictly inside the range matches whatever its time (NOTIME3 on
    the 3rd, in "from the 2nd at 08:00"); a bound's own day with no time is
    unknown and does not match (NOTIME1)."""
    assert qido_accessions(server, "/studies", StudyDate=dates, StudyTime=times) == expected
    # The series and the instances carry the same dates and times.
    assert qido_accessions(server, "/series", SeriesDate=dates, SeriesTime=times) == expected
    assert qido_accessions(server, "/instances", ContentDate=dates, ContentTime=times) == expected


def test_qido_date_and_time_of_other_forms_are_matched_apart(server: PacsServer, tmp_path: Path) -> None:
    """A single date with a time range, or ranges of two forms, are not one
    date-time range (C.2.2.2.5.4: "both of which specify the same form"):
    QIDO-RS and C-FIND agree on them."""
    for keys, expected in [
        ({"StudyDate": "20250101", "StudyTime": "1800-"}, {"EVE1", "LATE1"}),
        ({"StudyDate": "20250101-20250102", "StudyTime": "0800-"}, {"NOON1", "EVE1", "LATE1", "EIGHT2", "NINE2"}),
        ({"StudyDate": "20250102-", "StudyTime": "-0800"}, {"EARLY2", "EIGHT2"}),
    ]:
        assert qido_accessions(server, "/studies", **keys) == expected, keys
        assert cfind_accessions(server, tmp_path, "STUDY", **keys) == expected, keys


def test_cfind_matches_date_and_time_apart(server: PacsServer, tmp_path: Path) -> None:
    """Without the extended negotiation of combined date-time matching
    (which the SCP does not offer) C-FIND matches each key by itself."""
    assert cfind_accessions(server, tmp_path, "STUDY", StudyDate="20250101-20250102", StudyTime="1800-0800") == set()
    keys = {"StudyDate": "20250101-20250103", "StudyTime": "0830-2000"}
    assert cfind_accessions(server, tmp_path, "STUDY", **keys) == {"NOON1", "NINE2", "DAY3"}
    # QIDO-RS: from the 1st at 08:30 to the 3rd at 20:00.
    assert qido_accessions(server, "/studies", **keys) == {"NOON1", "EVE1", "LATE1", "EARLY2", "EIGHT2", "NINE2",
                                                           "DAY3"}


# -- 2. the keys matched on are returned ----------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "level", "key", "tag", "value"),
    [
        ("/studies", "STUDY", "InstitutionName", "00080080", "Bệnh viện Shift"),
        ("/studies", "STUDY", "IssuerOfPatientID", "00100021", "HOSP_A"),
        ("/series", "SERIES", "StationName", "00081010", "STATION3"),
        ("/instances", "IMAGE", "ContentTime", "00080033", "030000.25"),
    ],
)
def test_qido_returns_the_keys_it_matched_on(server: PacsServer, tmp_path: Path, path: str, level: str, key: str,
                                             tag: str, value: str) -> None:
    """They were left out (InstitutionName=X answered studies without an
    Institution Name): a client checking its answers found none matching."""
    keys = {key: value, "AccessionNumber": "EARLY2"}
    found, _ = qido(server, path, **keys)
    assert len(found) == 1
    assert found[0][tag]["Value"] in ([value], [{"Alphabetic": value}]), found[0].get(tag)
    # C-FIND returns the key of its identifier with the same value.
    if level == "IMAGE":
        keys.update(SeriesInstanceUID="", SOPInstanceUID="")
    answers = findscu(server, tmp_path, level, {"SpecificCharacterSet": "ISO_IR 192", "StudyInstanceUID": "",
                                                "SeriesInstanceUID": "", **keys})
    assert [str(a.get(key)) for a in answers] == [value]


def test_qido_match_key_of_a_lower_level_still_refused(server: PacsServer) -> None:
    with server.http() as http:
        answer = http.get("/dicom-web/studies", params={"StationName": "STATION3"})
    assert answer.status_code == 400


# -- 3. emptyvaluematching, multiplevaluematching -----------------------------------------------
@pytest.mark.parametrize("name", ["emptyvaluematching", "multiplevaluematching"])
def test_qido_takes_the_matching_parameters_of_ps3_18(server: PacsServer, name: str) -> None:
    """They were refused: "emptyvaluematching is not a DICOM attribute" (400)."""
    assert qido_accessions(server, "/studies", AccessionNumber="EVE1", **{name: "false"}) == {"EVE1"}
    _, warning = qido(server, "/studies", AccessionNumber="EVE1", **{name: "false"})
    assert name not in warning
    found, warning = qido(server, "/studies", AccessionNumber="EVE1", includefield="AccessionNumber", **{name: "true"})
    assert [m["00080050"]["Value"] for m in found] == [["EVE1"]]
    assert f"The {name} parameter is not supported" in warning
