"""Each study's report state (studies.report_state, migration 0026), which
the reading worklist filters on: the unread studies, newest first, read from
an index instead of a subquery per study (89 ms at 100,000 studies, 300 of
them unread; 1.4 ms now: bench/README.md).

Run on the core in-process on SQLite and on PostgreSQL (real databases):
every report write the service makes (save, signature, amendment) moves the
state through the triggers on reports, a deletion of the study takes it
along, and a migration from 0025 fills it from the reports already there.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from pacs.reports import ReportService
from pacs.studylist import study_list

from .test_report_review import _core, _ingest_ct

STATUSES = ("unread", "draft", "signed")


def _state(engine: Engine, study: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT report_state FROM studies WHERE study_uid = :u"), {"u": study}).scalar_one()


def _listed(engine: Engine, *, signed_only: bool = False) -> dict[str, list[str]]:
    """The studies each status filter lists, and the status shown with each."""
    listed: dict[str, list[str]] = {}
    for status in STATUSES:
        items = study_list(engine, status=status, signed_only=signed_only)["items"]
        listed[status] = [i["study_uid"] for i in items]
        assert {i["report_status"] for i in items} <= {status}, (status, items)
    return listed


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_every_report_write_moves_the_state_the_worklist_filters_on(db: str, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    index_url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    with _core(tmp_path / "data", index_url) as core:
        study = _ingest_ct(core, tmp_path)
        engine, reports = core.engine, ReportService(core)

        def check(state: str, everyone: str, signed_readers: str) -> None:
            assert _state(engine, study) == state
            assert _listed(engine) == {s: [study] if s == everyone else [] for s in STATUSES}
            assert _listed(engine, signed_only=True) == {s: [study] if s == signed_readers else [] for s in STATUSES}

        check("unread", "unread", "unread")
        reports.save_draft(study, "Phổi sáng.", "Bình thường.", "bs.an")
        check("draft", "draft", "unread")  # a first draft is not a report yet to the EMR
        reports.save_draft(study, "Phổi sáng, tim bình thường.", "Bình thường.", "bs.an")
        check("draft", "draft", "unread")
        reports.sign(study, "bs.an", "BS. An")
        check("signed", "signed", "signed")
        reports.amend(study, "bs.an")
        check("amending", "draft", "signed")  # the EMR keeps seeing the signed version
        reports.save_draft(study, "Phổi sáng; bổ sung.", "Bình thường.", "bs.an")
        reports.sign(study, "bs.an", "BS. An")
        check("signed", "signed", "signed")

        # A deleted report (the study's reports go with a deletion, or an
        # operator's hand): the state follows whatever write removed it.
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM reports WHERE version = 2 AND study_pk = "
                              "(SELECT pk FROM studies WHERE study_uid = :u)"), {"u": study})
        check("signed", "signed", "signed")
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM reports WHERE study_pk = (SELECT pk FROM studies WHERE study_uid = :u)"),
                         {"u": study})
        check("unread", "unread", "unread")


def test_an_upgrade_fills_the_state_from_the_reports_there(tmp_path: Path) -> None:
    from pacs.index import create_index_engine, upgrade_schema

    url = f"sqlite:///{tmp_path}/index.sqlite"
    engine = create_index_engine(url)
    upgrade_schema(engine, "0025")
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("INSERT INTO patients (pk, patient_id, issuer, name, name_folded, name_words, name_reading, birth_date,"
               " sex, created_at, updated_at, changed_at) VALUES (1, 'P', '', '', '', '', '', '', '', 0, 0, 0)")
    states = {1: [], 2: ["draft"], 3: ["signed"], 4: ["signed", "draft"], 5: ["signed", "signed"]}
    for pk, versions in states.items():
        db.execute("INSERT INTO studies (pk, patient_pk, study_uid, study_date, study_time, accession_number, study_id,"
                   " referring_physician, referring_physician_folded, description, institution, modalities,"
                   " num_series, num_instances, size_bytes, created_at, updated_at, changed_at)"
                   " VALUES (?, 1, ?, '20260101', '', '', '', '', '', '', '', '', 0, 0, 0, 0, 0, 0)", (pk, f"1.2.{pk}"))
        for version, status in enumerate(versions, 1):
            db.execute("INSERT INTO reports (study_pk, version, status, findings, impression, author, created_at,"
                       " updated_at, signed_by, pdf_sop_uid) VALUES (?, ?, ?, '', '', '', 0, 0, '', '')",
                       (pk, version, status))
    db.commit()
    db.close()
    upgrade_schema(engine)
    with engine.connect() as conn:
        found = dict(conn.execute(text("SELECT pk, report_state FROM studies")).all())
    engine.dispose()
    assert found == {1: "unread", 2: "draft", 3: "signed", 4: "amending", 5: "signed"}
