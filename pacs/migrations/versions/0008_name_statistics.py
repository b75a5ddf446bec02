"""PostgreSQL: finer statistics on the name columns patient-name searches match.

With the default statistics target, PostgreSQL estimated a name prefix such
as 'PHAM DUC%' to match several times the patients it does, and answered a
newest-first study search (QIDO-RS, the viewer's list) by walking the study
date index backwards, filtering every study by its patient's name: 30-150 ms
at 100,000 studies instead of ~1.5 ms from the name index. A target of 1000
(histogram buckets of ~30 patients at 33,000 patients) makes the estimate
close enough for the planner to start from the name.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 04:10:00
"""

from __future__ import annotations

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_COLUMNS = ("name_words", "name")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in _COLUMNS:
        op.execute(f"ALTER TABLE patients ALTER COLUMN {column} SET STATISTICS 1000")
    op.execute("ANALYZE patients")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for column in _COLUMNS:
        op.execute(f"ALTER TABLE patients ALTER COLUMN {column} SET STATISTICS -1")
