"""The web viewer's "Kết quả nguy kịch" screen (#/critical): studies sent
with DCMTK storescu, their reports signed critical over the HTTP API by a
radiologist, then in Chromium another radiologist finds the open ones
oldest first with the count on the menu entry, acknowledges one from the
list (it moves to the acknowledged ones), and a referring doctor, whom
GET /api/critical refuses, has no such entry. Patients' names and notes
are shown as text: Vietnamese diacritics kept, markup never run.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_web_viewer import PASSWORD, USERNAME, answering, page, radiologist_server, sign_in  # noqa: F401 (fixtures)

XSS = "<img src=x onerror=window.__xss=1>"
TOLD = "BS. Lan, khoa Cấp cứu, qua điện thoại"
# (accession, patient name as sent, as shown, the radiologist's note), in the order they are signed.
# A PN's "=" starts its ideographic group, which the viewer does not show: the note carries all of the markup.
STUDIES = [
    ("CS-1", "Nguyễn^Thị Hằng", "Nguyễn Thị Hằng", "Tràn khí màng phổi trái lượng nhiều"),
    ("CS-2", XSS, "<img src", f"Xuất huyết nội sọ {XSS}"),
    ("CS-3", "Trần^Văn Bình", "Trần Văn Bình", "Thủng tạng rỗng"),
]


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The `page` fixture's server: the radiologist of tests.test_web_viewer, who reads the list."""
    with radiologist_server(tmp_path_factory.mktemp("critical-screen")) as server:
        yield server


def _signed_critical(server: PacsServer, folder: Path, token: str) -> list[str]:
    """STUDIES sent and their reports signed critical by the radiologist of *token*: their UIDs."""
    uids = []
    for accession, name, _, note in STUDIES:
        study = generate_uid()
        ct = make_ct(folder / f"{accession}.dcm", StudyInstanceUID=study, PatientID=f"PID-{accession}",
                     AccessionNumber=accession, PatientName=name, SpecificCharacterSet="ISO_IR 192")
        sent = server.storescu(str(ct))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        with server.http(token) as rad:
            assert rad.put(f"/api/studies/{study}/report", json={"findings": note, "impression": note}
                           ).status_code == 200
            signed = rad.post(f"/api/studies/{study}/report/sign", json={"critical": True, "critical_note": note})
            assert signed.status_code == 200, signed.text
        uids.append(study)
    return uids


def _flagged_earlier(server: PacsServer, study: str, minutes: int) -> None:
    """Move the study's flag *minutes* back, as if nobody had acknowledged it for that long."""
    with sqlite3.connect(server.data_dir / "index.sqlite", timeout=30) as conn:
        changed = conn.execute(
            "UPDATE critical_results SET flagged_at = strftime('%Y-%m-%d %H:%M:%f', flagged_at, ?) "
            "WHERE study_pk = (SELECT pk FROM studies WHERE study_uid = ?)", (f"-{minutes} minutes", study)).rowcount
    assert changed == 1


def _refreshes_are_not_audited_again(server: PacsServer, token: str, studies: set[str]) -> None:
    """The viewer's own refreshes (unattended) of the badge and of a list
    it showed already this hour write no audit event: an open viewer made
    one a minute, the trail of who saw what drowned in them."""
    unattended = {"x-pacs-unattended": "1"}
    with server.http(token) as http:
        assert http.get("/api/critical", params={"limit": 0}, headers=unattended).status_code == 200
        assert http.get("/api/critical", headers=unattended).json()["total"] == 3
    with server.http() as admin:  # GET /api/audit writes what is queued first
        events = [e for e in admin.get("/api/audit", params={"action": "query", "user": "bs.hoa"}).json()
                  if e["detail"].startswith("critical results")]
    opened = [e for e in events if e["detail"].startswith("critical results (open)")]
    # The count asked with the user there (one event), the list (one per study): none of the refreshes.
    assert len(opened) == 1 + len(studies), opened
    assert {e["study_uid"] for e in opened if e["study_uid"]} == studies


