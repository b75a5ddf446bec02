"""The indexed any-word name search (table patient_name_words, migration 0025).

The study list, QIDO-RS fuzzymatching and FHIR Patient name=/given= find a
patient by the start of any word of the name ("AN" finds "Nguyễn^Văn An").
That was a LIKE '% AN%' on the name columns, which reads every patient; the
candidates now come from the word index and the LIKEs stay the exact filter.
Checked here, in-process on real SQLite and PostgreSQL indexes: the matches
are those of the LIKEs alone, for names with diacritics, ideographic groups,
LIKE's own special characters, for multi-word, one-letter and wildcard terms;
the word rows follow every writer of a name (ingest, HIS update, merge) and
go with a deleted patient.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from pacs.header import parse_header
from pacs.index import create_index_engine, upgrade_schema
from pacs.index.db import write_transaction
from pacs.index.name_words import name_words_t, words_of
from pacs.index.prune import prune_patients
from pacs.index.writer import IndexRecord, IndexWriter
from pacs.orders import OrderService, PatientInfo
from pacs.query import Level, Query, build_select
from pacs.query.attributes import patients
from pacs.query import matching
from pacs.query.matching import name_word_lookup, pn_match
from pacs.studylist import study_list

from .dicomfiles import make_ct
from .peers import create_database, drop_database

# Patient ID -> name: diacritics, a middle name read before the given one,
# ideographic and phonetic groups, LIKE's special characters, an apostrophe.
NAMES = {
    "NW1": "Nguyễn^Văn An", "NW2": "Nguyễn^Thị Anh", "NW3": "Trần^Văn Bình=陳^ちば", "NW4": "Trịnh^Bình^Văn",
    "NW5": "Lê^An Khang", "NW6": "Phạm^Thị Lan", "NW7": "O'Brien^Anne", "NW8": "Ng_uyen^100% Lan",
    "NW9": "Đỗ^Thanh Tùng", "NW10": "Nguyen^Van^^^",
}
TERMS = ["AN", "an", "A", "Ă", "Ân", "ANH", "VAN AN", "NGUYEN VAN", "Nguyễn Văn An", "van", "VĂN BÌNH", "ちば", "陳",
         "TRINH VAN BINH", "BINH VAN", "Nguyen^Van", "Nguyen^", "^Van", "NG_", "100%", "100% LAN", "%", "_", "O'B",
         "KHANG", "ZZZ", "AN*", "*AN", "N?UYEN*", "Trần^Văn Bình=陳^ちば", "=ちば", "Lan", "T", "D", "Đ"]


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An index holding one study per patient of NAMES, received as DICOM."""
    tmp = tmp_path_factory.mktemp(f"name-words-{request.param}")
    pg = create_database() if request.param == "pg" else None
    index = create_index_engine(pg or f"sqlite:///{tmp}/index.sqlite")
    upgrade_schema(index)
    writer = IndexWriter()
    for n, (pid, name) in enumerate(NAMES.items()):
        _receive(index, writer, tmp, pid, name, n)
    yield index
    index.dispose()
    if pg:
        drop_database(pg)


def _receive(engine: Engine, writer: IndexWriter, tmp: Path, pid: str, name: str, n: int, **values: str) -> None:
    """One CT object of a study of its own for patient *pid*, indexed as the ingest does."""
    path = make_ct(tmp / f"{pid}-{n}.dcm", PatientID=pid, PatientName=name, SpecificCharacterSet="ISO_IR 192", **values,
                   StudyInstanceUID=f"1.2.826.0.1.3680043.9.7.{n}", SeriesInstanceUID=f"1.2.826.0.1.3680043.9.8.{n}",
                   SOPInstanceUID=f"1.2.826.0.1.3680043.9.9.{n}")
    with path.open("rb") as stream:
        header = parse_header(stream, path.stat().st_size)
    record = IndexRecord(header, path.stat().st_size, "0" * 64, f"k/{pid}/{n}", datetime.now(UTC))
    with write_transaction(engine) as conn:
        writer.add(conn, record)


def _pids(engine: Engine, term: str) -> set[str]:
    return {item["patient_id"] for item in study_list(engine, name=term, limit=1000)["items"]}


def _like_only(engine: Engine, term: str) -> set[str]:
    """The patients the any-word LIKEs alone match (the condition before the word index)."""
    condition = pn_match(term, patients.c.name_folded, patients.c.name_words, patients.c.name_reading, fuzzy=True)
    with engine.connect() as conn:
        return set(conn.execute(select(patients.c.patient_id).where(condition)).scalars())


def assert_words_follow_names(engine: Engine) -> None:
    """One word row per distinct word of each patient's name_words, and no other."""
    with engine.connect() as conn:
        rows = set(conn.execute(select(name_words_t.c.patient_pk, name_words_t.c.word)).all())
        names = conn.execute(select(patients.c.pk, patients.c.name_words)).all()
    assert {tuple(r) for r in rows} == {(pk, word) for pk, words in names for word in words_of(words)}


