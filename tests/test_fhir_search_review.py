"""FHIR ImagingStudy searches an EMR or HIS asks a PACS, against a real
`pacs serve` on SQLite and on PostgreSQL (a server on UTC for a hospital in
Vietnam, PACS_TIMEZONE): "this patient's CT studies since Monday" (started,
modality), a series or SOP class (series, dicom-class), and "every study
that arrived or changed since my last poll" (_lastUpdated on
meta.lastUpdated, which moves with every change of what the resource shows:
an instance or series added, a series deleted, the description filled by a
later series, the patient renamed or merged by the HIS); and Patient's
meta.lastUpdated and _lastUpdated (its name, birth date, sex or identifiers
corrected, a patient merged into it).

Studies are stored by `pacs import` and DCMTK storescu; the HIS speaks
HL7 v2 over MLLP. No wall-clock time is asserted: times are compared with
each other (a change moves meta.lastUpdated forward, a study left alone keeps it).
"""

from __future__ import annotations

import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from viewer_api.fhir import PATIENT_ID_SYSTEM

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database
from .test_reports_fhir import _empty_values, _outcome
from .test_worklist_ris import msa, send

VN = "Asia/Ho_Chi_Minh"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UID = "1.2.826.0.1.3680043.8.498.91"
CT_MON, MR_MON, CT_OLD, DATE_ONLY, NO_DATE, BAD_TIME, OTHER_MON = (f"{UID}.{n}" for n in range(1, 8))
LU_A, LU_B, LU_C = f"{UID}.21", f"{UID}.22", f"{UID}.23"  # changed by the _lastUpdated test only
SERIES = {study: f"{study}.1" for study in (CT_MON, MR_MON, CT_OLD, DATE_ONLY, NO_DATE, BAD_TIME, OTHER_MON,
                                            LU_A, LU_B, LU_C)}
NO_MODALITY_SERIES = f"{DATE_ONLY}.2"  # a Secondary Capture series without Modality (shown as OT)
SC = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE, MR_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
PATIENT, OTHER, RENAMED = "BVDK.BN900", "BVDK.BN901", "BVDK.BN902"
# What started shows for each study (the hospital's clock, +07:00).
STARTED = {CT_MON: "2026-01-05T08:30:00+07:00", MR_MON: "2026-01-05T14:00:00+07:00",
           CT_OLD: "2025-12-31T23:59:59+07:00", DATE_ONLY: "2026-01-06", BAD_TIME: "2026-01-07",
           OTHER_MON: "2026-01-05T08:30:00+07:00"}
REFERRER = "Lê^Văn Minh"
MSH = "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20260110090000||{}|{}|P|2.5|||||VNM|UNICODE UTF-8"


