"""Review findings on report templates ("mẫu kết quả"), each against a real
`pacs serve` (SQLite, and PostgreSQL where the index matters), the real
`pacs template` command, or the viewer in headless Chromium."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from pydicom import dcmread

from . import test_web_viewer as web_viewer
from .conftest import PacsServer, pydicom_file
from .test_report_templates import API, STARTER, _as, _create, server  # noqa: F401 (a fixture)
from .test_web_viewer import _log_in

page = web_viewer.page
viewer_server = web_viewer.viewer_server


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_decomposed_vietnamese_counts_and_is_kept_composed(server: PacsServer, tmp_path: Path) -> None:
    """A Mac's or a phone's keyboard sends Vietnamese decomposed (NFD: "ệ"
    as e + circumflex + dot below). Before, the limits counted those code
    points: a 100-character name was refused as "279 characters, at most
    120", a 15-letter modality and an 18,000-character findings likewise; the
    text was stored decomposed; and a department file saved so was imported
    as "updated" (a new version of every template) though nothing changed."""
    name = "Nghiệm pháp " + "ệ" * 88  # 100 characters as written, 279 code points decomposed
    # 18,090 characters as written, 22,680 code points decomposed.
    findings = "Gan mật tụy lách thận bình thường; đường mật trong gan không giãn. " * 270
    body = {"name": _nfd(name), "modality": _nfd("SIÊU ÂM TỔNG QT"), "findings": _nfd(findings)}
    assert len(body["name"]) > 120 and len(body["findings"]) > 20_000 and len(body["modality"]) > 16
    with _as(server, "bs.an") as http:
        created = http.post(API, json=body)
        assert created.status_code == 201, created.text[:300]
        assert (created.json()["name"], created.json()["findings"]) == (name, findings)
        assert created.json()["modality"] == "SIÊU ÂM TỔNG QT"

    # The department's set, saved decomposed by an editor on a Mac: the same text, nothing to update.
    exported = json.loads(server.cli("template", "export", "-").stdout)
    mac = tmp_path / "khoa-mac.json"
    mac.write_text(_nfd(json.dumps(exported, ensure_ascii=False)), encoding="utf-8")
    done = json.loads(server.cli("template", "import", str(mac), "--json").stdout)
    assert done == {"created": [], "updated": [], "unchanged": [t["name"] for t in exported]}


def test_a_report_save_does_not_name_a_colleagues_template(server: PacsServer) -> None:
    """A report save's template_id was described in its audit event whoever
    owned the template: a radiologist sending the id of a colleague's
    template (which they may not read: 404) got the trail to say their
    report's text came from it, and wrote that template's name into it."""
    secret = _create(server, "bs.lan", {"name": "Mẫu riêng của BS Lan", "findings": "Nang gan 12 mm."})
    study = dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID
    with _as(server, "bs.an") as http:
        assert http.get(f"{API}/{secret['id']}").status_code == 404
        saved = http.put(f"/api/studies/{study}/report",
                         json={"findings": "Nang gan.", "impression": "x", "template_id": secret["id"]})
        assert saved.status_code == 200, saved.text
    with _as(server, "qtv") as http:
        events = http.get("/api/audit", params={"user": "bs.an", "action": "report-update"}).json()
    details = [e["detail"] for e in events]
    assert not any("Mẫu riêng" in d for d in details), details
    assert any(f"text from template #{secret['id']} (unknown)" in d for d in details), details


def test_cli_import_of_a_deeply_nested_file_is_refused_clearly(server: PacsServer, tmp_path: Path) -> None:
    """A file of lists nested thousands deep (JSON or TOML) ended `pacs
    template import` with "error: RecursionError: maximum recursion depth
    exceeded" and exit 1, the code for "nothing to remove", instead of a
    refused file (exit 2) saying what is wrong with it."""
    for name, text in (("deep.json", "[" * 100_000 + "]" * 100_000),
                       ("deep.toml", "template = " + "[" * 10_000 + "]" * 10_000)):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        refused = server.cli("template", "import", str(path), check=False)
        assert refused.returncode == 2, (name, refused.returncode, refused.stderr)
        assert "nested too deeply" in refused.stderr and "RecursionError" not in refused.stderr, refused.stderr


def test_cli_import_refuses_a_key_given_twice_in_json(server: PacsServer, tmp_path: Path) -> None:
    """A JSON template with "findings" twice (a block copied in a hand-edited
    file) was imported with the last one only, the first text dropped
    without a word; TOML refuses the same file, and so does JSON now."""
    path = tmp_path / "khoa.json"
    path.write_text('[{"name": "Siêu âm gan", "findings": "Gan không to.", "impression": "Bình thường.",\n'
                    '  "findings": ""}]', encoding="utf-8")
    refused = server.cli("template", "import", str(path), check=False)
    assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
    assert "'findings' is given twice" in refused.stderr, refused.stderr
    assert "Siêu âm gan" not in server.cli("template", "list", "--json").stdout


def test_cli_remove_with_other_diacritics_archives_nothing(server: PacsServer) -> None:
    """`pacs template remove` falls back on the name without diacritics, for
    a name typed on a console without them. It did so for a name typed with
    other diacritics too: "Mẩu" (another word) archived the template "Mẫu"."""
    with _as(server, "qtv") as http:
        assert http.post(API, json={"name": "Mẫu", "findings": "Bình thường."}).status_code == 201
    missed = server.cli("template", "remove", "Mẩu", check=False)
    assert missed.returncode == 1, (missed.stdout, missed.stderr)
    assert "Mẫu" in [t["name"] for t in json.loads(server.cli("template", "list", "--json").stdout)]
    # Typed without any diacritics it is still found.
    assert "archived: Mẫu" in server.cli("template", "remove", "mau").stdout


def _open_picker(page: Any, server: PacsServer) -> Any:
    """A radiologist on a US abdomen study with the starter set, the picker open; its items."""
    from playwright.sync_api import expect

    server.cli("template", "import", "--starter")
    with server.http() as admin:
        study = admin.get("/api/worklist", params={"modality": "US"}).json()["items"][0]["study_uid"]
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    expect(page.locator("#report-status")).to_have_attribute("data-status", "none")
    page.click("#template-summary")
    items = page.locator('[data-testid="template-item"]')
    expect(items).to_have_count(4)
    expect(items.first).to_contain_text(STARTER[0])
    return items


def test_enter_in_the_picker_picks_from_what_was_typed(page: Any, viewer_server: PacsServer) -> None:
    """Enter in the template search filled the report from the first item of
    the list shown, which still answered the text typed before (the search
    waits for a pause in typing, then for the server): "tuyen giap" + Enter
    filled an empty report with the abdominal ultrasound, unasked."""
    from playwright.sync_api import expect

    _open_picker(page, viewer_server)
    page.eval_on_selector("#template-search", """(el) => {
        el.value = "tuyen giap";
        el.dispatchEvent(new Event("input", { bubbles: true }));
        el.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true, cancelable: true }));
    }""")
    expect(page.locator("#template-list")).to_be_hidden()
    with viewer_server.http() as admin:
        thyroid = next(t for t in admin.get(API, params={"q": "tuyen giap"}).json()["items"])
    expect(page.locator("#findings")).to_have_value(thyroid["findings"])
    expect(page.locator("#impression")).to_have_value(thyroid["impression"])
    assert not page.errors, page.errors


def test_a_picker_opened_before_the_study_is_known_sorts_for_it(page: Any, viewer_server: PacsServer) -> None:
    """The picker opened while the study's details were still on their way
    asked for templates without a modality; the study's modality, arriving
    while that search was answered, did not ask again, so the list stayed in
    name order (the CT head first on an abdominal ultrasound) and Enter
    picked that one. Failed once in CI."""
    from playwright.sync_api import expect

    viewer_server.cli("template", "import", "--starter")
    with viewer_server.http() as admin:
        study = admin.get("/api/worklist", params={"modality": "US"}).json()["items"][0]["study_uid"]
    held: dict[str, Any] = {}

    def hold_first(name: str) -> Any:
        return lambda route: held.setdefault(name, route) is route or route.continue_()

    details = re.compile(rf".*/api/studies/{re.escape(study)}$")
    searches = re.compile(r".*/api/report-templates(\?.*)?$")
    page.route(details, hold_first("details"))
    page.route(searches, hold_first("search"))
    page.goto(f"/#/study/{study}")
    _log_in(page)
    page.click("#template-summary")
    page.wait_for_function("() => document.querySelector('#template-picker').getAttribute('aria-busy') === 'true'")
    assert set(held) == {"details", "search"}, held
    held["details"].continue_()  # the study is known while the first search is on its way
    expect(page.locator("#report-status")).to_have_attribute("data-status", "none")
    held["search"].continue_()
    items = page.locator('[data-testid="template-item"]')
    expect(items).to_have_count(4)
    expect(items.first).to_contain_text(STARTER[0])
    assert not page.errors, page.errors


def test_escape_in_the_picker_closes_it_and_stays_on_the_study(page: Any, viewer_server: PacsServer) -> None:
    """Escape on a template of the open list (reached with the arrow keys)
    was the study page's Escape: back to the worklist, instead of closing
    the list."""
    from playwright.sync_api import expect

    _open_picker(page, viewer_server)
    url = page.url
    page.press("#template-search", "ArrowDown")
    expect(page.locator('[data-testid="template-item"]').first).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#template-list")).to_be_hidden()
    expect(page.locator("#template-summary")).to_be_focused()
    assert page.url == url
    assert not page.errors, page.errors


def test_the_audit_names_the_template_version_picked(page: Any, viewer_server: PacsServer) -> None:
    """The draft save's audit event named the template's version at the save,
    not the one whose text was picked: the department's template changed
    by an administrator while the radiologist wrote, the trail said the
    report came from the new text (v2), which it never held."""
    from playwright.sync_api import expect

    items = _open_picker(page, viewer_server)
    with viewer_server.http() as admin:
        abdomen = next(t for t in admin.get(API).json()["items"] if t["name"] == STARTER[0])
    items.first.click()
    expect(page.locator("#findings")).to_have_value(abdomen["findings"])
    with viewer_server.http() as admin:
        changed = admin.put(f"{API}/{abdomen['id']}", json={"version": 1, "impression": "Chưa thấy bất thường."})
        assert changed.status_code == 200 and changed.json()["version"] == 2, changed.text
    page.click("#save-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    with viewer_server.http() as admin:
        events = admin.get("/api/audit", params={"action": "report-update"}).json()
    details = [e["detail"] for e in events]
    assert any(f"text from template #{abdomen['id']} {STARTER[0]!r} v1 (the department; v2 since)" in d
               for d in details), details
    assert not page.errors, page.errors
