"""A Vietnamese radiologist's reading day, end to end over the real HTTP API,
HL7 MLLP and DICOM: each test a chain of features added at different times.

Bugs found:
- A report (ORU^R01) or order status (ORM^O01) queued while the HIS was down
  went out under the patient it was queued with: after an ADT^A40 merged the
  emergency's temporary number into the citizen ID, the HIS got the ID it had
  merged away.
- Report text typed with combining marks (Unikey's "Unicode tổ hợp", NFD)
  lost tone marks in the signed PDF ("Hằng" printed "Hăng").
- A draft left open on a study whose every image a rejection note withdrew
  (the wrong patient's) could be signed: the ORU^R01 went to this patient at
  the HIS and the PDF brought the study back into their history.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port, run_dcmtk
from .dicomfiles import make_ct
from .pdftext import page_texts
from .peers import MLLPRecorder, serving_with_his
from .test_worklist_ris import _mpps, msa, orm, send

A = ("bs.an", "Nguyễn^Văn An")
B = ("bs.binh", "Trần^Thị Bình")


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive (SQLite) with the HIS listening for ORU^R01 (``day.his``),
    radiologists A (``day.radiologist``) and B (``day.b``)."""
    tmp = tmp_path_factory.mktemp("day")
    his_port, http_port = free_port(), free_port()
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), http_port=http_port,
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}",
                                   "PACS_PUBLIC_URL": f"http://127.0.0.1:{http_port}"})
    with serving_with_his(server, his_port, A) as serving:
        serving.b = serving.make_token(B[0], "radiologist", B[1])  # type: ignore[attr-defined]
        serving.emr = serving.make_token("emr", "emr")  # type: ignore[attr-defined]
        serving.work = tmp  # type: ignore[attr-defined]
        yield serving


def _send_ct(server: PacsServer, study: str, count: int, **attributes: Any) -> list[str]:
    """*count* CT slices of *study* sent with DCMTK storescu; their SOP UIDs."""
    work: Path = server.work  # type: ignore[attr-defined]
    series = generate_uid()
    files, sops = [], []
    for n in range(count):
        sop = generate_uid()
        files.append(str(make_ct(work / f"{sop}.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series,
                                 InstanceNumber=n + 1, SpecificCharacterSet="ISO_IR 192", Modality="CT",
                                 StudyDate="20261207", StudyTime="081500", PixelSpacing=[0.7, 0.7],
                                 **attributes)))
        sops.append(sop)
    sent = server.storescu(*files)
    assert sent.returncode == 0, sent.stderr
    return sops