def _study(directory: Path, study: str, patient: str, name: str, series: str | None = None,
           **overrides: Any) -> Path:
    """One CT object of *study* (series *series*, else the study's first)
    for BVDK's *patient*; *overrides* as make_ct's (SOPClassUID in the file
    meta too)."""
    values: dict[str, Any] = {"SpecificCharacterSet": "ISO_IR 192", "PatientID": patient,
                              "IssuerOfPatientID": "BVDK", "PatientName": name, "StudyInstanceUID": study,
                              "SeriesInstanceUID": series or SERIES[study],
                              "AccessionNumber": f"A{study.rsplit('.', 1)[1]:0>2}", **overrides}
    sop_class = values.pop("SOPClassUID", CT_IMAGE)
    return make_ct(directory / f"{uuid.uuid4().hex}.dcm", sop_class, **values)


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-fs"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Patient BN900's studies on Monday 5 January 2026 and around it, one
    with a date alone, one with a time the resource cannot show, one without
    Study Date; another patient's Monday CT; three studies the
    _lastUpdated test changes. An EMR, and a referring physician who
    referred two of Monday's CTs."""
    tmp = tmp_path_factory.mktemp(f"fhir-search-{request.param}")
    index_url = None
    if request.param.startswith("pg"):
        index_url = create_database(request.getfixturevalue("postgres"))
    server = PacsServer(tmp / "data", Backend(request.param, index_url, None, {}),
                        extra_env={"TZ": "UTC", "PACS_TIMEZONE": VN})
    files = tmp / "files"
    files.mkdir()
    hoa = "Phạm^Thị Hoa"
    _study(files, CT_MON, "BN900", hoa, StudyDate="20260105", StudyTime="083000", ReferringPhysicianName=REFERRER)
    _study(files, MR_MON, "BN900", hoa, StudyDate="20260105", StudyTime="1400", Modality="MR", SOPClassUID=MR_IMAGE)
    _study(files, CT_OLD, "BN900", hoa, StudyDate="20251231", StudyTime="235959.123456")
    _study(files, DATE_ONLY, "BN900", hoa, StudyDate="20260106")
    _study(files, DATE_ONLY, "BN900", hoa, series=NO_MODALITY_SERIES, StudyDate="20260106", Modality=None,
           SOPClassUID=SC)
    _study(files, NO_DATE, "BN900", hoa, StudyTime="101500")
    with warnings.catch_warnings():  # pydicom's: the invalid time is the point
        warnings.simplefilter("ignore")
        _study(files, BAD_TIME, "BN900", hoa, StudyDate="20260107", StudyTime="2561")
    _study(files, OTHER_MON, "BN901", "Vũ^Văn Tám", StudyDate="20260105", StudyTime="083000",
           ReferringPhysicianName=REFERRER)
    _study(files, LU_A, "BN902", "Đinh^Văn Lực", StudyDate="20260110", StudyTime="090000")
    _study(files, LU_B, "BN902", "Đinh^Văn Lực", StudyDate="20260111", StudyTime="090000")
    _study(files, LU_C, "BN903", "Đinh^Văn Lực", StudyDate="20260112", StudyTime="090000")
    server.cli("import", str(files))
    server.start()
    server.emr = server.make_token("emr.search", "emr", "EMR")  # type: ignore[attr-defined]
    server.referring = server.make_token("bs.minh", "referring", REFERRER)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        if index_url:
            drop_database(index_url, request.getfixturevalue("postgres"))


def _emr(server: PacsServer) -> httpx.Client:
    return server.http(token=server.emr)  # type: ignore[attr-defined]


def _found(http: httpx.Client, query: dict[str, Any] | str, **extra: Any) -> dict[str, dict[str, Any]]:
    """The studies a search finds (all of them: total equals the entries), by id."""
    if isinstance(query, str):
        response = http.get(f"/fhir/ImagingStudy?{query}", **extra)
    else:
        response = http.get("/fhir/ImagingStudy", params={**query, "_count": 200}, **extra)
    assert response.status_code == 200, response.text
    bundle = response.json()
    entries = {e["resource"]["id"]: e["resource"] for e in bundle.get("entry", [])}
    assert bundle["total"] == len(entries), bundle
    return entries


def _mine(http: httpx.Client, **query: Any) -> set[str]:
    """The studies of patient BN900 a search finds."""
    return set(_found(http, {"patient": f"Patient/{PATIENT}", **query}))


