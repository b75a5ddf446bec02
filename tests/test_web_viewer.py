"""The radiologist's web viewer (viewer_api/static) in a real browser.

A real `pacs serve` with the synthetic sample studies, driven by Playwright
through Debian's Chromium (never a downloaded browser): log in, search the
worklist without diacritics, open the CT study, scroll slices, change the
window, write, save and sign the report; also the 1366x768 layout (no
horizontal scroll) and the VI/EN toggle. Screenshots of each step go to
test-artifacts/web-viewer/.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .peers import ROOT, Backend, PacsServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "web-viewer"
HINT = "bash scripts/test.sh installs them (apt-get install -y chromium; pip install playwright; never `playwright install`)"
WIDTH, HEIGHT = 1366, 768
USERNAME, PASSWORD = "bs.an", "Secret-123"
FINDINGS = "Nhu mô phổi hai bên sáng đều, không thấy nốt mờ. Không tràn dịch màng phổi."
IMPRESSION = "Chưa phát hiện bất thường trên phim CT ngực."


def _sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the Python package playwright is not installed: {HINT}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (Debian package chromium): {HINT}")
    return sync_playwright


@contextmanager
def watched_page(**context: Any) -> Iterator[tuple[Any, list[str]]]:
    """A page of headless Debian Chromium (vi-VN; *context*: the browser
    context's options), and the list its script errors and Content Security
    Policy refusals are collected in."""
    with _sync_playwright()() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            browser_context = browser.new_context(locale="vi-VN", **context)
            browser_context.set_default_timeout(20_000)
            page = browser_context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text
                    else None)
            yield page, problems
            browser_context.close()
        finally:
            browser.close()


def browsing(server: PacsServer, **context: Any) -> Any:
    """watched_page on *server*'s HTTP port, in the laptop-sized window the viewer is tested in."""
    return watched_page(viewport={"width": WIDTH, "height": HEIGHT}, base_url=f"http://127.0.0.1:{server.http_port}",
                        **context)


@pytest.fixture
def viewer_server(tmp_path: Path, samples: Path) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(samples))
    server.cli("user", "add", USERNAME, "--role", "radiologist", "--password", PASSWORD,
               "--display-name", "BS. Trần Văn An")
    server.start()
    yield server
    server.stop()
    if server.alive() or (server.proc is not None and server.proc.returncode not in (0, -15)):
        print(server.log_text()[-5000:])


@pytest.fixture
def page(request: pytest.FixtureRequest) -> Iterator[Any]:
    _sync_playwright()  # fail fast, before starting the server
    viewer_server: PacsServer = request.getfixturevalue("viewer_server")
    with browsing(viewer_server) as (page, problems):
        page.errors = problems  # uncaught JavaScript exceptions, Content Security Policy refusals
        yield page


class Steps:
    """Numbered screenshots of one walk-through, in a folder only it clears.

    The `page` fixture is shared with other test files that may run at the
    same time on another worker, so it must not touch the screenshots.
    """

    def __init__(self, page: Any, folder: Path = ARTIFACTS) -> None:
        self.page = page
        self.n = 0
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"))


def assert_no_horizontal_scroll(page: Any) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= WIDTH, f"horizontal scroll: scrollWidth {width} > {WIDTH}"
    body = page.evaluate("document.body.scrollWidth")
    assert body <= WIDTH, f"horizontal scroll: body.scrollWidth {body} > {WIDTH}"


