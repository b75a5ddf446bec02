"""studies.priority and reading_claims: the reading worklist's urgency and who is reading.

studies.priority is the study's reading priority as a DICOM term (STAT,
HIGH, ROUTINE, MEDIUM, LOW, '' for none): its HIS order's when it has one
(orders.priority, normalized: the JSON orders API takes it as sent), else
studies.image_priority, what the modality wrote in the images (Requested
Procedure Priority; the index writer sets it at ingest). Kept by triggers
on study_orders (a study linked to an order, unlinked, matched by hand)
and on orders (an ORM^O01 XO changing the priority), as report_state is
(0026): every path moves it, with no code of its own to forget. Indexed
with the report state and the study date: the worklist lists the urgent
studies not yet reported first, and its header counts them.

Studies already linked to an order take its priority here; the images'
priority of studies already stored is not read back from the objects.

reading_claims: a radiologist reading a study ("đang đọc"), one claim per
study, until it expires (expires_at, on the database's clock: every node
agrees), is released or the report is signed (pacs.reading_claims).

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

# pacs.priority's spellings as of this revision (a migration does not
# follow later code).
_TERMS = {
    "S": "STAT", "STAT": "STAT",
    "A": "HIGH", "P": "HIGH", "C": "HIGH", "ASAP": "HIGH", "URGENT": "HIGH", "HIGH": "HIGH",
    "R": "ROUTINE", "ROUTINE": "ROUTINE",
    "T": "MEDIUM", "MEDIUM": "MEDIUM",
    "LOW": "LOW",
}
_CASES = " ".join(f"WHEN '{word}' THEN '{term}'" for word, term in _TERMS.items())
_ORDER_PRIORITY = ("(SELECT CASE UPPER(TRIM(orders.priority)) " + _CASES + " ELSE '' END FROM study_orders "
                   "JOIN orders ON orders.pk = study_orders.order_pk WHERE study_orders.study_pk = studies.pk)")
_SET = f"UPDATE studies SET priority = COALESCE(NULLIF({_ORDER_PRIORITY}, ''), studies.image_priority)"

_SQLITE_TRIGGERS = {
    "trg_study_orders_priority_insert": f"AFTER INSERT ON study_orders BEGIN {_SET} WHERE pk = NEW.study_pk; END",
    "trg_study_orders_priority_delete": f"AFTER DELETE ON study_orders BEGIN {_SET} WHERE pk = OLD.study_pk; END",
    "trg_study_orders_priority_update": (f"AFTER UPDATE OF study_pk, order_pk ON study_orders "
                                         f"BEGIN {_SET} WHERE pk IN (OLD.study_pk, NEW.study_pk); END"),
    # Only a changed priority: an HL7 update rewrites every column of its steps.
    "trg_orders_priority_update": (f"AFTER UPDATE OF priority ON orders WHEN OLD.priority IS NOT NEW.priority "
                                   f"BEGIN {_SET} "
                                   "WHERE pk IN (SELECT study_pk FROM study_orders WHERE order_pk = NEW.pk); END"),
}

_PG_FUNCTIONS = {
    "study_orders_priority": f"""
CREATE FUNCTION study_orders_priority() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_SET} WHERE pk = OLD.study_pk;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        {_SET} WHERE pk = NEW.study_pk;
    END IF;
    RETURN NULL;
END $$
""",
    "orders_priority": f"""
CREATE FUNCTION orders_priority() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {_SET} WHERE pk IN (SELECT study_pk FROM study_orders WHERE order_pk = NEW.pk);
    RETURN NULL;
END $$
""",
}
_PG_TRIGGERS = {
    "trg_study_orders_priority": ("study_orders", "AFTER INSERT OR DELETE ON study_orders", "study_orders_priority"),
    "trg_study_orders_priority_update": ("study_orders", "AFTER UPDATE OF study_pk, order_pk ON study_orders",
                                         "study_orders_priority"),
    "trg_orders_priority_update": ("orders", "AFTER UPDATE OF priority ON orders FOR EACH ROW WHEN "
                                   "(OLD.priority IS DISTINCT FROM NEW.priority)", "orders_priority"),
}


def upgrade() -> None:
    # Constant defaults: instant ALTERs whatever the archive's size.
    op.add_column("studies", sa.Column("priority", sa.String(), server_default="", nullable=False))
    op.add_column("studies", sa.Column("image_priority", sa.String(), server_default="", nullable=False))
    op.execute(f"{_SET} WHERE pk IN (SELECT study_pk FROM study_orders)")
    op.create_index("ix_studies_priority", "studies", ["priority", "report_state", "study_date", "study_time"])
    op.create_table('reading_claims',
    sa.Column('study_pk', PK, autoincrement=False, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('display_name', sa.String(), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_reading_claims_study_pk_studies'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('study_pk', name=op.f('pk_reading_claims'))
    )
    op.create_index('ix_reading_claims_username', 'reading_claims', ['username', 'expires_at'])
    if op.get_bind().dialect.name == "postgresql":
        for function in _PG_FUNCTIONS.values():
            op.execute(function)
        for trigger, (_, when, function) in _PG_TRIGGERS.items():
            for_each = "" if "FOR EACH ROW" in when else " FOR EACH ROW"
            op.execute(f"CREATE TRIGGER {trigger} {when}{for_each} EXECUTE FUNCTION {function}()")
        return
    for trigger, body in _SQLITE_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {trigger} {body}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger, (table, _, _) in _PG_TRIGGERS.items():
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    else:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_index('ix_reading_claims_username', table_name='reading_claims')
    op.drop_table('reading_claims')
    op.drop_index("ix_studies_priority", table_name="studies")
    op.drop_column("studies", "image_priority")
    op.drop_column("studies", "priority")