# -- started ----------------------------------------------------------------------------------
def test_started_finds_studies_by_date_with_prefixes_precisions_and_zones(served: PacsServer) -> None:
    """started is the Study Date and Time on the hospital's clock, as the
    resource shows it, a range itself (a date alone its day, a time its
    second); each prefix compares ranges as R4 search 3.1.1.5.8 says; a
    value without zone is the hospital's time, one with a zone is taken
    there; several started AND together; a study without a Study Date never
    matches; a bad value is a 400 OperationOutcome."""
    with _emr(served) as http:
        monday = _found(http, {"started": "2026-01-05"})
        assert set(monday) == {CT_MON, MR_MON, OTHER_MON}  # any patient: no patient needed
        assert all(r["started"] == STARTED[uid] for uid, r in monday.items())
        cases = {
            "2026-01-05": {CT_MON, MR_MON},
            "eq2026-01-05": {CT_MON, MR_MON},
            "2026-01": {CT_MON, MR_MON, DATE_ONLY, BAD_TIME},
            "2026": {CT_MON, MR_MON, DATE_ONLY, BAD_TIME},
            "2025": {CT_OLD},
            "2025-12-31T23:59:59": {CT_OLD},  # the hospital's time
            "2025-12-31T23:59": {CT_OLD},  # a minute
            "2025-12-31T16:59:59Z": {CT_OLD},  # UTC, 7 hours behind
            "2025-12-31T18:59:59+02:00": {CT_OLD},
            "2025-12-31T23:59:59+00:00": set(),  # 06:59:59 the next morning in Hà Nội
            "2026-01-05T08:30:00": {CT_MON},
            "2026-01-05T08:30:00.000": set(),  # a second (what started shows) is not within a millisecond
            "gt2026-01-05": {DATE_ONLY, BAD_TIME},
            "sa2026-01-05T08:30:00+07:00": {MR_MON, DATE_ONLY, BAD_TIME},
            "eb2026-01-05": {CT_OLD},
            "lt2026-01-05T14:00": {CT_OLD, CT_MON},
            "le2026-01-05T14:00": {CT_OLD, CT_MON, MR_MON},
            "ge2026-01-05T14:00": {MR_MON, DATE_ONLY, BAD_TIME},
            "ne2026-01-05": {CT_OLD, DATE_ONLY, BAD_TIME},  # not the study without a date
            # A date alone is its whole day: not within a minute of it, but
            # starting before 10:00 and ending after 10:01.
            "2026-01-06T10:00": set(),
            "ge2026-01-06T10:00": {DATE_ONLY, BAD_TIME},
            "le2026-01-06T10:00": {CT_OLD, CT_MON, MR_MON, DATE_ONLY},
            "2026-01-07T00:00": set(),  # the time 2561 is no time: the study shows its date alone
            "2026-01-05,2025-12-31": {CT_MON, MR_MON, CT_OLD},  # commas: any
            "ge1900": {CT_MON, MR_MON, CT_OLD, DATE_ONLY, BAD_TIME},
        }
        for value, expected in cases.items():
            assert _mine(http, started=value) == expected, value
        # Twice: both apply (a range).
        week = _found(http, f"patient=Patient/{PATIENT}&started=ge2026-01-05&started=lt2026-01-07")
        assert set(week) == {CT_MON, MR_MON, DATE_ONLY}
        # "+07:00" typed as is in the URL arrives as a space: still that zone.
        raw = _found(http, f"patient=Patient/{PATIENT}&started=2026-01-05T08:30:00+07:00")
        assert set(raw) == {CT_MON}
        assert set(_found(http, {"started": "2026-01-05T08:30:00+07:00"})) == {CT_MON, OTHER_MON}
        for bad in ("2026-13", "2026-1-5", "ap2026-01-05", "2026-01-05T25:00", "2026-02-30", "monday",
                    "2026-01-05T08:30:00+15:00", "xx2026", "2026-01-05T08"):
            refused = _outcome(http.get("/fhir/ImagingStudy", params={"started": bad}), 400)
            assert "started" in refused["issue"][0]["diagnostics"], bad
        _outcome(http.get("/fhir/ImagingStudy", params={"started:missing": "true"}), 400)


