"""Report templates ("mẫu kết quả"): core, HTTP API, CLI and the viewer's picker.

Against a real `pacs serve` (SQLite, and PostgreSQL for the core and the
API): who may read and write them, the study's templates first (same
modality and body part, then same modality), a search without diacritics,
a stale version refused 409, an archived template hidden while a report
written from it is untouched (and its audit event names the template), the
department's set imported and exported with Vietnamese text, the starter
set; and, in Chromium, a radiologist picking a template, asked before typed
text is replaced, saving the draft and saving their text as a template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from . import test_web_viewer as web_viewer
from .conftest import Backend, PacsServer, make_backend, pydicom_file
from .test_web_viewer import USERNAME, _log_in

API = "/api/report-templates"
ROLES = {"bs.an": "radiologist", "bs.lan": "radiologist", "qtv": "admin", "ct1": "modality",
         "bs.gioi.thieu": "referring", "emr": "emr", "his": "his"}
# The web viewer's fixtures: a server with the sample studies and a radiologist, a Chromium page.
page = web_viewer.page
viewer_server = web_viewer.viewer_server
STARTER = ["Siêu âm ổ bụng bình thường", "X-quang ngực thẳng (PA) bình thường",
           "CT sọ não không tiêm thuốc cản quang bình thường", "Siêu âm tuyến giáp bình thường"]
FATTY_LIVER = {"name": "Gan nhiễm mỡ độ I", "modality": "US", "body_part": "ABDOMEN",
               "findings": "Gan không to, nhu mô tăng âm nhẹ, đồng nhất.\nĐường mật không giãn.",
               "impression": "Hình ảnh gan nhiễm mỡ độ I."}


@pytest.fixture(params=["sqlite-fs", "pg-fs"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    """`pacs serve` with one CT study (CT_small), the starter set imported,
    and a user of every role (tokens in ``server.tokens``)."""
    server = PacsServer(tmp_path / "data", make_backend(request.param, request))
    server.cli("import", str(pydicom_file("CT_small.dcm")))
    server.cli("template", "import", "--starter")
    server.start()
    server.tokens = {name: server.make_token(name, role, display_name=f"BS. {name}")  # type: ignore[attr-defined]
                     for name, role in ROLES.items()}
    yield server
    server.stop()


def _as(server: PacsServer, user: str) -> Any:
    return server.http(token=server.tokens[user])  # type: ignore[attr-defined]


def _names(answer: Any) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [t["name"] for t in answer.json()["items"]]


def _create(server: PacsServer, user: str, body: dict[str, Any]) -> dict[str, Any]:
    with _as(server, user) as http:
        answer = http.post(API, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_roles(server: PacsServer) -> None:
    """Radiologists and administrators only; others 403 with a reason, no token 401."""
    own = _create(server, "bs.an", FATTY_LIVER)
    assert (own["owner"], own["version"], own["shared"]) == ("bs.an", 1, False)
    calls = [("GET", API, None), ("GET", f"{API}/{own['id']}", None),
             ("POST", API, {"name": "Mẫu thử", "findings": "Bình thường."}),
             ("PUT", f"{API}/{own['id']}", {"version": 1, "impression": "Gan nhiễm mỡ."}),
             ("DELETE", f"{API}/{own['id']}", None)]
    for method, path, body in calls:
        with server.http(token="none") as anonymous:
            anonymous.headers.pop("Authorization", None)
            assert anonymous.request(method, path, json=body).status_code == 401, (method, path)
        for user in ("ct1", "bs.gioi.thieu", "emr", "his"):
            with _as(server, user) as http:
                answer = http.request(method, path, json=body)
            assert answer.status_code == 403, (method, path, user, answer.text)
            assert "needs: radiologist, admin" in answer.json()["error"]

    # A radiologist writes their own only; an administrator the department's (default) or anyone's.
    with _as(server, "bs.an") as http:
        refused = http.post(API, json={"name": "Của khoa", "findings": "x", "owner": ""})
        assert refused.status_code == 403 and "administrator" in refused.json()["error"]
        assert http.post(API, json={"name": "Của bs.lan", "findings": "x", "owner": "bs.lan"}).status_code == 403
        assert http.get(API, params={"all": "true"}).status_code == 403
    shared = _create(server, "qtv", {"name": "Mẫu của khoa", "findings": "Không thấy bất thường."})
    assert shared["owner"] == "" and shared["shared"] is True
    given = _create(server, "qtv", {"name": "Mẫu tặng", "findings": "x", "owner": "bs.lan"})
    assert given["owner"] == "bs.lan"
    with _as(server, "qtv") as http:
        unknown = http.post(API, json={"name": "Mẫu", "findings": "x", "owner": "nobody"})
        assert unknown.status_code == 400 and "no user 'nobody'" in unknown.json()["error"]
        everyone = _names(http.get(API, params={"all": "true"}))
        assert {"Gan nhiễm mỡ độ I", "Mẫu tặng", "Mẫu của khoa"} <= set(everyone)

    # Each radiologist sees their own and the department's, never a colleague's.
    with _as(server, "bs.lan") as http:
        names = _names(http.get(API))
        assert "Gan nhiễm mỡ độ I" not in names and {"Mẫu tặng", "Mẫu của khoa", *STARTER} <= set(names)
        assert http.get(f"{API}/{own['id']}").status_code == 404
        assert http.put(f"{API}/{own['id']}", json={"version": 1, "name": "x"}).status_code == 404
        assert http.delete(f"{API}/{own['id']}").status_code == 404
        # The department's templates are an administrator's to change.
        refused = http.put(f"{API}/{shared['id']}", json={"version": 1, "findings": "Khác."})
        assert refused.status_code == 403, refused.text
        assert http.delete(f"{API}/{shared['id']}").status_code == 403
    with _as(server, "qtv") as http:
        assert http.put(f"{API}/{own['id']}", json={"version": 1, "impression": "Gan nhiễm mỡ."}).status_code == 200


def test_the_studys_templates_first_and_search_without_diacritics(server: PacsServer) -> None:
    _create(server, "bs.an", FATTY_LIVER)
    _create(server, "bs.an", {"name": "Siêu âm tim bình thường", "modality": "US", "body_part": "HEART",
                              "findings": "Các buồng tim không giãn.", "impression": "Bình thường."})
    _create(server, "qtv", {"name": "Mẫu chung (mọi loại máy)", "findings": "Không thấy bất thường."})
    with _as(server, "bs.an") as http:
        answer = http.get(API, params={"modality": "US", "body_part": "abdomen"})
        items = answer.json()["items"]
        # Same modality and body part (the user's own first), then same modality, then the rest.
        assert [(t["name"], t["fits"]) for t in items[:2]] == [
            ("Gan nhiễm mỡ độ I", "study"), ("Siêu âm ổ bụng bình thường", "study")]
        assert [(t["name"], t["fits"]) for t in items[2:4]] == [
            ("Siêu âm tim bình thường", "modality"), ("Siêu âm tuyến giáp bình thường", "modality")]
        assert {t["fits"] for t in items[4:]} == {""}
        assert {t["name"] for t in items[4:]} == {"Mẫu chung (mọi loại máy)", STARTER[1], STARTER[2]}
        # The texts round-trip, line breaks and diacritics as written.
        assert items[0]["findings"] == FATTY_LIVER["findings"]
        assert items[1]["findings"].startswith("- Gan: không to, bờ đều, nhu mô âm đồng nhất")

        # "CR/DX" names two modalities: a DX chest study has the chest X-ray first.
        assert _names(http.get(API, params={"modality": "DX", "body_part": "CHEST"}))[0] == STARTER[1]
        assert _names(http.get(API, params={"modality": "CT", "body_part": "HEAD"}))[0] == STARTER[2]

        # Names are searched without diacritics or case, each word anywhere in the name.
        assert _names(http.get(API, params={"q": "gan"})) == ["Gan nhiễm mỡ độ I"]
        assert _names(http.get(API, params={"q": "Gan"})) == ["Gan nhiễm mỡ độ I"]
        assert set(_names(http.get(API, params={"q": "SIEU AM"}))) == {
            "Siêu âm ổ bụng bình thường", "Siêu âm tuyến giáp bình thường", "Siêu âm tim bình thường"}
        assert _names(http.get(API, params={"q": "sieu am bung"})) == ["Siêu âm ổ bụng bình thường"]
        assert _names(http.get(API, params={"q": "ổ bụng"})) == ["Siêu âm ổ bụng bình thường"]
        assert _names(http.get(API, params={"q": "do i", "modality": "US"})) == ["Gan nhiễm mỡ độ I"]
        assert _names(http.get(API, params={"q": "%"})) == []  # a LIKE wildcard is a character
        assert _names(http.get(API, params={"q": "khong co mau nay"})) == []
        assert len(_names(http.get(API, params={"limit": 2}))) == 2


def test_bad_input_is_a_clear_400(server: PacsServer) -> None:
    base = {"name": "Mẫu", "findings": "Bình thường."}
    cases = [
        ({**base, "name": "  "}, "needs a name"),
        ({**base, "name": "x" * 121}, "name has 121 characters, at most 120"),
        ({**base, "name": "hai\ndòng"}, "name must be one line"),
        ({**base, "findings": "x" * 20_001}, "findings has 20001 characters, at most 20000"),
        ({**base, "impression": "y" * 20_001}, "impression has 20001 characters"),
        ({**base, "modality": "SIÊU ÂM TỔNG QUÁT"}, "modality has 17 characters, at most 16"),
        ({**base, "body_part": "B" * 17}, "body_part has 17 characters, at most 16"),
        ({**base, "findings": "a\x00b"}, "U+0000"),
        ({**base, "findings": "a\x1bb"}, "control character (U+001B)"),
        ({"name": "Trống", "findings": " ", "impression": ""}, "neither findings nor impression"),
        ({**base, "finding": "typo"}, "finding"),
        ({**base, "name": 5}, "name"),
    ]
    with _as(server, "bs.an") as http:
        for body, message in cases:
            answer = http.post(API, json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert message in answer.json()["error"], (message, answer.json())
        # A modality code we do not know is fine as free text (upper-cased), up to 16 characters.
        odd = http.post(API, json={**base, "modality": "siêu âm", "body_part": " gan "})
        assert odd.status_code == 201, odd.text
        assert (odd.json()["modality"], odd.json()["body_part"]) == ("SIÊU ÂM", "GAN")
        template = odd.json()["id"]
        for path in (f"{API}/abc", f"{API}/0", f"{API}/{2**64}"):
            assert http.get(path).status_code == 400, path
        assert http.get(API, params={"limit": 0}).status_code == 400
        assert http.get(API, params={"q": "x" * 201}).status_code == 400
        assert http.put(f"{API}/{template}", json={"findings": "x"}).status_code == 400  # no version
        bad = http.put(f"{API}/{template}", json={"version": 1, "findings": "x" * 20_001})
        assert bad.status_code == 400 and "at most 20000" in bad.json()["error"]
        assert http.put(f"{API}/{template}", json={"version": 1, "owner": "bs.lan"}).status_code == 400
        assert http.put(f"{API}/999999", json={"version": 1, "name": "x"}).status_code == 404
        # Names are unique per owner, case and spacing ignored; diacritics count.
        taken = http.post(API, json={**base, "name": " mẫu  "})
        assert taken.status_code == 409 and "already has a template named" in taken.json()["error"]
        assert http.post(API, json={**base, "name": "Mẩu"}).status_code == 201
    # Another owner may use the name.
    _create(server, "bs.lan", base)


def test_stale_version_409_and_archive(server: PacsServer) -> None:
    created = _create(server, "bs.an", FATTY_LIVER)
    url = f"{API}/{created['id']}"
    with _as(server, "bs.an") as http:
        changed = http.put(url, json={"version": 1, "impression": "Gan nhiễm mỡ độ I, theo dõi."})
        assert changed.status_code == 200, changed.text
        assert changed.json()["version"] == 2 and changed.json()["findings"] == FATTY_LIVER["findings"]
        # A second tab still at version 1: refused, nothing overwritten.
        stale = http.put(url, json={"version": 1, "impression": "Cũ."})
        assert stale.status_code == 409 and "after you read version 1" in stale.json()["error"]
        assert http.get(url).json()["impression"] == "Gan nhiễm mỡ độ I, theo dõi."
        # The same text again is no new version.
        assert http.put(url, json={"version": 2, "impression": "Gan nhiễm mỡ độ I, theo dõi."}).json()["version"] == 2
        # Renamed onto another of one's own names: 409.
        other = http.post(API, json={"name": "Gan nhiễm mỡ độ II", "findings": "Tăng âm."}).json()
        clash = http.put(url, json={"version": 2, "name": "gan nhiễm mỡ độ ii"})
        assert clash.status_code == 409 and "already has a template named" in clash.json()["error"]

        # Archived: hidden from the list, still readable, no longer changed; its name is free again.
        assert http.delete(url, params={"version": 1}).status_code == 409
        archived = http.delete(url, params={"version": 2})
        assert archived.status_code == 200, archived.text
        assert archived.json()["archived"] is True and archived.json()["archived_by"] == "bs.an"
        assert "Gan nhiễm mỡ độ I" not in _names(http.get(API, params={"q": "gan"}))
        kept = http.get(url).json()
        assert kept["archived"] is True and kept["findings"] == FATTY_LIVER["findings"]
        assert http.put(url, json={"version": 3, "findings": "x"}).status_code == 409
        assert http.delete(url).status_code == 200  # again: nothing more to do
        again = http.post(API, json=FATTY_LIVER)
        assert again.status_code == 201 and again.json()["id"] != created["id"]
        assert http.delete(f"{API}/{other['id']}").status_code == 200

    with _as(server, "qtv") as http:
        events = http.get("/api/audit", params={"user": "bs.an"}).json()
    ours = [(e["action"], e["outcome"], e["detail"]) for e in events if e["action"].startswith("template-")]
    assert ("template-create", "success", f"created template #{created['id']} 'Gan nhiễm mỡ độ I' for bs.an") in ours
    assert any(a == "template-update" and o == "success" and "v1 -> v2" in d and "impression changed" in d
               for a, o, d in ours), ours
    assert any(a == "template-update" and o == "failure" and "409" in d for a, o, d in ours), ours
    assert any(a == "template-archive" and o == "success" and d.startswith("archived: template") for a, o, d in ours)


def test_a_report_written_from_an_archived_template_is_untouched(server: PacsServer) -> None:
    study = dcmread(pydicom_file("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID
    with _as(server, "bs.an") as http:
        template = next(t for t in http.get(API, params={"modality": "CT"}).json()["items"]
                        if t["name"] == STARTER[2])
        text = {"findings": template["findings"] + "\n- Thêm: không thấy vôi hóa.",
                "impression": template["impression"]}
        saved = http.put(f"/api/studies/{study}/report", json={**text, "revision": 0, "template_id": template["id"]})
        assert saved.status_code == 200, saved.text
    with _as(server, "qtv") as http:
        assert http.delete(f"{API}/{template['id']}").status_code == 200
        assert STARTER[2] not in _names(http.get(API))
        report = http.get(f"/api/studies/{study}/report").json()
        current = report["current"]
        assert (current["findings"], current["impression"]) == (text["findings"], text["impression"])
        # The report's audit event says which template (and version) the text came from: still readable.
        events = http.get("/api/audit", params={"user": "bs.an", "action": "report-update"}).json()
        assert any(f"text from template #{template['id']} {STARTER[2]!r} v1 (the department)" in e["detail"]
                   for e in events), events
        assert http.get(f"{API}/{template['id']}").json()["archived"] is True
    with _as(server, "bs.an") as http:
        # An unknown template id does not stop a save.
        assert http.put(f"/api/studies/{study}/report", json={**text, "template_id": 424242}).status_code == 200


def test_cli_round_trip_and_starter(server: PacsServer, tmp_path: Path) -> None:
    listed = json.loads(server.cli("template", "list", "--json").stdout)
    assert sorted(t["name"] for t in listed) == sorted(STARTER)
    assert all(t["owner"] == "" and t["version"] == 1 for t in listed)
    # Loaded once; again it changes nothing.
    again = json.loads(server.cli("template", "import", "--starter", "--json").stdout)
    assert again == {"created": [], "updated": [], "unchanged": sorted(STARTER, key=STARTER.index)}

    hospital = [
        {"name": "Siêu âm ổ bụng bình thường", "modality": "US", "body_part": "ABDOMEN",
         "findings": "Gan, mật, tụy, lách, thận: chưa thấy bất thường.\n\"Đã xem\" \\ kỹ.",
         "impression": "Bình thường."},
        {"name": "Chụp MRI cột sống thắt lưng", "modality": "MR", "body_part": "LSPINE",
         "findings": "Thân đốt sống L1–L5 bình thường.\n\tĐĩa đệm không thoát vị.",
         "impression": "Chưa thấy bất thường."},
    ]
    source = tmp_path / "benh-vien.json"
    source.write_text(json.dumps(hospital, ensure_ascii=False), encoding="utf-8")
    done = json.loads(server.cli("template", "import", str(source), "--json").stdout)
    assert done == {"created": ["Chụp MRI cột sống thắt lưng"], "updated": ["Siêu âm ổ bụng bình thường"],
                    "unchanged": []}
    with _as(server, "bs.an") as http:
        abdomen = next(t for t in http.get(API, params={"q": "sieu am o bung"}).json()["items"])
    assert abdomen["findings"] == hospital[0]["findings"] and abdomen["version"] == 2

    # Exported as TOML and JSON, then imported into another hospital's archive: the same set.
    toml_file, json_file = tmp_path / "khoa.toml", tmp_path / "khoa.json"
    server.cli("template", "export", str(toml_file))
    server.cli("template", "export", str(json_file))
    assert "Siêu âm ổ bụng bình thường" in toml_file.read_text(encoding="utf-8")
    exported = json.loads(json_file.read_text(encoding="utf-8"))
    assert len(exported) == 5 and {**hospital[1]} in exported
    assert json.loads(server.cli("template", "export", "-").stdout) == exported
    other = PacsServer(tmp_path / "other", Backend("sqlite-fs", None, None, {}))
    assert "5 created" in other.cli("template", "import", str(toml_file)).stdout
    assert json.loads(other.cli("template", "export", "-").stdout) == exported
    assert "5 unchanged" in other.cli("template", "import", str(json_file)).stdout

    # A file with one bad template imports nothing, and says which.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[template]]\nname = "Tốt"\nfindings = "x"\n\n[[template]]\nname = "Xấu"\nfinding = "y"\n',
                   encoding="utf-8")
    refused = server.cli("template", "import", str(bad), check=False)
    assert refused.returncode == 2
    assert "template 2 ('Xấu'): unknown keys 'finding'" in refused.stderr.replace("\n", "")
    for name, content in (("dup.json", json.dumps([hospital[1], hospital[1]])), ("latin1.json", None),
                          ("x.csv", "name\n"), ("broken.toml", "[[template]\n")):
        path = tmp_path / name
        path.write_bytes('[{"name": "Gan", "findings": "bình thường"}]'.encode("latin-1", "replace")
                         if content is None else content.encode())
        assert server.cli("template", "import", str(path), check=False).returncode == 2, name
    assert len(json.loads(server.cli("template", "list", "--json").stdout)) == 5

    # remove archives (typed without diacritics too); the API no longer offers it.
    assert "archived" in server.cli("template", "remove", "chup mri cot song that lung").stdout
    assert server.cli("template", "remove", "Chụp MRI cột sống thắt lưng", check=False).returncode == 1
    assert len(json.loads(server.cli("template", "list", "--json").stdout)) == 4
    with _as(server, "qtv") as http:
        assert "Chụp MRI cột sống thắt lưng" not in _names(http.get(API))
        events = http.get("/api/audit", params={"action": "template-update"}).json()
        assert any(e["detail"].startswith("department template 'Siêu âm ổ bụng bình thường' from ")
                   and e["protocol"] == "cli" for e in events), events
        assert http.get("/api/audit", params={"action": "template-archive"}).json()[0]["protocol"] == "cli"


# -- the viewer ---------------------------------------------------------------------------------
@contextmanager
def dialogs(page: Any, answers: list[str | bool]) -> Iterator[list[str]]:
    """The messages of the dialogs the page opens inside the block, answered
    in turn: True accepts a confirm, False dismisses it, a text is typed
    into a prompt. A dialog beyond *answers* fails the test."""
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        if len(asked) > len(answers):
            dialog.dismiss()
            return
        value = answers[len(asked) - 1]
        if value is False:
            dialog.dismiss()
        elif value is True:
            dialog.accept()
        else:
            dialog.accept(value)

    page.on("dialog", answer)
    try:
        yield asked
    finally:
        page.remove_listener("dialog", answer)
    assert len(asked) == len(answers), f"dialogs {asked}, expected {len(answers)}"


def test_the_viewer_picks_a_template_and_saves_one(page: Any, viewer_server: PacsServer) -> None:
    """The picker lists the study's templates first; a template fills an
    empty report; over typed text it asks first (cancelled: nothing
    changes); the draft saves, its audit event naming the template; the
    current text becomes the radiologist's own template."""
    from playwright.sync_api import expect

    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    viewer_server.cli("template", "import", "--starter")
    created = viewer_server.cli("token", "create", USERNAME, "--name", "tests", "--json")
    radiologist = json.loads(created.stdout)["token"]
    with viewer_server.http() as admin:
        study = admin.get("/api/worklist", params={"modality": "US"}).json()["items"][0]["study_uid"]
        starter = {t["name"]: t for t in admin.get(API).json()["items"]}
    abdomen, thyroid = starter[STARTER[0]], starter[STARTER[3]]
    page.goto(f"/#/study/{study}")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    expect(page.locator("#report-status")).to_have_attribute("data-status", "none")

    summary = page.locator("#template-summary")
    expect(summary).to_have_text("Mẫu kết quả")
    summary.click()
    items = page.locator('[data-testid="template-item"]')
    expect(items).to_have_count(4)
    # A US abdomen study: the abdominal ultrasound first, then the other ultrasound.
    expect(items.nth(0)).to_have_attribute("data-fits", "study")
    expect(items.nth(0)).to_contain_text(STARTER[0])
    expect(items.nth(0)).to_contain_text("Của khoa")
    expect(items.nth(1)).to_contain_text(STARTER[3])
    expect(items.nth(1)).to_have_attribute("data-fits", "modality")

    # Searched without diacritics, on the server.
    page.fill("#template-search", "tuyen giap")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text(STARTER[3])
    page.fill("#template-search", "")
    expect(items).to_have_count(4)

    # An empty report is filled without a question.
    with dialogs(page, []):
        items.nth(0).click()
        expect(page.locator("#findings")).to_have_value(abdomen["findings"])
        expect(page.locator("#impression")).to_have_value(abdomen["impression"])
    expect(page.locator("#report-dirty")).to_be_visible()
    expect(page.locator("#template-list")).to_be_hidden()  # the picker closed

    # Typed text: the template asks first; cancelled, nothing changes.
    typed = abdomen["impression"] + " Đề nghị khám lại sau 6 tháng."
    page.fill("#impression", typed)
    summary.click()
    thyroid_item = page.locator('[data-testid="template-item"]', has_text=STARTER[3])
    with dialogs(page, [False]) as asked:
        thyroid_item.click()
        expect(page.locator("#template-list")).to_be_visible()
    assert "Thay văn bản đã nhập" in asked[0] and STARTER[3] in asked[0]
    expect(page.locator("#impression")).to_have_value(typed)
    expect(page.locator("#findings")).to_have_value(abdomen["findings"])
    # Agreed: replaced.
    with dialogs(page, [True]):
        thyroid_item.click()
        expect(page.locator("#findings")).to_have_value(thyroid["findings"])
    expect(page.locator("#impression")).to_have_value(thyroid["impression"])

    # The draft saves; its audit event names the template.
    page.fill("#impression", typed)
    page.click("#save-report")
    expect(page.locator("#report-status")).to_have_attribute("data-status", "draft")
    expect(page.locator("#report-dirty")).to_be_hidden()
    with viewer_server.http() as admin:
        report = admin.get(f"/api/studies/{study}/report").json()["current"]
        assert (report["findings"], report["impression"]) == (thyroid["findings"], typed)
        events = admin.get("/api/audit", params={"action": "report-update", "study": study}).json()
        assert any(f"text from template #{thyroid['id']} {STARTER[3]!r}" in e["detail"] for e in events), events

    # "Save as my template": the current text under a name the radiologist types.
    name = "Tuyến giáp – theo dõi 6 tháng"
    with dialogs(page, [name]):
        page.click("#save-template")
        expect(page.locator("#toast")).to_contain_text(f"Đã lưu mẫu “{name}”")
    with viewer_server.http(token=radiologist) as mine:
        own = mine.get(API, params={"q": "tuyen giap theo doi"}).json()["items"]
    assert [(t["owner"], t["name"], t["findings"], t["impression"]) for t in own] == [
        (USERNAME, name, thyroid["findings"], typed)]
    assert (own[0]["modality"], own[0]["body_part"]) == ("US", "ABDOMEN")
    summary.click()
    expect(items).to_have_count(5)
    expect(items.first).to_contain_text(name)  # one's own first
    expect(items.first).to_contain_text("Của tôi")
    summary.click()

    # The same name again: asked before their template is replaced.
    page.fill("#findings", "Nhân giáp thùy phải 5 mm.")
    with dialogs(page, [name.upper(), True]) as asked:
        page.click("#save-template")
        expect(page.locator("#toast")).to_contain_text(f"Đã cập nhật mẫu “{name}”")
    assert "Bạn đã có mẫu tên" in asked[1]
    with viewer_server.http(token=radiologist) as mine:
        again = mine.get(f"{API}/{own[0]['id']}").json()
    assert (again["version"], again["findings"], again["name"]) == (2, "Nhân giáp thùy phải 5 mm.", name)

    # English labels.
    page.click("#lang-toggle")
    expect(summary).to_have_text("Report templates")
    expect(page.locator("#save-template")).to_have_text("Save as my template")
    assert not page.errors, page.errors
    assert not violations, violations
