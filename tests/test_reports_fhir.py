"""Issue 6 acceptance 2: a signed report is an Encapsulated PDF in the study
(WADO-RS), a FHIR DiagnosticReport with the PDF, and an ORU^R01 at the HIS."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import EncapsulatedPDFStorage

from .conftest import Backend, PacsServer, free_port
from .peers import serving_with_his
from .qr_corpus import study_uid, write_corpus


@pytest.fixture
def reporting(tmp_path: Path) -> Iterator[PacsServer]:
    his_port, http_port = free_port(), free_port()
    # The image link in the signed PDF and the ORU comes from public_url only.
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), http_port=http_port,
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}",
                                   "PACS_PUBLIC_URL": f"http://127.0.0.1:{http_port}"})
    write_corpus(tmp_path / "corpus")
    server.cli("import", str(tmp_path / "corpus"))
    with serving_with_his(server, his_port, ("bs.tung", "Đỗ^Thanh Tùng")) as serving:
        yield serving


def test_sign_stores_pdf_fhir_and_oru(reporting: PacsServer) -> None:
    s1 = study_uid("S1")
    with reporting.http(token=reporting.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.get(f"/api/studies/{s1}/report").json()["status"] == "none"
        assert rad.post(f"/api/studies/{s1}/report/sign").status_code == 409  # nothing to sign
        draft = rad.put(f"/api/studies/{s1}/report", json={
            "findings": "Phổi hai bên sáng đều, không thấy tổn thương khu trú.",
            "impression": "Không thấy bất thường trên CT ngực.",
        })
        assert draft.status_code == 200 and draft.json()["status"] == "draft"
        signed = rad.post(f"/api/studies/{s1}/report/sign")
        assert signed.status_code == 200, signed.text
        assert signed.json()["current"]["signed_by"] == "Đỗ^Thanh Tùng"
        # Signed means immutable; an amendment is a new version.
        assert rad.put(f"/api/studies/{s1}/report", json={"findings": "x", "impression": "y"}).status_code == 409
        pdf = rad.get(f"/api/studies/{s1}/report/pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")

    # The PDF is part of the study over WADO-RS (and QIDO lists its series).
    client = DICOMwebClient(f"http://127.0.0.1:{reporting.http_port}/dicom-web", headers=reporting.auth_headers)
    instances = client.retrieve_study(s1)
    pdfs = [ds for ds in instances if ds.SOPClassUID == EncapsulatedPDFStorage]
    assert len(pdfs) == 1
    assert bytes(pdfs[0].EncapsulatedDocument).startswith(b"%PDF")
    assert str(pdfs[0].PatientName) == "Nguyễn^Văn An"
    assert "DOC" in client.search_for_studies(search_filters={"StudyInstanceUID": s1})[0]["00080061"]["Value"]

    # FHIR: ImagingStudy by citizen ID and by accession; DiagnosticReport with the PDF.
    with reporting.http() as http:
        by_cccd = http.get("/fhir/ImagingStudy", params={"patient.identifier": "CCCD|001085012345"}).json()
        assert by_cccd["resourceType"] == "Bundle" and by_cccd["type"] == "searchset"
        assert {e["resource"]["id"] for e in by_cccd["entry"]} == {s1, study_uid("S2")}
        by_bhyt = http.get("/fhir/ImagingStudy", params={"patient.identifier": "DN4797912345678"}).json()
        assert by_bhyt["total"] == 2
        study = http.get("/fhir/ImagingStudy", params={"identifier": "ACC001"}).json()["entry"][0]["resource"]
        assert study["numberOfInstances"] == 4 and study["endpoint"] == [{"reference": "Endpoint/dicomweb"}]
        assert any(i.get("value") == "ACC001" for i in study["identifier"])
        # The Study Instance UID as the resource shows it, with its system, without, or under the URI system.
        for identifier in (f"urn:dicom:uid|urn:oid:{s1}", f"urn:oid:{s1}", f"urn:ietf:rfc:3986|urn:oid:{s1}"):
            found = http.get("/fhir/ImagingStudy", params={"identifier": identifier}).json()
            assert [e["resource"]["id"] for e in found.get("entry", [])] == [s1], identifier
        viewer = study["extension"][0]["valueUrl"]
        assert http.get(viewer, follow_redirects=False).headers["location"] == f"/#/study/{s1}"
        reports = http.get("/fhir/DiagnosticReport", params={"patient.identifier": "CCCD|001085012345"}).json()
        assert reports["total"] == 1
        report = reports["entry"][0]["resource"]
        assert report["status"] == "final" and report["imagingStudy"] == [{"reference": f"ImagingStudy/{s1}"}]
        assert report["conclusion"] == "Không thấy bất thường trên CT ngực."
        assert report["resultsInterpreter"] == [{"display": "Đỗ Thanh Tùng"}]  # a name to read, not DICOM PN
        forms = {f["contentType"]: f for f in report["presentedForm"]}
        assert http.get(forms["application/pdf"]["url"]).content.startswith(b"%PDF")
        assert "Phổi hai bên" in base64.b64decode(forms["text/plain; charset=utf-8"]["data"]).decode()
        endpoint = http.get("/fhir/Endpoint/dicomweb").json()
        assert endpoint["address"].endswith("/dicom-web") and endpoint["connectionType"]["code"] == "dicom-wado-rs"
        assert http.get("/fhir/ImagingStudy").status_code == 400

    # The ORU^R01 reaches the HIS.
    messages = reporting.his.wait_for(1, timeout=30)  # type: ignore[attr-defined]
    oru = [m.decode() for m in messages if b"ORU^R01" in m]
    assert oru, messages
    assert "Không thấy bất thường" in oru[0] and "ACC001" in oru[0] and f"/viewer/study/{s1}" in oru[0]


def test_amendment_keeps_the_signed_version(reporting: PacsServer) -> None:
    s2 = study_uid("S2")
    with reporting.http(token=reporting.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(f"/api/studies/{s2}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
        rad.post(f"/api/studies/{s2}/report/sign")
        amended = rad.post(f"/api/studies/{s2}/report/amend").json()
        assert amended["current"]["version"] == 2 and amended["status"] == "draft"
        rad.put(f"/api/studies/{s2}/report", json={"findings": "Bổ sung: nốt mờ 3 mm.", "impression": "Theo dõi."})
        rad.post(f"/api/studies/{s2}/report/sign")
        report = rad.get(f"/api/studies/{s2}/report").json()
        assert [v["status"] for v in report["versions"]] == ["signed", "signed"]
        assert report["versions"][0]["findings"] == "Bình thường."
        v1 = rad.get(f"/api/studies/{s2}/report/pdf", params={"version": 1}).content
        v2 = rad.get(f"/api/studies/{s2}/report/pdf").content
        assert v1.startswith(b"%PDF") and v2.startswith(b"%PDF") and v1 != v2
    with reporting.http() as http:
        fhir = http.get("/fhir/DiagnosticReport", params={"identifier": "ACC002"}).json()
        assert fhir["entry"][0]["resource"]["status"] == "amended"



def test_a_colleagues_save_is_never_overwritten_nor_signed_unseen(reporting: PacsServer) -> None:
    """Two radiologists open the same study; each save and signature names the
    draft revision its author read, and one made stale by a colleague is 409."""
    s3 = study_uid("S3")
    other = reporting.make_token("bs.lan", "radiologist", "Trần^Thị Lan")
    url = f"/api/studies/{s3}/report"
    with reporting.http(token=reporting.radiologist) as tung, reporting.http(token=other) as lan:  # type: ignore[attr-defined]
        first = tung.put(url, json={"findings": "Không thấy tổn thương.", "impression": "Bình thường.", "revision": 0})
        assert first.status_code == 200 and first.json()["current"]["revision"] == 1
        # Lan opened the study before Tùng's save (no report then): her first save is refused.
        stale = lan.put(url, json={"findings": "Khối u thùy trán trái 3 cm.", "impression": "U não.", "revision": 0})
        assert stale.status_code == 409 and "bs.tung" in stale.json()["error"]
        # She reloads (revision 1), writes her findings and saves them.
        assert lan.put(url, json={"findings": "Khối u thùy trán trái 3 cm.", "impression": "U não.",
                                  "revision": 1}).json()["current"]["revision"] == 2
        # Tùng, still at revision 1, can neither overwrite her text nor sign it unseen.
        assert tung.put(url, json={"findings": "x", "impression": "y", "revision": 1}).status_code == 409
        refused = tung.post(f"{url}/sign", json={"revision": 1})
        assert refused.status_code == 409, refused.text
        report = tung.get(url).json()
        assert report["status"] == "draft" and report["current"]["findings"] == "Khối u thùy trán trái 3 cm."
        # Having read revision 2, he signs it.
        signed = tung.post(f"{url}/sign", json={"revision": 2})
        assert signed.status_code == 200 and signed.json()["status"] == "signed"
        # An amendment goes on counting: a revision read from the signed version is stale.
        amended = tung.post(f"{url}/amend")
        assert amended.status_code == 200 and amended.json()["current"]["revision"] == 3
        assert lan.put(url, json={"findings": "cũ", "impression": "cũ", "revision": 2}).status_code == 409
        # Clients that send no revision keep working as before.
        assert tung.put(url, json={"findings": "Bổ sung.", "impression": "U não."}).status_code == 200


def test_a_signature_that_loses_the_race_leaves_no_pdf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A colleague saves while the PDF of a signature is being made: the
    signature is refused (409) and the PDF already stored in the study is
    withdrawn, index row and object; it would read as a signed report of a
    text nobody signed. (The core in-process, on real SQLite and files, to
    place the colleague's save inside the signature.)"""
    import pacs.reports as reports
    from pacs.ingest import Origin
    from pacs.part10 import FileSource

    from .fuzzing import core_on
    from .dicomfiles import make_ct

    with core_on(tmp_path / "data") as core:
        ct = make_ct(tmp_path / "ct.dcm")
        study = core.ingestor.ingest(FileSource(ct), Origin("test")).header.study_uid
        service = reports.ReportService(core)
        service.save_draft(study, "Không thấy tổn thương.", "Bình thường.", "bs.an", revision=0)
        real_render = reports.render

        def render_while_a_colleague_saves(content: object) -> bytes:
            service.save_draft(study, "Khối u 3 cm.", "U não.", "bs.lan", revision=1)
            return real_render(content)  # type: ignore[arg-type]

        monkeypatch.setattr(reports, "render", render_while_a_colleague_saves)
        with pytest.raises(reports.ReportError) as refused:
            service.sign(study, "bs.an", revision=1)
        assert refused.value.http_status == 409
        assert core.reader.stats().instances == 1  # the CT alone: no PDF row
        assert len(list(core.store.list())) == 1  # and no PDF object
        report = service.get(study)
        assert report["status"] == "draft" and report["current"]["findings"] == "Khối u 3 cm."


