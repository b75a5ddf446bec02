"""The department's activity over a period (pacs.activity): examinations
sent by DCMTK storescu from two machines, reports signed and amended over
the HTTP API by two radiologists, read back with `pacs activity` and
`GET /api/activity` (JSON and CSV), on SQLite + filesystem and PostgreSQL + S3.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom.uid import generate_uid

from pacs.activity import Activity, Period, PeriodError, ProcedureRow, examination_modality

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_rejections import DOSE_SR, WRONG_ENTRY, _note
from .test_web_viewer import PASSWORD, USERNAME, page, radiologist_server, sign_in  # noqa: F401 (fixtures)

ZONE = "Asia/Ho_Chi_Minh"
US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"


def _exam(server: PacsServer, folder: Path, calling: str, day: date, count: int, modality: str = "CT",
          sop_class: str | None = None, **extra: object) -> tuple[str, str, list[str]]:
    """A study of *count* images examined on *day*, sent from *calling*: (study, series, SOP UIDs)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(count)]
    options = {"sop_class": sop_class} if sop_class else {}
    files = [str(make_ct(folder / f"{i}.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series,
                         StudyDate=day.strftime("%Y%m%d"), Modality=modality, PatientID=f"ACT-{folder.name}",
                         PatientName="TRẦN^THỊ BÌNH", SpecificCharacterSet="ISO_IR 192", InstanceNumber=i + 1,
                         **options, **extra))
             for i, sop in enumerate(sops)]
    sent = server.storescu(*files, calling=calling)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return study, series, sops


def test_periods_and_modalities() -> None:
    today = date(2026, 12, 7)
    assert Period.parse("", "", today) == Period(date(2026, 12, 1), today)
    assert Period.parse("20261101", "2026-11-30", today) == Period(date(2026, 11, 1), date(2026, 11, 30))
    assert Period.parse("2024-01-01", "2024-12-31", today).last == date(2024, 12, 31)  # a leap year: 366 days
    for first, last in (("2026-11-30", "2026-11-01"), ("2026-13-01", ""), ("yesterday", ""), ("2025-01-01", "")):
        try:
            Period.parse(first, last, today)
        except PeriodError:
            continue
        raise AssertionError(f"{first}..{last} was accepted")
    assert examination_modality(["CT", "SR"]) == "CT"
    assert examination_modality(["PT", "CT", "KO"]) == "CT/PT"
    assert examination_modality(["SR"]) == "SR"
    assert examination_modality([""]) == "OT"
    # A name or procedure a sender chose is never a formula in Excel.
    found = Activity(today, today, procedures=[ProcedureRow("CT", "=1+1", '=HYPERLINK("http://x")', 2),
                                               ProcedureRow("MR", "", "Cộng hưởng từ sọ não", 1)])
    rows = list(csv.reader(io.StringIO(found.csv("procedures").lstrip("\ufeff"))))
    assert rows == [["modality", "code", "procedure", "studies"], ["CT", "'=1+1", '\'=HYPERLINK("http://x")', "2"],
                    ["MR", "", "Cộng hưởng từ sọ não", "1"]]


