"""Web viewer review (a radiologist on a slow hospital PC), against a running
`pacs serve` and Debian's Chromium through Playwright: text typed while a
save is on its way stays in the editor (and a signature takes no typing);
an amendment asks first; the worklist page the list shrank under shows its
last page, not "no studies found"; a login lockout is said in the UI
language; the viewer's scripts are revalidated, never run stale after an
upgrade; an empty report is not signed (nor saved empty); a link cut inside a
%-escape opens no study without an error; a server restarting does not end
the session."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .peers import PacsServer, wait_until
from .test_ui_review import _instance, _stow
from .test_web_viewer import _log_in, answering, page, radiologist_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server for the module (the `page` fixture asks for this name)."""
    with radiologist_server(tmp_path_factory.mktemp("viewer-review")) as server:
        yield server


def _events(page: Any) -> bool:
    """Let Playwright deliver the page's events (routes): a sync client hears them only inside its own calls."""
    page.evaluate("0")
    return True


def _report(server: PacsServer, study: str) -> dict[str, Any]:
    with server.http() as admin:
        answer = admin.get(f"/api/studies/{study}/report")
    assert answer.status_code == 200, answer.text
    report: dict[str, Any] = answer.json()
    return report


# -- 1. typing while a save is on its way ---------------------------------------------------------------
def test_text_typed_while_a_save_is_on_its_way_stays(page: Any, viewer_server: PacsServer) -> None:
    """Ctrl+S, then on typing over a slow link: the answer to the save used to
    put the saved text back in the editor, wiping what was typed meanwhile,
    with the "unsaved" mark and the kept copy gone (leaving asked nothing)."""
    from playwright.sync_api import expect

    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Lưu^Chậm", "SLOW-SAVE", ""))])
    held: list[Any] = []
    report_url = re.compile(rf".*/api/studies/{re.escape(study)}/report(/sign)?$")

    def hold(route: Any) -> None:
        # The link is slow for writes: each waits until released below.
        if route.request.method in ("PUT", "POST"):
            held.append(route)
        else:
            route.continue_()

    page.route(report_url, hold)
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page.locator("#save-report")).to_be_visible()
    page.fill("#findings", "Gan to nhẹ.")
    page.keyboard.press("Control+s")
    assert wait_until(lambda: _events(page) and len(held) == 1, timeout=20), "the save was not sent"
    page.click("#impression")
    page.keyboard.type("Theo dõi gan nhiễm mỡ.")
    held.pop().continue_()
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    expect(page.locator("#findings")).to_have_value("Gan to nhẹ.")
    expect(page.locator("#impression")).to_have_value("Theo dõi gan nhiễm mỡ.")
    expect(page.locator("#report-dirty")).to_be_visible()  # leaving asks; not saved yet
    assert _report(viewer_server, study)["current"]["impression"] == ""

    # A second save (from the revision the first one made) stores it, no conflict.
    page.keyboard.press("Control+s")
    assert wait_until(lambda: _events(page) and len(held) == 1, timeout=20), "the second save was not sent"
    held.pop().continue_()
    expect(page.locator("#report-dirty")).to_be_hidden()
    expect(page.locator("#report-error")).to_be_hidden()
    current = _report(viewer_server, study)["current"]
    assert (current["findings"], current["impression"]) == ("Gan to nhẹ.", "Theo dõi gan nhiễm mỡ."), current

    # A signature signs what was on screen when confirmed: no typing while it is on its way.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sign-report")
    assert wait_until(lambda: _events(page) and len(held) == 1, timeout=20), "the signature was not sent"
    expect(page.locator("#findings")).not_to_be_editable()
    expect(page.locator("#impression")).not_to_be_editable()
    held.pop().continue_()
    expect(page.locator("#report-status")).to_have_attribute("data-status", "signed")
    page.unroute(report_url)
    assert not page.errors, page.errors