def _outcome(response: object, status: int) -> dict:
    """An error under /fhir: the status, as an OperationOutcome (FHIR JSON)."""
    assert response.status_code == status, (response.status_code, response.text)  # type: ignore[attr-defined]
    assert response.headers["content-type"].startswith("application/fhir+json")  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"], body
    return body


def _sign(server: PacsServer, study: str) -> None:
    with server.http(token=server.radiologist) as rad:  # type: ignore[attr-defined]
        rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.", "impression": "Bình thường."})
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200


def test_encapsulated_pdf_over_wado(reporting: PacsServer) -> None:
    """PS3.18: WADO-URI contentType=application/pdf gives the document, no
    contentType the DICOM object (not an image); rendered is the PDF."""
    s1 = study_uid("S1")
    _sign(reporting, s1)
    with reporting.http() as http:
        found = http.get(f"/dicom-web/studies/{s1}/instances", params={"SOPClassUID": str(EncapsulatedPDFStorage)})
        pdf = found.json()[0]
        series, sop = pdf["0020000E"]["Value"][0], pdf["00080018"]["Value"][0]
        params = {"requestType": "WADO", "studyUID": s1, "seriesUID": series, "objectUID": sop}
        document = http.get("/wado", params={**params, "contentType": "application/pdf"})
        assert document.status_code == 200 and document.headers["content-type"] == "application/pdf"
        assert document.content.startswith(b"%PDF") and document.content.rstrip().endswith(b"%%EOF")
        assert document.content == http.get(f"/api/studies/{s1}/report/pdf").content
        default = http.get("/wado", params=params)
        assert default.status_code == 200 and default.headers["content-type"] == "application/dicom"
        assert dcmread(io.BytesIO(default.content)).SOPClassUID == EncapsulatedPDFStorage
        assert http.get("/wado", params={**params, "contentType": "image/jpeg"}).status_code == 406
        rendered = f"/dicom-web/studies/{s1}/series/{series}/instances/{sop}/rendered"
        for accept in (None, "application/pdf", "*/*"):
            response = http.get(rendered, headers={"Accept": accept} if accept else {})
            assert response.status_code == 200 and response.headers["content-type"] == "application/pdf", accept
            assert response.content == document.content
        assert http.get(rendered, headers={"Accept": "image/jpeg"}).status_code == 406