def test_the_radiologist_acknowledges_a_critical_result_from_the_list(page: Any, viewer_server: PacsServer,
                                                                      tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server = viewer_server
    signer = server.make_token("bs.hoa", "radiologist", "Lý^Thị Hoa")
    first, second, third = _signed_critical(server, tmp_path, signer)
    _flagged_earlier(server, first, 45)  # beyond the 30 minutes a critical result may wait
    referring = server.make_token("bs.lan", "referring", "Lê^Thị Lan")
    with server.http(referring) as http:
        assert http.get("/api/critical").status_code == 403
    with server.http(signer) as http:  # what the badge asks: the count alone, no patient listed
        assert http.get("/api/critical", params={"limit": 0}).json() == {"state": "open", "total": 3, "critical": []}
        listed = http.get("/api/critical").json()["critical"]
    assert [(c["study_uid"], c["modality"]) for c in listed] == [(first, "CT"), (second, "CT"), (third, "CT")]
    assert listed[0]["minutes_open"] >= 45
    _refreshes_are_not_audited_again(server, signer, {first, second, third})

    sign_in(page, USERNAME, PASSWORD)
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    nav = page.locator("#nav-critical")
    expect(nav).to_be_visible()
    expect(page.locator("#critical-count")).to_have_text("3")
    nav.click()
    expect(page).to_have_url(re.compile(r"#/critical$"))
    rows = page.locator("#critical-list tbody tr")
    expect(rows).to_have_count(3)
    # Oldest first; names as text, the markup one included (its onerror never ran).
    expect(rows.locator(".critical-patient")).to_have_text([shown for _, _, shown, _ in STUDIES])
    expect(rows.locator(".critical-accession")).to_have_text(["CS-1", "CS-2", "CS-3"])
    expect(rows.nth(0)).to_contain_text("PID-CS-1")
    expect(rows.nth(0)).to_contain_text("bs.hoa")
    expect(rows.nth(0).locator(".critical-note")).to_have_text(STUDIES[0][3])
    expect(rows.nth(0).locator(".critical-modality")).to_have_text("CT")
    # The one waiting 45 minutes stands out; the others have just been signed.
    expect(rows.nth(0).locator(".critical-minutes")).to_have_class(re.compile(r"\blate\b"))
    expect(rows.nth(0).locator(".critical-minutes")).to_contain_text("45")
    expect(rows.nth(1).locator(".critical-minutes")).not_to_have_class(re.compile(r"\blate\b"))
    assert page.evaluate("window.__xss") is None
    assert page.locator("#critical-list img").count() == 0
    expect(rows.nth(2).locator("a.critical-open")).to_have_attribute("href", f"#/study/{third}")

    # Told by phone: recorded from the list, the row leaves it and the count follows.
    asked = answering(page, text=TOLD)
    rows.nth(1).locator("button.critical-ack").click()
    expect(rows).to_have_count(2)
    assert asked and "Đã báo cho ai" in asked[0]
    expect(rows.locator(".critical-accession")).to_have_text(["CS-1", "CS-3"])
    expect(page.locator("#critical-count")).to_have_text("2")
    with server.http() as admin:
        done = admin.get("/api/critical", params={"state": "acknowledged"}).json()["critical"]
    assert [(c["study_uid"], c["acknowledged_by"], c["acknowledgement"]) for c in done] == [(second, USERNAME, TOLD)]

    # The acknowledged ones: who recorded it, who was told and how.
    page.check("#critical-show-acknowledged")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".critical-patient")).to_have_text("<img src")
    expect(rows.first.locator(".critical-note")).to_have_text(STUDIES[1][3])
    expect(rows.first.locator(".critical-told")).to_have_text(TOLD)
    expect(rows.first.locator(".critical-acknowledged-by")).to_have_text(USERNAME)
    expect(rows.first.locator("button.critical-ack")).to_have_count(0)
    expect(page.locator("#critical-count")).to_have_text("2")
    # English where the app shows both.
    page.click("#lang-toggle")
    expect(page.locator("#nav-critical")).to_contain_text("Critical results")
    expect(page.locator("#critical-list thead")).to_contain_text("Who was told, how")
    page.click("#lang-toggle")
    # The link opens the study in the viewer.
    page.uncheck("#critical-show-acknowledged")
    expect(rows).to_have_count(2)
    rows.nth(0).locator("a.critical-open").click()
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(first)}$"))
    expect(page.locator("#report-critical-badge")).to_have_text("NGUY KỊCH")
    assert page.evaluate("window.__xss") is None
    assert not page.errors, page.errors

    # The referring doctor, whom the list is refused, has no menu entry; the screen says why.
    page.click("#logout-button")
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.fill("#username", "bs.lan")
    page.fill("#password", "test-password-123")
    page.press("#password", "Enter")
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    expect(page.locator("#nav-critical")).to_be_hidden()
    page.goto("/#/critical")
    expect(page.locator("#critical-message")).to_have_text("Chỉ bác sĩ chẩn đoán hình ảnh và quản trị viên "
                                                           "xem được danh sách này.")
    expect(page.locator("#critical-list")).to_have_count(0)
    assert not page.errors, page.errors