def _orus(server: PacsServer, count: int, study: str) -> list[str]:
    """The ORU^R01 of *study* the HIS received, once there are *count* (or after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        orus = [m.decode() for m in list(server.his.messages)  # type: ignore[attr-defined]
                if b"ORU^R01" in m and study.encode() in m]
        if len(orus) >= count or time.monotonic() > deadline:
            return orus
        time.sleep(0.1)


def test_a_stat_ct_read_signed_amended_and_shared(day: PacsServer) -> None:
    study, accession, cccd = generate_uid(), "CT26-0001", "079190001234"
    name = "Phạm^Thị Hằng"
    ack = send(day, orm("D1", accession, name=name, pid=cccd, study_uid=study).replace(
        "^^^20241121090000^^R", "^^^20241121090000^^S"))
    assert msa(ack)[0] == "AA", ack
    sops = _send_ct(day, study, 3, PatientID="TYPED", PatientName="PHAM^THI HANG", AccessionNumber=accession)
    a, b = day.radiologist, day.b  # type: ignore[attr-defined]
    with day.http(token=a) as rad_a, day.http(token=b) as rad_b:
        found = rad_a.get("/api/worklist", params={"patient_id": cccd}).json()
        item = next(i for i in found["items"] if i["study_uid"] == study)
        assert item["priority"] == "STAT" and found["urgent_unread"] >= 1
        assert item["patient_name"] == name, item
        assert rad_a.post(f"/api/studies/{study}/claim").status_code == 200
        assert rad_b.post(f"/api/studies/{study}/claim").status_code == 409

        made = rad_a.post("/api/report-templates", json={
            "name": "CT sọ não không cản quang - bình thường", "modality": "CT", "body_part": "HEAD",
            "findings": "Nhu mô não không thấy ổ tăng/giảm tỷ trọng bất thường.",
            "impression": "Không thấy tổn thương nội sọ trên CT."})
        assert made.status_code == 201, made.text
        listed = rad_a.get("/api/report-templates", params={"q": "so nao", "modality": "CT"}).json()
        template = next(t for t in listed["items"] if t["id"] == made.json()["id"])

        saved = rad_a.put(f"/api/studies/{study}/report", json={
            "findings": template["findings"], "impression": template["impression"], "revision": 0,
            "template_id": template["id"], "template_version": template["version"]})
        assert saved.status_code == 200, saved.text
        clash = rad_b.put(f"/api/studies/{study}/report", json={"findings": "x", "impression": "y", "revision": 0})
        assert clash.status_code == 409
        revision = saved.json()["current"]["revision"]

        keys = rad_a.put(f"/api/studies/{study}/key-images", json={"images": [{"sop_uid": sops[1], "frame": 1}]})
        assert keys.status_code == 200, keys.text
        marks = rad_a.put(f"/api/studies/{study}/annotations", json={"measurements": [
            {"sop_uid": sops[1], "frame": 1, "kind": "length", "points": [[1, 1], [10, 1]], "label": "6.3 mm"}]})
        assert marks.status_code == 200, marks.text

        signed = rad_a.post(f"/api/studies/{study}/report/sign", json={"revision": revision})
        assert signed.status_code == 200, signed.text
        pdf = rad_a.get(f"/api/studies/{study}/report/pdf").content
        text = "\n".join(page_texts(pdf))
        assert "Phạm Thị Hằng" in text or "Phạm^Thị Hằng" in text, text
        assert "tăng/giảm tỷ trọng" in text, text
        oru = _orus(day, 1, study)
        assert oru and name in oru[-1] and cccd in oru[-1] and accession in oru[-1], oru

        amended = rad_a.post(f"/api/studies/{study}/report/amend")
        assert amended.status_code == 200
        current = amended.json()["current"]
        saved = rad_a.put(f"/api/studies/{study}/report", json={
            "findings": current["findings"] + " Bổ sung: nốt vôi hóa 2 mm thùy trán phải.",
            "impression": current["impression"], "revision": current["revision"]})
        assert saved.status_code == 200, saved.text
        signed = rad_a.post(f"/api/studies/{study}/report/sign", json={"revision": saved.json()["current"]["revision"]})
        assert signed.status_code == 200, signed.text
        orus = _orus(day, 2, study)
        assert len(orus) >= 2 and "nốt vôi hóa" in orus[-1], orus

    with day.http(token=day.emr) as emr:  # type: ignore[attr-defined]
        report = emr.get(f"/fhir/DiagnosticReport/{study}").json()
        assert report["status"] == "amended" and report["meta"]["versionId"] == "2", report
        first = emr.get(f"/fhir/DiagnosticReport/{study}/_history/1").json()
        assert first["status"] == "final" and "nốt vôi hóa" not in base64.b64decode(
            first["presentedForm"][1]["data"]).decode()
        subject = emr.get(f"/fhir/{report['subject']['reference']}").json()
        assert subject["name"][0]["family"] == "Phạm", subject
        found = emr.get("/fhir/DiagnosticReport", params={"patient.identifier": f"CCCD|{cccd}"}).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [study], found
    with day.http() as admin:
        docs = admin.get(f"/dicom-web/studies/{study}/series", params={"Modality": "DOC"}).json()
        assert len(docs) == 2, docs
        share = admin.post(f"/api/studies/{study}/shares", json={"days": 7})
        assert share.status_code == 201, share.text


def _sign(http: Any, study: str, findings: str, impression: str) -> dict[str, Any]:
    """Save a draft (over the current revision) and sign it; the answer."""
    current = http.get(f"/api/studies/{study}/report").json()["current"]
    revision = current["revision"] if current else 0
    saved = http.put(f"/api/studies/{study}/report", json={"findings": findings, "impression": impression,
                                                           "revision": revision})
    assert saved.status_code == 200, saved.text
    signed = http.post(f"/api/studies/{study}/report/sign", json={"revision": saved.json()["current"]["revision"]})
    assert signed.status_code == 200, signed.text
    return signed.json()


def test_a_signed_study_moved_to_its_patient_follows_them(day: PacsServer) -> None:
    """The technologist picked the wrong patient; the report was signed before
    anyone saw it; the study is moved: the HIS has the report posted as
    wrong for the patient it left and sent for the right one; FHIR,
    worklist, the amended report's ORU and PDF name the right patient."""
    study = generate_uid()
    wrong, right = "001185009999", "038092004321"
    sops = _send_ct(day, study, 2, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName="Lê^Văn Sai",
                    PatientBirthDate="19850101", PatientSex="M", AccessionNumber="CT26-0002")
    a = day.radiologist  # type: ignore[attr-defined]
    with day.http(token=a) as rad:
        assert rad.put(f"/api/studies/{study}/key-images",
                       json={"images": [{"sop_uid": sops[0], "frame": 1}]}).status_code == 200
        _sign(rad, study, "Gan kích thước bình thường.", "Không thấy bất thường.")
    assert len(_orus(day, 1, study)) == 1
    with day.http() as admin:
        moved = admin.post(f"/api/studies/{study}/patient", json={
            "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng", "birth_date": "19920304", "sex": "F"},
            "reason": "kỹ thuật viên chọn nhầm bệnh nhân"})
        assert moved.status_code == 200, moved.text
        found = admin.get("/api/worklist", params={"patient_id": right}).json()
        assert [i["study_uid"] for i in found["items"]] == [study]
        assert found["items"][0]["patient_name"] == "Đặng^Thị Đúng"
        assert admin.get("/api/worklist", params={"patient_id": wrong}).json()["items"] == []
    with day.http(token=day.emr) as emr:  # type: ignore[attr-defined]
        report = emr.get(f"/fhir/DiagnosticReport/{study}").json()
        assert report["subject"]["identifier"]["value"] == right, report["subject"]
        by_right = emr.get("/fhir/DiagnosticReport", params={"patient.identifier": f"CCCD|{right}"}).json()
        assert [e["resource"]["id"] for e in by_right.get("entry", [])] == [study]
        by_wrong = emr.get("/fhir/DiagnosticReport", params={"patient.identifier": f"CCCD|{wrong}"}).json()
        assert by_wrong.get("entry", []) == []
        imaging = emr.get(f"/fhir/ImagingStudy/{study}").json()
        assert imaging["subject"]["identifier"]["value"] == right
    with day.http(token=a) as rad:
        keys = rad.get(f"/api/studies/{study}/key-images").json()
        assert [i["sop_uid"] for i in keys["images"]] == [sops[0]]
        amended = rad.post(f"/api/studies/{study}/report/amend")
        assert amended.status_code == 200, amended.text
        _sign(rad, study, "Gan kích thước bình thường. Đã chuyển đúng bệnh nhân.", "Không thấy bất thường.")
        text = "\n".join(page_texts(rad.get(f"/api/studies/{study}/report/pdf").content))
        assert right in text and wrong not in text and "Đúng" in text, text
    # The HIS had the first version under the wrong patient: posted as wrong there (OBX-11 W), sent for the
    # right one, then the amendment (C).
    orus = _orus(day, 4, study)
    assert len(orus) == 4
    assert f"PID|1||{wrong}^^^CCCD" in orus[1] and "|W\r" in orus[1], orus[1]
    assert all(right in m and wrong not in m and "Đặng" in m for m in orus[2:]), orus[2:]
    # The PACS clients find both PDFs under the right patient, and retrieve them with the right header.
    out = day.work / f"find-{study}"  # type: ignore[attr-defined]
    out.mkdir()
    found = run_dcmtk("findscu", "-S", "-aec", day.ae_title, "-X", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
                      "-k", f"StudyInstanceUID={study}", "-k", "Modality=DOC", "-k", "SeriesInstanceUID",
                      "-k", "PatientID", "-k", "SpecificCharacterSet=ISO_IR 192", "-k", "PatientName",
                      "127.0.0.1", str(day.dicom_port))
    assert found.returncode == 0, found.stderr
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert len(answers) == 2 and {str(a.PatientID) for a in answers} == {right}, answers
    with day.http() as admin:
        pdfs = admin.get(f"/dicom-web/studies/{study}/series", params={"Modality": "DOC"}).json()
        for series in pdfs:
            series_uid = series["0020000E"]["Value"][0]
            listed = admin.get(f"/dicom-web/studies/{study}/series/{series_uid}/instances").json()
            sop = listed[0]["00080018"]["Value"][0]
            got = admin.get("/wado", params={"requestType": "WADO", "studyUID": study, "seriesUID": series_uid,
                                             "objectUID": sop, "contentType": "application/dicom"})
            assert got.status_code == 200, got.text
            header = dcmread(io.BytesIO(got.content), stop_before_pixels=True)
            assert (str(header.PatientID), str(header.PatientName)) == (right, "Đặng^Thị Đúng")
            pdf = admin.get("/wado", params={"requestType": "WADO", "studyUID": study, "seriesUID": series_uid,
                                             "objectUID": sop, "contentType": "application/pdf"})
            assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        token = admin.post(f"/api/studies/{study}/shares", json={"days": 7}).json()["url"].rsplit("/", 1)[1]
    with day.http() as admin:
        media = admin.get(f"/api/studies/{study}/media")
        assert media.status_code == 200, media.text
        with zipfile.ZipFile(io.BytesIO(media.content)) as disc:
            names = [n for n in disc.namelist() if n.startswith("DICOM/") or n == "DICOMDIR"]
            headers = [dcmread(io.BytesIO(disc.read(n)), stop_before_pixels=True, force=True) for n in names]
        ids = {str(h.PatientID) for h in headers if "PatientID" in h}
        ids |= {str(r.PatientID) for h in headers for r in h.get("DirectoryRecordSequence", []) if "PatientID" in r}
        assert ids == {right}, ids
        events = admin.get("/api/audit", params={"study": study, "limit": 1000}).json()
    signs = [e["patient_id"] for e in events if e["action"] == "report-sign"]
    assert len(signs) == 2 and set(signs) == {f"{wrong}^^^CCCD", f"{right}^^^CCCD"}, signs
    assert signs[0] == f"{right}^^^CCCD", signs  # newest first: the amendment's signature, after the move
    with httpx.Client(base_url=f"http://127.0.0.1:{day.http_port}", timeout=30) as phone:
        # The birth year is the right patient's, not the one the study was typed under.
        assert phone.post(f"/share/{token}/birth-year", json={"birth_year": "1985"}).status_code == 403
        assert phone.post(f"/share/{token}/birth-year", json={"birth_year": "1992"}).status_code == 204
        page = phone.get(f"/share/{token}/study")
        assert page.status_code == 200, page.text
        shown = page.json()
        assert "Đặng" in json.dumps(shown, ensure_ascii=False) and "Sai" not in json.dumps(shown, ensure_ascii=False)
        assert phone.get(f"/share/{token}/report.pdf").status_code == 200


