"""Issue 6 acceptance 2: a signed report is an Encapsulated PDF in the study
(WADO-RS), a FHIR DiagnosticReport with the PDF, and an ORU^R01 at the HIS."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import EncapsulatedPDFStorage

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder
from .qr_corpus import study_uid, write_corpus


@pytest.fixture
def reporting(tmp_path: Path) -> Iterator[PacsServer]:
    his_port = free_port()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    write_corpus(tmp_path / "corpus")
    server.cli("import", str(tmp_path / "corpus"))
    server.start()
    server.his = MLLPRecorder(his_port)  # type: ignore[attr-defined]
    server.radiologist = server.make_token("bs.tung", "radiologist", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    yield server
    server.his.stop()  # type: ignore[attr-defined]
    server.stop()


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
        viewer = study["extension"][0]["valueUrl"]
        assert http.get(viewer, follow_redirects=False).headers["location"] == f"/#/study/{s1}"
        reports = http.get("/fhir/DiagnosticReport", params={"patient.identifier": "CCCD|001085012345"}).json()
        assert reports["total"] == 1
        report = reports["entry"][0]["resource"]
        assert report["status"] == "final" and report["imagingStudy"] == [{"reference": f"ImagingStudy/{s1}"}]
        assert report["conclusion"] == "Không thấy bất thường trên CT ngực."
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

