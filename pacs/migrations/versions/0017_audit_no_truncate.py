"""The audit trail refuses TRUNCATE too (PostgreSQL).

Migration 0005 made audit_events append-only with a row trigger on UPDATE
and DELETE; TRUNCATE fires no row trigger and emptied the table. SQLite has
no TRUNCATE (its DELETE without WHERE fires the row trigger).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE TRIGGER trg_audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER trg_audit_events_no_truncate ON audit_events")