def test_a_failed_signature_gives_the_editor_back(page: Any, viewer_server: PacsServer) -> None:
    """The editor is locked while a signature is on its way, and editable
    again when the server refuses it (503 busy), the text still there."""
    from playwright.sync_api import expect

    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Ký^Lỗi", "SIGN-503", ""))])
    sign_url = re.compile(rf".*/api/studies/{re.escape(study)}/report/sign$")
    page.route(sign_url, lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"error": "the index is busy: try again"}'))
    page.goto(f"/#/study/{study}")
    _log_in(page)
    page.fill("#findings", "Không thấy bất thường.")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sign-report")
    expect(page.locator("#report-error")).to_contain_text("Máy chủ đang quá tải hoặc bảo trì")
    expect(page.locator("#findings")).to_be_editable()
    expect(page.locator("#findings")).to_have_value("Không thấy bất thường.")
    page.unroute(sign_url)


# -- 2. an amendment asks first ------------------------------------------------------------------------
def test_amending_a_signed_report_asks_first(page: Any, viewer_server: PacsServer) -> None:
    """A stray click on "Bổ sung / sửa" made a new version at once (its
    confirmation text was there, never asked): the study turned "draft" on
    every radiologist's worklist, with no way to take it back."""
    from playwright.sync_api import expect

    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Bổ^Sung", "AMEND-1", ""))])
    rad = viewer_server.make_token("bs.ky2", "radiologist", "BS. Ký")
    with viewer_server.http(token=rad) as http:
        base = f"/api/studies/{study}/report"
        assert http.put(base, json={"findings": "Bình thường.", "impression": "Bình thường."}).status_code == 200
        assert http.post(f"{base}/sign").status_code == 200
    page.goto(f"/#/study/{study}")
    _log_in(page)
    asked = answering(page, accept=False)
    page.click("#amend-report")
    assert wait_until(lambda: _events(page) and bool(asked), timeout=10), "amending asked nothing"
    assert asked == ["Mở phiên bản bổ sung mới cho báo cáo đã ký?"], asked
    expect(page.locator("#report-status")).to_have_attribute("data-status", "signed")
    report = _report(viewer_server, study)
    assert report["status"] == "signed" and len(report["versions"]) == 1, report

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#amend-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    expect(page.locator("#findings")).to_be_editable()
    assert len(_report(viewer_server, study)["versions"]) == 2
    assert not page.errors, page.errors


# -- 3. the worklist page the list shrank under -----------------------------------------------------------
def test_a_page_past_the_shortened_list_shows_its_last_page(page: Any, viewer_server: PacsServer) -> None:
    """Page 2 of the "unread" list, the one study there read and signed:
    back on the worklist, page 2 was empty, "no studies found" over the 50
    unread studies of page 1 (and "0–50 / 50")."""
    from playwright.sync_api import expect

    name = ("Phân^Trang", "PAGE-", "")
    studies = [generate_uid() for _ in range(51)]
    _stow(viewer_server, [_instance(uid, generate_uid(), 1, patient=(name[0], f"{name[1]}{n:02d}", ""),
                                    date=f"2023{1 + n % 12:02d}{1 + n % 28:02d}") for n, uid in enumerate(studies)])
    page.goto("/")
    _log_in(page)
    page.fill("#search-name", "phan trang")
    page.select_option("#search-status", "unread")
    rows = page.locator('[data-testid="study-row"]')
    expect(page.locator("#page-info")).to_have_text("1–50 / 51")
    page.click("#next-page")
    expect(page.locator("#page-info")).to_have_text("51–51 / 51")
    expect(rows).to_have_count(1)
    last = rows.first.get_attribute("data-study-uid")
    rows.first.click()
    expect(page.locator("#save-report")).to_be_visible()
    page.fill("#findings", "Bình thường.")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sign-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "signed")

    page.keyboard.press("Escape")
    expect(page).to_have_url(re.compile(r"#/worklist$"))
    expect(page.locator("#page-info")).to_have_text("1–50 / 50")
    expect(rows).to_have_count(50)
    expect(page.locator("#worklist-message")).to_have_text("")
    assert last not in [rows.nth(i).get_attribute("data-study-uid") for i in range(50)]
    expect(page.locator("#next-page")).to_be_disabled()
    assert not page.errors, page.errors


