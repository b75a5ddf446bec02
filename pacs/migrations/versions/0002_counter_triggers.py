"""Instance counters on series and studies maintained by triggers.

The ingest hot path then issues one INSERT per instance; the database keeps
num_instances / size_bytes / updated_at of the series and the study right on
insert, replace and delete (including cascaded deletes by purge).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SQLITE = [
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
    """
    CREATE TRIGGER trg_instances_counters_update AFTER UPDATE OF size_bytes, series_pk ON instances
    BEGIN
        UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
        WHERE pk = OLD.series_pk;
        UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
        WHERE pk = (SELECT study_pk FROM series WHERE pk = OLD.series_pk);
        UPDATE series SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
        WHERE pk = NEW.series_pk;
        UPDATE studies SET num_instances = num_instances + 1,
            size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
        WHERE pk = (SELECT study_pk FROM series WHERE pk = NEW.series_pk);
    END
    """,
]

_POSTGRESQL = [
    """
    CREATE FUNCTION instances_counters() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE s_pk BIGINT;
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
            WHERE pk = OLD.series_pk RETURNING study_pk INTO s_pk;
            UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - OLD.size_bytes
            WHERE pk = s_pk;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            UPDATE series SET num_instances = num_instances + 1,
                size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
            WHERE pk = NEW.series_pk RETURNING study_pk INTO s_pk;
            UPDATE studies SET num_instances = num_instances + 1,
                size_bytes = size_bytes + NEW.size_bytes, updated_at = NEW.received_at
            WHERE pk = s_pk;
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER trg_instances_counters AFTER INSERT OR DELETE OR UPDATE OF size_bytes, series_pk
    ON instances FOR EACH ROW EXECUTE FUNCTION instances_counters()
    """,
]


def upgrade() -> None:
    statements = _POSTGRESQL if op.get_bind().dialect.name == "postgresql" else _SQLITE
    for sql in statements:
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_instances_counters ON instances")
        op.execute("DROP FUNCTION IF EXISTS instances_counters()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_instances_counters_{name}")
