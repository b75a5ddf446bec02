"""The radiologists' reading worklist: priority, waiting time, who is reading.

Against a real `pacs serve` per index backend (SQLite, PostgreSQL): orders
sent by the HIS as HL7 ORM^O01 over MLLP (priority S = STAT, R = routine;
an XO that makes one STAT), CTs stored with DCMTK's storescu and matched to
them by their Study Instance UID, a study without order whose images carry
Requested Procedure Priority HIGH, and one without any priority.

1. Priority: /api/worklist lists the urgent studies not yet reported first
   (STAT, then HIGH), then the others newest first; it filters by priority
   and counts the urgent unread studies; the study's JSON gives it.
2. Waiting: each item's ISO received time, on the database's clock (the
   answer's ``now``); "waiting" lists the unreported studies, longest
   waiting first.
3. Claims: radiologist A claims a study, B sees it in the worklist and in
   the study, is refused (409 naming A) until B takes it over explicitly;
   heartbeats are not audited, the claim, take-over and release are; a claim
   idle past reading_claim_minutes (the database clock moved past it) is
   gone; the signature ends it; "Mine" lists one's own.
4. One browser check (Debian Chromium through Playwright): the red STAT
   badge, the header's urgent count, the claim shown to the second
   radiologist with "take over", in Vietnamese and English, no horizontal
   scroll at 1366x768; a real short claim timeout kept alive by the viewer's
   heartbeat and ended once the study is closed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select, update

from pacs.index import create_index_engine
from pacs.index.models import ReadingClaim

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, drop_database, wait_until
from .test_web_viewer import (CHROMIUM, CHROMIUM_ARGS, HEIGHT, WIDTH, Steps, _sync_playwright,
                              assert_no_horizontal_scroll)
from .test_worklist_ris import msa, orm, send

ROOT = Path(__file__).resolve().parent.parent
CLAIM_MINUTES = 20
A = ("bs.an", "BS. Trần Văn An")
B = ("bs.binh", "BS. Lê Thị Bình")


def _orm(control: str, accession: str, pid: str, study_uid: str, priority: str, order_control: str = "NW") -> str:
    """tests.test_worklist_ris's ORM^O01 with *priority* in OBR-27.6 (HL7 table 0027: S, A, R...)."""
    message = orm(control, accession, pid=pid, study_uid=study_uid, order_control=order_control)
    assert "^^^20241121090000^^R" in message
    return message.replace("^^^20241121090000^^R", f"^^^20241121090000^^{priority}")


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per index backend with radiologists A and B (``server.a``,
    ``server.b``: tokens), a referring physician and an EMR."""
    pg = create_database() if request.param == "pg" else None
    pacs = PacsServer(tmp_path_factory.mktemp("reading") / "data", Backend(request.param, pg, None, {}),
                      extra_env={"PACS_READING_CLAIM_MINUTES": str(CLAIM_MINUTES)})
    pacs.start()
    pacs.a = pacs.make_token(A[0], "radiologist", A[1])  # type: ignore[attr-defined]
    pacs.b = pacs.make_token(B[0], "radiologist", B[1])  # type: ignore[attr-defined]
    pacs.referring = pacs.make_token("bs.tung", "referring", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    pacs.emr = pacs.make_token("emr", "emr")  # type: ignore[attr-defined]
    try:
        yield pacs
    finally:
        pacs.stop()
        if pg:
            drop_database(pg)


@pytest.fixture(scope="module")
def studies(server: PacsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """routine (ordered R, newest but one), stat (ordered S), high (no order,
    images HIGH, oldest), plain (no order, no priority, newest); stored in
    that order. Patient IDs start with RW: the tests' worklist searches."""
    work = tmp_path_factory.mktemp("reading-cts")
    uids = {name: generate_uid() for name in ("routine", "stat", "high", "plain")}
    assert msa(send(server, _orm("RW1", "RW-ROUT", "RW0001", uids["routine"], "R")))[0] == "AA"
    assert msa(send(server, _orm("RW2", "RW-STAT", "RW0002", uids["stat"], "S")))[0] == "AA"
    images = {
        # The modality typed other IDs: the order (by Study Instance UID) files them under the HIS patient.
        "routine": {"PatientID": "TYPED1", "AccessionNumber": "RW-ROUT", "StudyDate": "20261207",
                    "StudyTime": "080000"},
        "stat": {"PatientID": "TYPED2", "AccessionNumber": "RW-STAT", "StudyDate": "20261206",
                 "StudyTime": "230000"},
        "high": {"PatientID": "RW0003", "PatientName": "PHAM^VAN KHAN", "StudyDate": "20261201", "StudyTime": "100000",
                 "RequestedProcedurePriority": "HIGH"},
        "plain": {"PatientID": "RW0004", "PatientName": "VO^THI THUONG", "StudyDate": "20261208",
                  "StudyTime": "090000"},
    }
    for name, attributes in images.items():
        ct = make_ct(work / f"{name}.dcm", StudyInstanceUID=uids[name], **attributes)
        assert server.storescu(str(ct)).returncode == 0
    return uids


