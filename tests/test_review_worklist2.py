"""Review of the reading worklist's refinements (old data not urgent, the
urgent group by waiting time, withdrawn orders, the page's refresh).

Against a real `pacs serve` (SQLite) and Chromium, as the feature's own
tests (tests/test_worklist_refinements.py) do.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, text, update

from pacs.auth import SESSION, tokens_t, users_t
from pacs.index import create_index_engine, upgrade_schema

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_web_viewer import browsing, sign_in

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

    with browsing(server) as (page, _problems):
        page.clock.install()
        sign_in(page, USER[0], PASSWORD)
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
        # The first request to a server just started, on a loaded CI machine, took longer than 5 s.
        expect(rows).to_have_count(5, timeout=30_000)


def _newest_session(conn: Any) -> Any:
    """USER's newest browser session (the one this test signed in)."""
    return (select(tokens_t.c.pk, tokens_t.c.expires_at).join(users_t, users_t.c.pk == tokens_t.c.user_pk)
            .where(users_t.c.username == USER[0], tokens_t.c.name == SESSION)
            .order_by(tokens_t.c.pk.desc()).limit(1))


def _session_ends(server: PacsServer) -> datetime:
    """When USER's newest browser session ends (api_tokens.expires_at)."""
    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    try:
        with engine.connect() as conn:
            end = conn.execute(_newest_session(conn)).one().expires_at
        return end if end.tzinfo else end.replace(tzinfo=UTC)
    finally:
        engine.dispose()


def _set_session_end(server: PacsServer, end: datetime) -> None:
    from pacs.index.db import write_transaction

    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    try:
        # BEGIN IMMEDIATE: a read then a write beside the running server would be refused at once.
        with write_transaction(engine) as conn:
            pk = conn.execute(_newest_session(conn)).one().pk
            conn.execute(update(tokens_t).where(tokens_t.c.pk == pk).values(expires_at=end))
    finally:
        engine.dispose()


def test_the_automatic_refresh_is_no_use_of_the_session(server: PacsServer) -> None:
    """A login session ends after 30 minutes without use (README): a
    workstation left on the worklist, patients' names on screen, must still
    sign out. The refresh every 30 s made every half minute a use: the
    session lived its full 12 hours. A refresh now leaves the session's end
    where it was; what the radiologist does (a search) still pushes it."""
    from playwright.sync_api import expect

    with browsing(server) as (page, _problems):
        page.clock.install()
        sign_in(page, USER[0], PASSWORD)
        rows = page.locator('[data-testid="study-row"]')
        expect(rows.first).to_be_visible()
        # Twenty minutes without use: ten left.
        end = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
        _set_session_end(server, end)
        with page.expect_response(lambda r: "/api/worklist" in r.url) as answer:
            page.clock.run_for(31_000)
        assert answer.value.status == 200
        assert _session_ends(server) == end
        # The radiologist searches: that is use.
        with page.expect_response(lambda r: "/api/worklist" in r.url) as answer:
            page.click("#search-button")
        assert answer.value.status == 200
        assert _session_ends(server) > end + timedelta(minutes=15)


# -- migration 0033 on an index with data ----------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty index: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/index.sqlite"
    return str(request.getfixturevalue("pg_empty_url"))


def _receive(engine: Any, writer: Any, folder: Path, n: int, source: str, priority: str, *, study: int = 0) -> None:
    """One CT (study *study* or its own) with *priority* in its images, indexed as an ingest by *source* does."""
    from pacs.header import parse_header
    from pacs.index.db import write_transaction
    from pacs.index.writer import IndexRecord

    path = make_ct(folder / f"{n}.dcm", PatientID=f"MG{study or n}",
                   StudyInstanceUID=f"1.2.826.0.1.3680043.9.71.{study or n}",
                   SeriesInstanceUID=f"1.2.826.0.1.3680043.9.72.{n}", SOPInstanceUID=f"1.2.826.0.1.3680043.9.73.{n}",
                   RequestedProcedurePriority=priority)
    with path.open("rb") as stream:
        header = parse_header(stream, path.stat().st_size)
    with write_transaction(engine) as conn:
        writer.add(conn, IndexRecord(header, path.stat().st_size, "0" * 64, f"k/{n}", datetime.now(UTC),
                                     source=source))


