"""The reading worklist's refinements: which studies are urgent, in which
order, and what the page and the claims do under real use.

Against a real `pacs serve` (SQLite; the claims' race on PostgreSQL too):

1. Old data with STAT in its images -- a CD imported with `pacs import`, a
   study copied from the old PACS (DCMTK's dcmqrscp) by `pacs remote pull` --
   is not urgent: only an examination arriving (a modality's C-STORE here)
   takes its images' priority. The urgent count and the default order follow.
2. The urgent group is ordered by waiting time: a STAT study whose Study
   Date is years old but which arrived last waits less than one received
   before it.
3. A cancelled HIS order (ORM^O01 ORC-1 CA over MLLP) no longer makes its
   study urgent, even when the images carry the order's STAT (the modality
   copied it from the worklist): the study is routine.
4. Two colleagues claiming, or taking over, one study at the same moment
   (threads, HTTP): exactly one wins, the other gets the 409 naming them.
5. Chromium: a study stored after the worklist page loaded appears without
   reload, the filters typed, the row selected and the scroll kept; hidden,
   the page asks nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import create_database, dcmtk, drop_database, free_port, run_dcmtk, wait_port
from .test_reading_worklist import _orm
from .test_web_viewer import HEIGHT, WIDTH, sign_in, watched_page
from .test_worklist_ris import msa, send

A = ("bs.an", "BS. Trần Văn An")
B = ("bs.binh", "BS. Lê Thị Bình")
C = ("bs.cuong", "BS. Phạm Văn Cường")
PASSWORD = "Secret-123a"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A SQLite server whose archive holds an old CD's STAT CT (`pacs
    import`, patient WR-CD: ``server.cd``); radiologist A (``server.a``: a
    token); radiologist B signs in in the browser."""
    work = tmp_path_factory.mktemp("refinements")
    cd = work / "cd"
    cd.mkdir()
    uid = generate_uid()
    make_ct(cd / "old.dcm", StudyInstanceUID=uid, PatientID="WR-CD", StudyDate="20190305",
            RequestedProcedurePriority="STAT")
    pacs = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    pacs.cli("import", str(cd))
    pacs.cli("user", "add", B[0], "--role", "radiologist", "--password", PASSWORD, "--display-name", B[1])
    pacs.start()
    pacs.cd = uid  # type: ignore[attr-defined]
    pacs.a = pacs.make_token(A[0], "radiologist", A[1])  # type: ignore[attr-defined]
    try:
        yield pacs
    finally:
        pacs.stop()


def _worklist(server: PacsServer, **params: Any) -> dict[str, Any]:
    with server.http(token=server.a) as http:  # type: ignore[attr-defined]
        answer = http.get("/api/worklist", params={"patient_id": "WR*", **params})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _uids(found: dict[str, Any]) -> list[str]:
    return [item["study_uid"] for item in found["items"]]


def _priority(server: PacsServer, uid: str) -> str:
    with server.http(token=server.a) as http:  # type: ignore[attr-defined]
        return str(http.get(f"/api/studies/{uid}").json()["priority"])


def _store(server: PacsServer, folder: Path, **attributes: Any) -> str:
    uid = str(attributes.pop("StudyInstanceUID", None) or generate_uid())
    ct = make_ct(folder / f"{uid}.dcm", StudyInstanceUID=uid, **attributes)
    assert server.storescu(str(ct)).returncode == 0
    return uid


def _pull_from_old_pacs(server: PacsServer, tmp: Path, uid: str) -> None:
    """dcmqrscp as the old PACS holding one STAT CT of 2018, copied in by `pacs remote pull`."""
    db, files = tmp / "legacy-db", tmp / "legacy-src"
    db.mkdir()
    files.mkdir()
    ct = make_ct(files / "stat.dcm", StudyInstanceUID=uid, PatientID="WR-OLD", StudyDate="20180102",
                 AccessionNumber="WR-OLD1", RequestedProcedurePriority="STAT")
    port = free_port()
    config = tmp / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nfilmless = ({server.ae_title}, 127.0.0.1, {server.dicom_port})\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nLEGACY {db} RW (200, 1024mb) ANY\nAETable END\n")
    assert run_dcmtk("dcmqridx", str(db), str(ct)).returncode == 0
    with (tmp / "dcmqrscp.log").open("wb") as log:
        proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port, timeout=30, proc=proc)
        server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
        pulled = server.cli("remote", "pull", "LEGACY", "--json", "--since", "20000101", "--until", "20301231",
                            check=False)
        assert pulled.returncode == 0 and json.loads(pulled.stdout)["studies"] == 1, pulled.stdout + pulled.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- 1. old data is not urgent ---------------------------------------------------------------------------
