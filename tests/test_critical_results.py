"""Critical results (pacs.critical_results): a radiologist signs a report
flagged critical over the HTTP API; the stand-in HIS receives the ORU^R01
with OBX-8 "AA" and the note over MLLP, the EMR reads a DiagnosticReport
with conclusionCode AA, the signed PDF says so, the result stays on the
open list until the referring doctor's acknowledgement, which is audited,
counted by `pacs activity`, and cannot be made twice. A report not flagged
carries none of it; a note without the flag, or with control characters,
is refused. One `pacs serve` on SQLite + filesystem, DCMTK storescu.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .pdftext import page_texts
from .peers import free_port, serving_with_his
from .test_web_viewer import USERNAME, _log_in, answering, page, radiologist_server  # noqa: F401 (fixtures)

NOTE = "Tràn khí màng phổi phải lượng nhiều, cần dẫn lưu ngay"
REFERRING = "Lê^Thị Lan"


@pytest.fixture
def hospital(tmp_path: Path) -> Iterator[PacsServer]:
    his_port = free_port()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HIS_RETRY_SECONDS": "0.1"})
    with serving_with_his(server, his_port, ("bs.tung", "Đỗ^Thanh Tùng")) as serving:
        yield serving


def _study(server: PacsServer, folder: Path, accession: str) -> str:
    folder.mkdir()
    study = generate_uid()
    ct = make_ct(folder / "ct.dcm", StudyInstanceUID=study, PatientID=f"CR-{accession}", AccessionNumber=accession,
                 PatientName="Nguyễn^Văn An", SpecificCharacterSet="ISO_IR 192", ReferringPhysicianName=REFERRING)
    assert server.storescu(str(ct)).returncode == 0
    return study


def _oru(server: PacsServer, accession: str) -> list[str]:
    """The segments of the ORU^R01 the HIS received for *accession*."""
    server.his.wait_for(1)  # type: ignore[attr-defined]
    for _ in range(100):
        found = [m for m in server.his.messages if b"ORU^R01" in m and accession.encode() in m]  # type: ignore
        if found:
            return found[-1].decode("utf-8").split("\r")
        server.his.wait_for(len(server.his.messages) + 1, timeout=0.3)  # type: ignore[attr-defined]
    raise AssertionError(f"no ORU^R01 for {accession}")


def test_a_critical_result_reaches_the_his_and_stays_open_until_acknowledged(hospital: PacsServer,
                                                                             tmp_path: Path) -> None:
    server = hospital
    critical, normal = _study(server, tmp_path / "crit", "CRIT-1"), _study(server, tmp_path / "norm", "NORM-1")
    with server.http(server.radiologist) as rad:  # type: ignore[attr-defined]
        for study in (critical, normal):
            assert rad.put(f"/api/studies/{study}/report", json={
                "findings": "Tràn khí màng phổi phải.", "impression": "Tràn khí màng phổi phải lượng nhiều."}
            ).status_code == 200
        # Refused: a note without the flag, a note with control characters; the draft stays.
        refused = rad.post(f"/api/studies/{critical}/report/sign", json={"critical_note": NOTE})
        assert refused.status_code == 400 and "not flagged critical" in refused.text
        refused = rad.post(f"/api/studies/{critical}/report/sign", json={"critical": True, "critical_note": "a\x07b"})
        assert refused.status_code == 400 and "control characters" in refused.text
        signed = rad.post(f"/api/studies/{critical}/report/sign", json={"critical": True, "critical_note": NOTE})
        assert signed.status_code == 200, signed.text
        flagged = signed.json()["current"]["critical"]
        assert flagged["note"] == NOTE and flagged["flagged_by"] == "bs.tung" and flagged["acknowledged_at"] is None
        assert rad.post(f"/api/studies/{normal}/report/sign").status_code == 200
        pdf = rad.get(f"/api/studies/{critical}/report/pdf").content
        plain = rad.get(f"/api/studies/{normal}/report/pdf").content
        listed = rad.get("/api/critical").json()
    assert f"KẾT QUẢ NGUY KỊCH / CRITICAL RESULT: {NOTE}" in " ".join(page_texts(pdf)[0].split())  # wrapped
    assert "NGUY KỊCH" not in page_texts(plain)[0]
    assert listed["total"] == 1 and [c["study_uid"] for c in listed["critical"]] == [critical]
    assert listed["critical"][0]["patient_name"] == "Nguyễn^Văn An"

    # The HIS: OBX-8 "AA" on the impression and on the note; nothing flagged on the normal report.
    obx = [s.split("|") for s in _oru(server, "CRIT-1") if s.startswith("OBX|")]
    flags = {fields[3]: fields[8] for fields in obx}
    assert flags["19005-8^Impression^LN"] == "AA" and flags["59776-5^Findings^LN"] == ""
    assert flags["CRITICAL^Critical result^L"] == "AA"
    assert [f[5] for f in obx if f[3] == "CRITICAL^Critical result^L"] == [NOTE]
    assert all(fields[8] == "" for fields in (s.split("|") for s in _oru(server, "NORM-1") if s.startswith("OBX|")))

    # The EMR reads it as critically abnormal.
    emr = server.make_token("emr", "emr")
    with server.http(emr) as http:
        report = http.get(f"/fhir/DiagnosticReport/{critical}").json()
        assert report["conclusionCode"][0]["coding"][0]["code"] == "AA"
        assert report["conclusionCode"][0]["text"] == NOTE
        assert "conclusionCode" not in http.get(f"/fhir/DiagnosticReport/{normal}").json()

    # The referring doctor told by phone acknowledges it; a second acknowledgement is refused.
    referring = server.make_token("bs.lan", "referring", REFERRING)
    told = "BS. Lan, khoa Cấp cứu, qua điện thoại"
    with server.http(referring) as http:
        url = f"/api/studies/{critical}/report/critical/ack"
        assert http.post(url, json={"acknowledgement": "   "}).status_code == 400
        done = http.post(url, json={"acknowledgement": told})
        assert done.status_code == 200, done.text
        assert done.json()["acknowledged_by"] == "bs.lan" and done.json()["acknowledgement"] == told
        again = http.post(url, json={"acknowledgement": told})
        assert again.status_code == 409 and "acknowledged already by bs.lan" in again.text
        assert http.post(f"/api/studies/{normal}/report/critical/ack", json={"acknowledgement": told}
                         ).status_code == 404
    with server.http(server.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.get("/api/critical").json()["total"] == 0
        everything = rad.get("/api/critical", params={"state": "all"}).json()["critical"]
        assert [(c["study_uid"], c["acknowledgement"]) for c in everything] == [(critical, told)]
        assert rad.get("/api/critical", params={"state": "maybe"}).status_code == 400
        assert rad.get(f"/api/studies/{critical}/report").json()["current"]["critical"]["acknowledged_by"] == "bs.lan"
    with server.http() as admin:
        events = admin.get("/api/audit", params={"action": "critical-ack"}).json()
    assert [(e["user"], e["study_uid"], e["outcome"]) for e in events if e["outcome"] == "success"] == [
        ("bs.lan", critical, "success")]
    assert told in next(e["detail"] for e in events if e["outcome"] == "success")

    activity = server.cli("activity", "--from", date.today().replace(day=1).isoformat(), "--json")
    found = json.loads(activity.stdout)
    assert (found["totals"]["critical"], found["totals"]["critical_open"]) == (1, 0)
    assert [r["reads"] for r in found["turnaround"] if r["group"] == "critical-ack"] == [1]


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The `page` fixture's server, with the radiologist of tests.test_web_viewer."""
    with radiologist_server(tmp_path_factory.mktemp("critical-ui")) as server:
        yield server