# -- modality, series, dicom-class ------------------------------------------------------------
def test_modality_series_and_sop_class_find_the_studies_that_hold_them(served: PacsServer) -> None:
    """modality matches any series of the study (ModalitiesInStudy), a code
    alone or in DICOM's system; series a Series Instance UID; dicom-class an
    instance's SOP Class, as sopClass shows it or bare; commas OR, repeats
    and other parameters AND."""
    with _emr(served) as http:
        ct = _mine(http, modality="CT")
        assert ct == {CT_MON, CT_OLD, DATE_ONLY, NO_DATE, BAD_TIME}
        assert _mine(http, modality=f"{DCM}|MR") == {MR_MON}
        assert _mine(http, modality="MR,OT") == {MR_MON, DATE_ONLY}  # OT: the series without Modality
        assert _mine(http, modality="http://snomed.info/sct|CT") == set()
        assert _found(http, "patient=Patient/BVDK.BN900&modality=CT&modality=OT").keys() == {DATE_ONLY}
        # This patient's CT studies since Monday; and everyone's.
        since = _found(http, {"patient": f"Patient/{PATIENT}", "modality": "CT", "started": "ge2026-01-05"})
        assert set(since) == {CT_MON, DATE_ONLY, BAD_TIME}
        assert set(_found(http, {"modality": "CT", "started": "2026-01-05"})) == {CT_MON, OTHER_MON}
        for resource in _found(http, {"modality": "OT"}).values():
            assert {"system": DCM, "code": "OT"} in resource["modality"]

        assert set(_found(http, {"series": SERIES[CT_MON]})) == {CT_MON}
        assert set(_found(http, {"series": f"{SERIES[CT_MON]},urn:oid:{SERIES[MR_MON]}"})) == {CT_MON, MR_MON}
        assert set(_found(http, {"series": NO_MODALITY_SERIES, "started": "2026-01-06"})) == {DATE_ONLY}
        assert _found(http, {"series": f"{SERIES[CT_MON]}", "patient": f"Patient/{OTHER}"}) == {}

        for value in (f"urn:oid:{SC}", SC, f"urn:ietf:rfc:3986|urn:oid:{SC}"):
            found = _found(http, {"dicom-class": value})
            assert set(found) == {DATE_ONLY}, value
            classes = {i["sopClass"]["code"] for s in found[DATE_ONLY]["series"] for i in s["instance"]}
            assert f"urn:oid:{SC}" in classes
        assert _mine(http, **{"dicom-class": f"urn:oid:{CT_IMAGE}"}) == ct
        assert _mine(http, **{"dicom-class": f"http://example.org|{SC}"}) == set()
        for modified in ({"modality:text": "CT"}, {"series:missing": "false"}, {"dicom-class:below": SC}):
            _outcome(http.get("/fhir/ImagingStudy", params=modified), 400)


# -- links, strict handling, capabilities, who sees what --------------------------------------
def test_links_carry_the_parameters_applied_and_the_statement_lists_them(served: PacsServer) -> None:
    """The self link carries the new parameters as given (both started of
    a range), not one the server ignored; Prefer: handling=strict refuses
    an unknown one only; /fhir/metadata lists them with their types."""
    with _emr(served) as http:
        query = [("started", "ge2026-01-05"), ("started", "lt2026-01-07"), ("modality", "CT,MR"),
                 ("unknown", "1"), ("_count", "1")]
        bundle = http.get("/fhir/ImagingStudy", params=query).json()
        assert bundle["total"] == 4  # CT_MON, MR_MON, OTHER_MON, DATE_ONLY
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        applied = urllib.parse.parse_qsl(urllib.parse.urlsplit(links["self"]).query)
        assert applied == [("started", "ge2026-01-05"), ("started", "lt2026-01-07"), ("modality", "CT,MR"),
                           ("_count", "1")]
        following = urllib.parse.parse_qsl(urllib.parse.urlsplit(links["next"]).query)
        assert ("_offset", "1") in following and ("unknown", "1") not in following
        seen = [bundle["entry"][0]["resource"]["id"]]
        while "next" in links:
            page = http.get(links["next"]).json()
            seen += [e["resource"]["id"] for e in page["entry"]]
            links = {link["relation"]: link["url"] for link in page["link"]}
        assert sorted(seen) == sorted({CT_MON, MR_MON, OTHER_MON, DATE_ONLY})

        strict = {"Prefer": "handling=strict"}
        ok = http.get("/fhir/ImagingStudy", params=[*query[:3], ("series", SERIES[CT_MON]),
                                                     ("dicom-class", CT_IMAGE), ("_lastUpdated", "ge2000")],
                      headers=strict)
        assert ok.status_code == 200 and ok.json()["total"] == 1, ok.text
        refused = _outcome(http.get("/fhir/ImagingStudy", params=query, headers=strict), 400)
        assert "unknown" in refused["issue"][0]["diagnostics"]
        # Not DiagnosticReport's: its search is by patient and accession still.
        _outcome(http.get("/fhir/DiagnosticReport", params={"identifier": "A01", "started": "2026"},
                          headers=strict), 400)
        posted = http.post("/fhir/ImagingStudy/_search", data={"started": "2026-01-05", "modality": "MR"})
        assert [e["resource"]["id"] for e in posted.json()["entry"]] == [MR_MON]

        http.headers.pop("Authorization")
        statement = http.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    params = {p["name"]: p["type"] for p in resources["ImagingStudy"]["searchParam"]}
    assert {"started": "date", "modality": "token", "series": "token", "dicom-class": "token",
            "_lastUpdated": "date", "patient": "reference", "identifier": "token"}.items() <= params.items()
    assert "started" not in {p["name"] for p in resources["DiagnosticReport"]["searchParam"]}
    assert _empty_values(statement) == []


