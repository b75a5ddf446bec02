"""studies.changed_at: when what a study shows last changed.

The FHIR ImagingStudy's meta.lastUpdated, and the `_lastUpdated` search an
EMR polls with ("every study that arrived or changed since my last poll"),
need a time that moves with every change of what the resource shows: an
instance added or deleted, a series added, moved or deleted, the study's
date, accession or description corrected, the study filed under another
patient (ADT merge, reconciliation with an order), its patient's ID, issuer
or name corrected (ADT^A08). studies.updated_at is none of those (the last
instance received: it drives "study stable" routing, and a merge must not
restart that).

Kept by triggers, as the counters are (0002): every path that changes those
rows -- the ingest, the overwrite policy, deletions and purges, pruning,
reconciliation, the HIS's merges and corrections, and any written later --
moves it, with no code of its own to forget. The instance counter triggers
set it in the UPDATE they already make (no extra write per instance); an
instance's replacement by the same object recompressed (pacs compress: size
and storage key only) does not move it. The time is the database's
(SQLite's clock, PostgreSQL's clock_timestamp()), as UTCDateTime keeps
instants: UTC, and on SQLite the text SQLAlchemy writes
("YYYY-MM-DD HH:MM:SS.ffffff"), so that it compares with bound values.

Existing studies start from updated_at, the latest time known.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None

# What the ImagingStudy shows of each row (pacs.studylist.study_detail,
# viewer_api.fhir.imaging_study): a change of another column (counters,
# sizes, storage keys, names' search forms) changes nothing it shows.
_STUDY_SHOWN = ("patient_pk", "study_uid", "study_date", "study_time", "accession_number", "description",
                "modalities")
_SERIES_SHOWN = ("study_pk", "series_uid", "modality", "series_number", "description")
_INSTANCE_SHOWN = ("series_pk", "sop_uid", "sop_class_uid", "instance_number")
_PATIENT_SHOWN = ("patient_id", "issuer", "name")

# SQLite's clock as SQLAlchemy writes a DateTime there (microseconds: the
# milliseconds of %f, then 000), UTC.
_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def _changed(columns: tuple[str, ...], distinct: str) -> str:
    return " OR ".join(f"OLD.{c} {distinct} NEW.{c}" for c in columns)


# The counter triggers of 0002, with changed_at set on an insert and a delete.
_SQLITE_COUNTERS = [
    f"""
    CREATE TRIGGER trg_instances_counters_insert AFTER INSERT ON instances
    BEGIN
        UPDATE series SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
        WHERE pk = NEW.series_pk;
        UPDATE studies SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at, changed_at = {_SQLITE_NOW}
        WHERE pk = (SELECT study_pk FROM series WHERE pk = NEW.series_pk);
    END
    """,
    f"""
    CREATE TRIGGER trg_instances_counters_delete AFTER DELETE ON instances
    BEGIN
        UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
        WHERE pk = OLD.series_pk;
        UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes,
            changed_at = {_SQLITE_NOW}
        WHERE pk = (SELECT study_pk FROM series WHERE pk = OLD.series_pk);
    END
    """,
]
_SQLITE_0002_COUNTERS = [
    """
    CREATE TRIGGER trg_instances_counters_insert AFTER INSERT ON instances
    BEGIN
        UPDATE series SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
        WHERE pk = NEW.series_pk;
        UPDATE studies SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
        WHERE pk = (SELECT study_pk FROM series WHERE pk = NEW.series_pk);
    END
    """,
    """
    CREATE TRIGGER trg_instances_counters_delete AFTER DELETE ON instances
    BEGIN
        UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
        WHERE pk = OLD.series_pk;
        UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
        WHERE pk = (SELECT study_pk FROM series WHERE pk = OLD.series_pk);
    END
    """,
]
_SQLITE_CHANGED = [
    f"""
    CREATE TRIGGER trg_instances_changed AFTER UPDATE OF {", ".join(_INSTANCE_SHOWN)} ON instances
    WHEN {_changed(_INSTANCE_SHOWN, "IS NOT")}
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW}
        WHERE pk IN (SELECT study_pk FROM series WHERE pk IN (OLD.series_pk, NEW.series_pk));
    END
    """,
    f"""
    CREATE TRIGGER trg_series_changed_insert AFTER INSERT ON series
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW} WHERE pk = NEW.study_pk;
    END
    """,
    f"""
    CREATE TRIGGER trg_series_changed_delete AFTER DELETE ON series
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW} WHERE pk = OLD.study_pk;
    END
    """,
    f"""
    CREATE TRIGGER trg_series_changed_update AFTER UPDATE OF {", ".join(_SERIES_SHOWN)} ON series
    WHEN {_changed(_SERIES_SHOWN, "IS NOT")}
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW} WHERE pk IN (OLD.study_pk, NEW.study_pk);
    END
    """,
    # Not fired again by its own UPDATE: changed_at is not among its columns.
    f"""
    CREATE TRIGGER trg_studies_changed AFTER UPDATE OF {", ".join(_STUDY_SHOWN)} ON studies
    WHEN {_changed(_STUDY_SHOWN, "IS NOT")}
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW} WHERE pk = NEW.pk;
    END
    """,
    f"""
    CREATE TRIGGER trg_patients_changed AFTER UPDATE OF {", ".join(_PATIENT_SHOWN)} ON patients
    WHEN {_changed(_PATIENT_SHOWN, "IS NOT")}
    BEGIN
        UPDATE studies SET changed_at = {_SQLITE_NOW} WHERE patient_pk = NEW.pk;
    END
    """,
]
_SQLITE_TRIGGERS = ("trg_instances_changed", "trg_series_changed_insert", "trg_series_changed_delete",
                    "trg_series_changed_update", "trg_studies_changed", "trg_patients_changed")


def _pg_counters(changed: str) -> str:
    """0002's instances_counters(), the studies' UPDATEs setting *changed* too."""
    return f"""
    CREATE OR REPLACE FUNCTION instances_counters() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE s_pk BIGINT;
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
            WHERE pk = OLD.series_pk RETURNING study_pk INTO s_pk;
            UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes{changed}
            WHERE pk = s_pk;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE series SET num_instances = num_instances + 1,
                size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
            WHERE pk = NEW.series_pk RETURNING study_pk INTO s_pk;
            UPDATE studies SET num_instances = num_instances + 1,
                size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at{changed}
            WHERE pk = s_pk;
        END IF;
        RETURN NULL;
    END $$
    """


# An UPDATE of an instance (its size or series) moves it through trg_instances_changed only.
_PG_COUNTERS = _pg_counters(
    ",\n                changed_at = CASE WHEN TG_OP = 'UPDATE' THEN changed_at ELSE clock_timestamp() END")
_PG_CHANGED = [
    """
    CREATE FUNCTION instances_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE studies SET changed_at = clock_timestamp()
        WHERE pk IN (SELECT study_pk FROM series WHERE pk IN (OLD.series_pk, NEW.series_pk));
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER trg_instances_changed AFTER UPDATE OF {", ".join(_INSTANCE_SHOWN)} ON instances
    FOR EACH ROW WHEN ({_changed(_INSTANCE_SHOWN, "IS DISTINCT FROM")}) EXECUTE FUNCTION instances_changed()
    """,
    """
    CREATE FUNCTION series_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE studies SET changed_at = clock_timestamp() WHERE pk = OLD.study_pk;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE studies SET changed_at = clock_timestamp() WHERE pk = NEW.study_pk;
        END IF;
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER trg_series_changed AFTER INSERT OR DELETE ON series FOR EACH ROW EXECUTE FUNCTION series_changed()",
    f"""
    CREATE TRIGGER trg_series_changed_update AFTER UPDATE OF {", ".join(_SERIES_SHOWN)} ON series
    FOR EACH ROW WHEN ({_changed(_SERIES_SHOWN, "IS DISTINCT FROM")}) EXECUTE FUNCTION series_changed()
    """,
    """
    CREATE FUNCTION studies_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.changed_at := clock_timestamp();
        RETURN NEW;
    END $$
    """,
    f"""
    CREATE TRIGGER trg_studies_changed BEFORE UPDATE OF {", ".join(_STUDY_SHOWN)} ON studies
    FOR EACH ROW WHEN ({_changed(_STUDY_SHOWN, "IS DISTINCT FROM")}) EXECUTE FUNCTION studies_changed()
    """,
    """
    CREATE FUNCTION patients_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE studies SET changed_at = clock_timestamp() WHERE patient_pk = NEW.pk;
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER trg_patients_changed AFTER UPDATE OF {", ".join(_PATIENT_SHOWN)} ON patients
    FOR EACH ROW WHEN ({_changed(_PATIENT_SHOWN, "IS DISTINCT FROM")}) EXECUTE FUNCTION patients_changed()
    """,
]
_PG_TRIGGERS = (("trg_instances_changed", "instances"), ("trg_series_changed", "series"),
                ("trg_series_changed_update", "series"), ("trg_studies_changed", "studies"),
                ("trg_patients_changed", "patients"))