def test_radiologist_reads_and_signs_a_ct(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    steps = Steps(page)

    # 1. Login; a wrong password is said so in the UI language.
    page.goto("/")
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.locator("#username")).to_be_focused()
    assert_no_horizontal_scroll(page)
    page.fill("#username", USERNAME)
    page.fill("#password", "wrong-password")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#login-error")).to_have_text("Đăng nhập thất bại: sai tên đăng nhập hoặc mật khẩu")
    steps.shot("login-error")
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    expect(page.locator("#current-user")).to_have_text("BS. Trần Văn An")

    # 2. Worklist: a name typed without diacritics finds "Nguyễn^Văn An".
    page.fill("#search-name", "nguyen")
    page.click("#search-button")
    rows = page.locator('[data-testid="study-row"]')
    # The unfiltered list of the first load stays on screen until the search answers: wait until
    # every row is a match before reading the names (CI read the old list once).
    expect(rows.filter(has_not_text="Nguyễn")).to_have_count(0)
    expect(rows.filter(has_text="Nguyễn Văn An").first).to_be_visible()
    names = rows.locator("td.name").all_inner_texts()
    assert names and all("Nguyễn" in n and "^" not in n for n in names), names
    assert_no_horizontal_scroll(page)
    steps.shot("worklist")

    # An accession number typed from its start finds its study; a reversed date range says so.
    with viewer_server.http() as admin:
        dx = admin.get("/api/worklist", params={"modality": "DX"}).json()["items"][0]
    page.fill("#search-name", "")
    page.fill("#search-accession", dx["accession"][:-1])
    page.click("#search-button")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-study-uid", dx["study_uid"])
    page.fill("#search-date-from", "2024-08-31")
    page.fill("#search-date-to", "2024-08-01")
    page.click("#search-button")
    expect(page.locator("#worklist-message")).to_have_class(re.compile("error"))
    page.click("#clear-button")
    page.fill("#search-name", "nguyen")
    page.click("#search-button")
    expect(rows.filter(has_text="Nguyễn Văn An").first).to_be_visible()

    # The language toggle switches the labels, and the choice is remembered.
    search_label = page.locator('label[for="search-name"]')
    expect(search_label).to_have_text("Họ tên bệnh nhân")
    page.click("#lang-toggle")
    expect(search_label).to_have_text("Patient name")
    expect(page.locator("#search-button")).to_have_text("Search")
    assert page.evaluate("localStorage.getItem('pacs.lang')") == "en"
    steps.shot("worklist-en")
    page.click("#lang-toggle")
    expect(search_label).to_have_text("Họ tên bệnh nhân")

    # 3. Open the CT study.
    ct_row = page.locator('[data-testid="study-row"][data-modalities*="CT"]').filter(has_text="Nguyễn").first
    study_uid = ct_row.get_attribute("data-study-uid")
    assert study_uid
    ct_row.click()
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study_uid)}$"))
    expect(page.locator("#patient-name")).to_have_text("Nguyễn Văn An")
    thumbs = page.locator('[data-testid="series-thumb"]')
    expect(thumbs.first).to_be_visible()
    image = page.locator("#viewer-image")
    expect(image).to_have_attribute("src", re.compile(r"/instances/[\d.]+/rendered\?.*viewport=\d+,\d+"))
    expect(image).to_be_visible()
    page.wait_for_function("() => { const i = document.querySelector('#viewer-image'); return i && i.complete && i.naturalWidth > 0; }")
    label = page.locator("#slice-label")
    expect(label).to_have_text(re.compile(r"^Lát cắt 1 / \d+$"))
    total = int(label.inner_text().rsplit("/", 1)[1])
    assert total > 1
    assert "window=" not in image.get_attribute("src")  # "Default": the object's own window
    assert_no_horizontal_scroll(page)
    steps.shot("study")

    # Mouse wheel over the image: next slices, new image URLs.
    first_src = image.get_attribute("src")
    page.hover("#viewport")
    page.mouse.wheel(0, 100)
    expect(label).to_have_text(f"Lát cắt 2 / {total}")
    expect(image).not_to_have_attribute("src", first_src)
    second_src = image.get_attribute("src")
    page.mouse.wheel(0, 100)
    expect(label).to_have_text(f"Lát cắt 3 / {total}")
    expect(image).not_to_have_attribute("src", second_src)
    # Keyboard: up goes back.
    page.keyboard.press("ArrowUp")
    expect(label).to_have_text(f"Lát cắt 2 / {total}")
    expect(image).to_have_attribute("src", second_src)
    steps.shot("scrolled")

    # 4. Lung window preset.
    page.click('[data-preset="lung"]')
    expect(image).to_have_attribute("src", re.compile(r"window=-600,1500"))
    expect(page.locator("#wl-label")).to_contain_text("-600")
    page.wait_for_function("() => { const i = document.querySelector('#viewer-image'); return i.complete && i.naturalWidth > 0; }")
    steps.shot("lung-window")

    # Right-button drag changes centre / width continuously (new renders).
    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 60, y + 40, steps=6)
    page.mouse.up(button="right")
    # 60 px right, 40 px down from C -600 / W 1500 at 1500/300 units a pixel
    expect(page.locator("#wl-label")).to_have_text("C -400 / W 1800")
    expect(page.locator('[data-preset="lung"]')).not_to_have_class(re.compile(r"\bactive\b"))
    expect(image).to_have_attribute("src", re.compile(r"window=-400,1800,linear"))
    # Ctrl+wheel zooms on the client (no new request), "0" fits again.
    src = image.get_attribute("src")
    page.keyboard.down("Control")
    page.mouse.wheel(0, -300)
    page.keyboard.up("Control")
    expect(page.locator("#zoom-label")).not_to_have_text("100%")
    assert "scale(1)" not in (image.get_attribute("style") or "")
    assert image.get_attribute("src") == src
    steps.shot("window-drag-zoom")
    page.keyboard.press("0")
    expect(page.locator("#zoom-label")).to_have_text("100%")

    # 5. Report: write in Vietnamese, save, sign.
    expect(page.locator('label[for="findings"]')).to_have_text("Mô tả")
    expect(page.locator('label[for="impression"]')).to_have_text("Kết luận")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "none")
    page.fill("#findings", FINDINGS)
    page.fill("#impression", IMPRESSION)
    page.click("#save-report")
    status = page.locator("#report-status")
    expect(status).to_have_attribute("data-status", "draft")
    expect(page.locator("#report-error")).to_be_hidden()
    steps.shot("report-draft")

    dialogs = answering(page)
    page.click("#sign-report")
    expect(status).to_have_attribute("data-status", "signed")
    expect(status).to_have_text("Đã ký")
    assert dialogs, "signing asks for confirmation"
    expect(page.locator("#findings")).not_to_be_editable()
    expect(page.locator("#impression")).not_to_be_editable()
    expect(page.locator("#findings")).to_have_value(FINDINGS)
    expect(page.locator("#impression")).to_have_value(IMPRESSION)
    expect(page.locator("#save-report")).to_be_hidden()
    expect(page.locator("#sign-report")).to_be_hidden()
    expect(page.locator("#amend-report")).to_be_visible()
    expect(page.locator("#report-signed-info")).to_contain_text("BS. Trần Văn An")
    pdf_link = page.locator("#report-pdf")
    expect(pdf_link).to_be_visible()
    pdf = page.request.get(pdf_link.get_attribute("href"))  # the session cookie goes along
    assert pdf.status == 200, pdf.text()
    assert pdf.body().startswith(b"%PDF")
    # The signed report is also a series of the study (Encapsulated PDF): it opens as a document.
    page.reload()
    page.click('[data-testid="series-thumb"][data-modality="DOC"]')
    link = page.locator(".document-link").first
    expect(link).to_be_visible()
    document = page.request.get(link.get_attribute("href"))
    assert document.status == 200 and document.body().startswith(b"%PDF"), document.status
    page.click('[data-testid="series-thumb"]:not([data-modality="DOC"])')
    assert_no_horizontal_scroll(page)
    steps.shot("report-signed")

    # The worklist now shows the study as signed.
    page.keyboard.press("Escape")
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    expect(page.locator(f'[data-testid="study-row"][data-study-uid="{study_uid}"]')).to_have_attribute(
        "data-report-status", "signed"
    )

    # A reload keeps the session (the cookie, via /api/me) and the language.
    page.click("#lang-toggle")
    page.goto(f"/#/study/{study_uid}")
    page.reload()
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study_uid)}$"))
    expect(page.locator('label[for="findings"]')).to_have_text("Findings")
    expect(page.locator("#report-status")).to_have_text("Signed")
    expect(page.locator("#slice-label")).to_have_text(re.compile(r"^Slice 1 / \d+$"))
    steps.shot("study-en")

    # Logout goes back to the login screen and the session is gone.
    page.click("#logout-button")
    expect(page).to_have_url(re.compile(r"#/login$"))
    assert page.request.get("/api/me").status == 401

    # An EMR link by accession number, opened without a session: login first,
    # then the study; an accession the user cannot see says so.
    with viewer_server.http() as admin:
        accession = admin.get(f"/api/studies/{study_uid}").json()["accession"]
    assert accession
    page.goto(f"/viewer/accession/{accession}")
    expect(page).to_have_url(re.compile(r"#/login$"))
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study_uid)}$"))
    expect(page.locator("#patient-name")).to_have_text("Nguyễn Văn An")
    page.goto("/viewer/accession/NO-SUCH-ACC")
    expect(page.locator("#app")).to_contain_text("NO-SUCH-ACC")
    steps.shot("accession-unknown")
    page.goto("/viewer/accession/*")  # a wildcard opens nobody (it opened the first patient)
    expect(page.locator("#accession-message")).to_contain_text("*")
    expect(page).to_have_url(re.compile(r"#/accession/"))

    assert not page.errors, page.errors
    assert len(list(ARTIFACTS.glob("*.png"))) == steps.n

    # Every access of the session is in the audit trail, with user and study.
    with viewer_server.http() as admin:
        events = admin.get("/api/audit", params={"user": USERNAME, "limit": 5000}).json()
    actions = {(e["action"], e["study_uid"]) for e in events if e["outcome"] == "success"}
    for action in ("login", "logout", "query"):
        assert action in {a for a, _ in actions}, action
    for action in ("view", "retrieve", "report-update", "report-sign", "download"):
        assert (action, study_uid) in actions, action


