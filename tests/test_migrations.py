"""Alembic migrations produce exactly the models' schema, on both databases."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from pacs.index import create_index_engine, current_revision, upgrade_schema
from pacs.index.models import Base


def assert_schema_matches(engine: Engine) -> None:
    upgrade_schema(engine)
    upgrade_schema(engine)  # idempotent: a second start changes nothing
    with engine.connect() as conn:
        # PostgreSQL-only text_pattern_ops indexes (migration 0003) are not
        # expressible in the portable models; everything else must match.
        context = MigrationContext.configure(
            conn, opts={"include_object": lambda obj, name, *_: not (name or "").endswith("_pattern")}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"migrations drifted from models: {diff}"
    assert current_revision(engine)


def test_sqlite_schema(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        assert_schema_matches(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_postgresql_schema(pg_empty_url: str) -> None:
    engine = create_index_engine(pg_empty_url)
    try:
        assert_schema_matches(engine)
        with engine.connect() as conn:
            # Migration 0008: name prefixes estimated finely enough for the
            # planner to start a newest-first search from the name index.
            targets = dict(conn.exec_driver_sql(
                "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = 'patients'::regclass"
                " AND attname IN ('name', 'name_words')").all())
        assert targets == {"name": 1000, "name_words": 1000}
    finally:
        engine.dispose()


def test_kept_lookup_connection_survives_a_lost_backend(pg_empty_url: str) -> None:
    """The ingest's duplicate lookup keeps one connection; a PostgreSQL
    restart (here: its backend killed) costs one reconnect, not an error."""
    import psycopg
    from sqlalchemy import text

    from pacs.reads import IndexReader

    from .peers import PG_ADMIN

    engine = create_index_engine(pg_empty_url)
    reader = IndexReader(engine)
    try:
        upgrade_schema(engine)
        assert reader.instance_key("1.2.3") is None
        conn = reader._lookup_conn
        assert conn is not None
        pid = conn.execute(text("select pg_backend_pid()")).scalar()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        assert reader.instance_key("1.2.3") is None
        assert reader._lookup_conn is not conn
    finally:
        reader.close()
        engine.dispose()


def _instance_row(engine: Engine, sop_uid: str, key: str) -> None:
    """One patient/study/series/instance written on its own connection."""
    from datetime import UTC, datetime

    from pacs.index.models import Instance, Patient, Series, Study

    now = datetime.now(UTC)
    with engine.begin() as conn:
        patient = conn.execute(Patient.__table__.insert().values(
            patient_id="P1", created_at=now, updated_at=now,
        ).returning(Patient.__table__.c.pk)).scalar_one()
        study = conn.execute(Study.__table__.insert().values(
            patient_pk=patient, study_uid="1.2.840.1", created_at=now, updated_at=now,
        ).returning(Study.__table__.c.pk)).scalar_one()
        series = conn.execute(Series.__table__.insert().values(
            study_pk=study, series_uid="1.2.840.1.1", created_at=now, updated_at=now,
        ).returning(Series.__table__.c.pk)).scalar_one()
        conn.execute(Instance.__table__.insert().values(
            series_pk=series, sop_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="", storage_key=key,
            received_at=now,
        ))


def test_kept_lookup_connection_sees_later_commits(tmp_path: Path) -> None:
    """The kept lookup connection holds no transaction between lookups
    (SQLite: no read snapshot), so it sees what other connections committed."""
    from pacs.reads import IndexReader

    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    reader = IndexReader(engine)
    try:
        upgrade_schema(engine)
        assert reader.instance_key("1.2.840.1.1.1") is None
        _instance_row(engine, "1.2.840.1.1.1", "a/b/c.dcm")
        assert reader.instance_key("1.2.840.1.1.1") == "a/b/c.dcm"
        assert reader._lookup_conn is not None
        assert not reader._lookup_conn.connection.dbapi_connection.in_transaction  # type: ignore[union-attr]
    finally:
        reader.close()
        engine.dispose()


def _upgrade_across_0013(engine: Engine, caplog: Any) -> None:
    """An index at 0012 holding a patient with identifiers, studies, an order;
    upgraded to head: nothing lost (the SQLite rebuild of `patients` runs with
    foreign keys off, else dropping the old table would delete every
    identifier), and the unique key now spares patients without an ID."""
    from datetime import UTC, datetime

    from sqlalchemy import func, select
    from sqlalchemy.exc import IntegrityError

    from pacs.index.models import Patient, PatientIdentifier, Study

    upgrade_schema(engine, "0012")
    now = datetime.now(UTC)
    patients, identifiers, studies = Patient.__table__, PatientIdentifier.__table__, Study.__table__
    blank = {"issuer": "", "name": "", "name_folded": "", "name_words": "", "birth_date": "", "sex": "",
             "created_at": now, "updated_at": now}
    with engine.begin() as conn:
        pk = conn.execute(patients.insert().values(patient_id="001085012345", **blank)).inserted_primary_key[0]
        conn.execute(identifiers.insert().values(patient_pk=pk, value="DN4797912345678", issuer="BHYT", id_type="HC"))
        unknown = conn.execute(patients.insert().values(patient_id="", **blank)).inserted_primary_key[0]
        for owner, uid in ((pk, "1.2.3.4"), (unknown, "1.2.3.5"), (unknown, "1.2.3.6")):
            conn.execute(studies.insert().values(
                patient_pk=owner, study_uid=uid, study_date="", study_time="", accession_number="", study_id="",
                referring_physician="", referring_physician_folded="", description="", institution="",
                modalities="", num_series=0, num_instances=0, size_bytes=0, created_at=now, updated_at=now))
    with caplog.at_level("WARNING"):
        upgrade_schema(engine)
    assert "2 studies received without a Patient ID share one patient" in caplog.text
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(identifiers)).scalar() == 1
        assert conn.execute(select(studies.c.patient_pk).where(studies.c.study_uid == "1.2.3.4")).scalar() == pk
    blank["changed_at"] = now  # a column of a later revision (0024)
    with engine.begin() as conn:
        conn.execute(patients.insert().values(patient_id="", **blank))
        conn.execute(patients.insert().values(patient_id="", **blank))  # two people without an ID
    try:
        with engine.begin() as conn:
            conn.execute(patients.insert().values(patient_id="001085012345", **blank))
        raise AssertionError("a second patient with the same ID and issuer was accepted")
    except IntegrityError:
        pass
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for the pool


def test_upgrade_across_0013_keeps_everything_sqlite(tmp_path: Path, caplog: Any) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        _upgrade_across_0013(engine, caplog)
    finally:
        engine.dispose()


def test_upgrade_across_0013_keeps_everything_postgresql(pg_empty_url: str, caplog: Any) -> None:
    engine = create_index_engine(pg_empty_url)
    try:
        _upgrade_across_0013(engine, caplog)
    finally:
        engine.dispose()


# -- who may upgrade an existing index ---------------------------------------------------------
def _cli(*args: str, data_dir: Path, index_url: str | None = None) -> Any:
    from .peers import PACS_COMMANDS

    extra = ["--index-url", index_url] if index_url else []
    # Forked from the tests' zygote (pacs imported once): the same command, a second sooner.
    return PACS_COMMANDS.run([*args, "--data-dir", str(data_dir), *extra], dict(os.environ), timeout=300)


def test_only_serve_and_db_upgrade_upgrade_an_older_index_and_never_under_a_server(tmp_path: Path) -> None:
    """Any command of a new version upgraded the index it opened (`pacs stats`,
    a backup before the upgrade...), also under an older `pacs serve` still
    running, which then refused every C-STORE (A703: the ON CONFLICT of its
    patients insert no longer matched a key). Now only `pacs db upgrade` and
    `pacs serve` upgrade, not while a server runs on the data dir; the others
    say what to do. An index from a newer version is named as such."""
    from pacs.running import hold_for_serving

    data = tmp_path / "data"
    engine = create_index_engine(f"sqlite:///{data}/index.sqlite")
    try:
        upgrade_schema(engine, "0012")
    finally:
        engine.dispose()
    stats = _cli("stats", data_dir=data)
    assert stats.returncode == 1 and "revision 0012" in stats.stderr and "pacs db upgrade" in stats.stderr
    serving = hold_for_serving(data)
    try:
        refused = _cli("db", "upgrade", data_dir=data)
    finally:
        serving.close()
    assert refused.returncode == 1 and "a pacs serve runs on" in refused.stderr, refused.stderr
    upgraded = _cli("db", "upgrade", data_dir=data)
    assert upgraded.returncode == 0 and "upgraded from revision 0012" in upgraded.stdout, upgraded.stderr
    assert _cli("stats", data_dir=data).returncode == 0
    engine = create_index_engine(f"sqlite:///{data}/index.sqlite")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    finally:
        engine.dispose()
    newer = _cli("stats", data_dir=data)
    assert newer.returncode == 1 and "written by a newer version" in newer.stderr, newer.stderr


def test_no_upgrade_while_another_server_uses_the_postgresql_index(tmp_path: Path, pg_empty_url: str) -> None:
    """On a shared PostgreSQL index (two nodes) the data dir lock says nothing
    of the other node: its sessions do. A session without a name (an older
    version's server) holds the upgrade back; a DBA's psql does not."""
    import psycopg

    engine = create_index_engine(pg_empty_url)
    try:
        upgrade_schema(engine, "0012")
    finally:
        engine.dispose()
    libpq = pg_empty_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, application_name="psql"):
        for old_node in ("", "filmless-pacs 0012"):  # before sessions were named; a named older version
            with psycopg.connect(libpq, application_name=old_node):
                refused = _cli("db", "upgrade", data_dir=tmp_path / "d", index_url=pg_empty_url)
                assert refused.returncode == 1 and "connection(s) from" in refused.stderr, refused.stderr
        upgraded = _cli("db", "upgrade", data_dir=tmp_path / "d", index_url=pg_empty_url)
        assert upgraded.returncode == 0 and "upgraded from revision 0012" in upgraded.stdout, upgraded.stderr


def test_nodes_starting_together_upgrade_once_and_both_start(pg_empty_url: str) -> None:
    """All nodes stopped, upgraded and started at once (docker compose up):
    each node's upgrading session must not count as the other's running
    server, or neither would start."""
    from concurrent.futures import ThreadPoolExecutor

    from pacs.index.schema import head_revision, prepare_schema

    engines = [create_index_engine(pg_empty_url) for _ in range(3)]
    try:
        upgrade_schema(engines[0], "0012")
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda e: prepare_schema(e, upgrade=True), engines))
        assert current_revision(engines[0]) == head_revision(engines[0])
    finally:
        for engine in engines:
            engine.dispose()


def test_schema_head_constant_is_the_newest_migration(tmp_path: Path) -> None:
    from pacs.index.db import SCHEMA_HEAD
    from pacs.index.schema import head_revision

    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        assert head_revision(engine) == SCHEMA_HEAD
    finally:
        engine.dispose()


def _patient_changes_and_downgrade(engine: Engine) -> None:
    """Migration 0024's triggers move patients.changed_at for what the
    Patient shows and nothing else, on the database's own clock, including
    what the FHIR tests do not reach (a patient without ID, whose id names
    its first study; a merged-away key taken up again); then the downgrade
    leaves 0023's schema, and upgrading again the models' one."""
    import time
    from datetime import UTC, datetime

    from alembic import command
    from sqlalchemy import inspect, select, update

    from pacs.index import alembic_config
    from pacs.index.models import Patient, PatientIdentifier, Study

    upgrade_schema(engine)
    patients, identifiers, studies = Patient.__table__, PatientIdentifier.__table__, Study.__table__
    past = datetime(2020, 1, 1, tzinfo=UTC)
    row = {"issuer": "BVDK", "name": "", "name_folded": "", "name_words": "", "birth_date": "", "sex": "",
           "created_at": past, "updated_at": past, "changed_at": past}
    study = {"study_date": "", "study_time": "", "accession_number": "", "study_id": "", "referring_physician": "",
             "referring_physician_folded": "", "description": "", "institution": "", "modalities": "",
             "num_series": 0, "num_instances": 0, "size_bytes": 0, "created_at": past, "updated_at": past,
             "changed_at": past}

    def moved() -> set[str]:
        """The patients whose changed_at moved (set back to the past after)."""
        time.sleep(0.002)  # SQLite's clock counts milliseconds
        with engine.begin() as conn:
            found = set(conn.execute(select(patients.c.patient_id, patients.c.name).where(
                patients.c.changed_at > past)).all())
            conn.execute(update(patients).values(changed_at=past))
        return {pid or name for pid, name in found}

    with engine.begin() as conn:
        one, other = (conn.execute(patients.insert().values(patient_id=pid, **row)).inserted_primary_key[0]
                      for pid in ("BN1", "BN2"))
        nobody = conn.execute(patients.insert().values(**{**row, "patient_id": "", "name": "NOBODY"})
                              ).inserted_primary_key[0]
    assert moved() == set()
    with engine.begin() as conn:  # a value it shows, then one it does not
        conn.execute(update(patients).where(patients.c.pk == one).values(name="A^B"))
    assert moved() == {"BN1"}
    with engine.begin() as conn:
        conn.execute(update(patients).where(patients.c.pk == one).values(name_folded="A^B", name="A^B"))
    assert moved() == set()
    with engine.begin() as conn:
        conn.execute(identifiers.insert().values(patient_pk=one, value="079", issuer="CCCD", id_type="NI"))
    assert moved() == {"BN1"}
    with engine.begin() as conn:  # BN2 merged into BN1: its key kept as a MERGED alias, its row gone
        conn.execute(identifiers.insert().values(patient_pk=one, value="BN2", issuer="BVDK", id_type="MERGED"))
        conn.execute(patients.delete().where(patients.c.pk == other))
    assert moved() == {"BN1"}
    with engine.begin() as conn:  # BN2 received anew: BN1's replaces link goes
        conn.execute(patients.insert().values(patient_id="BN2", **row))
    assert moved() == {"BN1"}
    with engine.begin() as conn:  # a study of the patient without ID: its id now names it
        conn.execute(studies.insert().values(patient_pk=nobody, study_uid="1.2.3.9", **study))
        conn.execute(studies.insert().values(patient_pk=one, study_uid="1.2.3.8", **study))
    assert moved() == {"NOBODY"}
    with engine.begin() as conn:
        conn.execute(identifiers.delete().where(identifiers.c.value == "079"))
    assert moved() == {"BN1"}

    cfg = alembic_config(engine)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0023")
    assert "changed_at" not in {c["name"] for c in inspect(engine).get_columns("patients")}
    with engine.begin() as conn:  # no trigger left naming the column
        conn.exec_driver_sql(f"UPDATE patients SET name = 'C^D', patient_id = 'BN3' WHERE pk = {int(one)}")
        conn.exec_driver_sql("DELETE FROM patient_identifiers")
        conn.exec_driver_sql("DELETE FROM studies")
    assert_schema_matches(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty index: a SQLite file, or a fresh PostgreSQL database."""
    url = f"sqlite:///{tmp_path}/index.sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_empty_url")
    engine = create_index_engine(url)
    yield engine
    engine.dispose()