def _a40(control: str, survivor: str, name: str, merged: str) -> str:
    return (f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261207100000||ADT^A40|{control}|P|2.5|||||VN|UNICODE UTF-8\n"
            f"EVN|A40|20261207100000\n"
            f"PID|1||{survivor}^^^CCCD^NI||{name}||19900101|M\n"
            f"MRG|{merged}^^^BVDK^MR")


def test_an_unidentified_emergency_patient_identified_after_the_signature(day: PacsServer) -> None:
    """A STAT CT of an unknown patient under the emergency's temporary number
    is read and signed; the HIS then merges that number into the patient's
    citizen ID (ADT^A40): the report, FHIR and the amendment's ORU follow."""
    study, accession, temporary, cccd = generate_uid(), "CT26-0003", "VD20261207001", "001090012345"
    message = orm("D3", accession, name="Vô Danh^Nam", pid=temporary, study_uid=study)
    message = message.replace(f"{temporary}^^^CCCD^NI~DN4797912345678^^^BHYT^HC", f"{temporary}^^^BVDK^MR")
    assert msa(send(day, message.replace("^^^20241121090000^^R", "^^^20241121090000^^S")))[0] == "AA"
    _send_ct(day, study, 2, PatientID=temporary, PatientName="VO DANH^NAM", AccessionNumber=accession)
    a = day.radiologist  # type: ignore[attr-defined]
    with day.http(token=a) as rad:
        urgent = rad.get("/api/worklist").json()["urgent_unread"]
        _sign(rad, study, "Tụ máu dưới màng cứng bán cầu trái dày 8 mm.", "Tụ máu dưới màng cứng cấp.")
        assert rad.get("/api/worklist").json()["urgent_unread"] == urgent - 1
    assert len(_orus(day, 1, study)) == 1
    assert msa(send(day, _a40("A40-3", cccd, "Hoàng^Văn Minh", temporary)))[0] == "AA"
    with day.http(token=day.emr) as emr:  # type: ignore[attr-defined]
        report = emr.get(f"/fhir/DiagnosticReport/{study}").json()
        assert report["subject"]["identifier"]["value"] == cccd, report["subject"]
        assert report["subject"]["display"] == "Hoàng Văn Minh"
        found = emr.get("/fhir/DiagnosticReport", params={"patient.identifier": f"CCCD|{cccd}"}).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [study], found
        patient = emr.get(f"/fhir/{report['subject']['reference']}").json()
        assert patient.get("active", True) and patient["name"][0]["family"] == "Hoàng", patient
        # The EMR kept the temporary patient's id: it reads as replaced, and finds the report.
        old = emr.get(f"/fhir/Patient/BVDK.{temporary}").json()
        assert old.get("active") is False and old["link"][0]["type"] == "replaced-by", old
        by_old = emr.get("/fhir/DiagnosticReport", params={"patient": f"Patient/BVDK.{temporary}"}).json()
        assert [e["resource"]["id"] for e in by_old.get("entry", [])] == [study], by_old
        by_old_id = emr.get("/fhir/DiagnosticReport", params={"patient.identifier": f"BVDK|{temporary}"}).json()
        assert [e["resource"]["id"] for e in by_old_id.get("entry", [])] == [study], by_old_id
    with day.http(token=a) as rad:
        found = rad.get("/api/worklist", params={"patient_id": cccd}).json()
        assert [i["study_uid"] for i in found["items"]] == [study]
        assert found["items"][0]["patient_name"] == "Hoàng^Văn Minh"
        assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        _sign(rad, study, "Tụ máu dưới màng cứng bán cầu trái dày 8 mm, đẩy lệch đường giữa 3 mm.",
              "Tụ máu dưới màng cứng cấp.")
        text = "\n".join(page_texts(rad.get(f"/api/studies/{study}/report/pdf").content))
        assert cccd in text and "Hoàng" in text, text
    orus = _orus(day, 2, study)
    assert len(orus) == 2 and f"PID|1||{cccd}^^^CCCD" in orus[-1] and "Hoàng^Văn Minh" in orus[-1], orus[-1]