def _worklist(server: PacsServer, token: str, **params: Any) -> dict[str, Any]:
    with server.http(token=token) as http:
        answer = http.get("/api/worklist", params={"patient_id": "RW*", **params})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _uids(found: dict[str, Any]) -> list[str]:
    return [item["study_uid"] for item in found["items"]]


def _as_a(server: PacsServer, **params: Any) -> list[str]:
    """The studies radiologist A's worklist lists, in its order."""
    return _uids(_worklist(server, server.a, **params))  # type: ignore[attr-defined]


def _item(found: dict[str, Any], study_uid: str) -> dict[str, Any]:
    return next(item for item in found["items"] if item["study_uid"] == study_uid)


def _events(server: PacsServer, **filters: str) -> list[dict[str, Any]]:
    with server.http() as admin:
        return admin.get("/api/audit", params={"limit": 10000, **filters}).json()


def _index(server: PacsServer) -> Engine:
    return create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)


# -- priority and waiting -----------------------------------------------------------------------------
def test_urgent_unread_studies_come_first_with_their_priority(server: PacsServer, studies: dict[str, str]) -> None:
    u = studies
    with server.http() as admin:
        # The HL7 codes as the worklist's DICOM terms.
        assert admin.get("/api/orders/RW-STAT").json()["priority"] == "STAT"
        assert admin.get("/api/orders/RW-ROUT").json()["priority"] == "ROUTINE"
    found = _worklist(server, server.a)  # type: ignore[attr-defined]
    # STAT, then HIGH (urgent, unread), then the others newest first.
    assert _uids(found) == [u["stat"], u["high"], u["plain"], u["routine"]]
    assert [i["priority"] for i in found["items"]] == ["STAT", "HIGH", "", "ROUTINE"]
    assert found["urgent_unread"] == 2
    # The same studies by date alone, and by priority filters.
    assert _as_a(server, sort="date") == [u["plain"], u["routine"], u["stat"], u["high"]]
    assert _as_a(server, priority="stat") == [u["stat"]]
    assert _as_a(server, priority="high") == [u["high"]]
    assert _as_a(server, priority="urgent") == [u["stat"], u["high"]]
    assert _as_a(server, priority="routine") == [u["plain"], u["routine"]]
    # The filters that were there keep working with it.
    assert _as_a(server, status="unread", modality="CT", priority="urgent") == [u["stat"], u["high"]]
    assert _as_a(server, status="signed") == []
    # Pages cut across the urgent group and the rest.
    pages = [_as_a(server, limit=3, offset=0), _as_a(server, limit=3, offset=3)]
    assert pages == [[u["stat"], u["high"], u["plain"]], [u["routine"]]]
    assert _as_a(server, limit=1, offset=1) == [u["high"]]
    with server.http(token=server.a) as http:  # type: ignore[attr-defined]
        for bad in ({"priority": "urgentest"}, {"sort": "name"}):
            assert http.get("/api/worklist", params=bad).status_code == 400, bad
        detail = http.get(f"/api/studies/{u['stat']}").json()
    assert (detail["priority"], detail["report_status"], detail["claim"]) == ("STAT", "unread", None)


