"""FHIR review fixes, against a real `pacs serve`: a token's system names one
issuer; a Patient id the HIS replaced (hospital number, merge) still leads to
the patient; an amended report is a new version of the same DiagnosticReport;
no negative unsignedInt; search by POST; the CapabilityStatement's roles,
_format and Accept spellings, subject:Patient; the audit trail names the
patient with its issuer."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pacs import audit

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_reports_fhir import _empty_values, _outcome
from .test_worklist_ris import msa, send

SYSTEM = "https://filmless-pacs.org/fhir/NamingSystem/patient-id"
UID = "1.2.826.0.1.3680043.8.498.77"  # short Study UIDs: "{uid}-v1" was an id of earlier releases
BN100 = {"": f"{UID}.100", "BVDK": f"{UID}.101", "BVTW": f"{UID}.102"}  # three people holding BN100
CCCD_STUDY, MERGED_STUDY, SURVIVOR_STUDY = f"{UID}.300", f"{UID}.500", f"{UID}.501"
AMENDED_STUDY, NEGATIVE_STUDY = f"{UID}.600", f"{UID}.700"
MSH = "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261206090000||{}|{}|P|2.5|||||VNM|UNICODE UTF-8"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Three patients BN100 (issuers none, BVDK, BVTW), a patient registered
    by citizen ID, two to merge, a study to report on and one with negative
    numbers; an EMR and a radiologist."""
    tmp = tmp_path_factory.mktemp("fhir-review")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    utf8 = {"SpecificCharacterSet": "ISO_IR 192", "StudyDate": "20261206", "StudyTime": "080000"}
    first, rest = tmp / "first", tmp / "rest"
    first.mkdir()
    rest.mkdir()
    # The issuer-less BN100 first: received after a single BN100 with an
    # issuer, it would be filed as that patient (a modality omits the issuer).
    make_ct(first / "bn100.dcm", PatientID="BN100", PatientName="Lý^Văn Nam", StudyInstanceUID=BN100[""],
            AccessionNumber="ORD102", **utf8)
    for issuer, name, accession in (("BVDK", "Trần^Thị Lan", "ORD100"), ("BVTW", "Phan^Văn Hùng", "ORD101")):
        make_ct(rest / f"{accession}.dcm", PatientID="BN100", IssuerOfPatientID=issuer, PatientName=name,
                StudyInstanceUID=BN100[issuer], AccessionNumber=accession, **utf8)
    make_ct(rest / "cccd.dcm", PatientID="079300001111", IssuerOfPatientID="CCCD", PatientName="Đặng^Thu Trang",
            StudyInstanceUID=CCCD_STUDY, AccessionNumber="ACC300", **utf8)
    make_ct(rest / "m500.dcm", PatientID="BN500", IssuerOfPatientID="BVTW", PatientName="Mai^Văn Hải",
            StudyInstanceUID=MERGED_STUDY, AccessionNumber="M500", **utf8)
    make_ct(rest / "m501.dcm", PatientID="BN501", IssuerOfPatientID="BVDK", PatientName="Mai^Văn Hải",
            StudyInstanceUID=SURVIVOR_STUDY, AccessionNumber="M501", **utf8)
    make_ct(rest / "amend.dcm", PatientID="BN600", IssuerOfPatientID="BVDK", PatientName="Võ^Thị Sáu",
            StudyInstanceUID=AMENDED_STUDY, AccessionNumber="AMEND1", **utf8)
    make_ct(rest / "negative.dcm", PatientID="BN700", IssuerOfPatientID="BVDK", PatientName="Hồ^Văn Bảy",
            StudyInstanceUID=NEGATIVE_STUDY, AccessionNumber="NEG1", SeriesNumber="-1", InstanceNumber="-3", **utf8)
    make_ct(rest / "reading.dcm", PatientID="BN800", IssuerOfPatientID="BVDK", PatientName="Trịnh^Bình^Văn",
            StudyInstanceUID=f"{UID}.800", AccessionNumber="READ1", **utf8)
    server.cli("import", str(first))
    server.cli("import", str(rest))
    server.start()
    server.emr = server.make_token("emr.review", "emr", "EMR")  # type: ignore[attr-defined]
    server.radiologist = server.make_token("bs.review", "radiologist", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def _emr(server: PacsServer) -> httpx.Client:
    return server.http(token=server.emr)  # type: ignore[attr-defined]


def _ids(bundle: dict[str, Any]) -> list[str]:
    assert bundle["resourceType"] == "Bundle", bundle
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _hl7(server: PacsServer, control: str, *segments: str) -> str:
    """Send one HL7 message; its MSA-1."""
    kind = {"A08": "ADT^A08^ADT_A01", "A40": "ADT^A40^ADT_A39"}[segments[0][4:7]]
    return msa(send(server, "\n".join((MSH.format(kind, control), *segments))))[0]


# -- F1 -------------------------------------------------------------------------------------
def test_an_identifier_system_names_one_issuer(served: PacsServer) -> None:
    """Our system alone is an ID without issuer (as Patient/BN100 gives it),
    not any issuer's; an empty system names identifiers without one (we give
    none); ``system|`` is refused, not answered with nothing."""
    with _emr(served) as http:
        issuerless = http.get("/fhir/Patient/BN100").json()
        token = f"{issuerless['identifier'][0]['system']}|BN100"
        assert token == f"{SYSTEM}|BN100"
        assert _ids(http.get("/fhir/Patient", params={"identifier": token}).json()) == ["BN100"]
        assert sorted(_ids(http.get("/fhir/Patient", params={"identifier": "BN100"}).json())) == [
            "BN100", "BVDK.BN100", "BVTW.BN100"]  # no system: any
        assert _ids(http.get("/fhir/Patient", params={"identifier": "BVDK|BN100"}).json()) == ["BVDK.BN100"]
        assert _ids(http.get("/fhir/Patient", params={"identifier": f"{SYSTEM}/BVTW|BN100"}).json()) == [
            "BVTW.BN100"]
        assert http.get("/fhir/Patient", params={"identifier": "|BN100"}).json()["total"] == 0
        studies = http.get("/fhir/ImagingStudy", params={"patient.identifier": token}).json()
        assert _ids(studies) == [BN100[""]]
        assert http.get("/fhir/ImagingStudy", params={"patient.identifier": "|BN100"}).json()["total"] == 0
        for path, key in (("/fhir/Patient", "identifier"), ("/fhir/ImagingStudy", "patient.identifier")):
            refused = _outcome(http.get(path, params={key: "BVDK|"}), 400)
            assert "system" in refused["issue"][0]["diagnostics"]


# -- F2 -------------------------------------------------------------------------------------
def test_a_patient_id_replaced_by_the_hospital_number_still_leads_to_the_patient(served: PacsServer) -> None:
    """Registered by citizen ID, then given the hospital number (ADT^A08 with
    a PI): the id the EMR kept reads as replaced by the new one, and still
    finds the patient's studies."""
    old = "CCCD.079300001111"
    with _emr(served) as http:
        kept = http.get("/fhir/ImagingStudy", params={"identifier": "ACC300"}).json()["entry"][0]["resource"]
        assert kept["subject"]["reference"] == f"Patient/{old}"
        assert _hl7(served, "F2-A08", "EVN|A08|20261206091000",
                    "PID|1||BN300^^^BVDK^PI~079300001111^^^CCCD^NI||Đặng^Thu Trang||19950505|F", "PV1|1|O") == "AA"
        current = http.get("/fhir/Patient/BVDK.BN300")
        assert current.status_code == 200
        read = http.get(f"/fhir/Patient/{old}")
        assert read.status_code == 200, read.text
        assert read.json() == {
            "resourceType": "Patient", "id": old, "meta": current.json()["meta"], "active": False,
            "identifier": [{"use": "old", "system": f"{SYSTEM}/CCCD", "value": "079300001111"}],
            "link": [{"other": {"reference": "Patient/BVDK.BN300"}, "type": "replaced-by"}]}
        for key in ("patient", "subject"):
            found = http.get("/fhir/ImagingStudy", params={key: f"Patient/{old}"}).json()
            assert _ids(found) == [CCCD_STUDY], key
            assert found["entry"][0]["resource"]["subject"]["reference"] == "Patient/BVDK.BN300"


def test_a_merged_patient_id_leads_to_the_survivor_and_its_reports(served: PacsServer) -> None:
    """ADT^A40 merges BVTW.BN500 into BVDK.BN501: the old id reads as
    replaced by the survivor, which says it replaces it; the old id's
    studies and reports are still found by it."""
    old = "BVTW.BN500"
    with served.http(token=served.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(f"/api/studies/{MERGED_STUDY}/report", json={"findings": "Nốt phổi 8 mm.", "impression": "Theo dõi."})
        assert rad.post(f"/api/studies/{MERGED_STUDY}/report/sign").status_code == 200
    with _emr(served) as http:
        assert http.get("/fhir/DiagnosticReport", params={"subject": f"Patient/{old}"}).json()["total"] == 1
        assert _hl7(served, "F2-A40", "EVN|A40|20261206090000", "PID|1||BN501^^^BVDK^PI||Mai^Văn Hải||19600101|M",
                    "MRG|BN500^^^BVTW^PI") == "AA"
        former = http.get(f"/fhir/Patient/{old}")
        assert former.status_code == 200, former.text
        body = former.json()
        assert body["active"] is False and body["id"] == old
        assert body["link"] == [{"other": {"reference": "Patient/BVDK.BN501"}, "type": "replaced-by"}]
        survivor = http.get("/fhir/Patient/BVDK.BN501").json()
        assert survivor["link"] == [{"other": {"reference": f"Patient/{old}"}, "type": "replaces"}]
        assert _empty_values(survivor) == [] and _empty_values(body) == []
        studies = http.get("/fhir/ImagingStudy", params={"patient": f"Patient/{old}"}).json()
        assert sorted(_ids(studies)) == sorted([MERGED_STUDY, SURVIVOR_STUDY])
        reports = http.get("/fhir/DiagnosticReport", params={"subject": old}).json()
        assert _ids(reports) == [MERGED_STUDY]
        # A patient no identifier ever named is still unknown.
        _outcome(http.get("/fhir/Patient/BVTW.BN599"), 404)


# -- F3 -------------------------------------------------------------------------------------
def test_an_amended_report_is_a_new_version_of_the_same_resource(served: PacsServer) -> None:
    """The EMR that kept the report's id reads the amendment there; each
    signed version is a version (meta, ETag, vread); a search gives the
    current one; the per-version ids of earlier releases read the current."""
    url = f"/api/studies/{AMENDED_STUDY}/report"
    with served.http(token=served.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(url, json={"findings": "Bóng tim to.", "impression": "Tim to."})
        assert rad.post(f"{url}/sign").status_code == 200
    with _emr(served) as http:
        first = http.get("/fhir/DiagnosticReport", params={"identifier": "AMEND1"}).json()["entry"][0]["resource"]
        assert first["id"] == AMENDED_STUDY and first["status"] == "final"
        assert first["meta"]["versionId"] == "1" and first["meta"]["lastUpdated"].endswith("Z")
        read = http.get(f"/fhir/DiagnosticReport/{first['id']}")
        assert read.headers["etag"] == 'W/"1"' and read.json() == first
    with served.http(token=served.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.post(f"{url}/amend").status_code == 200
        rad.put(url, json={"findings": "Bóng tim bình thường.", "impression": "Bình thường (đính chính)."})
        assert rad.post(f"{url}/sign").status_code == 200
    with _emr(served) as http:
        again = http.get(f"/fhir/DiagnosticReport/{first['id']}")
        current = again.json()
        assert again.headers["etag"] == 'W/"2"' and again.headers["last-modified"].endswith(" GMT")
        assert current["id"] == first["id"] and current["status"] == "amended"
        assert current["conclusion"] == "Bình thường (đính chính)." and current["meta"]["versionId"] == "2"
        assert current["meta"]["lastUpdated"] >= first["meta"]["lastUpdated"]
        search = http.get("/fhir/DiagnosticReport", params={"identifier": "AMEND1"}).json()
        assert search["total"] == 1 and [e["resource"] for e in search["entry"]] == [current]
        legacy = http.get(f"/fhir/DiagnosticReport/{AMENDED_STUDY}-v1")
        assert legacy.status_code == 200 and legacy.json() == current
        _outcome(http.get(f"/fhir/DiagnosticReport/{AMENDED_STUDY}-v3"), 404)  # never given out
        history = http.get(f"/fhir/DiagnosticReport/{first['id']}/_history/1")
        assert history.status_code == 200 and history.headers["etag"] == 'W/"1"'
        assert history.json() == first  # that version, with its own status
        assert http.get(f"/fhir/DiagnosticReport/{first['id']}/_history/2").json() == current
        for missing in ("3", "0", "x"):
            _outcome(http.get(f"/fhir/DiagnosticReport/{first['id']}/_history/{missing}"), 404)
        statement = http.get("/fhir/metadata").json()
    report = next(r for r in statement["rest"][0]["resource"] if r["type"] == "DiagnosticReport")
    assert {i["code"] for i in report["interaction"]} == {"read", "vread", "search-type"}


# -- F4 -------------------------------------------------------------------------------------
def test_negative_series_and_instance_numbers_are_left_out(served: PacsServer) -> None:
    """IS allows -1; ImagingStudy's numbers are unsignedInt."""
    with _emr(served) as http:
        study = http.get(f"/fhir/ImagingStudy/{NEGATIVE_STUDY}").json()
        bundle = http.get("/fhir/ImagingStudy", params={"identifier": "NEG1"}).json()
    assert bundle["entry"][0]["resource"] == study
    series = study["series"][0]
    assert "number" not in series and "number" not in series["instance"][0], series
    assert _empty_values(study) == []


# -- F5 -------------------------------------------------------------------------------------
def test_search_by_post_with_a_form_body(served: PacsServer) -> None:
    """POST [type]/_search: the form body's parameters with the query
    string's, the same answer as the GET, GET links; roles and CSRF apply."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    base = f"http://127.0.0.1:{served.http_port}/fhir"
    with served.http(token=served.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(f"/api/studies/{BN100['BVDK']}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
        assert rad.post(f"/api/studies/{BN100['BVDK']}/report/sign").status_code == 200
    with _emr(served) as http:
        for kind, body, ids in (("Patient", "identifier=BVDK%7CBN100", ["BVDK.BN100"]),
                                ("ImagingStudy", "patient.identifier=BVDK|BN100", [BN100["BVDK"]]),
                                ("DiagnosticReport", "patient=BVDK.BN100", [BN100["BVDK"]])):
            posted = http.post(f"/fhir/{kind}/_search", content=body, headers=form)
            assert posted.status_code == 200, (kind, posted.text)
            assert posted.headers["content-type"].startswith("application/fhir+json")
            get = http.get(f"/fhir/{kind}?{body}").json()
            assert posted.json() == get and _ids(get) == ids, kind
            assert get["link"][0]["url"].startswith(f"{base}/{kind}?")
        # Query string and body together; the next link is a GET.
        both = http.post("/fhir/Patient/_search?_count=1", content="identifier=BN100", headers=form).json()
        assert both["total"] == 3 and len(both["entry"]) == 1
        links = {link["relation"]: link["url"] for link in both["link"]}
        assert links["next"].startswith(f"{base}/Patient?")
        assert sorted(urllib.parse.parse_qsl(urllib.parse.urlsplit(links["next"]).query)) == [
            ("_count", "1"), ("_offset", "1"), ("identifier", "BN100")]
        assert len(http.get(links["next"]).json()["entry"]) == 1
        _outcome(http.post("/fhir/Patient/_search", content="_format=xml&identifier=BN100", headers=form), 406)
        _outcome(http.post("/fhir/Patient/_search", content="name=%00", headers=form), 400)
        _outcome(http.post("/fhir/Patient/_search", content='{"identifier": "BN100"}',
                           headers={"Content-Type": "application/json"}), 415)
        _outcome(http.post("/fhir/Patient/_search", content="", headers=form), 400)  # a search names someone
    modality = served.make_token("ct.review", "modality", "CT")
    with served.http(token=modality) as http:
        _outcome(http.post("/fhir/Patient/_search", content="identifier=BN100", headers=form), 403)
    # The session cookie from another site's page is refused, as for any POST.
    with httpx.Client(base_url=f"http://127.0.0.1:{served.http_port}", timeout=30) as browser:
        assert browser.post("/api/auth/login", json={"username": "emr.review",
                                                     "password": "test-password-123"}).status_code == 200
        forged = browser.post("/fhir/Patient/_search", content="identifier=BN100",
                              headers={**form, "Origin": "https://evil.example"})
        assert forged.status_code == 403
        assert browser.post("/fhir/Patient/_search", content="identifier=BN100", headers=form).json()["total"] == 3


# -- F6 -------------------------------------------------------------------------------------
def test_capability_roles_format_spellings_and_typed_patient_reference(served: PacsServer) -> None:
    """(a) the roles the CapabilityStatement names are those the routes let
    in; (b) _format=application/fhir+json typed with a raw "+" (a space) or
    with parameters; (c) Accept: application/json+fhir as _format takes it;
    (d) subject:Patient= and patient:Patient= as subject= and patient=."""
    his = served.make_token("his.review", "his", "HIS")
    with served.http(token=his) as http:
        assert http.get("/fhir/Patient/BVDK.BN100").status_code == 403
    with _emr(served) as http:
        security = http.get("/fhir/metadata").json()["rest"][0]["security"]["description"]
        assert "his" not in security.replace(",", " ").split()
        assert all(role in security for role in ("radiologist", "admin", "emr", "referring"))
        patient = "/fhir/Patient/BVDK.BN100"
        for query in ("_format=application/fhir+json", "_format=application/fhir%2Bjson",
                      "_format=application/fhir%2Bjson%3B%20fhirVersion%3D4.0", "_format=application/json+fhir"):
            assert http.get(f"{patient}?{query}").status_code == 200, query
        assert http.get(patient, headers={"Accept": "application/json+fhir"}).status_code == 200
        _outcome(http.get(patient, headers={"Accept": "application/fhir+xml"}), 406)
        for key in ("subject:Patient", "patient:Patient"):
            found = http.get("/fhir/ImagingStudy", params={key: "BVDK.BN100"})
            assert found.status_code == 200, found.text
            assert _ids(found.json()) == [BN100["BVDK"]], key
        _outcome(http.get("/fhir/ImagingStudy", params={"subject:Device": "BVDK.BN100"}), 400)


# -- F7 -------------------------------------------------------------------------------------
def test_the_audit_trail_names_the_patient_with_its_issuer(served: PacsServer) -> None:
    """Three different people hold BN100: each read and search names the
    one shown, ID^^^issuer (HL7 CX, the ATNA patient object's form); a
    query by the ID alone finds all three, by CX one."""
    reader = served.make_token("emr.audit.review", "emr", "EMR")
    with served.http(token=reader) as http:
        for fhir_id in ("BVDK.BN100", "BVTW.BN100", "BN100"):
            assert http.get(f"/fhir/Patient/{fhir_id}").status_code == 200
        assert http.get("/fhir/ImagingStudy", params={"patient.identifier": "BVTW|BN100"}).json()["total"] == 1
        assert http.get(f"/fhir/ImagingStudy/{BN100['BVDK']}").status_code == 200
        assert http.get("/fhir/Patient", params={"identifier": "BN100"}).json()["total"] == 3
    with served.http() as admin:
        events = list(reversed(admin.get("/api/audit", params={"user": "emr.audit.review"}).json()))
        atna = admin.get("/api/audit", params={"user": "emr.audit.review", "format": "atna"}).json()
    named = [e["patient_id"] for e in events]
    assert named[:5] == ["BN100^^^BVDK", "BN100^^^BVTW", "BN100", "BN100^^^BVTW", "BN100^^^BVDK"], events
    assert set(named[5].split("\\")) == {"BN100", "BN100^^^BVDK", "BN100^^^BVTW"}
    patients = [p["ParticipantObjectID"] for p in atna[-1]["ParticipantObjectIdentification"]
                if p["ParticipantObjectTypeCode"] == 1]
    assert patients == ["BN100^^^BVDK"]  # the oldest event: one patient object, as CX
    assert {p["ParticipantObjectID"] for p in atna[0]["ParticipantObjectIdentification"]} == set(
        named[5].split("\\"))  # the search: one object per patient shown
    from pacs.index import create_index_engine

    engine = create_index_engine(f"sqlite:///{served.data_dir}/index.sqlite", pool_size=0)
    try:
        by_id = audit.query(engine, user="emr.audit.review", patient_id="BN100")
        by_cx = audit.query(engine, user="emr.audit.review", patient_id="BN100^^^BVTW")
    finally:
        engine.dispose()
    assert len(by_id) == 6 and len(by_cx) == 3  # the read, the search by BVTW|BN100, the search of all three


def test_a_name_is_found_in_the_order_it_is_read(served: PacsServer) -> None:
    """Trịnh^Bình^Văn (Family^Given^Middle, as HL7 and modalities write it) is
    read "Trịnh Văn Bình": the Patient name search finds it so, as C-FIND and
    QIDO-RS do (patients.name_reading)."""
    with _emr(served) as http:
        for value in ("trinh van binh", "Trịnh Văn Bình", "van binh", "trinh binh van"):
            bundle = http.get("/fhir/Patient", params={"name": value}).json()
            assert _ids(bundle) == ["BVDK.BN800"], value