def test_an_image_rejected_after_it_was_marked_and_measured(day: PacsServer) -> None:
    """The technologist withdraws a slice (failed exposure) the radiologist
    had marked as key image and measured: the viewer's next saves (what it
    holds as ``mine`` plus the new mark) still work, the PDF signed then and
    the share page leave the slice out."""
    study = generate_uid()
    sops = _send_ct(day, study, 3, PatientID="079300001111", IssuerOfPatientID="CCCD", PatientName="Bùi^Thị Lan",
                    PatientBirthDate="19800808", AccessionNumber="CT26-0004")
    a = day.radiologist  # type: ignore[attr-defined]
    with day.http(token=a) as rad:
        assert rad.put(f"/api/studies/{study}/key-images",
                       json={"images": [{"sop_uid": sops[0], "frame": 1}]}).status_code == 200
        length = {"sop_uid": sops[0], "frame": 1, "kind": "length", "points": [[1, 1], [10, 1]], "label": "6.3 mm"}
        assert rad.put(f"/api/studies/{study}/annotations", json={"measurements": [length]}).status_code == 200
        rad.put(f"/api/studies/{study}/report", json={"findings": "Đang đọc.", "impression": "", "revision": 0})
    with day.http() as admin:
        rejected = admin.post("/api/rejections/reject", json={
            "study_uid": study, "sop_uids": [sops[0]], "code": "113001", "reason": "ảnh chụp hỏng, chụp lại"})
        assert rejected.status_code == 200, rejected.text
    with day.http(token=a) as rad:
        keys = rad.get(f"/api/studies/{study}/key-images").json()
        assert keys["images"] == [], keys["images"]
        mine = keys["mine"]
        saved = rad.put(f"/api/studies/{study}/key-images",
                        json={"images": [*mine, {"sop_uid": sops[2], "frame": 1}]})
        assert saved.status_code == 200, saved.text
        assert [i["sop_uid"] for i in saved.json()["images"]] == [sops[2]]
        marks = rad.get(f"/api/studies/{study}/annotations").json()
        assert sops[0] not in {i["sop_uid"] for i in marks["images"]}, marks["images"]
        more = {"sop_uid": sops[2], "frame": 1, "kind": "length", "points": [[2, 2], [2, 12]], "label": "7.0 mm"}
        saved = rad.put(f"/api/studies/{study}/annotations", json={"measurements": [*marks["mine"], more]})
        assert saved.status_code == 200, saved.text
        _sign(rad, study, "Nốt mờ 7 mm thùy dưới phổi phải.", "Nốt phổi, theo dõi sau 6 tháng.")
        marks = rad.get(f"/api/studies/{study}/annotations").json()
        assert {i["sop_uid"] for i in marks["images"]} == {sops[2]}, marks["images"]