def test_waiting_time_is_the_received_time_on_the_database_clock(server: PacsServer, studies: dict[str, str]) -> None:
    u = studies
    found = _worklist(server, server.a, sort="waiting")  # type: ignore[attr-defined]
    # Not reported yet, longest waiting first: in the order they were stored.
    assert _uids(found) == [u["routine"], u["stat"], u["high"], u["plain"]]
    now = datetime.fromisoformat(found["now"])
    received = [datetime.fromisoformat(item["received_at"]) for item in found["items"]]
    assert all(r.tzinfo is not None for r in received) and now.tzinfo is not None
    assert received == sorted(received) and received[-1] <= now
    assert now - received[0] < timedelta(hours=1)


def test_an_order_changed_to_stat_puts_its_study_first(server: PacsServer, studies: dict[str, str]) -> None:
    """The HIS raises the routine order to STAT (ORM^O01 XO): its study,
    already received, becomes urgent (the index follows the order)."""
    u = studies
    assert msa(send(server, _orm("RW3", "RW-ROUT", "RW0001", u["routine"], "S", order_control="XO")))[0] == "AA"
    found = _worklist(server, server.a)  # type: ignore[attr-defined]
    assert _item(found, u["routine"])["priority"] == "STAT"
    # Both STAT, the longest waiting (received first: routine, though acquired after) first.
    assert _uids(found)[:3] == [u["routine"], u["stat"], u["high"]]
    assert found["urgent_unread"] == 3
    assert msa(send(server, _orm("RW4", "RW-ROUT", "RW0001", u["routine"], "R", order_control="XO")))[0] == "AA"
    assert _item(_worklist(server, server.a), u["routine"])["priority"] == "ROUTINE"  # type: ignore[attr-defined]


# -- claims ---------------------------------------------------------------------------------------------
def test_a_claim_is_seen_by_colleagues_and_taken_over_explicitly(server: PacsServer, studies: dict[str, str]) -> None:
    study = studies["stat"]
    path = f"/api/studies/{study}/claim"
    with server.http(token=server.a) as a, server.http(token=server.b) as b:  # type: ignore[attr-defined]
        claimed = a.post(path)
        assert claimed.status_code == 200, claimed.text
        mine = claimed.json()
        assert (mine["user"], mine["display_name"], mine["mine"]) == (A[0], A[1], True)
        since, expires = datetime.fromisoformat(mine["since"]), datetime.fromisoformat(mine["expires_at"])
        assert expires - since == timedelta(minutes=CLAIM_MINUTES)
        assert 1 <= mine["refresh_seconds"] <= 60

        # B sees who reads it, in the worklist and in the study.
        item = _item(_worklist(server, server.b), study)  # type: ignore[attr-defined]
        assert item["claim"]["user"] == A[0] and item["claim"]["display_name"] == A[1] and not item["claim"]["mine"]
        assert b.get(f"/api/studies/{study}").json()["claim"]["display_name"] == A[1]
        # Mine: A's claims only.
        assert _as_a(server, mine="true") == [study]
        assert _uids(_worklist(server, server.b, mine="true")) == []  # type: ignore[attr-defined]
        # Not the EMR's business.
        assert _item(_worklist(server, server.emr), study)["claim"] is None  # type: ignore[attr-defined]
        assert "urgent_unread" not in _worklist(server, server.emr)  # type: ignore[attr-defined]

        # B opening it is refused, naming A; A's heartbeat extends A's claim.
        refused = b.post(path, json={"take_over": False})
        assert refused.status_code == 409 and refused.json()["claim"]["user"] == A[0], refused.text
        beat = a.post(path)
        assert beat.status_code == 200 and beat.json()["since"] == mine["since"]
        assert datetime.fromisoformat(beat.json()["expires_at"]) >= expires
        # B takes it over, on purpose; A's next heartbeat learns it, and A may not release B's claim.
        taken = b.post(path, json={"take_over": True})
        assert taken.status_code == 200 and taken.json()["user"] == B[0], taken.text
        lost = a.post(path)
        assert lost.status_code == 409 and lost.json()["claim"]["user"] == B[0]
        assert a.delete(path).status_code == 403
        assert b.delete(path).status_code == 204
        assert _item(_worklist(server, server.a), study)["claim"] is None  # type: ignore[attr-defined]
    with server.http(token=server.referring) as referring:  # type: ignore[attr-defined]
        assert referring.post(path).status_code == 403

    events = [e for e in _events(server, study=study) if e["action"].startswith("claim")]
    by = [(e["action"], e["user"], e["outcome"]) for e in events]
    # One event for A's claim (not its heartbeat), the refusals, B's take-over and release.
    assert by.count(("claim", A[0], "success")) == 1, by
    assert ("claim-takeover", B[0], "success") in by and ("claim-release", B[0], "success") in by, by
    takeover = next(e for e in events if e["action"] == "claim-takeover")
    assert "taken over from bs.an" in takeover["detail"] and takeover["patient_id"].startswith("RW0002"), takeover
    # B's refused claim and A's refused release of B's claim are there too.
    assert ("claim", B[0], "success") not in by and {e["outcome"] for e in events if e["user"] == B[0]
                                                        and e["action"] == "claim"} == {"failure"}, by
    assert any(a == "claim-release" and user == A[0] and outcome != "success" for a, user, outcome in by), by