@contextmanager
def radiologist_server(work: Path) -> Iterator[PacsServer]:
    """A running server with no studies whose radiologist USERNAME logs in
    with PASSWORD (the `page` fixture asks for a `viewer_server`)."""
    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("user", "add", USERNAME, "--role", "radiologist", "--password", PASSWORD,
               "--display-name", "BS. Trần Văn An")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def answering(page: Any, accept: bool = True, text: str | None = None) -> list[str]:
    """The messages of the page's next dialog, which is accepted (a prompt
    answered with *text*) or dismissed."""
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept(text) if accept else dialog.dismiss()

    page.once("dialog", answer)
    return asked


def sign_in(page: Any, username: str, password: str) -> None:
    """Open the viewer's start page and log in as *username*."""
    page.goto("/")
    page.fill("#username", username)
    page.fill("#password", password)
    page.press("#password", "Enter")


def _log_in(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page).to_have_url(re.compile(r"#/login$"))
    page.fill("#username", USERNAME)
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")


def test_report_text_survives_a_lost_session_and_a_colleagues_save(page: Any, viewer_server: PacsServer) -> None:
    """Typed text is never lost: not when the session ends before the save
    (re-login brings it back), not when a colleague saved first (their text
    is shown, the author's own beside it, nothing overwritten)."""
    from playwright.sync_api import expect

    with viewer_server.http() as admin:
        items = admin.get("/api/worklist", params={"modality": "CT"}).json()["items"]
    study = items[0]["study_uid"]
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    mine = "Tổn thương dạng nốt thùy trên phổi phải, kích thước 8 mm."
    page.fill("#findings", mine)
    page.fill("#impression", "Theo dõi.")

    # The session ends behind the viewer's back (12-hour expiry, an administrator).
    token = page.evaluate("sessionStorage.getItem('pacs.token')")
    assert page.request.post("/api/auth/logout", headers={"Authorization": f"Bearer {token}"}).status == 204
    page.click("#save-report")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    expect(page.locator("#findings")).to_have_value(mine)
    expect(page.locator("#report-dirty")).to_be_visible()
    page.click("#save-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    expect(page.locator("#report-dirty")).to_be_hidden()

    # A colleague saves while this one is still editing: the save is refused, their
    # text is shown and this author's text is kept beside it.
    colleague = viewer_server.make_token("bs.lan", "radiologist", "Trần^Thị Lan")
    with viewer_server.http(token=colleague) as lan:
        assert lan.put(f"/api/studies/{study}/report", json={
            "findings": "Nốt mờ 8 mm, nghĩ tới u hạt.", "impression": "Sinh thiết.", "revision": 1}).status_code == 200
    page.fill("#findings", mine + " Không hạch trung thất.")
    page.click("#save-report")
    expect(page.locator("#report-error")).to_be_visible()
    expect(page.locator("#findings")).to_have_value("Nốt mờ 8 mm, nghĩ tới u hạt.")
    expect(page.locator("#report-mine")).to_have_value(re.compile("Không hạch trung thất"))
    # Signing now signs what is on the screen (the colleague's revision 2), nothing else.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sign-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "signed")
    with viewer_server.http() as admin:
        report = admin.get(f"/api/studies/{study}/report").json()
    assert report["current"]["findings"] == "Nốt mờ 8 mm, nghĩ tới u hạt." and report["current"]["revision"] == 2
    assert not page.errors, page.errors


def test_clip_plays_and_a_zoomed_radiograph_is_sharp(page: Any, viewer_server: PacsServer) -> None:
    """A multi-frame clip is counted in frames and plays (button or P) at
    its own rate (25 fps, Recommended Display Frame Rate); P pauses it."""
    from playwright.sync_api import expect

    with viewer_server.http() as admin:
        study = admin.get("/api/worklist", params={"modality": "US"}).json()["items"][0]["study_uid"]
    page.goto(f"/#/study/{study}")
    _log_in(page)
    label = page.locator("#slice-label")
    expect(label).to_have_text(re.compile(r"^Khung hình 1 / \d+$"))
    total = int(label.get_attribute("data-total"))
    assert total > 1
    page.click("#cine-play")
    expect(page.locator("#cine-play")).to_have_attribute("aria-pressed", "true")
    expect(label).not_to_have_attribute("data-index", "1")
    page.wait_for_function(f"() => Number(document.querySelector('#slice-label').dataset.index) >= {min(total, 5)}")
    page.locator("#viewport").focus()
    page.keyboard.press("p")
    expect(page.locator("#cine-play")).to_have_attribute("aria-pressed", "false")
    paused = label.get_attribute("data-index")
    page.wait_for_timeout(300)
    assert label.get_attribute("data-index") == paused
    page.reload()  # the same frame again, not the first
    expect(label).to_have_attribute("data-index", paused)

    # A 2k x 2k radiograph zoomed in is fetched with its own pixels, not a
    # screen-sized rendering enlarged; back at 100 % the lighter one returns.
    with viewer_server.http() as admin:
        dx = admin.get("/api/worklist", params={"modality": "DX"}).json()["items"][0]["study_uid"]
    page.goto(f"/#/study/{dx}")
    image = page.locator("#viewer-image")
    expect(image).to_have_attribute("src", re.compile(r"viewport="))
    fit = image.get_attribute("src")

    def viewport_width(src: str) -> int:
        return int(re.search(r"viewport=(\d+),", src).group(1))

    page.locator("#viewport").focus()
    for _ in range(4):
        page.keyboard.press("+")
    expect(image).not_to_have_attribute("src", fit)
    assert viewport_width(image.get_attribute("src")) > viewport_width(fit)
    page.wait_for_function("() => document.querySelector('#viewer-image').naturalWidth > 1000")
    page.keyboard.press("0")
    expect(image).to_have_attribute("src", fit)

    # The patient's other study is one click away, for comparison.
    with viewer_server.http() as admin:
        items = admin.get("/api/worklist", params={"limit": 100}).json()["items"]
    by_patient: dict[str, list[str]] = {}
    for item in items:
        by_patient.setdefault(item["patient_id"], []).append(item["study_uid"])
    first, other = next(uids for uids in by_patient.values() if len(uids) == 2)
    page.goto(f"/#/study/{first}")
    prior = page.locator('[data-testid="prior-study"]')
    expect(prior).to_have_count(1)
    prior.click()
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(other)}$"))
    assert not page.errors, page.errors