def test_a_referring_physician_searching_by_date_sees_and_counts_only_the_studies_referred(
        served: PacsServer) -> None:
    """A search that names no patient (Monday's studies) gives a referring
    physician the studies they referred, counted so (total, pages), not
    every study of the day."""
    with served.http(token=served.referring) as http:  # type: ignore[attr-defined]
        assert set(_found(http, {"started": "2026-01-05"})) == {CT_MON, OTHER_MON}
        first = http.get("/fhir/ImagingStudy", params={"started": "ge2025", "_count": 1}).json()
        assert first["total"] == 2 and len(first["entry"]) == 1
        nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
        second = http.get(nxt).json()
        assert {first["entry"][0]["resource"]["id"], second["entry"][0]["resource"]["id"]} == {CT_MON, OTHER_MON}
        assert _found(http, {"started": "2026-01-05", "modality": "MR"}) == {}


# -- meta.lastUpdated and _lastUpdated --------------------------------------------------------
def _read(http: httpx.Client, resource_id: str, kind: str = "ImagingStudy") -> dict[str, Any]:
    response = http.get(f"/fhir/{kind}/{resource_id}")
    assert response.status_code == 200, response.text
    assert response.headers["Last-Modified"].endswith(" GMT")
    return response.json()


def _updated(http: httpx.Client, resource_id: str, kind: str = "ImagingStudy") -> str:
    return _read(http, resource_id, kind)["meta"]["lastUpdated"]


def _since(http: httpx.Client, moment: str, **query: Any) -> set[str]:
    return set(_found(http, {"_lastUpdated": f"gt{moment}", **query}))


def _hl7(server: PacsServer, control: str, *segments: str) -> str:
    kind = {"A08": "ADT^A08^ADT_A01", "A40": "ADT^A40^ADT_A39"}[segments[0][4:7]]
    return msa(send(server, "\n".join((MSH.format(kind, control), *segments))))[0]