def test_the_radiologist_flags_a_critical_result_in_the_viewer(page: Any, viewer_server: PacsServer,
                                                               tmp_path: Path) -> None:
    from playwright.sync_api import expect

    study = _study(viewer_server, tmp_path / "ui", "CRIT-UI")
    page.goto(f"/#/study/{study}")
    _log_in(page)
    page.fill("#findings", "Khí tự do dưới cơ hoành phải.")
    page.fill("#impression", "Thủng tạng rỗng.")
    expect(page.locator("#report-critical-box")).to_be_visible()
    page.check("#report-critical")
    page.fill("#report-critical-note", "Thủng tạng rỗng, báo ngoại khoa")
    page.click("#save-report")  # a save in between keeps the flag for the signature
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    expect(page.locator("#report-critical")).to_be_checked()
    dialogs = answering(page)
    page.click("#sign-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "signed")
    assert dialogs, "signing asks for confirmation"
    badge = page.locator("#report-critical-badge")
    expect(badge).to_have_text("NGUY KỊCH")
    expect(badge).to_have_attribute("title", "Thủng tạng rỗng, báo ngoại khoa — chưa có xác nhận đã báo")
    expect(page.locator("#report-critical-box")).to_be_hidden()
    with viewer_server.http() as admin:
        listed = admin.get("/api/critical").json()["critical"]
    assert [(c["study_uid"], c["note"], c["flagged_by"]) for c in listed] == [
        (study, "Thủng tạng rỗng, báo ngoại khoa", USERNAME)]
    # The radiologist phones the surgeon and records it.
    told = "BS. Hải, khoa Ngoại, qua điện thoại"
    asked = answering(page, text=told)
    page.click("#critical-ack")
    expect(page.locator("#critical-ack")).to_be_hidden()
    expect(badge).to_have_attribute("title", f"Thủng tạng rỗng, báo ngoại khoa — đã báo: {told} ({USERNAME})")
    assert asked and "Đã báo cho ai" in asked[0]
    with viewer_server.http() as admin:
        assert admin.get("/api/critical").json()["total"] == 0
    assert not page.errors, page.errors