def test_a_report_waiting_for_the_his_goes_out_under_the_merged_patient(day: PacsServer) -> None:
    """The HIS is down when the emergency CT's report is signed; back up, it
    first merges the temporary number into the citizen ID (ADT^A40), then
    takes the queued ORU^R01: the result names the patient the HIS keeps,
    not the ID it merged away (which it would refuse, parking the report)."""
    study, accession, temporary, cccd = generate_uid(), "CT26-0005", "VD20261207002", "001090054321"
    message = orm("D5", accession, name="Vô Danh^Nữ", pid=temporary, study_uid=study)
    message = message.replace(f"{temporary}^^^CCCD^NI~DN4797912345678^^^BHYT^HC", f"{temporary}^^^BVDK^MR")
    assert msa(send(day, message.replace("^^^20241121090000^^R", "^^^20241121090000^^S")))[0] == "AA"
    _send_ct(day, study, 1, PatientID=temporary, PatientName="VO DANH^NU", AccessionNumber=accession)
    his = day.his  # type: ignore[attr-defined]
    his.stop()
    try:
        # The CT room says the examination started (MPPS): the HIS is to be told (ORM^O01 IP).
        started = Dataset()
        started.PerformedProcedureStepStatus = "IN PROGRESS"
        started.Modality, started.PerformedStationAETitle = "CT", "CT_ROOM1"
        started.PerformedProcedureStepStartDate, started.PerformedProcedureStepStartTime = "20261207", "081500"
        started.PerformedProcedureStepID = "PPS-D5"
        step = Dataset()
        step.AccessionNumber, step.StudyInstanceUID, step.ScheduledProcedureStepID = accession, study, f"SPS{accession}"
        started.ScheduledStepAttributesSequence = Sequence([step])
        assert _mpps(day, generate_uid(), started, create=True) == 0
        with day.http(token=day.radiologist) as rad:  # type: ignore[attr-defined]
            _sign(rad, study, "Không thấy chảy máu nội sọ.", "CT sọ não bình thường.")
        assert msa(send(day, _a40("A40-5", cccd, "Trịnh^Thị Mai", temporary)))[0] == "AA"
    finally:
        day.his = MLLPRecorder(his.port)  # type: ignore[attr-defined]
    orus = _orus(day, 1, study)
    assert len(orus) == 1
    assert f"PID|1||{cccd}^^^CCCD" in orus[0] and "Trịnh^Thị Mai" in orus[0], orus[0]
    assert temporary not in orus[0].split("\r")[1], orus[0]
    # So does the order's status queued before it.
    statuses = [m.decode() for m in list(day.his.messages)  # type: ignore[attr-defined]
                if b"ORM^O01" in m and accession.encode() in m]
    assert statuses and all(f"PID|1||{cccd}^^^CCCD" in m for m in statuses), statuses