def test_patient_changed_at(empty_index: Engine) -> None:
    _patient_changes_and_downgrade(empty_index)


def _name_words_filled_and_downgrade(engine: Engine) -> None:
    """Migration 0025 gives the patients of an index at 0024 their name
    words (what the fuzzy name search starts from): found by any word
    afterwards, as before; the downgrade drops the table."""
    from datetime import UTC, datetime

    from alembic import command
    from sqlalchemy import inspect, select

    from pacs.index import alembic_config
    from pacs.index.models import Patient
    from pacs.index.name_words import name_words_t
    from pacs.names import fold_name, name_reading, name_words
    from pacs.query import Level, Query, build_select
    from pacs.studylist import study_list

    from .test_name_words import assert_words_follow_names

    upgrade_schema(engine, "0024")
    now = datetime.now(UTC)
    patients = Patient.__table__
    names = {"BN1": "Nguyễn^Văn An", "BN2": "Trần^Văn Bình=陳^ちば", "BN3": "", "BN4": "Trịnh^Bình^Văn"}
    with engine.begin() as conn:
        for pid, name in names.items():
            conn.execute(patients.insert().values(
                patient_id=pid, issuer="", name=name, name_folded=fold_name(name), name_words=name_words(name),
                name_reading=name_reading(name), birth_date="", sex="", created_at=now, updated_at=now, changed_at=now))
    upgrade_schema(engine)
    assert_words_follow_names(engine)
    with engine.connect() as conn:
        assert len(conn.execute(select(name_words_t)).all()) == 3 + 5 + 3
    # The word index answers the fuzzy search (no study here: the patient-level query).
    for term, expected in (("an", {"BN1"}), ("VAN", {"BN1", "BN2", "BN4"}), ("ちば", {"BN2"}),
                           ("van binh", {"BN2", "BN4"}), ("binh van", {"BN4"})):
        stmt, _ = build_select(Query(Level.PATIENT, {"PatientName": term}, fuzzy=True))
        with engine.connect() as conn:
            assert {r._patient_id for r in conn.execute(stmt)} == expected, term
    assert study_list(engine, name="an")["total"] == 0  # no studies
    cfg = alembic_config(engine)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0024")
    assert not inspect(engine).has_table("patient_name_words")
    assert current_revision(engine) == "0024"


def test_name_words_migration(empty_index: Engine) -> None:
    _name_words_filled_and_downgrade(empty_index)