def test_fhir_conformance(reporting: PacsServer) -> None:
    s1, s2 = study_uid("S1"), study_uid("S2")
    _sign(reporting, s1)
    _sign(reporting, s2)
    with reporting.http() as http:
        # dateTime with a time has a zone (the server's, for DICOM times); instant always.
        study = http.get(f"/fhir/ImagingStudy/{s1}").json()
        assert study["started"] == datetime(2024, 1, 15, 8, 30).astimezone().isoformat()
        page = http.get("/fhir/DiagnosticReport", params={"patient.identifier": "CCCD|001085012345", "_count": 1})
        bundle = page.json()
        assert bundle["total"] == 2 and len(bundle["entry"]) == 1
        report = bundle["entry"][0]["resource"]
        assert report["issued"].endswith("Z")
        issued = datetime.fromisoformat(report["issued"])
        assert abs((datetime.now(UTC) - issued).total_seconds()) < 600
        # fullUrl is readable; the next link gives the other match.
        read = http.get(bundle["entry"][0]["fullUrl"])
        # One report per study, its id the Study UID (each signed version a meta.versionId).
        study_of_report = report["imagingStudy"][0]["reference"].split("/")[1]
        assert read.status_code == 200 and read.json()["id"] == report["id"] == study_of_report
        following = http.get([link["url"] for link in bundle["link"] if link["relation"] == "next"][0]).json()
        assert following["total"] == 2 and [link["relation"] for link in following["link"]] == ["self"]
        assert {e["resource"]["id"] for e in [*bundle["entry"], *following["entry"]]} == {s1, s2}
        studies = http.get("/fhir/ImagingStudy", params={"patient.identifier": "CCCD|001085012345", "_count": 1}).json()
        assert studies["total"] == 2 and len(studies["entry"]) == 1
        # Errors are OperationOutcomes; XML is not spoken.
        _outcome(http.get("/fhir/ImagingStudy"), 400)
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "_count": "many"}), 400)
        _outcome(http.get("/fhir/ImagingStudy/1.2.3"), 404)
        _outcome(http.get(f"/fhir/DiagnosticReport/{s1}-v9"), 404)
        _outcome(http.get("/fhir/Practitioner"), 404)
        _outcome(http.get("/fhir/Patient"), 400)  # a search names someone
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "_format": "xml"}), 406)
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001"},
                          headers={"Accept": "application/fhir+xml"}), 406)
        assert http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "_format": "json"}).status_code == 200
        http.headers.pop("Authorization")
        assert _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001"}), 401)["issue"][0]["code"] == "login"
        # The capabilities are public (clients read them before logging in).
        capabilities = http.get("/fhir/metadata")
        assert capabilities.status_code == 200 and capabilities.headers["content-type"].startswith("application/fhir+json")
        statement = capabilities.json()
        assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
        resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
        assert set(resources) == {"Patient", "ImagingStudy", "DiagnosticReport", "Endpoint"}
        assert {p["name"] for p in resources["ImagingStudy"]["searchParam"]} >= {"identifier", "patient"}
    modality = reporting.make_token("ct1", "modality", "CT 1")
    with reporting.http(token=modality) as http:
        _outcome(http.get("/fhir/ImagingStudy", params={"identifier": "ACC001"}), 403)
    # Other APIs keep their own error body.
    with reporting.http() as http:
        assert http.get("/dicom-web/studies/1.2.3/metadata").json()["error"]
        assert http.get("/nowhere").status_code == 404