def test_imported_and_pulled_studies_are_not_urgent(server: PacsServer, tmp_path: Path) -> None:
    old = generate_uid()
    _pull_from_old_pacs(server, tmp_path, old)
    live = _store(server, tmp_path, PatientID="WR-LIVE", StudyDate="20261207", RequestedProcedurePriority="STAT")
    cd = server.cd  # type: ignore[attr-defined]
    # Their images are there, their STAT is not taken: the modality's study alone is urgent.
    assert (_priority(server, cd), _priority(server, old), _priority(server, live)) == ("", "", "STAT")
    found = _worklist(server, patient_id="WR-*")
    assert set(_uids(found)) == {cd, old, live}
    assert _uids(found)[0] == live
    assert found["urgent_unread"] == 1
    assert _uids(_worklist(server, priority="urgent")) == [live]
    _sign(server, live)
    assert _worklist(server)["urgent_unread"] == 0


def _sign(server: PacsServer, uid: str) -> None:
    """Radiologist A reports the study: it leaves the urgent group."""
    with server.http(token=server.a) as http:  # type: ignore[attr-defined]
        assert http.put(f"/api/studies/{uid}/report", json={"findings": "Bình thường.", "impression": "Bình thường."}
                        ).status_code == 200
        assert http.post(f"/api/studies/{uid}/report/sign").status_code == 200


# -- 2. the longest waiting first ------------------------------------------------------------------------
def test_urgent_studies_are_ordered_by_waiting_time(server: PacsServer, tmp_path: Path) -> None:
    """Received first, acquired today; received second, dated 2015 (a
    modality's wrong clock, a study sent late): the first waits longest."""
    first = _store(server, tmp_path, PatientID="WR-WAIT1", StudyDate="20261207", StudyTime="080000",
                   RequestedProcedurePriority="STAT")
    second = _store(server, tmp_path, PatientID="WR-WAIT2", StudyDate="20150101", StudyTime="080000",
                    RequestedProcedurePriority="STAT")
    undated = _store(server, tmp_path, PatientID="WR-WAIT3", StudyDate="", StudyTime="",
                     RequestedProcedurePriority="STAT")
    high = _store(server, tmp_path, PatientID="WR-WAIT4", StudyDate="20000101", RequestedProcedurePriority="HIGH")
    found = _worklist(server, patient_id="WR-WAIT*")
    assert _uids(found) == [first, second, undated, high]
    received = [item["received_at"] for item in found["items"][:3]]
    assert received == sorted(received)
    for uid in (first, second, undated, high):
        _sign(server, uid)


# -- 3. a cancelled order --------------------------------------------------------------------------------
def test_a_cancelled_order_no_longer_makes_its_study_urgent(server: PacsServer, tmp_path: Path) -> None:
    uid = generate_uid()
    assert msa(send(server, _orm("WRC1", "WR-CANCEL", "WR-CA1", uid, "S")))[0] == "AA"
    # The modality copied the worklist's STAT into the images.
    _store(server, tmp_path, StudyInstanceUID=uid, PatientID="WR-CA1", AccessionNumber="WR-CANCEL",
           RequestedProcedurePriority="STAT")
    assert _priority(server, uid) == "STAT"
    assert _worklist(server)["urgent_unread"] == 1
    # The HIS cancels the order (a duplicate, the wrong patient): no longer urgent, listed as routine.
    assert msa(send(server, _orm("WRC2", "WR-CANCEL", "WR-CA1", uid, "S", order_control="CA")))[0] == "AA"
    with server.http() as admin:
        assert admin.get("/api/orders/WR-CANCEL").json()["status"] == "CANCELLED"
    assert _priority(server, uid) == "ROUTINE"
    found = _worklist(server)
    assert found["urgent_unread"] == 0 and uid not in _uids(_worklist(server, priority="urgent"))
    assert uid in _uids(_worklist(server, priority="routine"))


# -- 4. two colleagues at the same moment ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "pg"])
def race_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[PacsServer, list[str]]]:
    """A server per index backend with radiologists A, B, C (tokens:
    ``server.tokens``) and (the fixture's second value) 6 unread CTs."""
    pg = create_database() if request.param == "pg" else None
    work = tmp_path_factory.mktemp("claims-race")
    pacs = PacsServer(work / "data", Backend(request.param, pg, None, {}))
    pacs.start()
    pacs.tokens = {user: pacs.make_token(user, "radiologist", name) for user, name in (A, B, C)}  # type: ignore
    uids = [generate_uid() for _ in range(6)]
    for uid in uids:
        make_ct(work / f"{uid}.dcm", StudyInstanceUID=uid, PatientID=f"WR-RACE{uid[-4:]}")
    assert pacs.storescu(*(str(work / f"{uid}.dcm") for uid in uids)).returncode == 0
    try:
        yield pacs, uids
    finally:
        pacs.stop()
        if pg:
            drop_database(pg)