def selective_below(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Words in more than *rows* rows, or more candidates than that, are not selective."""
    monkeypatch.setattr(matching, "SELECTIVE_WORD_ROWS", rows)
    monkeypatch.setattr(matching, "SELECTIVE_PATIENTS", {"sqlite": rows, "postgresql": rows})


@pytest.mark.parametrize("selective", [None, 2, 0], ids=["default", "two-rows", "none"])
def test_matches_are_those_of_the_like_conditions(engine: Engine, selective: int | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every term finds exactly the patients the LIKEs alone find, in the
    study list and in a QIDO-RS fuzzymatching query, whether its candidates
    come from the word index (selective words) or not (every word of the
    term in more than SELECTIVE_WORD_ROWS rows)."""
    if selective is not None:
        selective_below(monkeypatch, selective)
    assert_words_follow_names(engine)
    found = {}
    for term in TERMS:
        expected = _like_only(engine, term)
        found[term] = _pids(engine, term)
        assert found[term] == expected, term
        with engine.connect() as conn:
            stmt, _ = build_select(Query(Level.STUDY, {"PatientName": term}, fuzzy=True), conn)
            assert {r._patient_id for r in conn.execute(stmt)} == expected, term
    # The terms are not vacuous: the given name, inner words, the groups.
    assert found["AN"] == {"NW1", "NW2", "NW5", "NW7"}
    assert found["VAN AN"] == {"NW1"}
    assert found["TRINH VAN BINH"] == found["BINH VAN"] == {"NW4"}
    assert found["ちば"] == found["陳"] == {"NW3"}
    assert found["100% LAN"] == {"NW8"} and found["%"] == set()
    assert found["Nguyen^Van"] == {"NW1", "NW10"}
    with engine.connect() as conn:
        # "AN*": Nguyễn Văn An, Thị Anh, An Khang, Anne: 4 rows.
        assert (name_word_lookup(conn)("AN") is None) is (selective is not None and selective < 4)


@pytest.mark.parametrize(("selective", "expected"), [(None, {"NW1"}), (3, {"NW1", "NW2", "NW10"}), (2, None)])
def test_the_candidates_are_the_patients_of_every_selective_word_of_the_term(
        engine: Engine, selective: int | None, expected: set[str] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-word term: its words but the last are whole words, the last
    a prefix; the candidates are the patients having each of its words that
    is in at most SELECTIVE_WORD_ROWS rows (NGUYEN: 3 patients; VAN: 4;
    AN*: 4); none is: no candidates, the LIKEs alone. A selective word no
    patient has: no patient."""
    if selective is not None:
        selective_below(monkeypatch, selective)
    with engine.connect() as conn:
        lookup = name_word_lookup(conn)
        candidates = lookup("NGUYEN VAN AN")
        if expected is None:
            assert candidates is None
        else:
            assert candidates is not None
            assert set(conn.execute(select(patients.c.patient_id).where(candidates)).scalars()) == expected
        nobody = lookup("ZZZ NGUYEN")
        assert nobody is not None and conn.execute(select(patients.c.pk).where(nobody)).all() == []
        assert lookup("") is None
        if selective is None:  # selective words leaving more patients than SELECTIVE_PATIENTS: none
            monkeypatch.setattr(matching, "SELECTIVE_PATIENTS", {"sqlite": 2, "postgresql": 2})
            assert name_word_lookup(conn)("NGUYEN") is None and name_word_lookup(conn)("NGUYEN VAN AN") is not None


def test_a_term_of_many_words_matches_as_the_likes(engine: Engine) -> None:
    """A pasted term of hundreds of words: a few of its words are looked
    up, the LIKEs decide (SQLite refused an INTERSECT of more than 500
    SELECTs: the study list and QIDO-RS answered 500)."""
    many = " ".join(["NGUYEN"] * 3 + [f"W{i}" for i in range(600)] + ["AN"])
    for term in (many, "NGUYEN " * 600 + "VAN AN"):
        assert _pids(engine, term) == _like_only(engine, term), term[:20]
    assert _pids(engine, "NGUYEN " * 600 + "VAN AN") == set()


def test_fhir_name_and_given_match_as_before(engine: Engine) -> None:
    """FHIR Patient name= and given=: the candidates from the word index
    narrow the same LIKEs (the last clause of the condition) to the same patients."""
    from viewer_api.fhir import _given_matches, _name_matches

    with engine.connect() as conn:
        def pids(condition: object) -> set[str]:
            return set(conn.execute(select(patients.c.patient_id).where(condition)).scalars())  # type: ignore[arg-type]

        lookup = name_word_lookup(conn)
        for matches in (_name_matches, _given_matches):
            for value in ("an", "Văn", "van an", "thi lan", "ちば", "100%", "o'b", "anne", "zzz", "nguyen van"):
                assert pids(matches(value, lookup)) == pids(matches(value, lambda _: None)), (matches.__name__, value)
        assert pids(_name_matches("an", lookup)) == {"NW1", "NW2", "NW5", "NW7"}
        assert pids(_given_matches("an", lookup)) == {"NW1", "NW2", "NW5", "NW7"}
        assert pids(_given_matches("nguyen", lookup)) == set()


def test_his_rename_merge_and_deletion_keep_the_words(engine: Engine) -> None:
    """ADT^A08 renames: the old given name no longer finds the patient, the
    new one does. ADT^A40 merges: the merged-away patient's words go. A
    patient pruned away leaves no word rows. The rows follow the names throughout."""
    service = OrderService(engine)
    service.update_patient(PatientInfo("NW6", name="Phạm^Thị Loan"))
    assert "NW6" not in _pids(engine, "LAN") and "NW6" in _pids(engine, "loan")
    assert_words_follow_names(engine)
    # A new patient from the HIS (no study yet) is searchable by its words too.
    service.update_patient(PatientInfo("NW20", name="Võ^Quốc Bảo"))
    with engine.connect() as conn:
        new_pk = conn.execute(select(patients.c.pk).where(patients.c.patient_id == "NW20")).scalar_one()
        assert set(conn.execute(select(name_words_t.c.word).where(name_words_t.c.patient_pk == new_pk)).scalars()) \
            == {"VO", "QUOC", "BAO"}
    # NW9 (Đỗ^Thanh Tùng) merged into NW5 (Lê^An Khang): its study is found by NW5's words only.
    service.merge_patients(PatientInfo("NW5"), [("NW9", "")])
    assert _pids(engine, "TUNG") == set() and _pids(engine, "KHANG") == {"NW5"}
    assert len(study_list(engine, name="KHANG")["items"]) == 2
    assert_words_follow_names(engine)
    with write_transaction(engine) as conn:
        assert prune_patients(conn, {new_pk}) == 0  # registered by the HIS: kept (pacs.index.prune)
        conn.execute(patients.update().where(patients.c.pk == new_pk).values(registered=False))
        assert prune_patients(conn, {new_pk}) == 1  # one only modalities made goes
    with engine.connect() as conn:
        assert conn.execute(select(name_words_t.c.word).where(name_words_t.c.patient_pk == new_pk)).all() == []
    assert_words_follow_names(engine)


def test_a_first_name_arriving_later_is_searchable(engine: Engine, tmp_path: Path) -> None:
    """A patient whose first object had no name takes the first real one
    (pacs.index.writer: a writer that has not cached the patient, an
    object naming its issuer): its words come with it."""
    _receive(engine, IndexWriter(), tmp_path, "NW30", "", 30, IssuerOfPatientID="BVDK")
    assert _pids(engine, "HUONG") == set()
    _receive(engine, IndexWriter(), tmp_path, "NW30", "Hồ^Thị Hương", 31, IssuerOfPatientID="BVDK")
    assert _pids(engine, "huong") == {"NW30"}
    assert_words_follow_names(engine)


@pytest.mark.parametrize("issuer", ["BVDK", ""], ids=["issuer", "no-issuer"])
def test_a_first_name_arriving_later_fills_a_patient_the_writer_knows(engine: Engine, tmp_path: Path,
                                                                      issuer: str) -> None:
    """The same writer (a receiving process) had the nameless patient in its
    cache, or found it by its ID alone (no issuer): the name of a later
    study was dropped, and the patient stayed unfindable by name."""
    writer = IndexWriter()
    pid = f"NW4{len(issuer)}"
    _receive(engine, writer, tmp_path, pid, "", 40 + len(issuer), IssuerOfPatientID=issuer)
    given = "Nga" if issuer else "Hoa"
    _receive(engine, writer, tmp_path, pid, f"Vũ^Thị {given}", 42 + len(issuer), IssuerOfPatientID=issuer)
    assert _pids(engine, given) == {pid}
    assert_words_follow_names(engine)


def test_a_name_the_his_gives_meanwhile_is_not_overwritten_by_the_modality_s(tmp_path: Path) -> None:
    """A nameless patient: an ingest read the blank name, and the HIS named
    the patient (ADT^A08, committed) before the ingest filled it. The
    modality's name overwrote the HIS's. On PostgreSQL, in a database of its
    own: on SQLite the ingest's transaction holds the one write lock from its
    start, so no other writer comes between."""
    url = create_database()
    engine = create_index_engine(url)
    try:
        upgrade_schema(engine)
        _receive(engine, IndexWriter(), tmp_path, "NW50", "", 50, IssuerOfPatientID="BVDK")
        renamed: list[bool] = []

        def his_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if not renamed and statement.startswith("UPDATE patients SET name="):
                renamed.append(True)  # the HIS commits on its own connection, before the ingest's UPDATE
                OrderService(engine).update_patient(PatientInfo("NW50", issuer="BVDK", name="Lý^Thị Mai"))

        event.listen(engine, "before_cursor_execute", his_first)
        try:
            _receive(engine, IndexWriter(), tmp_path, "NW50", "Ly^Mai", 51, IssuerOfPatientID="BVDK")
        finally:
            event.remove(engine, "before_cursor_execute", his_first)
        assert renamed
        with engine.connect() as conn:
            assert conn.execute(select(patients.c.name).where(patients.c.patient_id == "NW50")).scalar_one() \
                == "Lý^Thị Mai"
        assert _pids(engine, "THI MAI") == {"NW50"}
        assert_words_follow_names(engine)
    finally:
        engine.dispose()
        drop_database(url)