def test_last_updated_moves_with_every_change_of_what_the_study_shows(served: PacsServer,
                                                                      tmp_path: Path) -> None:
    """meta.lastUpdated moves with an instance stored, a series added (and
    the description it fills), a series deleted, the patient renamed
    (ADT^A08) and merged (ADT^A40): a poll by _lastUpdated=gt{the last
    time seen} finds exactly the studies changed since, and a study left
    alone keeps its time."""
    with _emr(served) as http, served.http() as admin:
        untouched = _updated(http, CT_MON)
        a0, b0, c0 = (_updated(http, s) for s in (LU_A, LU_B, LU_C))
        assert a0.endswith("Z") and len(a0) == len("2026-01-10T02:00:00.000000Z")
        assert _found(http, {"identifier": "A21", "_lastUpdated": a0}).keys() == {LU_A}  # eq: that instant
        assert _found(http, {"identifier": "A21", "_lastUpdated": f"ge{a0}"}).keys() == {LU_A}
        assert LU_A not in _since(http, a0, identifier="A21")
        assert LU_A in _found(http, {"_lastUpdated": f"le{a0}"})
        latest = max(_updated(http, s) for s in (CT_MON, MR_MON, CT_OLD, DATE_ONLY, NO_DATE, BAD_TIME,
                                                   OTHER_MON, LU_A, LU_B, LU_C))
        assert _since(http, latest) == set()  # nothing changed since

        # An instance stored into a series of LU_A.
        added = _study(tmp_path, LU_A, "BN902", "Đinh^Văn Lực", StudyDate="20260110", StudyTime="090000",
                       InstanceNumber="2")
        assert served.storescu(str(added)).returncode == 0
        a1 = _updated(http, LU_A)
        assert a1 > a0 and _since(http, latest) == {LU_A}
        assert _read(http, LU_A)["numberOfInstances"] == 2

        # A new series that brings the Study Description the first lacked.
        described = _study(tmp_path, LU_A, "BN902", "Đinh^Văn Lực", series=f"{LU_A}.2", StudyDate="20260110",
                           StudyTime="090000", StudyDescription="CT ngực", Modality="MR")
        assert served.storescu(str(described)).returncode == 0
        study = _read(http, LU_A)
        a2 = study["meta"]["lastUpdated"]
        assert a2 > a1 and study["description"] == "CT ngực" and study["numberOfSeries"] == 2
        assert _since(http, a1) == {LU_A}

        # That series deleted.
        deleted = admin.delete(f"/api/studies/{LU_A}/series/{LU_A}.2", params={"reason": "wrong series"})
        assert deleted.status_code == 200, deleted.text
        study = _read(http, LU_A)
        a3 = study["meta"]["lastUpdated"]
        assert a3 > a2 and study["numberOfSeries"] == 1 and _since(http, a2) == {LU_A}
        assert _updated(http, LU_B) == b0  # its patient's other study: nothing it shows changed

        # The HIS corrects the patient's name: both of the patient's studies show it.
        assert _hl7(served, "LU-A08", "EVN|A08|20260110091000",
                    "PID|1||BN902^^^BVDK^PI||Đinh^Văn Lực Mới||19700101|M", "PV1|1|O") == "AA"
        renamed = _read(http, LU_B)
        assert renamed["subject"]["display"] == "Đinh Văn Lực Mới"
        b1 = renamed["meta"]["lastUpdated"]
        assert b1 > b0 and _updated(http, LU_A) > a3
        assert _since(http, a3) == {LU_A, LU_B}

        # The HIS merges BN903 into BN902: LU_C now shows BN902.
        assert _hl7(served, "LU-A40", "EVN|A40|20260110092000",
                    "PID|1||BN902^^^BVDK^PI||Đinh^Văn Lực Mới||19700101|M", "MRG|BN903^^^BVDK^PI") == "AA"
        merged = _read(http, LU_C)
        assert merged["subject"]["reference"] == f"Patient/{RENAMED}"
        c1 = merged["meta"]["lastUpdated"]
        assert c1 > c0 and LU_C in _since(http, b1)

        # Everything else kept its time; a poll from the last time seen finds nothing.
        assert _updated(http, CT_MON) == untouched
        newest = max(_updated(http, s) for s in (LU_A, LU_B, LU_C))
        assert _since(http, newest) == set()
        assert _found(http, {"_lastUpdated": [f"gt{a0}", f"lt{newest}"], "identifier": "A21"}).keys() == {LU_A}
        for bad in ("2026-02-30", "ap2026", "yesterday"):
            _outcome(http.get("/fhir/ImagingStudy", params={"_lastUpdated": bad}), 400)


# -- Patient: meta.lastUpdated and _lastUpdated -------------------------------------------------
PT_A, PT_B, PT_C = f"{UID}.31", f"{UID}.32", f"{UID}.33"  # the Patient test's own studies
PT_ONE, PT_MERGED, PT_ALONE = "BVDK.BN920", "BVDK.BN921", "BVDK.BN922"