# -- 4. a login lockout in the UI's language -----------------------------------------------------------
def test_a_login_lockout_is_said_in_the_ui_language(page: Any, viewer_server: PacsServer) -> None:
    """The lock after repeated wrong passwords (HTTP 429) showed the server's
    English words only, to a Vietnamese user."""
    from playwright.sync_api import expect

    viewer_server.cli("user", "add", "bs.khoa", "--role", "radiologist", "--password", "Dung-mat-khau-1")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"#/login$"))
    error = page.locator("#login-error")
    for _ in range(10):  # 5 wrong passwords lock the username (pacs.auth.USER_FAILURES)
        page.fill("#username", "bs.khoa")
        page.fill("#password", "sai-mat-khau")
        page.click("#login-button")
        expect(error).to_be_visible()
        expect(page.locator("#login-button")).to_be_enabled()
        if "too many" in (error.text_content() or ""):
            break
    expect(error).to_have_text(re.compile(r"^Đăng nhập thất bại: Quá nhiều lần thử; hãy thử lại sau \(too many"))


# -- 5. the scripts after an upgrade ----------------------------------------------------------------------
def test_the_viewers_files_are_revalidated(viewer_server: PacsServer) -> None:
    """The scripts went without Cache-Control: a browser keeps such a file
    for a tenth of its age unasked (days for files installed months ago), so
    after an upgrade it ran the old modules with the new index.html and API,
    or old and new modules together (an import the other lacks: a blank page)."""
    with viewer_server.http(token="") as http:
        for name in ("app.js", "api.js", "report.js", "viewer.js", "worklist.js", "i18n.js", "style.css"):
            answer = http.get(f"/static/{name}")
            assert answer.status_code == 200, name
            assert answer.headers.get("cache-control") == "no-cache", (name, answer.headers)
            # Revalidation costs a 304, not the file.
            again = http.get(f"/static/{name}", headers={"If-None-Match": answer.headers["etag"]})
            assert again.status_code == 304, (name, again.status_code)
        assert http.get("/").headers.get("cache-control") == "no-cache"


# -- 6. an empty report is not signed; a broken link; a server restarting -----------------------------
def test_an_empty_report_is_not_signed_nor_saved(page: Any, viewer_server: PacsServer) -> None:
    """Sign on an untouched report saved an empty draft first, then got 422:
    the study read "draft" on every worklist with nothing written."""
    from playwright.sync_api import expect

    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Trống^Rỗng", "EMPTY-1", ""))])
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page.locator("#findings")).to_be_editable()
    page.click("#sign-report")
    expect(page.locator("#toast")).to_contain_text("Báo cáo trống")
    assert _report(viewer_server, study)["status"] == "none"
    assert not page.errors, page.errors


def test_a_link_cut_inside_an_escape_opens_no_study_without_an_error(page: Any, viewer_server: PacsServer) -> None:
    """"#/study/%E0%A4%A" (a link cut short in a chat) threw URIError: the
    address changed, the old screen stayed, without a word."""
    from playwright.sync_api import expect

    page.goto("/#/worklist")
    _log_in(page)
    page.goto("/#/study/%E0%A4%A")
    expect(page.locator("#study-error")).to_be_visible()
    assert not page.errors, page.errors


def test_a_server_restarting_does_not_end_the_session(page: Any, viewer_server: PacsServer) -> None:
    """A 503 (or no answer) to the start-up /api/me dropped the token: after
    every restart of the server each radiologist had to log in again. It is
    said, and asked again until the server answers."""
    from playwright.sync_api import expect

    page.goto("/#/worklist")
    _log_in(page)
    expect(page.locator("table#worklist")).to_be_visible()
    me = re.compile(r".*/api/me$")
    page.route(me, lambda route: route.fulfill(status=503, content_type="application/json",
                                               body='{"error": "the archive is starting"}'))
    page.reload()
    expect(page.locator("#toast")).to_contain_text("Máy chủ đang quá tải hoặc bảo trì")
    page.unroute(me)
    expect(page.locator("table#worklist")).to_be_visible(timeout=15000)
    assert page.evaluate("location.hash") == "#/worklist"