def _empty_values(value: object, path: str = "$") -> list[str]:
    """Where a FHIR JSON value is empty ("", null, [], {}): R4 json.html 2.6.2 forbids it."""
    if value in ("", None, [], {}) or (isinstance(value, str) and not value.strip()):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _empty_values(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _empty_values(v, f"{path}[{i}]")]
    return []


def _query(url: str) -> list[tuple[str, str]]:
    import urllib.parse

    return urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)


PATIENT_ID_SYSTEM = "https://filmless-pacs.org/fhir/NamingSystem/patient-id"


def test_fhir_resources_are_valid_without_dicom_values(reporting: PacsServer, tmp_path: Path) -> None:
    """A study with no Study/Series Description, Series Number nor accession
    and a report without impression: the absent values are left out (FHIR has
    no empty strings, nulls or empty arrays), and the patient identifier has
    its system, one a patient.identifier search accepts back."""
    from .dicomfiles import make_ct

    ct = make_ct(tmp_path / "bare.dcm", PatientID="BN000700", PatientName="Lê^Văn Bảy",
                 SpecificCharacterSet="ISO_IR 192")
    assert reporting.storescu(str(ct)).returncode == 0
    bare = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    with reporting.http(token=reporting.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{bare}/report", json={"findings": "Không thấy tổn thương.",
                                                             "impression": ""}).status_code == 200
        assert rad.post(f"/api/studies/{bare}/report/sign").status_code == 200
    _sign(reporting, study_uid("S1"))
    with reporting.http() as http:
        study = http.get(f"/fhir/ImagingStudy/{bare}").json()
        assert _empty_values(study) == [], study
        assert "description" not in study
        assert "description" not in study["series"][0] and "number" not in study["series"][0]
        assert study["series"][0]["modality"]["code"] == "CT" and study["series"][0]["instance"][0]["uid"]
        assert study["subject"] == {"reference": "Patient/BN000700",
                                    "identifier": {"system": PATIENT_ID_SYSTEM, "value": "BN000700"},
                                    "display": "Lê Văn Bảy"}
        report = http.get(f"/fhir/DiagnosticReport/{bare}-v1").json()
        assert _empty_values(report) == [], report
        assert "conclusion" not in report and "identifier" not in report
        assert report["subject"]["identifier"]["system"] == PATIENT_ID_SYSTEM
        # A study with its values keeps them; the issuer is in the system.
        full = http.get(f"/fhir/ImagingStudy/{study_uid('S1')}").json()
        assert _empty_values(full) == [] and full["description"] == "CT ngực"
        assert full["series"][0]["number"] == 1
        subject = full["subject"]["identifier"]
        assert subject == {"system": f"{PATIENT_ID_SYSTEM}/CCCD", "value": "001085012345"}
        signed = http.get(f"/fhir/DiagnosticReport/{study_uid('S1')}-v1").json()
        assert signed["conclusion"] == "Bình thường." and signed["identifier"][0]["value"] == "ACC001"
        # The identifier as given out finds the patient's studies again.
        again = http.get("/fhir/ImagingStudy", params={"patient.identifier": f"{subject['system']}|{subject['value']}"})
        assert {e["resource"]["id"] for e in again.json()["entry"]} == {study_uid("S1"), study_uid("S2")}
        mine = http.get("/fhir/ImagingStudy", params={"patient.identifier": f"{PATIENT_ID_SYSTEM}|BN000700"}).json()
        assert [e["resource"]["id"] for e in mine["entry"]] == [bare]
        for bundle in (again.json(), mine):
            assert _empty_values(bundle) == []


