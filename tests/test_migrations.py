"""Alembic migrations produce exactly the models' schema, on both databases."""

from __future__ import annotations

from pathlib import Path

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


def test_postgresql_schema(pg_url: str) -> None:
    engine = create_index_engine(pg_url)
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


def test_kept_lookup_connection_survives_a_lost_backend(pg_url: str) -> None:
    """The ingest's duplicate lookup keeps one connection; a PostgreSQL
    restart (here: its backend killed) costs one reconnect, not an error."""
    import psycopg
    from sqlalchemy import text

    from pacs.reads import IndexReader

    from .peers import PG_ADMIN

    engine = create_index_engine(pg_url)
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


def _upgrade_across_0013(engine: Engine) -> None:
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
        conn.execute(studies.insert().values(
            patient_pk=pk, study_uid="1.2.3.4", study_date="", study_time="", accession_number="A1", study_id="",
            referring_physician="", referring_physician_folded="", description="", institution="", modalities="",
            num_series=0, num_instances=0, size_bytes=0, created_at=now, updated_at=now))
    upgrade_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(identifiers)).scalar() == 1
        assert conn.execute(select(studies.c.patient_pk)).scalar() == pk
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


def test_upgrade_across_0013_keeps_everything_sqlite(tmp_path: Path) -> None:
    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        _upgrade_across_0013(engine)
    finally:
        engine.dispose()


def test_upgrade_across_0013_keeps_everything_postgresql(pg_url: str) -> None:
    engine = create_index_engine(pg_url)
    try:
        _upgrade_across_0013(engine)
    finally:
        engine.dispose()