@pytest.fixture
def hospital(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    """`pacs serve` on the hospital's clock (Vietnam), whatever the machine's."""
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_TIMEZONE": ZONE}).start()
    yield server
    server.stop()


def test_examinations_reads_turnaround_and_waiting(hospital: PacsServer, tmp_path: Path) -> None:
    server = hospital
    today = datetime.now(ZoneInfo(ZONE)).date()
    for title in ("CT_ROOM1", "US_ROOM2"):
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", "104", "--services", "all,reject")
    # The head CT was ordered by the HIS (a procedure code insurance pays for); the others were not.
    his = server.make_token("his", "his")
    with server.http(his) as http:
        ordered = http.post("/api/orders", json={
            "patient": {"id": "ACT-head", "name": "TRẦN^THỊ BÌNH"}, "accession_number": "ACT-HEAD", "modality": "CT",
            "procedure_code": "18.0133.0028", "procedure_code_scheme": "BYT",
            "procedure_code_meaning": "Chụp CT sọ não không tiêm thuốc cản quang"})
        assert ordered.status_code == 201, ordered.text
    head, *_ = _exam(server, tmp_path / "head", "CT_ROOM1", today - timedelta(days=2), 3,
                     AccessionNumber="ACT-HEAD")  # reconciled with the order by its accession
    chest, *_ = _exam(server, tmp_path / "chest", "CT_ROOM1", today - timedelta(days=1), 2,
                      RequestedProcedurePriority="STAT")
    # Its dose report sent later from a workstation: still the CT room's examination.
    dose = make_ct(tmp_path / "dose.dcm", sop_class=DOSE_SR, StudyInstanceUID=chest, SeriesInstanceUID=generate_uid(),
                   Modality="SR", PatientID="ACT-chest", PatientName="TRẦN^THỊ BÌNH", SpecificCharacterSet="ISO_IR 192")
    assert server.storescu(str(dose), calling="US_ROOM2").returncode == 0
    abdomen, *_ = _exam(server, tmp_path / "abdomen", "US_ROOM2", today, 1, modality="US", sop_class=US_CLASS)
    _exam(server, tmp_path / "old", "CT_ROOM1", today - timedelta(days=40), 1)  # before the period
    wrong, wrong_series, wrong_sops = _exam(server, tmp_path / "wrong", "CT_ROOM1", today, 2)
    note = _note(tmp_path / "note.dcm", wrong, "ACT-wrong", WRONG_ENTRY, {wrong: [wrong_series, *wrong_sops]})
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0  # withdrawn: no examination
    an = server.make_token("bs.an", "radiologist", "Nguyễn Văn An")
    binh = server.make_token("bs.binh", "radiologist", "Lê Thị Bình")
    for token, study in ((an, head), (binh, chest)):
        with server.http(token) as rad:
            url = f"/api/studies/{study}/report"
            assert rad.put(url, json={"findings": "Bình thường.", "impression": "Không thấy bất thường."}
                           ).status_code == 200
            assert rad.post(f"{url}/sign").status_code == 200
    with server.http(an) as rad:
        url = f"/api/studies/{head}/report"
        assert rad.post(f"{url}/amend").status_code == 200
        assert rad.put(url, json={"findings": "Bình thường.", "impression": "Đính chính."}).status_code == 200
        assert rad.post(f"{url}/sign").status_code == 200

    period = {"from": (today - timedelta(days=7)).isoformat(), "to": today.isoformat()}
    with server.http() as http:
        found = http.get("/api/activity", params=period)
        assert found.status_code == 200, found.text
        report = found.json()
        table = http.get("/api/activity/reads.csv", params=period)
        assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
        assert f'activity-reads-{period["from"]}-{period["to"]}.csv' in table.headers["content-disposition"]
        assert table.content.startswith("\ufeff".encode())
        rows = list(csv.reader(io.StringIO(table.content.decode("utf-8-sig"))))
        assert rows[0] == ["radiologist", "login", "modality", "reads", "amendments"]
        assert ["Nguyễn Văn An", "bs.an", "CT", "1", "1"] in rows[1:]
        assert http.get("/api/activity", params={"from": "2026-13-01"}).status_code == 400
        assert http.get("/api/activity", params={"from": period["to"], "to": period["from"]}).status_code == 400
        assert http.get("/api/activity/patients.csv").status_code == 404
        events = http.get("/api/audit", params={"user": "pacs-test", "action": "query"})
    with server.http(an) as rad:
        assert rad.get("/api/activity").status_code == 403  # administrators only

    assert report["from"] == period["from"] and report["to"] == period["to"]
    # Instances are every object of the studies: the dose report and the signed reports' PDFs too.
    assert report["totals"] == {"studies": 3, "instances": 10, "bytes": report["totals"]["bytes"], "reads": 2,
                                "amendments": 1, "waiting": 1, "critical": 0, "critical_open": 0}, report
    assert [(r["modality"], r["station"], r["studies"], r["instances"]) for r in report["exams"]] == [
        ("CT", "CT_ROOM1", 2, 9), ("US", "US_ROOM2", 1, 1)]
    assert [(r["modality"], r["code"], r["procedure"], r["studies"]) for r in report["procedures"]] == [
        ("CT", "", "", 1), ("CT", "18.0133.0028", "Chụp CT sọ não không tiêm thuốc cản quang", 1), ("US", "", "", 1)]
    assert report["days"] == [{"day": (today - timedelta(days=n)).isoformat(), "studies": 1} for n in (2, 1, 0)]
    assert [(r["radiologist"], r["login"], r["modality"], r["reads"], r["amendments"]) for r in report["reads"]] == [
        ("Lê Thị Bình", "bs.binh", "CT", 1, 0), ("Nguyễn Văn An", "bs.an", "CT", 1, 1)]
    turnaround = {r["group"]: r for r in report["turnaround"]}
    assert {g: r["reads"] for g, r in turnaround.items()} == {"CT": 2, "urgent": 1, "routine": 1}
    assert all(0 <= r["median_minutes"] <= r["p90_minutes"] <= r["max_minutes"] for r in turnaround.values())
    assert [(w["modality"], w["studies"]) for w in report["waiting"]] == [("US", 1)]
    assert events.status_code == 200 and any("activity" in (e.get("detail") or "") for e in events.json())

    # The command prints the same, and writes the tables for Excel.
    out = tmp_path / "tables"
    printed = server.cli("activity", "--from", period["from"], "--to", period["to"], "--json", "--csv", str(out))
    assert json.loads(printed.stdout) == report
    assert sorted(p.name for p in out.iterdir()) == ["days.csv", "exams.csv", "procedures.csv", "reads.csv",
                                                     "turnaround.csv", "waiting.csv"]
    assert (out / "exams.csv").read_bytes().startswith("\ufeffmodality,station,".encode())
    shown = server.cli("activity", "--from", period["from"], "--to", period["to"])
    assert "3 examinations" in shown.stdout and "Nguyễn Văn An" in shown.stdout
    refused = server.cli("activity", "--from", period["to"], "--to", period["from"], check=False)
    assert refused.returncode == 2 and "before it starts" in refused.stderr


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The `page` fixture's server: a radiologist (tests.test_web_viewer) and an administrator."""
    with radiologist_server(tmp_path_factory.mktemp("activity-ui")) as server:
        server.cli("user", "add", "truong.khoa", "--role", "admin", "--password", ADMIN_PASSWORD,
                   "--display-name", "Trưởng khoa Phạm Văn Đức")
        yield server


ADMIN_PASSWORD = "mat-khau-quan-tri-1"


def test_the_head_of_department_reads_the_activity_in_the_viewer(page: Any, viewer_server: PacsServer,
                                                                  tmp_path: Path) -> None:
    from playwright.sync_api import expect

    today = date.today()
    _exam(viewer_server, tmp_path / "ui", "CT_ROOM1", today, 2)
    sign_in(page, "truong.khoa", ADMIN_PASSWORD)
    nav = page.locator("#nav-activity")
    expect(nav).to_be_visible()
    nav.click()
    expect(page).to_have_url(re.compile(r"#/activity$"))
    exams = page.locator("#activity-exams tbody tr")
    expect(exams).to_have_count(1)
    expect(exams.first.locator("td").nth(0)).to_have_text("CT")
    expect(exams.first.locator("td").nth(1)).to_have_text("CT_ROOM1")
    expect(page.locator("#activity-totals")).to_contain_text("1 ca chụp")
    expect(page.locator("#activity-procedures tbody td").nth(2)).to_have_text("(không có chỉ định)")
    expect(page.locator("#activity-from")).to_have_value(today.replace(day=1).isoformat())
    href = page.locator("#activity-exams-csv").get_attribute("href") or ""
    assert href.startswith("/api/activity/exams.csv?from=")
    # The download works with the session cookie alone (what a click on the link sends).
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with viewer_server.http(token="") as http:
        http.cookies.update(cookies)
        answer = http.get(href)
    assert answer.status_code == 200 and "CT_ROOM1" in answer.text, answer.text
    # A period with nothing in it, then the language switched.
    page.fill("#activity-from", "2020-01-01")
    page.fill("#activity-to", "2020-01-31")
    page.click("#activity-show")
    expect(page.locator("#activity-exams")).to_contain_text("Không có.")
    page.click("#lang-toggle")
    expect(page.locator("#activity-exams h3")).to_contain_text("Examinations per modality and machine")
    expect(page.locator("#activity-totals")).to_contain_text("2020-01-01 to 2020-01-31: 0 examinations")
    assert not page.errors, page.errors

    # A radiologist has no such link, and the screen says why.
    page.click("#logout-button")
    expect(page).to_have_url(re.compile(r"#/login$"))  # the session ended before the next sign-in
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    expect(page.locator("#nav-activity")).to_be_hidden()
    page.goto("/#/activity")
    expect(page.locator("#activity-message")).to_have_text("Only administrators see the activity.")
    assert not page.errors, page.errors