def test_0033_drops_the_urgency_of_every_study_this_archive_fetched_itself(index_url: str, tmp_path: Path) -> None:
    """Upgrading an index at 0032: the studies that came whole by `pacs
    import` lose their images' STAT, and so must those this archive
    retrieved itself by C-GET (`pacs remote pull --method get`, recorded as
    source c-get: they can be told apart), also when it made key images of
    them since. A modality's study stays urgent; the downgrade and a new
    upgrade agree."""
    from alembic import command

    from pacs.index import alembic_config
    from pacs.index.models import RejectedInstance, Study
    from pacs.index.writer import IndexWriter

    studies = Study.__table__
    engine = create_index_engine(index_url)
    try:
        upgrade_schema(engine, "0032")
        writer = IndexWriter()
        # Today's writer reads the column and table of later revisions (0034, patients.registered;
        # 0035, rejected_instances): there while it writes the rows of revision 0032, gone before
        # the upgrade.
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE patients ADD COLUMN registered BOOLEAN NOT NULL DEFAULT false"))
            RejectedInstance.__table__.create(conn)
        _receive(engine, writer, tmp_path, 1, "import", "STAT")
        _receive(engine, writer, tmp_path, 2, "c-get", "STAT")
        _receive(engine, writer, tmp_path, 3, "c-get", "HIGH")
        _receive(engine, writer, tmp_path, 4, "key-images", "", study=3)
        _receive(engine, writer, tmp_path, 5, "dimse", "STAT")
        _receive(engine, writer, tmp_path, 6, "c-get", "STAT", study=5)  # a modality's study completed from a peer
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE patients DROP COLUMN registered"))
            RejectedInstance.__table__.drop(conn)

        def priorities() -> dict[int, str]:
            with engine.connect() as conn:
                rows = conn.execute(select(studies.c.study_uid, studies.c.priority)).all()
            return {int(uid.rsplit(".", 1)[1]): priority for uid, priority in rows}

        assert priorities() == {1: "STAT", 2: "STAT", 3: "HIGH", 5: "STAT"}
        upgrade_schema(engine)
        expected = {1: "", 2: "", 3: "", 5: "STAT"}
        assert priorities() == expected
        cfg = alembic_config(engine)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0032")
            conn.commit()
        assert priorities() == expected
        upgrade_schema(engine)
        assert priorities() == expected
    finally:
        engine.dispose()


def test_a_refresh_keeps_the_keyboard_in_the_list_when_the_focused_study_leaves_it(server: PacsServer) -> None:
    """A radiologist walks the unread list with the arrow keys; a colleague
    signs the study their row is on. The refresh drops that row: the
    keyboard must stay in the list (on the row that took its place), not
    fall to the page, where the arrows scroll and Enter opens nothing."""
    from playwright.sync_api import expect

    token = server.make_token("bs.khac", "radiologist", "BS. Khác")
    with browsing(server) as (page, _problems):
        page.clock.install()
        sign_in(page, USER[0], PASSWORD)
        rows = page.locator('[data-testid="study-row"]')
        expect(rows).to_have_count(5)
        page.fill("#search-patient-id", "RV")
        with page.expect_response(lambda r: "/api/worklist" in r.url and "status=unread" in r.url):
            page.select_option("#search-status", "unread")
        expect(page.locator("#worklist")).not_to_have_attribute("aria-busy", "true")
        expect(rows).to_have_count(5)
        rows.nth(1).focus()
        page.keyboard.press("ArrowDown")
        focused = page.evaluate("document.activeElement.dataset.studyUid")
        following = rows.nth(3).get_attribute("data-study-uid")
        assert focused == rows.nth(2).get_attribute("data-study-uid")
        with server.http(token=token) as http:
            assert http.put(f"/api/studies/{focused}/report", json={"findings": "BT.", "impression": "BT."}
                            ).status_code == 200
            assert http.post(f"/api/studies/{focused}/report/sign").status_code == 200
        page.clock.run_for(31_000)
        expect(rows).to_have_count(4)
        assert page.evaluate("document.activeElement.dataset.studyUid || document.activeElement.tagName") \
            == following
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.dataset.studyUid") == rows.nth(3).get_attribute(
            "data-study-uid")