def _at_once(server: PacsServer, path: str, bodies: dict[str, dict[str, Any]]) -> dict[str, httpx.Response]:
    """POST *path* as each user with their body, released together by a barrier."""
    tokens = server.tokens  # type: ignore[attr-defined]
    clients = {user: server.http(token=tokens[user]) for user in bodies}
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(len(bodies))

    def post(user: str) -> None:
        barrier.wait()
        answers[user] = clients[user].post(path, json=bodies[user])

    threads = [threading.Thread(target=post, args=(user,)) for user in bodies]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for client in clients.values():
            client.close()
    return answers


def _one_wins(answers: dict[str, httpx.Response]) -> str:
    won = [user for user, answer in answers.items() if answer.status_code == 200]
    assert len(won) == 1, {user: (a.status_code, a.text) for user, a in answers.items()}
    winner = won[0]
    assert answers[winner].json()["user"] == winner
    for user, answer in answers.items():
        if user != winner:
            assert answer.status_code == 409, answer.text
            assert answer.json()["claim"]["user"] == winner, answer.text
    return winner


def test_two_colleagues_claiming_at_once_one_wins(race_server: tuple[PacsServer, list[str]]) -> None:
    server, uids = race_server
    for uid in uids[:3]:
        answers = _at_once(server, f"/api/studies/{uid}/claim", {B[0]: {}, C[0]: {}})
        _one_wins(answers)


def test_two_colleagues_taking_over_at_once_one_wins(race_server: tuple[PacsServer, list[str]]) -> None:
    """A reads; B and C both press "take over" on A's banner at the same moment."""
    server, uids = race_server
    winners = set()
    for uid in uids[3:]:
        path = f"/api/studies/{uid}/claim"
        with server.http(token=server.tokens[A[0]]) as a:  # type: ignore[attr-defined]
            assert a.post(path).status_code == 200
        take = {"take_over": True, "holder": A[0]}
        winner = _one_wins(_at_once(server, path, {B[0]: take, C[0]: take}))
        winners.add(winner)
        with server.http() as admin:
            assert admin.get(f"/api/studies/{uid}").json()["claim"]["user"] == winner
    # Each take-over audited once, from A.
    with server.http() as admin:
        events = admin.get("/api/audit", params={"action": "claim-takeover", "limit": 1000}).json()
    assert len([e for e in events if e["outcome"] == "success"]) == 3, events
    assert all("taken over from bs.an" in e["detail"] for e in events if e["outcome"] == "success")


def test_a_withdrawn_order_makes_its_study_routine_on_each_backend(race_server: tuple[PacsServer, list[str]],
                                                                    tmp_path: Path) -> None:
    """The triggers on both databases: CA, and DC (discontinued) alike."""
    server, _ = race_server
    for n, control in enumerate(("CA", "DC")):
        uid, accession = generate_uid(), f"WR-W{n}"
        assert msa(send(server, _orm(f"WRW{n}", accession, f"WR-W{n}", uid, "S")))[0] == "AA"
        _store(server, tmp_path, StudyInstanceUID=uid, PatientID=f"WR-W{n}", AccessionNumber=accession,
               RequestedProcedurePriority="STAT")
        with server.http() as admin:
            assert admin.get(f"/api/studies/{uid}").json()["priority"] == "STAT"
            assert msa(send(server, _orm(f"WRX{n}", accession, f"WR-W{n}", uid, "S", order_control=control))
                       )[0] == "AA"
            assert admin.get(f"/api/studies/{uid}").json()["priority"] == "ROUTINE", control