_PG_FUNCTIONS = ("instances_changed", "series_changed", "studies_changed", "patients_changed")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.add_column("studies", sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))
        op.execute("UPDATE studies SET changed_at = updated_at")
        op.alter_column("studies", "changed_at", nullable=False)
        op.create_index("ix_studies_changed_at", "studies", ["changed_at"])
        for sql in (_PG_COUNTERS, *_PG_CHANGED):
            op.execute(sql)
        return
    # SQLite adds a NOT NULL column only with a constant default: never
    # used (the index writer names the column), the rows get updated_at.
    op.execute("ALTER TABLE studies ADD COLUMN changed_at DATETIME NOT NULL DEFAULT '1970-01-01 00:00:00.000000'")
    op.execute("UPDATE studies SET changed_at = updated_at")
    op.create_index("ix_studies_changed_at", "studies", ["changed_at"])
    for name in ("insert", "delete"):
        op.execute(f"DROP TRIGGER trg_instances_counters_{name}")
    for sql in (*_SQLITE_COUNTERS, *_SQLITE_CHANGED):
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger, table in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
        op.execute(_pg_counters(""))
        op.drop_index("ix_studies_changed_at", table_name="studies")
        op.drop_column("studies", "changed_at")
        return
    for trigger in _SQLITE_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for name in ("insert", "delete"):
        op.execute(f"DROP TRIGGER trg_instances_counters_{name}")
    for sql in _SQLITE_0002_COUNTERS:
        op.execute(sql)
    op.drop_index("ix_studies_changed_at", table_name="studies")
    op.execute("ALTER TABLE studies DROP COLUMN changed_at")  # SQLite 3.35+: no table rebuild
