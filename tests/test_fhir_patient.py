"""FHIR R4 Patient for the hospital EMR: read and search (identifier, name
without diacritics, birthdate, gender), ids derived from the patient's
identifiers, the studies' subject.reference, ImagingStudy?patient=, the
referring physician's limits and the audit trail, against a real `pacs serve`."""

from __future__ import annotations

import re
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from viewer_api.fhir import patient_fhir_id

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .qr_corpus import study_uid, write_corpus
from .test_reports_fhir import _empty_values, _outcome

PATIENT_ID_SYSTEM = "https://filmless-pacs.org/fhir/NamingSystem/patient-id"
P1 = "CCCD.001085012345"  # Nguyễn^Văn An: CCCD 001085012345, BHYT DN4797912345678 (tests/qr_corpus.py)
P2 = "CCCD.079190000111"  # Nguyễn^Thị Hoa
P4 = "CCCD.OLD123"  # NGUYEN^VAN AN: another person, the same name without diacritics
LONG_ISSUER = "Bệnh viện Đa khoa tỉnh Bắc Ninh"
LONG_ID = "HỒSƠ-" + "9" * 50


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The query corpus (five patients, six studies) and a few patients
    whose ids take the other forms, a radiologist and a referring physician
    (Đỗ^Thanh Tùng referred S1 only, of Nguyễn^Văn An's S1 and S2)."""
    tmp = tmp_path_factory.mktemp("fhir-patient")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    corpus = tmp / "corpus"
    write_corpus(corpus)
    utf8 = {"SpecificCharacterSet": "ISO_IR 192"}
    make_ct(corpus / "quynh.dcm", PatientName="Phạm^Thị Quỳnh", PatientID="079204987654", PatientSex="F",
            PatientBirthDate="19900215", AccessionNumber="QUYNH1", **utf8)
    with warnings.catch_warnings():  # pydicom's "Invalid value for VR DA": the point here
        warnings.simplefilter("ignore")
        make_ct(corpus / "long-issuer.dcm", PatientName="Đinh^Công Tráng", PatientID="BN-2024.001",
                IssuerOfPatientID=LONG_ISSUER, PatientSex="", PatientBirthDate="19851340", **utf8)
    make_ct(corpus / "long-id.dcm", PatientName="Vũ^Hồ Sơ", PatientID=LONG_ID, PatientSex="X", **utf8)
    make_ct(corpus / "nobody.dcm", PatientID=None, PatientName=None, AccessionNumber="NOBODY9")
    server.cli("import", str(corpus))
    server.start()
    server.radiologist = server.make_token("bs.tung", "radiologist", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    server.referring = server.make_token("bs.tung.ref", "referring", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    _his_patient(server)
    try:
        yield server
    finally:
        server.stop()


def _his_patient(server: PacsServer) -> None:
    """A patient the HIS registered (no study yet) with the other identifiers
    an HL7 PID-3 gives, typed (CX-5: NI citizen ID, HC insurance): the rows
    pacs.orders writes, written here straight into the index, as make_token
    does (the order API is not what these tests are about)."""
    from datetime import UTC, datetime

    from pacs.index.models import Patient, PatientIdentifier
    from pacs.index.name_words import set_name_words

    now = datetime.now(UTC)
    core = server.core()
    try:
        with core.engine.begin() as conn:
            pk = conn.execute(Patient.__table__.insert().values(
                patient_id="BN777", issuer="BVDK", name="Hoàng^Thị Mai", name_folded="HOANG^THI MAI",
                name_words="HOANG THI MAI", birth_date="19700707", sex="F", created_at=now, updated_at=now,
                changed_at=now,
            )).inserted_primary_key[0]
            set_name_words(conn, pk, "HOANG THI MAI")
            conn.execute(PatientIdentifier.__table__.insert(), [
                {"patient_pk": pk, "value": "079170000777", "issuer": "CCCD", "id_type": "NI"},
                {"patient_pk": pk, "value": "HC4797900000777", "issuer": "BHYT", "id_type": "HC"},
            ])
    finally:
        core.close()


def _patients(bundle: dict[str, Any]) -> list[str]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", bundle
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _search(http: Any, **params: str) -> dict[str, Any]:
    response = http.get("/fhir/Patient", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return response.json()  # type: ignore[no-any-return]


# -- structural validation (R4 patient.html, datatypes.html) --------------------------------
# fhir.resources is not a dependency of this project (tests/test_reports_fhir.py
# checks by hand too): the rules a Patient of ours can break, checked here.
_PATIENT_ELEMENTS = {"resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
                     "modifierExtension", "identifier", "active", "name", "telecom", "gender", "birthDate",
                     "deceasedBoolean", "deceasedDateTime", "address", "maritalStatus", "multipleBirthBoolean",
                     "multipleBirthInteger", "photo", "contact", "communication", "generalPractitioner",
                     "managingOrganization", "link"}
_IDENTIFIER_ELEMENTS = {"use", "type", "system", "value", "period", "assigner"}
_HUMAN_NAME_ELEMENTS = {"use", "text", "family", "given", "prefix", "suffix", "period"}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FHIR_DATE = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
                        r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")


def _is_uri(value: object) -> bool:
    if not isinstance(value, str) or not value or value != value.strip():
        return False
    parts = urllib.parse.urlsplit(value)
    return (parts.scheme in ("http", "https") and bool(parts.netloc)) or parts.scheme == "urn"


def _problems(patient: dict[str, Any]) -> list[str]:
    """What makes *patient* an invalid R4 Patient (empty: none found)."""
    found = [f"empty value at {p}" for p in _empty_values(patient)]
    if patient.get("resourceType") != "Patient":
        found.append("resourceType")
    found += [f"unknown element {k}" for k in set(patient) - _PATIENT_ELEMENTS]
    if not _FHIR_ID.fullmatch(str(patient.get("id", ""))):
        found.append(f"id {patient.get('id')!r}")
    for i, ident in enumerate(patient.get("identifier", [])):
        found += [f"identifier[{i}].{k}" for k in set(ident) - _IDENTIFIER_ELEMENTS]
        if not _is_uri(ident.get("system")):
            found.append(f"identifier[{i}].system {ident.get('system')!r} is not an absolute URI")
        if not isinstance(ident.get("value"), str):
            found.append(f"identifier[{i}].value")
        if ident.get("use") not in (None, "usual", "official", "temp", "secondary", "old"):
            found.append(f"identifier[{i}].use")
        for coding in ident.get("type", {}).get("coding", []):
            if not _is_uri(coding.get("system")) or not isinstance(coding.get("code"), str):
                found.append(f"identifier[{i}].type.coding {coding}")
    for i, name in enumerate(patient.get("name", [])):
        found += [f"name[{i}].{k}" for k in set(name) - _HUMAN_NAME_ELEMENTS]
        for key in ("text", "family"):
            if key in name and not isinstance(name[key], str):
                found.append(f"name[{i}].{key}")
        for key in ("given", "prefix", "suffix"):
            if key in name and not (isinstance(name[key], list) and all(isinstance(v, str) for v in name[key])):
                found.append(f"name[{i}].{key}")
    if patient.get("gender", "male") not in ("male", "female", "other", "unknown"):
        found.append(f"gender {patient['gender']!r}")
    if "birthDate" in patient and not _FHIR_DATE.fullmatch(str(patient["birthDate"])):
        found.append(f"birthDate {patient['birthDate']!r}")
    return found


# -- the id scheme (no server) --------------------------------------------------------------
def test_patient_ids_are_fhir_ids_derived_from_the_identifiers() -> None:
    """An id is [A-Za-z0-9-.]{1,64}, the same for the same (issuer, ID)
    whatever the row (it outlives a reindex), and never another patient's."""
    cases = [("001085012345", "CCCD", None), ("001085012345", "", None), ("001085012345", "BHYT", None),
             ("BN 1", "", None), ("BN-1", "", None), ("BN.1", "", None), ("BN-201", "", None),
             ("BN-2024.001", LONG_ISSUER, None), ("BN-2024.001", LONG_ISSUER + "!", None),
             (LONG_ID, "", None), (LONG_ID + "X", "", None), (LONG_ID[:-1], "", None), ("Ω" * 64, "Ω" * 64, None),
             ("", "", "1.2.840.10008.1"), ("", "", "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678")]
    ids = [patient_fhir_id(*case) for case in cases]
    for case, fhir_id in zip(cases, ids, strict=True):
        assert fhir_id is not None and _FHIR_ID.fullmatch(fhir_id), (case, fhir_id)
        assert fhir_id == patient_fhir_id(*case)
    assert len(set(ids)) == len(ids), ids
    assert ids[:3] == ["CCCD.001085012345", "001085012345", "BHYT.001085012345"]
    assert ids[3:7] == ["BN-201", "BN-2D1", "BN-2E1", "BN-2D201"]  # a space, "-" and "." escaped
    assert "--" in ids[7] and ids[7].startswith("BN-2D2024-2E001--")  # a long issuer: ID, digest
    assert patient_fhir_id("", "", None) is None  # no ID and no study: no Patient


# -- read ------------------------------------------------------------------------------------
def test_read_a_patient(served: PacsServer) -> None:
    with served.http() as http:
        response = http.get(f"/fhir/Patient/{P1}")
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
        patient = response.json()
    assert _problems(patient) == [], patient
    assert patient["id"] == P1
    assert patient["identifier"] == [
        {"use": "usual", "system": f"{PATIENT_ID_SYSTEM}/CCCD", "value": "001085012345"},
        {"system": f"{PATIENT_ID_SYSTEM}/BHYT", "value": "DN4797912345678"},  # DICOM type TEXT: no v2 type
    ]
    assert patient["name"] == [{"text": "Nguyễn Văn An", "family": "Nguyễn", "given": ["Văn", "An"]}]
    assert patient["gender"] == "male" and patient["birthDate"] == "1985-01-01"


def test_every_form_of_id_reads_its_patient(served: PacsServer) -> None:
    """Issuer-less, long (digest) and ID-less patients; absent or invalid
    sex and birth date are left out or unknown; HIS-registered patients
    carry their identifier types (HL7 CX-5, v2-0203)."""
    with served.http() as http:
        quynh = http.get("/fhir/Patient/079204987654").json()
        assert quynh["name"][0]["text"] == "Phạm Thị Quỳnh" and quynh["gender"] == "female"
        assert quynh["identifier"] == [{"use": "usual", "system": PATIENT_ID_SYSTEM, "value": "079204987654"}]

        found = {}
        for name in ("Đinh", "Vũ", "Hoàng"):
            entries = _search(http, name=name).get("entry", [])
            assert len(entries) == 1, (name, entries)
            found[name] = entries[0]["resource"]
        long_issuer, long_id, his = found["Đinh"], found["Vũ"], found["Hoàng"]
        assert long_issuer["id"] == patient_fhir_id("BN-2024.001", LONG_ISSUER, None)
        assert long_issuer["identifier"][0] == {
            "use": "usual", "system": f"{PATIENT_ID_SYSTEM}/{urllib.parse.quote(LONG_ISSUER, safe='')}",
            "value": "BN-2024.001"}
        assert "gender" not in long_issuer and "birthDate" not in long_issuer  # empty sex, 1985-13-40
        assert long_id["id"] == patient_fhir_id(LONG_ID, "", None) and long_id["gender"] == "unknown"  # sex X
        assert his["id"] == "BVDK.BN777" and his["birthDate"] == "1970-07-07"
        v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
        assert his["identifier"][1:] == [
            {"type": {"coding": [{"system": v2, "code": "NI"}]}, "system": f"{PATIENT_ID_SYSTEM}/CCCD",
             "value": "079170000777"},
            {"type": {"coding": [{"system": v2, "code": "HC"}]}, "system": f"{PATIENT_ID_SYSTEM}/BHYT",
             "value": "HC4797900000777"}]

        nobody = http.get("/fhir/ImagingStudy", params={"identifier": "NOBODY9"}).json()["entry"][0]["resource"]
        assert nobody["subject"]["display"] == "unidentified patient"
        assert nobody["subject"]["reference"].startswith("Patient/--")
        unidentified = http.get(f"/fhir/{nobody['subject']['reference']}").json()
        assert unidentified["resourceType"] == "Patient" and "identifier" not in unidentified

        for patient in (quynh, long_issuer, long_id, his, unidentified):
            assert _problems(patient) == [], patient
            again = http.get(f"/fhir/Patient/{patient['id']}")
            assert again.status_code == 200 and again.json() == patient, patient["id"]


def test_unknown_and_malformed_ids_are_404(served: PacsServer) -> None:
    with served.http() as http:
        for fhir_id in ("CCCD.999999999999", "001085012345",  # no such ID; the ID without its issuer
                        "BHYT.001085012345", "CCCD.00108501234-5",  # a malformed escape
                        "CCCD-2E001085012345", "a.b.c", "--zzzz", "--", "BN-2D2024-2E001--0000", "x" * 65):
            body = _outcome(http.get(f"/fhir/Patient/{fhir_id}"), 404)
            assert body["issue"][0]["code"] == "not-found", fhir_id


# -- search ----------------------------------------------------------------------------------
def test_search_by_identifier_with_and_without_system(served: PacsServer) -> None:
    with served.http() as http:
        for value in ("CCCD|001085012345", "001085012345", f"{PATIENT_ID_SYSTEM}/CCCD|001085012345",
                      "BHYT|DN4797912345678", "DN4797912345678", "urn:oid:1.2.3:BHYT|DN4797912345678"):
            bundle = _search(http, identifier=value)
            assert _patients(bundle) == [P1] and bundle["total"] == 1, value
            assert _problems(bundle["entry"][0]["resource"]) == []
            assert bundle["entry"][0]["fullUrl"] == f"http://127.0.0.1:{served.http_port}/fhir/Patient/{P1}"
            assert bundle["entry"][0]["search"] == {"mode": "match"}
        assert _search(http, identifier="BHYT|001085012345")["total"] == 0  # the wrong issuer
        assert sorted(_patients(_search(http, identifier="001085012345,079190000111"))) == [P1, P2]  # any
        both = http.get("/fhir/Patient", params=[("identifier", "001085012345"), ("identifier", "079190000111")])
        assert both.json()["total"] == 0  # given twice: both must match
        his = _search(http, identifier="CCCD|079170000777")  # an other ID the HIS sent
        assert _patients(his) == ["BVDK.BN777"]


def test_search_by_name_ignores_case_and_diacritics(served: PacsServer) -> None:
    with served.http() as http:
        nguyen = {P1, P2, P4}
        for value in ("nguyen", "Nguyễn", "NGUY", "nguyễn"):
            assert set(_patients(_search(http, name=value))) == nguyen, value
        assert set(_patients(_search(http, name="van an"))) == {P1, P4}  # words in order
        assert set(_patients(_search(http, name="an"))) == {P1, P4}  # any word, from its start
        assert _search(http, name="guyen")["total"] == 0  # a prefix, not a substring
        # Any of the values; "hoa" starts Hoa and Hoàng alike.
        assert set(_patients(_search(http, name="hoa,thang"))) == {P2, "BVDK.BN777", "CCCD.038095000333"}
        assert set(_patients(_search(http, family="nguyen"))) == nguyen
        assert _search(http, family="van")["total"] == 0
        assert set(_patients(_search(http, given="văn"))) == {P1, P4, "CCCD.001077000222"}  # Trần Văn Bình
        assert set(_patients(_search(http, given="an"))) == {P1, P4}
        assert _search(http, given="nguyen")["total"] == 0
        # Several parameters: all must match.
        assert _patients(_search(http, family="nguyen", given="thi")) == [P2]


def test_search_by_birthdate_and_gender(served: PacsServer) -> None:
    with served.http() as http:
        assert _search(http, birthdate="1985-01-01")["total"] == 5  # the corpus' five
        assert _patients(_search(http, birthdate="1990-02-15")) == ["079204987654"]
        assert _patients(_search(http, birthdate="eq1990-02-15")) == ["079204987654"]
        assert _patients(_search(http, birthdate="1990-02")) == ["079204987654"]  # a month is its days
        assert _search(http, birthdate="1990")["total"] == 1
        for bad in ("1985-13-01", "1985-02-30", "01/01/1985", "19850101", "ge1985-01-01", "1985-01-01T00:00"):
            body = _outcome(http.get("/fhir/Patient", params={"birthdate": bad}), 400)
            assert "birthdate" in body["issue"][0]["diagnostics"], bad
        assert set(_patients(_search(http, gender="female"))) == {"079204987654", "BVDK.BN777"}
        assert _patients(_search(http, gender="female", name="quynh")) == ["079204987654"]
        admin = "http://hl7.org/fhir/administrative-gender"
        assert _search(http, gender=f"{admin}|female")["total"] == 2
        assert _search(http, gender="http://example.org/sex|female")["total"] == 0
        assert _patients(_search(http, gender="unknown")) == [patient_fhir_id(LONG_ID, "", None)]
        assert _search(http, gender="male")["total"] == 5
        _outcome(http.get("/fhir/Patient", params={"gender": "nam"}), 400)
        _outcome(http.get("/fhir/Patient"), 400)  # a search names someone
        _outcome(http.get("/fhir/Patient", params={"_count": "5"}), 400)
        _outcome(http.get("/fhir/Patient", params={"name": "nguyen", "_count": "-1"}), 400)
        # _id: the ids given (any of them).
        assert sorted(_patients(_search(http, _id=f"{P1},{P2},NOPE"))) == [P1, P2]


def test_paging_links_and_parameters_applied(served: PacsServer) -> None:
    with served.http() as http:
        first = _search(http, name="nguyen", _count="2", unknown="x")
        assert first["total"] == 3 and len(first["entry"]) == 2
        links = {link["relation"]: link["url"] for link in first["link"]}
        base = f"http://127.0.0.1:{served.http_port}/fhir/Patient?"
        assert links["self"].startswith(base) and links["next"].startswith(base)
        # The parameter this server ignored is in neither link.
        assert urllib.parse.parse_qsl(urllib.parse.urlsplit(links["self"]).query) == [("name", "nguyen"),
                                                                                      ("_count", "2")]
        following = http.get(links["next"]).json()
        assert following["total"] == 3 and [link["relation"] for link in following["link"]] == ["self"]
        assert len(following["entry"]) == 1
        seen = _patients(first) + _patients(following)
        assert sorted(seen) == sorted({P1, P2, P4})
        strict = {"Prefer": "handling=strict"}
        refused = _outcome(http.get("/fhir/Patient", params={"name": "nguyen", "address": "Hà Nội"},
                                    headers=strict), 400)
        assert "address" in refused["issue"][0]["diagnostics"]
        assert http.get("/fhir/Patient", params={"name": "nguyen"}, headers=strict).json()["total"] == 3
        # A study search parameter is no Patient parameter (and the other way round).
        _outcome(http.get("/fhir/Patient", params={"name": "nguyen", "patient.identifier": "x"}, headers=strict), 400)
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "name": "x"}, headers=strict), 400)
        nothing = _search(http, name="zzz")
        assert nothing["total"] == 0 and "entry" not in nothing and _empty_values(nothing) == []
        _outcome(http.get("/fhir/Patient", params={"name": "nguyen", "_format": "xml"}), 406)
        # A modifier this server does not apply would widen the search (another
        # patient for the EMR): refused even without handling=strict.
        for modified in ({"name:exact": "Nguyen", "gender": "male"}, {"gender:not": "male", "name": "nguyen"},
                         {"identifier:of-type": "x"}):
            refused = _outcome(http.get("/fhir/Patient", params=modified), 400)
            assert "modifier" in refused["issue"][0]["diagnostics"]
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier:text": "ACC001"}), 400)
        for offset in ("9223372036854775808", "1000000001"):  # was a 500 (bigint out of range on PostgreSQL)
            _outcome(http.get("/fhir/Patient", params={"name": "nguyen", "_offset": offset}), 400)


# -- references from studies and reports -----------------------------------------------------
def test_subject_reference_resolves_and_finds_the_studies(served: PacsServer) -> None:
    s1, s2 = study_uid("S1"), study_uid("S2")
    with served.http(token=served.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(f"/api/studies/{s1}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
        assert rad.post(f"/api/studies/{s1}/report/sign").status_code in (200, 409)  # 409: signed before
    with served.http() as http:
        study = http.get(f"/fhir/ImagingStudy/{s1}").json()
        assert study["subject"] == {"reference": f"Patient/{P1}",
                                    "identifier": {"system": f"{PATIENT_ID_SYSTEM}/CCCD", "value": "001085012345"},
                                    "display": "Nguyễn Văn An"}
        report = http.get(f"/fhir/DiagnosticReport/{s1}-v1").json()
        assert report["subject"] == study["subject"]
        patient = http.get(f"/fhir/{study['subject']['reference']}").json()
        assert patient["id"] == P1 and patient["name"][0]["text"] == study["subject"]["display"]

        base = f"http://127.0.0.1:{served.http_port}/fhir"
        for key, value in (("patient", f"Patient/{P1}"), ("patient", P1), ("subject", f"Patient/{P1}"),
                           ("patient", f"{base}/Patient/{P1}"), ("patient", f"Patient/NOPE,Patient/{P1}")):
            bundle = http.get("/fhir/ImagingStudy", params={key: value}).json()
            assert {e["resource"]["id"] for e in bundle["entry"]} == {s1, s2}, (key, value)
            assert all(e["resource"]["subject"]["reference"] == f"Patient/{P1}" for e in bundle["entry"])
        for value in (f"Practitioner/{P1}", "Patient/NOPE", "NOPE"):
            assert http.get("/fhir/ImagingStudy", params={"patient": value}).json()["total"] == 0, value
        both = http.get("/fhir/ImagingStudy", params={"patient": f"Patient/{P1}", "identifier": "ACC002"}).json()
        assert [e["resource"]["id"] for e in both["entry"]] == [s2]
        reports = http.get("/fhir/DiagnosticReport", params={"patient": f"Patient/{P1}"}).json()
        assert [e["resource"]["id"] for e in reports["entry"]] == [s1]  # a report's id: its study's UID
        assert http.get("/fhir/DiagnosticReport", params={"subject": P2}).json()["total"] == 0


def test_capability_statement_lists_patient(served: PacsServer) -> None:
    with served.http() as http:
        http.headers.pop("Authorization")
        statement = http.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"Patient", "ImagingStudy", "DiagnosticReport", "Endpoint"} <= set(resources)
    patient = resources["Patient"]
    assert {i["code"] for i in patient["interaction"]} == {"read", "search-type"}
    params = {p["name"]: p["type"] for p in patient["searchParam"]}
    assert params == {"_id": "token", "identifier": "token", "name": "string", "family": "string",
                      "given": "string", "birthdate": "date", "gender": "token", "_lastUpdated": "date",
                      "_count": "number", "_offset": "number"}
    study_params = {p["name"]: p for p in resources["ImagingStudy"]["searchParam"]}
    assert study_params["patient"]["type"] == "reference" and "Patient/{id}" in study_params["patient"]["documentation"]
    assert _empty_values(statement) == []


# -- access and audit ------------------------------------------------------------------------
def test_referring_physician_sees_only_their_patients(served: PacsServer) -> None:
    """Đỗ^Thanh Tùng referred S1 (Nguyễn^Văn An): that patient, and no other,
    by search or read; an unknown id is refused like another patient's (403),
    so the archive's patients cannot be probed."""
    with served.http(token=served.referring) as http:  # type: ignore[attr-defined]
        assert _patients(_search(http, name="nguyen")) == [P1]
        assert _search(http, name="nguyen")["total"] == 1
        assert _patients(_search(http, identifier="001085012345,079190000111")) == [P1]
        assert _search(http, gender="female")["total"] == 0
        assert http.get(f"/fhir/Patient/{P1}").status_code == 200
        for other in (P2, P4, "BVDK.BN777", "CCCD.999999999999"):
            body = _outcome(http.get(f"/fhir/Patient/{other}"), 403)
            assert body["issue"][0]["code"] == "forbidden", other
        # The patient's studies by reference: the referred one only.
        bundle = http.get("/fhir/ImagingStudy", params={"patient": f"Patient/{P1}"}).json()
        assert [e["resource"]["id"] for e in bundle["entry"]] == [study_uid("S1")]
    other = served.make_token("bs.tung.khac", "referring", "Đỗ^Thanh Tung")  # another person (no diacritic)
    with served.http(token=other) as http:
        assert _search(http, name="nguyen")["total"] == 0
        _outcome(http.get(f"/fhir/Patient/{P1}"), 403)
    modality = served.make_token("ct.patient", "modality", "CT")
    with served.http(token=modality) as http:
        _outcome(http.get(f"/fhir/Patient/{P1}"), 403)
        _outcome(http.get("/fhir/Patient", params={"name": "nguyen"}), 403)
    with served.http(token="none") as http:
        http.headers.pop("Authorization")
        assert _outcome(http.get(f"/fhir/Patient/{P1}"), 401)["issue"][0]["code"] == "login"


def _audit_events(server: PacsServer, user: str, wanted: int) -> list[dict[str, Any]]:
    """The user's audit events, once *wanted* of them are written (in batches)."""
    deadline = time.monotonic() + 20
    while True:
        with server.http() as http:
            events = http.get("/api/audit", params={"user": user}).json()
        if len(events) >= wanted or time.monotonic() > deadline:
            return events  # type: ignore[no-any-return]
        time.sleep(0.2)


def test_patient_accesses_are_audited(served: PacsServer) -> None:
    reader = served.make_token("emr.audit", "emr", "EMR")
    with served.http(token=reader) as http:
        assert http.get(f"/fhir/Patient/{P1}").status_code == 200
        assert http.get("/fhir/Patient", params={"name": "nguyen"}).status_code == 200
        assert http.get("/fhir/Patient/CCCD.999999999999").status_code == 404
    events = _audit_events(served, "emr.audit", 3)
    seen = [(e["action"], e["outcome"], e["patient_id"]) for e in reversed(events)]
    # Each patient with the issuer of its ID (ID^^^issuer, HL7 CX).
    assert seen[0] == ("view", "success", "001085012345^^^CCCD")
    assert seen[1][:2] == ("query", "success")
    assert set(seen[1][2].split("\\")) == {"001085012345^^^CCCD", "079190000111^^^CCCD", "OLD123^^^CCCD"}
    assert seen[2] == ("view", "failure", "")
    assert all(e["role"] == "emr" and e["protocol"] == "http" for e in events)
    assert events[-1]["detail"] == f"/fhir/Patient/{P1}"
    refused = served.make_token("bs.audit.ref", "referring", "Hoàng^Minh")  # referred S2, S3: not S1 alone
    with served.http(token=refused) as http:
        assert http.get(f"/fhir/Patient/{P2}").status_code == 200  # S3 is hers
        assert http.get("/fhir/Patient/CCCD.038095000333").status_code == 403
    events = _audit_events(served, "bs.audit.ref", 2)
    assert [(e["action"], e["outcome"], e["patient_id"]) for e in reversed(events)] == [
        ("view", "success", "079190000111^^^CCCD"), ("view", "denied", "038095000333^^^CCCD")]