def test_a_report_typed_in_composed_unicode_keeps_its_tone_marks_in_the_pdf(day: PacsServer) -> None:
    """Unikey's "Unicode tổ hợp" (a letter then its combining marks, NFD) is a
    common keyboard setting: the signed PDF prints "Hằng", never "Hăng" (the
    font draws no stacked marks: the grave over the breve was lost)."""
    import unicodedata

    study = generate_uid()
    _send_ct(day, study, 1, PatientID="079300002222", IssuerOfPatientID="CCCD", PatientName="Lý^Thị Hằng",
             AccessionNumber="CT26-0006")
    findings = "Bệnh nhân Lý Thị Hằng: nốt mờ ở thùy trên phổi phải, bờ đều."
    impression = "Theo dõi nốt phổi; đối chiếu phim cũ."
    with day.http(token=day.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, unicodedata.normalize("NFD", findings), unicodedata.normalize("NFD", impression))
        text = "\n".join(page_texts(rad.get(f"/api/studies/{study}/report/pdf").content))
    assert findings in text and impression in text, ascii(text)



def test_a_study_withdrawn_as_the_wrong_patients_is_not_signed(day: PacsServer) -> None:
    """The radiologist has a draft open when the technologist withdraws every
    image as sent under the wrong patient (113038): the signature is refused,
    409. Signed, an ORU^R01 of another person's images went to this patient's
    record at the HIS, and the study (its report PDF) came back into this
    patient's history: worklist, FHIR, QIDO."""
    study, pid = generate_uid(), "079300003333"
    _send_ct(day, study, 2, PatientID=pid, IssuerOfPatientID="CCCD", PatientName="Mai^Văn Nhầm",
             AccessionNumber="CT26-0007")
    with day.http(token=day.radiologist) as rad:  # type: ignore[attr-defined]
        saved = rad.put(f"/api/studies/{study}/report", json={
            "findings": "Gãy cổ xương đùi phải.", "impression": "Gãy cổ xương đùi phải.", "revision": 0})
        assert saved.status_code == 200
    with day.http() as admin:
        rejected = admin.post("/api/rejections/reject", json={
            "study_uid": study, "code": "113038", "reason": "chụp nhầm bệnh nhân BN khác"})
        assert rejected.status_code == 200, rejected.text
    with day.http(token=day.radiologist) as rad:  # type: ignore[attr-defined]
        signed = rad.post(f"/api/studies/{study}/report/sign", json={"revision": saved.json()["current"]["revision"]})
        assert signed.status_code == 409, signed.text
        assert "withdrawn" in signed.text, signed.text
        assert rad.get(f"/api/studies/{study}/report").json()["status"] == "draft"
    with day.http() as admin:
        assert admin.get("/api/worklist", params={"patient_id": pid}).json()["items"] == []
        assert admin.get("/fhir/ImagingStudy", params={"patient.identifier": f"CCCD|{pid}"}).json()["total"] == 0
        docs = admin.get(f"/dicom-web/studies/{study}/series", params={"Modality": "DOC"})
        assert docs.status_code == 204 or docs.json() == [], docs.text
    assert not [m for m in day.his.messages if study.encode() in m]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """An archive with report_signature = radiologist: bs.an's certificate
    imported with a Vietnamese PIN (``signing.radiologist``: their token)."""
    from .test_report_digital_signature import P12_PASSWORD, Pki, import_cert

    tmp = tmp_path_factory.mktemp("kyso-day")
    pki = Pki(tmp / "pki")
    p12 = pki.p12("an", "Nguyễn Văn An")
    his_port, http_port = free_port(), free_port()
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), http_port=http_port,
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_REPORT_SIGNATURE": "radiologist",
                                   "PACS_REPORT_TRUST_ROOTS": str(pki.ca_pem),
                                   "PACS_PUBLIC_URL": f"http://127.0.0.1:{http_port}"})
    with serving_with_his(server, his_port, A) as serving:
        done = import_cert(serving, A[0], p12, f"{P12_PASSWORD}\n{SIGNING_PIN}\n")
        assert done.returncode == 0, done.stdout + done.stderr
        serving.work = tmp  # type: ignore[attr-defined]
        yield serving


