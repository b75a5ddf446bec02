"""Review of the reading worklist's refinements (old data not urgent, the
urgent group by waiting time, withdrawn orders, the page's refresh).

Against a real `pacs serve` (SQLite) and Chromium, as the feature's own
tests (tests/test_worklist_refinements.py) do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_web_viewer import CHROMIUM, CHROMIUM_ARGS, HEIGHT, WIDTH, _sync_playwright

USER = ("bs.rv", "BS. Đỗ Văn Rà")
PASSWORD = "Secret-123a"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A SQLite server with radiologist USER and 5 studies of patients RV*."""
    work = tmp_path_factory.mktemp("review-worklist2")
    pacs = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    pacs.cli("user", "add", USER[0], "--role", "radiologist", "--password", PASSWORD, "--display-name", USER[1])
    pacs.start()
    files = [make_ct(work / f"rv{n}.dcm", StudyInstanceUID=generate_uid(), PatientID=f"RV{n}", StudyDate="20261201")
             for n in range(5)]
    assert pacs.storescu(*(str(f) for f in files)).returncode == 0
    try:
        yield pacs
    finally:
        pacs.stop()


def test_a_refresh_after_a_failed_search_shows_the_rows_again(server: PacsServer, tmp_path: Path) -> None:
    """The server restarts (an upgrade) while the radiologist presses Search:
    the list is emptied under the error. Back up, the next refresh brings
    the same studies as before the failure: they must be shown again, not
    an empty table with no message (it took them for the rows on screen)."""
    from playwright.sync_api import expect

    with _sync_playwright()() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}, locale="vi-VN",
                                          base_url=f"http://127.0.0.1:{server.http_port}")
            context.set_default_timeout(20_000)
            page = context.new_page()
            page.clock.install()
            page.goto("/")
            page.fill("#username", USER[0])
            page.fill("#password", PASSWORD)
            page.press("#password", "Enter")
            rows = page.locator('[data-testid="study-row"]')
            page.fill("#search-patient-id", "RV")
            page.click("#search-button")
            expect(rows).to_have_count(5)

            server.stop()
            page.click("#search-button")  # the same search, the server down
            expect(page.locator("#worklist-message.error")).to_be_visible()
            expect(rows).to_have_count(0)
            server.proc = None
            server.start()
            page.clock.run_for(31_000)
            expect(rows).to_have_count(5)
        finally:
            browser.close()