def test_a_save_over_a_link_that_stalls_fails_with_a_message(page: Any, viewer_server: PacsServer) -> None:
    """A report saved over a satellite link that drops mid-request waited for
    ever: the button stayed busy and the draft looked saved. The call now has a
    deadline; past it the radiologist is told and the text stays on the page."""
    from playwright.sync_api import expect

    with viewer_server.http() as admin:
        study = admin.get("/api/worklist", params={"modality": "CT"}).json()["items"][-1]["study_uid"]
    page.clock.install()  # the deadline's timer, moved on below instead of waited for
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    text = "Không thấy bất thường."
    page.fill("#findings", text)
    stalled: list[str] = []
    # The request leaves the browser and no answer ever comes back: a dropped link.
    page.route(re.compile(r".*/report$"), lambda route: stalled.append(route.request.method)
               if route.request.method == "PUT" else route.continue_())
    page.click("#save-report")
    for _ in range(200):  # the PUT reaches the route handler (the browser's own pace, not a timing)
        if stalled:
            break
        page.wait_for_timeout(50)
    assert stalled == ["PUT"], stalled
    page.clock.fast_forward("01:01")
    expect(page.locator("#report-error")).to_be_visible()
    expect(page.locator("#report-error")).to_contain_text(re.compile("did not answer in time|không trả lời kịp"))
    expect(page.locator("#findings")).to_have_value(text)
    expect(page.locator("#report-dirty")).to_be_visible()
    page.unroute(re.compile(r".*/report$"))
    page.click("#save-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    assert not page.errors, page.errors