def test_an_idle_claim_expires(server: PacsServer, studies: dict[str, str]) -> None:
    """No heartbeat for longer than reading_claim_minutes: the claim is gone
    for every reader. The database's clock is the judge: the claim is moved
    21 minutes into the past there (20 minutes are the server's setting)."""
    study = studies["high"]
    path = f"/api/studies/{study}/claim"
    with server.http(token=server.a) as a, server.http(token=server.b) as b:  # type: ignore[attr-defined]
        assert a.post(path).status_code == 200
        assert b.post(path).status_code == 409
        engine = _index(server)
        try:
            with engine.begin() as conn:
                claims = ReadingClaim.__table__
                row = conn.execute(select(claims.c.study_pk, claims.c.claimed_at, claims.c.expires_at)
                                   .where(claims.c.username == A[0])).one()
                ago = timedelta(minutes=CLAIM_MINUTES + 1)
                conn.execute(update(claims).where(claims.c.study_pk == row.study_pk)
                             .values(claimed_at=row.claimed_at - ago, expires_at=row.expires_at - ago))
        finally:
            engine.dispose()
        assert _item(_worklist(server, server.b), study)["claim"] is None  # type: ignore[attr-defined]
        assert b.get(f"/api/studies/{study}").json()["claim"] is None
        assert _as_a(server, mine="true") == []
        # B claims it without taking anything over; A's late heartbeat finds B there.
        claimed = b.post(path)
        assert claimed.status_code == 200 and claimed.json()["user"] == B[0]
        assert a.post(path).status_code == 409
        assert b.delete(path).status_code == 204
    assert not [e for e in _events(server, study=study) if e["action"] == "claim-takeover"]


def test_the_signature_ends_the_claim(server: PacsServer, studies: dict[str, str]) -> None:
    study = studies["plain"]
    path = f"/api/studies/{study}/claim"
    with server.http(token=server.a) as a:  # type: ignore[attr-defined]
        assert a.post(path).status_code == 200
        assert a.put(f"/api/studies/{study}/report", json={"findings": "Phổi sáng.", "impression": "Bình thường."}
                     ).status_code == 200
        assert _item(_worklist(server, server.b), study)["claim"]["user"] == A[0]  # type: ignore[attr-defined]
        assert a.post(f"/api/studies/{study}/report/sign").status_code == 200
        item = _item(_worklist(server, server.b), study)  # type: ignore[attr-defined]
        assert (item["claim"], item["report_status"]) == (None, "signed")
        # Nothing left to read: no claim (nor heartbeat) on a signed report, until it is amended.
        refused = a.post(path)
        assert refused.status_code == 409 and "signed" in refused.json()["error"]
        assert a.post(f"/api/studies/{study}/report/amend").status_code == 200
        assert a.post(path).status_code == 200
        assert a.delete(path).status_code == 204
    ended = [e for e in _events(server, study=study, action="claim-release") if "signature" in e["detail"]]
    assert len(ended) == 1 and ended[0]["user"] == A[0], ended
    # The signed study is no longer counted, the other urgent ones are.
    assert _worklist(server, server.a)["urgent_unread"] == 2  # type: ignore[attr-defined]