SIGNING_PIN = "Mật khẩu ký 2026"


def test_a_digitally_signed_report_amended_after_key_images_and_a_move(signing: PacsServer) -> None:
    """Signed with the PIN typed decomposed (a Mac), the study moved to its
    right patient, amended and signed again: both versions verify, the
    amendment names the right patient."""
    import unicodedata

    study = generate_uid()
    sops = _send_ct(signing, study, 2, PatientID="001185007777", IssuerOfPatientID="CCCD", PatientName="Hồ^Văn Sai",
                    AccessionNumber="CT26-0101", InstitutionName="Bệnh viện Đa khoa tỉnh Quảng Ngãi")
    with signing.http(token=signing.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{study}/key-images",
                       json={"images": [{"sop_uid": sops[1], "frame": 1}]}).status_code == 200
        saved = rad.put(f"/api/studies/{study}/report", json={"findings": "Sỏi thận trái 6 mm.",
                                                               "impression": "Sỏi thận trái.", "revision": 0})
        assert saved.json()["digital_signature"] == {"mode": "radiologist", "pin_required": True}
        revision = saved.json()["current"]["revision"]
        assert rad.post(f"/api/studies/{study}/report/sign", json={"revision": revision}).status_code == 422
        wrong = rad.post(f"/api/studies/{study}/report/sign", json={"revision": revision, "pin": "Mat khau ky 2026"})
        assert wrong.status_code == 403, wrong.text
        signed = rad.post(f"/api/studies/{study}/report/sign",
                          json={"revision": revision, "pin": unicodedata.normalize("NFD", SIGNING_PIN)})
        assert signed.status_code == 200, signed.text
        first = rad.get(f"/api/studies/{study}/report/signature").json()
        assert first["version"] == 1 and first["signatures"], first
    assert len(_orus(signing, 1, study)) == 1  # the HIS has it under the patient it was sent with
    with signing.http() as admin:
        moved = admin.post(f"/api/studies/{study}/patient", json={
            "patient": {"id": "038092008888", "issuer": "CCCD", "name": "Hồ^Văn Đúng"}, "reason": "nhầm bệnh nhân"})
        assert moved.status_code == 200, moved.text
    with signing.http(token=signing.radiologist) as rad:  # type: ignore[attr-defined]
        current = rad.post(f"/api/studies/{study}/report/amend").json()["current"]
        saved = rad.put(f"/api/studies/{study}/report", json={
            "findings": current["findings"] + " Thận phải bình thường.", "impression": current["impression"],
            "revision": current["revision"]})
        signed = rad.post(f"/api/studies/{study}/report/sign",
                          json={"revision": saved.json()["current"]["revision"], "pin": SIGNING_PIN})
        assert signed.status_code == 200, signed.text
        for version in (1, 2):
            check = rad.get(f"/api/studies/{study}/report/signature", params={"version": version}).json()
            assert check["version"] == version and check["signatures"], check
            assert all(s["intact"] and s["trusted"] for s in check["signatures"]), check
        text = "\n".join(page_texts(rad.get(f"/api/studies/{study}/report/pdf").content))
        assert "038092008888" in text and "Hồ Văn Đúng" in text, text
    orus = _orus(signing, 4, study)  # signed, posted as wrong for the patient it left, sent again, amended
    assert len(orus) == 4 and "001185007777" in orus[1] and all("038092008888" in m for m in orus[2:]), orus