def _patients(http: httpx.Client, **query: Any) -> set[str]:
    response = http.get("/fhir/Patient", params={**query, "_count": 200})
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["total"] == len(bundle.get("entry", [])), bundle
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_patient_last_updated_moves_with_what_the_patient_shows(served: PacsServer, tmp_path: Path) -> None:
    """Patient had no meta.lastUpdated (ImagingStudy had): an EMR could not
    poll "every patient that changed since". It moves when the HIS corrects
    the name, birth date or sex (ADT^A08), adds an identifier, merges a
    patient into it (ADT^A40: a merged-away ID and a replaces link), and not
    when another object repeats what it shows; _lastUpdated searches it as
    ImagingStudy's does; a former id reads with the current patient's time."""
    one = "Hồ^Văn Một"
    files = [_study(tmp_path, PT_A, "BN920", one, series=f"{PT_A}.1", StudyDate="20260115"),
             _study(tmp_path, PT_B, "BN921", one, series=f"{PT_B}.1", StudyDate="20260116"),
             _study(tmp_path, PT_C, "BN922", "Hồ^Văn Ba", series=f"{PT_C}.1", StudyDate="20260117")]
    assert served.storescu(*map(str, files)).returncode == 0
    with _emr(served) as http:
        a0, c0 = _updated(http, PT_ONE, "Patient"), _updated(http, PT_ALONE, "Patient")
        assert a0.endswith("Z") and len(a0) == len("2026-01-10T02:00:00.000000Z")
        latest = max(a0, c0, _updated(http, PT_MERGED, "Patient"))
        assert _patients(http, _lastUpdated=f"gt{latest}") == set()  # nothing changed since
        assert _patients(http, identifier="BN920", _lastUpdated=a0) == {PT_ONE}  # eq: that instant
        assert _patients(http, identifier="BN920", _lastUpdated=f"ge{a0}") == {PT_ONE}
        assert _patients(http, identifier="BN920", _lastUpdated=f"gt{a0}") == set()

        # Another object of the patient, the same name, birth date and sex: nothing it shows changed.
        again = _study(tmp_path, PT_A, "BN920", one, series=f"{PT_A}.1", StudyDate="20260115", InstanceNumber="2")
        assert served.storescu(str(again)).returncode == 0
        assert _updated(http, PT_ONE, "Patient") == a0

        # The HIS corrects the name, birth date and sex.
        assert _hl7(served, "PT-A08-1", "EVN|A08|20260115091000",
                    "PID|1||BN920^^^BVDK^PI||Hồ^Văn Hai||19800202|F", "PV1|1|O") == "AA"
        patient = _read(http, PT_ONE, "Patient")
        a1 = patient["meta"]["lastUpdated"]
        assert patient["name"][0]["text"] == "Hồ Văn Hai" and patient["birthDate"] == "1980-02-02"
        assert a1 > a0 and _patients(http, _lastUpdated=f"gt{latest}") == {PT_ONE}

        # ... then gives the citizen ID.
        assert _hl7(served, "PT-A08-2", "EVN|A08|20260115092000",
                    "PID|1||BN920^^^BVDK^PI~001099000920^^^CCCD^NI||Hồ^Văn Hai||19800202|F", "PV1|1|O") == "AA"
        patient = _read(http, PT_ONE, "Patient")
        a2 = patient["meta"]["lastUpdated"]
        assert {"system": f"{PATIENT_ID_SYSTEM}/CCCD", "value": "001099000920"} in [
            {k: v for k, v in i.items() if k in ("system", "value")} for i in patient["identifier"]]
        assert a2 > a1 and _patients(http, _lastUpdated=f"gt{a1}") == {PT_ONE}

        # ... and merges BN921 into it.
        assert _hl7(served, "PT-A40", "EVN|A40|20260115093000",
                    "PID|1||BN920^^^BVDK^PI||Hồ^Văn Hai||19800202|F", "MRG|BN921^^^BVDK^PI") == "AA"
        patient = _read(http, PT_ONE, "Patient")
        a3 = patient["meta"]["lastUpdated"]
        assert {"other": {"reference": f"Patient/{PT_MERGED}"}, "type": "replaces"} in patient["link"]
        assert a3 > a2 and _patients(http, _lastUpdated=f"gt{a2}") == {PT_ONE}
        former = _read(http, PT_MERGED, "Patient")
        assert former["active"] is False and former["meta"]["lastUpdated"] == a3

        # The patient left alone kept its time; a poll from the last time seen finds nothing.
        assert _updated(http, PT_ALONE, "Patient") == c0
        assert _patients(http, _lastUpdated=f"gt{a3}") == set()
        assert _patients(http, _lastUpdated=[f"gt{a0}", f"le{a3}"], identifier="BN920") == {PT_ONE}  # AND
        assert _patients(http, _lastUpdated=[f"gt{a0}", f"lt{a3}"], identifier="BN920") == set()
        for bad in ("2026-02-30", "ap2026", "yesterday"):
            _outcome(http.get("/fhir/Patient", params={"_lastUpdated": bad}), 400)
        params = {p["name"] for p in http.get("/fhir/metadata").json()["rest"][0]["resource"][0]["searchParam"]}
        assert "_lastUpdated" in params
