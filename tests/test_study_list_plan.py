"""The radiologist's worklist at archive size: a newest-first page walks the
study dates on SQLite, and its total is counted only so far past the page.

SQLite read every patient, then sorted all their matching studies, for a
list filtered by modality or report status (250 ms for the newest CT studies
at 100,000 studies, 0.6 ms walking the date index), and counted every match
for the total (190 ms). Checked here on a real SQLite index: the plan, the
same studies in the same order either way, and the bounded total.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from pacs import studylist
from pacs.index import create_index_engine, upgrade_schema
from pacs.index.writer import IndexWriter
from pacs.query import Level, Query, build_select
from pacs.query.attributes import studies
from pacs.studylist import study_list

from .test_name_words import _receive

MODALITIES = ["CT", "MR", "CR", "US"]
# sqlite_stat1 of bench/archive.py's 100,000 studies (33,333 patients) after ANALYZE.
ARCHIVE_STATISTICS = [
    ("patients", "ix_patients_changed_at", "33333 60"), ("patients", "ix_patients_name_reading", "33333 7"),
    ("patients", "uq_patients_patient_id_issuer", "33333 1 1"), ("patients", "ix_patients_name_folded", "33333 7"),
    ("patients", "ix_patients_name_words", "33333 7"), ("studies", "ix_studies_changed_at", "100000 17"),
    ("studies", "ix_studies_updated_at", "100000 100000"), ("studies", "ix_studies_study_date", "100000 55"),
    ("studies", "ix_studies_patient_pk", "100000 4"), ("studies", "ix_studies_accession_number", "100000 1"),
    ("studies", "sqlite_autoindex_studies_1", "100000 1"), ("series", "ix_series_study_pk", "160181 2"),
    ("series", "ix_series_modality", "160181 32037"), ("series", "sqlite_autoindex_series_1", "160181 1"),
    ("studies", "ix_studies_referring_physician_reading", "100000 100000"),
    ("studies", "ix_studies_referring_physician_words", "100000 100000"),
    ("studies", "ix_studies_referring_physician_folded", "100000 100000"),
    # With reports in four states (unread, draft, signed, amending): a hospital that reports here.
    ("studies", "ix_studies_report_state", "100000 25000 36 1"),
    # No priority in the synthetic archive (no orders, none in the images).
    ("studies", "ix_studies_priority", "100000 100000 25000 1"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """40 studies of 10 patients, newest first by date, of four modalities."""
    tmp = tmp_path_factory.mktemp("study-list-plan")
    index = create_index_engine(f"sqlite:///{tmp}/index.sqlite")
    upgrade_schema(index)
    writer = IndexWriter()
    for n in range(40):
        _receive(index, writer, tmp, f"SL{n % 10}", f"Nguyễn^Văn {chr(65 + n % 10)}", 100 + n,
                 Modality=MODALITIES[n % 4], StudyDate=f"202601{1 + n % 28:02d}", StudyTime=f"{n % 24:02d}{n:02d}00")
    with index.connect() as conn:
        # The planner's statistics of an archive of 100,000 studies (bench
        # archive): SQLite plans as it would there (sqlite_stat1 may be written).
        conn.exec_driver_sql("ANALYZE")
        for table, index_name, stat in ARCHIVE_STATISTICS:
            conn.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = ? AND idx = ?", (table, index_name))
            conn.exec_driver_sql("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", (table, index_name, stat))
        conn.commit()
    index.dispose()  # new connections read them
    yield index
    index.dispose()


def _plan(engine: Engine, match: dict[str, str]) -> str:
    with engine.connect() as conn:
        stmt, _ = build_select(Query(Level.STUDY, match, fuzzy=True, newest_first=True), conn)
        page = stmt.order_by(studies.c.study_date.desc(), studies.c.study_time.desc(), studies.c.pk.desc()).limit(50)
        sql = str(page.compile(engine, compile_kwargs={"literal_binds": True}))
        return " / ".join(r[3] for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))


def test_a_newest_first_page_that_names_no_patient_reads_the_studies_first(engine: Engine) -> None:
    plan = _plan(engine, {"ModalitiesInStudy": "CT"})
    assert plan.startswith("SCAN studies USING INDEX ix_studies_study_date"), plan
    # A patient named: its studies are found from it, as before.
    plan = _plan(engine, {"PatientID": "SL3"})
    assert plan.split(" / ")[0].split()[1] == "patients" and "ix_studies_patient_pk" in plan, plan


@pytest.mark.parametrize("filters", [{}, {"modality": "CT"}, {"status": "unread"}, {"name": "VAN"},
                                     {"patient_id": "SL3"}, {"date_from": "20260105", "date_to": "20260120"}])
def test_the_same_studies_in_the_same_order(engine: Engine, filters: dict[str, str]) -> None:
    listed = [item["study_uid"] for item in study_list(engine, limit=500, **filters)["items"]]
    with engine.connect() as conn:
        where = {"modality": "EXISTS (SELECT 1 FROM series WHERE series.study_pk = studies.pk AND modality = 'CT')",
                 "patient_id": "patients.patient_id = 'SL3'", "name": "patients.name_words LIKE '% VAN%'",
                 "date_from": "studies.study_date BETWEEN '20260105' AND '20260120'"}
        conditions = [where[k] for k in filters if k in where] or ["1"]
        expected = list(conn.execute(text(
            "SELECT study_uid FROM studies JOIN patients ON patients.pk = studies.patient_pk WHERE "
            + " AND ".join(conditions) + " ORDER BY study_date DESC, study_time DESC, studies.pk DESC")).scalars())
    assert listed == expected and listed


def test_the_total_is_counted_only_so_far_past_the_page(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    found = study_list(engine, modality="CT", limit=5)
    assert (found["total"], found["total_exact"]) == (10, True)
    monkeypatch.setattr(studylist, "COUNT_AHEAD", 2)
    found = study_list(engine, modality="CT", limit=5)
    assert (found["total"], found["total_exact"], len(found["items"])) == (7, False, 5)
    found = study_list(engine, modality="CT", limit=5, offset=5)
    assert (found["total"], found["total_exact"], len(found["items"])) == (10, True, 5)



def test_the_unread_worklist_reads_the_unread_studies_from_their_index(engine: Engine) -> None:
    """The radiologist's default list: the unread studies, newest first. Each
    study's report status was a subquery, so finding the few unread studies
    of a reported archive read every study (89 ms at 100,000 studies)."""
    plans: list[str] = []

    def explain(conn: object, cursor: Any, statement: str, parameters: object, *_: object) -> None:
        if "LIMIT" in statement and not statement.startswith("EXPLAIN"):
            rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plans.append(" / ".join(r[3] for r in rows))

    event.listen(engine, "before_cursor_execute", explain)
    try:
        for status in ("unread", "draft", "signed"):
            study_list(engine, status=status)
            study_list(engine, status=status, modality="CT")
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert plans and all("reports" not in plan for plan in plans), plans
    # Unread: the counts (the urgent studies listed first, and all) and the
    # page of the others (no urgent study here), with and without a modality.
    assert len(plans) == 3 * 4 + 2 * 2, plans  # a signed list has no urgent unreported group
    for plan in plans[:6]:
        first = next(step for step in plan.split(" / ") if " studies " in f"{step} ")
        assert first.startswith("SEARCH studies USING INDEX ix_studies_report_state (report_state=?)"), plan
