"""The urgent group by waiting time; a withdrawn order makes its study routine; old data's images' priority.

- ix_studies_priority becomes (priority, report_state, created_at): the
  worklist lists the urgent studies not yet reported the longest waiting
  (earliest received) first, not by Study Date (a study dated years ago but
  received now came first). The index gives that order.
- A study whose HIS order was withdrawn -- every step of its requested
  procedure CANCELLED or DISCONTINUED (ORM^O01 CA / DC) -- is ROUTINE: the
  order no longer asks for it urgently, and the images' priority is the
  order's own, copied by the modality from the worklist. The triggers of
  0032 are made anew with that rule; the one on orders also fires when a
  step is withdrawn (or put back), and updates the studies of every step of
  the procedure (a study is linked to its first step).
- Studies all of whose objects came by ``pacs import`` or this archive's own
  C-GET (source ``c-get``: pacs remote pull --method get, prefetch by C-GET),
  or were made here (key images, reports), lose their images' priority (old
  data; since this revision the ingest does not take it, see
  pacs.ingest.Origin.examination). Those this archive pulled by C-MOVE came
  like a modality's (source ``dimse``), cannot be told apart afterwards and
  keep it.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-09 09:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None

# The sources (instances.source) of objects that were no examination arriving: an
# import, this archive's own C-GET, and what it made itself (key images, a report).
_OLD_DATA = "('import', 'c-get', 'key-images', 'report')"
# pacs.priority's spellings as of this revision (a migration does not follow later code).
_TERMS = {
    "S": "STAT", "STAT": "STAT",
    "A": "HIGH", "P": "HIGH", "C": "HIGH", "ASAP": "HIGH", "URGENT": "HIGH", "HIGH": "HIGH",
    "R": "ROUTINE", "ROUTINE": "ROUTINE",
    "T": "MEDIUM", "MEDIUM": "MEDIUM",
    "LOW": "LOW",
}
_CASES = " ".join(f"WHEN '{word}' THEN '{term}'" for word, term in _TERMS.items())
_WITHDRAWN = "('CANCELLED', 'DISCONTINUED')"


def _set(withdrawn_rule: bool) -> str:
    """0032's UPDATE of studies.priority, with or without the withdrawn order's rule."""
    term = f"CASE UPPER(TRIM(orders.priority)) {_CASES} ELSE '' END"
    if withdrawn_rule:
        term = (f"CASE WHEN NOT EXISTS (SELECT 1 FROM orders AS step WHERE step.accession_number = "
                f"orders.accession_number AND step.status NOT IN {_WITHDRAWN}) THEN 'ROUTINE' ELSE {term} END")
    order_priority = (f"(SELECT {term} FROM study_orders JOIN orders ON orders.pk = study_orders.order_pk "
                      "WHERE study_orders.study_pk = studies.pk)")
    return f"UPDATE studies SET priority = COALESCE(NULLIF({order_priority}, ''), studies.image_priority)"


# The studies linked to any step of NEW's requested procedure (they link its first step).
_PROCEDURE_STUDIES = ("SELECT study_orders.study_pk FROM study_orders JOIN orders AS linked "
                      "ON linked.pk = study_orders.order_pk WHERE linked.accession_number = NEW.accession_number")


def _sqlite_triggers(withdrawn_rule: bool) -> dict[str, str]:
    update = _set(withdrawn_rule)
    if withdrawn_rule:
        orders = ("AFTER UPDATE OF priority, status ON orders WHEN OLD.priority IS NOT NEW.priority OR "
                  f"(OLD.status IN {_WITHDRAWN}) IS NOT (NEW.status IN {_WITHDRAWN}) "
                  f"BEGIN {update} WHERE pk IN ({_PROCEDURE_STUDIES}); END")
    else:
        orders = (f"AFTER UPDATE OF priority ON orders WHEN OLD.priority IS NOT NEW.priority BEGIN {update} "
                  "WHERE pk IN (SELECT study_pk FROM study_orders WHERE order_pk = NEW.pk); END")
    return {
        "trg_study_orders_priority_insert": f"AFTER INSERT ON study_orders BEGIN {update} WHERE pk = NEW.study_pk; END",
        "trg_study_orders_priority_delete": f"AFTER DELETE ON study_orders BEGIN {update} WHERE pk = OLD.study_pk; END",
        "trg_study_orders_priority_update": (f"AFTER UPDATE OF study_pk, order_pk ON study_orders "
                                             f"BEGIN {update} WHERE pk IN (OLD.study_pk, NEW.study_pk); END"),
        "trg_orders_priority_update": orders,
    }


def _pg_functions(withdrawn_rule: bool) -> list[str]:
    update = _set(withdrawn_rule)
    studies = _PROCEDURE_STUDIES if withdrawn_rule else "SELECT study_pk FROM study_orders WHERE order_pk = NEW.pk"
    return [f"""
CREATE OR REPLACE FUNCTION study_orders_priority() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {update} WHERE pk = OLD.study_pk;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        {update} WHERE pk = NEW.study_pk;
    END IF;
    RETURN NULL;
END $$
""", f"""
CREATE OR REPLACE FUNCTION orders_priority() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {update} WHERE pk IN ({studies});
    RETURN NULL;
END $$
"""]


def _pg_orders_trigger(withdrawn_rule: bool) -> str:
    if withdrawn_rule:
        when = ("AFTER UPDATE OF priority, status ON orders FOR EACH ROW WHEN (OLD.priority IS DISTINCT FROM "
                f"NEW.priority OR (OLD.status IN {_WITHDRAWN}) IS DISTINCT FROM (NEW.status IN {_WITHDRAWN}))")
    else:
        when = ("AFTER UPDATE OF priority ON orders FOR EACH ROW WHEN "
                "(OLD.priority IS DISTINCT FROM NEW.priority)")
    return f"CREATE TRIGGER trg_orders_priority_update {when} EXECUTE FUNCTION orders_priority()"


def _triggers(withdrawn_rule: bool) -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in _pg_functions(withdrawn_rule):
            op.execute(function)
        op.execute("DROP TRIGGER IF EXISTS trg_orders_priority_update ON orders")
        op.execute(_pg_orders_trigger(withdrawn_rule))
        return
    for trigger, body in _sqlite_triggers(withdrawn_rule).items():
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(f"CREATE TRIGGER {trigger} {body}")


def upgrade() -> None:
    op.drop_index("ix_studies_priority", table_name="studies")
    op.create_index("ix_studies_priority", "studies", ["priority", "report_state", "created_at"])
    _triggers(True)
    # Only the urgent ones matter, and only those are read (the priority index).
    op.execute("UPDATE studies SET image_priority = '' WHERE priority IN ('STAT', 'HIGH') "
               "AND image_priority IN ('STAT', 'HIGH') AND NOT EXISTS (SELECT 1 FROM series JOIN instances "
               "ON instances.series_pk = series.pk WHERE series.study_pk = studies.pk "
               f"AND instances.source NOT IN {_OLD_DATA})")
    op.execute(f"{_set(True)} WHERE priority IN ('STAT', 'HIGH')")


def downgrade() -> None:
    _triggers(False)
    op.execute(f"{_set(False)} WHERE pk IN (SELECT study_pk FROM study_orders)")
    op.drop_index("ix_studies_priority", table_name="studies")
    op.create_index("ix_studies_priority", "studies", ["priority", "report_state", "study_date", "study_time"])