# -- 5. the page refreshes itself ------------------------------------------------------------------------
def test_the_worklist_refreshes_itself(server: PacsServer, tmp_path: Path) -> None:
    """A STAT study stored after the page loaded appears without reload
    (the page's clock moved past the refresh interval); what was typed in a
    search field, the selected row and the scroll position stay; a hidden
    page asks nothing, and refreshes when shown again."""
    from playwright.sync_api import expect

    for n in range(40):  # enough rows to scroll
        make_ct(tmp_path / f"fill{n}.dcm", StudyInstanceUID=generate_uid(), PatientID=f"WR-FILL{n:02d}",
                StudyDate="20260101")
    assert server.storescu(*(str(tmp_path / f"fill{n}.dcm") for n in range(40))).returncode == 0
    with watched_page(viewport={"width": WIDTH, "height": HEIGHT},
                      base_url=f"http://127.0.0.1:{server.http_port}") as (page, errors):
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/api/worklist" in r.url else None)
        page.clock.install()
        sign_in(page, B[0], PASSWORD)
        rows = page.locator('[data-testid="study-row"]')
        expect(rows.first).to_be_visible()
        shown = rows.count()
        assert shown > 20
        # Type a search not yet submitted, select a row far down, scroll.
        page.fill("#search-accession", "WR-TYPED")
        chosen = rows.nth(30)
        chosen_uid = chosen.get_attribute("data-study-uid")
        chosen.focus()
        scrolled = page.evaluate("""() => {
            const wrap = document.querySelector('.table-wrap');
            const box = wrap.scrollHeight > wrap.clientHeight ? wrap : document.scrollingElement;
            box.scrollTop = 300; return [box === wrap, box.scrollTop];
        }""")
        assert scrolled[1] > 0

        uid = generate_uid()
        _store(server, tmp_path, StudyInstanceUID=uid, PatientID="WR-NEW", RequestedProcedurePriority="STAT")
        new_row = page.locator(f'[data-testid="study-row"][data-study-uid="{uid}"]')
        expect(new_row).to_have_count(0)
        page.clock.run_for(31_000)
        expect(new_row).to_have_count(1)
        expect(rows.first).to_have_attribute("data-study-uid", uid)
        expect(page.locator("#search-accession")).to_have_value("WR-TYPED")
        assert page.evaluate("document.activeElement && document.activeElement.dataset.studyUid") == chosen_uid
        position = page.evaluate("""(wrap) => (wrap ? document.querySelector('.table-wrap')
                                       : document.scrollingElement).scrollTop""", scrolled[0])
        assert position == scrolled[1]

        # Hidden: no request however long; shown again: refreshed at once.
        page.evaluate("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
            Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
        asked = len(requests)
        page.clock.run_for(120_000)
        assert len(requests) == asked
        later = _store(server, tmp_path, PatientID="WR-NEW2", RequestedProcedurePriority="HIGH")
        page.evaluate("""() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'});
            document.dispatchEvent(new Event('visibilitychange'));
        }""")
        expect(page.locator(f'[data-testid="study-row"][data-study-uid="{later}"]')).to_have_count(1)
        assert len(requests) == asked + 1
        assert not errors, errors


# -- 6. the refresh's audit events -----------------------------------------------------------------------
def test_an_unattended_refresh_names_only_patients_not_shown_this_hour(server: PacsServer, tmp_path: Path) -> None:
    """The page's refresh (X-Pacs-Unattended) writes no event while it shows
    the patients its user was already shown, and names only a new one; a
    search the user makes names every patient, as before."""
    user = "bs.audit"
    token = server.make_token(user, "radiologist", "BS. Kiểm Tra")
    _store(server, tmp_path, PatientID="WR-AUD1")

    def ask(unattended: bool) -> list[str]:
        headers = {"X-Pacs-Unattended": "1"} if unattended else {}
        with server.http(token=token) as http:
            answer = http.get("/api/worklist", params={"patient_id": "WR-AUD*"}, headers=headers)
        assert answer.status_code == 200, answer.text
        return [item["patient_id"] for item in answer.json()["items"]]

    def events() -> list[dict[str, Any]]:
        with server.http() as admin:
            found = admin.get("/api/audit", params={"limit": 10000, "user": user}).json()
        return [e for e in found if e["action"] == "query"]

    assert ask(False) == ["WR-AUD1"]
    assert [e["patient_id"] for e in events()] == ["WR-AUD1"]
    for _ in range(3):
        assert ask(True) == ["WR-AUD1"]
    assert len(events()) == 1, events()
    _store(server, tmp_path, PatientID="WR-AUD2")
    assert sorted(ask(True)) == ["WR-AUD1", "WR-AUD2"]
    assert sorted(e["patient_id"] for e in events()) == ["WR-AUD1", "WR-AUD2"]
    assert ask(True) and len(events()) == 2
    ask(False)  # the user's own search: everyone shown, again
    named = [set(e["patient_id"].split("\\")) for e in events()]
    assert len(named) == 3 and {"WR-AUD1", "WR-AUD2"} in named, named