def test_fhir_search_links_show_only_the_parameters_applied(reporting: PacsServer) -> None:
    """R4 search 3.1.1.3.4: an unsupported parameter is ignored and left out
    of the self link (which says what was searched), or refused 400 with
    Prefer: handling=strict."""
    with reporting.http() as http:
        lenient = http.get("/fhir/ImagingStudy", params=[("patient.identifier", "CCCD|001085012345"),
                                                         ("date", "ge2030-01-01"), ("_count", "1")])
        assert lenient.status_code == 200
        bundle = lenient.json()
        assert bundle["total"] == 2  # the date was not applied...
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        # ...so the self link does not claim it was.
        assert _query(links["self"]) == [("patient.identifier", "CCCD|001085012345"), ("_count", "1")]
        assert links["self"].startswith(f"http://127.0.0.1:{reporting.http_port}/fhir/ImagingStudy?")
        assert _query(links["next"]) == [("patient.identifier", "CCCD|001085012345"), ("_count", "1"),
                                         ("_offset", "1")]
        assert http.get(links["next"]).json()["total"] == 2
        # A modifier this server does not implement would widen the search if it
        # were ignored (another patient's report): refused, even without strict.
        modified = http.get("/fhir/DiagnosticReport", params={"identifier:exact": "ACC001",
                                                              "patient.identifier": "CCCD|001085012345"})
        assert "modifier" in _outcome(modified, 400)["issue"][0]["diagnostics"]
        # _format is honoured, not a search parameter: accepted, not echoed.
        formatted = http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "_format": "json"}).json()
        assert _query(formatted["link"][0]["url"]) == [("identifier", "ACC001")]
        # No hits: no "entry" at all (FHIR JSON has no empty arrays).
        nothing = http.get("/fhir/ImagingStudy", params={"identifier": "NO-SUCH-ACCESSION"}).json()
        assert nothing["total"] == 0 and "entry" not in nothing

        strict = {"Prefer": "return=representation, handling=strict"}
        refused = _outcome(http.get("/fhir/ImagingStudy", params={"patient.identifier": "CCCD|001085012345",
                                                                  "date": "ge2030-01-01"}, headers=strict), 400)
        assert "date" in refused["issue"][0]["diagnostics"]
        _outcome(http.get("/fhir/DiagnosticReport", params={"identifier": "ACC001", "status": "final"},
                          headers=strict), 400)
        applied = http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "_format": "json"}, headers=strict)
        assert applied.status_code == 200 and applied.json()["total"] == 1
        lenient_header = http.get("/fhir/ImagingStudy", params={"identifier": "ACC001", "date": "x"},
                                  headers={"Prefer": "handling=lenient"})
        assert lenient_header.status_code == 200 and _query(lenient_header.json()["link"][0]["url"]) == [
            ("identifier", "ACC001")]