# -- in the browser --------------------------------------------------------------------------------------
PASSWORDS = {A[0]: "Secret-123a", B[0]: "Secret-123b"}
# A timeout short enough to watch: 9 s, the viewer refreshing every 3 s.
SHORT_CLAIM_MINUTES = 0.15


@pytest.fixture
def browser_server(tmp_path: Path) -> Iterator[tuple[PacsServer, str, str]]:
    """A server (SQLite) with a STAT CT (priority in its images) and a
    routine one, radiologists A and B; (server, STAT study, routine study)."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_READING_CLAIM_MINUTES": str(SHORT_CLAIM_MINUTES)})
    for username, display in (A, B):
        server.cli("user", "add", username, "--role", "radiologist", "--password", PASSWORDS[username],
                   "--display-name", display)
    server.start()
    stat, routine = generate_uid(), generate_uid()
    for uid, attributes in ((stat, {"PatientName": "NGUYEN^VAN CAP", "RequestedProcedurePriority": "STAT",
                                    "StudyDate": "20261201"}),
                            (routine, {"PatientName": "TRAN^THI THUONG", "StudyDate": "20261208"})):
        ct = make_ct(tmp_path / f"{uid}.dcm", StudyInstanceUID=uid, PatientID=f"P{uid[-6:]}", **attributes)
        assert server.storescu(str(ct)).returncode == 0
    try:
        yield server, stat, routine
    finally:
        server.stop()


def _log_in(page: Any, username: str) -> None:
    from playwright.sync_api import expect

    page.goto("/")
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.fill("#username", username)
    page.fill("#password", PASSWORDS[username])
    page.press("#password", "Enter")
    expect(page).to_have_url(re.compile(r"#/worklist$"))


def test_the_worklist_shows_stat_and_who_is_reading(browser_server: tuple[PacsServer, str, str]) -> None:
    from playwright.sync_api import expect

    server, stat, routine = browser_server
    with _sync_playwright()() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pages, errors = [], []
            for _ in range(2):
                context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}, locale="vi-VN",
                                              base_url=f"http://127.0.0.1:{server.http_port}")
                context.set_default_timeout(20_000)
                page = context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text
                        else None)
                pages.append(page)
            a, b = pages
            steps_a = Steps(a, ROOT / "test-artifacts" / "reading-worklist")

            # A: the STAT study first, its red badge, the header's count, no horizontal scroll.
            _log_in(a, A[0])
            rows = a.locator('[data-testid="study-row"]')
            expect(rows).to_have_count(2)
            expect(rows.first).to_have_attribute("data-study-uid", stat)
            badge = rows.first.locator(".badge.priority-stat")
            expect(badge).to_have_text("Cấp cứu")
            assert a.evaluate("e => getComputedStyle(e).backgroundColor", badge.element_handle()) == "rgb(198, 40, 40)"
            expect(a.locator("#urgent-count")).to_have_text("1 ca cấp cứu/khẩn chưa đọc")
            expect(a.locator("#worklist th").first).to_have_text("Ưu tiên")
            expect(rows.nth(1).locator("td.waiting")).to_have_text(re.compile(r"^\d+ phút$"))
            assert_no_horizontal_scroll(a)
            steps_a.shot("worklist-stat-first")

            # A opens it: claimed, and kept while open (the viewer's heartbeats move its expiry on).
            rows.first.click()
            expect(a.locator("#claim-chip")).to_have_attribute("data-state", "mine")
            expect(a.locator("#claim-state")).to_have_text("Bạn đang đọc")
            expect(a.locator("#claim-release")).to_have_text("Trả lại")
            expect(a.locator("#claim-banner")).to_be_hidden()
            assert_no_horizontal_scroll(a)
            steps_a.shot("reading-it")
            expect(a.locator("#study-header .badge.priority-stat")).to_have_text("Cấp cứu")
            with server.http() as admin:
                def expiry() -> datetime | None:
                    claim = admin.get(f"/api/studies/{stat}").json()["claim"]
                    return datetime.fromisoformat(claim["expires_at"]) if claim else None
                first = expiry()
                assert first and wait_until(lambda: (expiry() or first) > first, timeout=20, interval=0.5)

            # B: A's name in the worklist, then the warning in the study, with "take over".
            _log_in(b, B[0])
            b_row = b.locator(f'[data-testid="study-row"][data-study-uid="{stat}"]')
            expect(b_row.locator('[data-testid="claim"]')).to_have_text("BS. Trần Văn An đang đọc")
            assert_no_horizontal_scroll(b)
            steps_b = Steps(b, ROOT / "test-artifacts" / "reading-worklist-b")
            steps_b.shot("worklist-claimed-by-a")
            b_row.click()
            banner = b.locator("#claim-banner")
            expect(banner).to_be_visible()
            expect(b.locator("#claim-chip")).to_be_hidden()
            expect(b.locator("#claim-text")).to_have_text(
                re.compile(r"^BS\. Trần Văn An đang đọc ca này \(từ \d\d:\d\d\)\.$"))
            expect(b.locator("#claim-take-over")).to_have_text("Nhận đọc thay")
            assert_no_horizontal_scroll(b)
            steps_b.shot("study-claimed-by-a")
            b.click("#lang-toggle")
            expect(b.locator("#claim-text")).to_have_text(re.compile(r"^BS\. Trần Văn An is reading this study"))
            expect(b.locator("#claim-take-over")).to_have_text("Take over")
            assert_no_horizontal_scroll(b)

            # B takes it over; A's viewer says so at its next heartbeat.
            b.click("#claim-take-over")
            expect(banner).to_be_hidden()
            expect(b.locator("#claim-state")).to_have_text("You are reading")
            expect(b.locator("#claim-release")).to_have_text("Release")
            expect(a.locator("#claim-text")).to_have_text("BS. Lê Thị Bình đã nhận đọc thay ca này.", timeout=15_000)
            expect(a.locator("#claim-chip")).to_be_hidden()
            expect(a.locator("#claim-take-over")).to_be_visible()
            steps_a.shot("taken-over")

            # B goes back to the worklist: no more heartbeats, the claim ends after its 9 s.
            b.click("#back-to-worklist")
            expect(b.locator("#worklist th").first).to_have_text("Priority")
            b_row = b.locator(f'[data-testid="study-row"][data-study-uid="{stat}"]')
            expect(b_row.locator(".badge.priority-stat")).to_have_text("STAT")
            expect(b_row.locator('[data-testid="claim"]')).to_have_text("You are reading")
            expect(b.locator("#urgent-count")).to_have_text("1 urgent unread")
            b.click("#urgent-count")  # lists them
            expect(b.locator("#search-priority")).to_have_value("urgent")
            expect(b.locator('[data-testid="study-row"]')).to_have_count(1)
            expect(b.locator("#sort-waiting")).to_have_text("Waiting")
            assert_no_horizontal_scroll(b)
            steps_b.shot("worklist-en")
            with server.http() as admin:
                def claimed() -> bool:
                    return admin.get(f"/api/studies/{stat}").json()["claim"] is not None
                assert wait_until(lambda: not claimed(), timeout=30, interval=0.5)
            assert not errors, errors
        finally:
            browser.close()
    events = _events(server, study=stat)
    assert [e["user"] for e in events if e["action"] == "claim-takeover"] == [B[0]]