def test_oru_names_its_interpreter_time_and_unordered_study(reporting: PacsServer, tmp_path: Path) -> None:
    """OBR-32 (principal result interpreter) is the signer, OBR-22 the time of
    the signature; a study no order explains still has OBR-4 (what it is) and
    its accession as OBR-3."""
    import re

    from .peers import wait_until
    from .dicomfiles import make_ct

    ct = make_ct(tmp_path / "bare.dcm", PatientID="BN000701")  # no accession, no description
    assert reporting.storescu(str(ct)).returncode == 0
    bare = str(dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    _sign(reporting, study_uid("S1"))
    _sign(reporting, bare)
    assert wait_until(lambda: len(reporting.his.messages) >= 2, timeout=30)  # type: ignore[attr-defined]

    def obr(message: bytes) -> list[str]:
        return next(s for s in message.decode().split("\r") if s.startswith("OBR|")).split("|")

    messages = reporting.his.messages  # type: ignore[attr-defined]
    by_patient = {("BN000701" if b"BN000701" in m else "P1"): obr(m) for m in messages}
    s1 = by_patient["P1"]
    assert s1[2] == "" and s1[3] == "ACC001" and s1[4] == "^CT ngực^" and s1[18] == "ACC001"
    assert s1[25] == "F" and s1[32] == "bs.tung&Đỗ&Thanh Tùng"
    assert re.fullmatch(r"\d{14}[+-]\d{4}", s1[22]), s1[22]
    signed_at = datetime.strptime(s1[22], "%Y%m%d%H%M%S%z")
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 600
    unordered = by_patient["BN000701"]
    assert unordered[2] == unordered[3] == "" and unordered[4] == "^CT^"
    assert unordered[25] == "F" and unordered[32] == "bs.tung&Đỗ&Thanh Tùng" and unordered[22]


def test_fhir_conformance_of_long_uids_unknown_patients_and_or_searches(reporting: PacsServer,
                                                                        tmp_path: Path) -> None:
    """Findings of a conformance run with fhir.resources: a report of a
    64-character Study UID had a 67-character id (FHIR ids: at most 64); a
    study without patient ID or name had no ImagingStudy.subject (1..1);
    ``identifier=A,B`` (R4: any of) found nothing; a study date without a
    time became midnight in the server's zone; a series without a modality
    (OT) was missing from the study's modalities."""
    import re

    from .dicomfiles import make_ct

    long_uid = "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678"
    assert len(long_uid) == 64
    long_ct = make_ct(tmp_path / "long.dcm", StudyInstanceUID=long_uid, AccessionNumber="LONG64",
                      StudyDate="20240103")
    nobody = make_ct(tmp_path / "nobody.dcm", PatientID=None, PatientName=None, AccessionNumber="NOBODY1",
                     Modality=None)
    for path in (long_ct, nobody):
        assert reporting.storescu(str(path)).returncode == 0
    _sign(reporting, long_uid)
    with reporting.http() as http:
        reports = http.get("/fhir/DiagnosticReport", params={"identifier": "LONG64"}).json()
        report = reports["entry"][0]["resource"]
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", report["id"]), report["id"]
        assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{long_uid}"}]
        read = http.get(reports["entry"][0]["fullUrl"])
        assert read.status_code == 200 and read.json()["id"] == report["id"]

        study = http.get(f"/fhir/ImagingStudy/{long_uid}").json()
        assert study["started"] == "2024-01-03"  # a date alone: no invented midnight nor zone

        unknown = http.get("/fhir/ImagingStudy", params={"identifier": "NOBODY1"}).json()["entry"][0]["resource"]
        assert unknown["subject"]["display"] == "unidentified patient"
        assert unknown["subject"]["reference"].startswith("Patient/--")  # its own Patient, without identifier
        assert unknown["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "OT"}]

        either = http.get("/fhir/ImagingStudy", params={"identifier": "LONG64,NOBODY1"}).json()
        assert either["total"] == 2
        assert {e["resource"]["id"] for e in either["entry"]} == {long_uid, unknown["id"]}
        escaped = http.get("/fhir/ImagingStudy", params={"identifier": r"LONG64\,NOBODY1"}).json()
        assert escaped["total"] == 0  # one accession with a comma in it
        both = http.get("/fhir/ImagingStudy", params=[("identifier", "LONG64"), ("identifier", "NOBODY1")]).json()
        assert both["total"] == 0  # given twice: both must match (it was the last one alone)
        assert sum("identifier=" in part for part in both["link"][0]["url"].split("&")) == 2
