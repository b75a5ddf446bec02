"""report_templates: findings and impression text a radiologist starts a report from.

Most reports in a Vietnamese department are written from a handful of
"mẫu kết quả" (a normal abdominal ultrasound, a normal chest X-ray...) and
then edited. A template is the department's (owner '') or one radiologist's
own; its name is unique per owner among the active ones (a partial unique
index: an archived template's name may be used again). Templates are
archived, never deleted, so a report written from one stays explainable.
``version`` counts the changes, for optimistic concurrency. See
pacs.report_templates.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None

ACTIVE = "archived_at IS NULL"


def upgrade() -> None:
    op.create_table('report_templates',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('name_key', sa.String(), nullable=False),
    sa.Column('name_folded', sa.String(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('body_part', sa.String(length=16), nullable=False),
    sa.Column('findings', sa.String(), nullable=False),
    sa.Column('impression', sa.String(), nullable=False),
    sa.Column('created_by', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('archived_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('archived_by', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_report_templates'))
    )
    op.create_index('uq_report_templates_owner_name_key', 'report_templates', ['owner', 'name_key'], unique=True,
                    sqlite_where=sa.text(ACTIVE), postgresql_where=sa.text(ACTIVE))


def downgrade() -> None:
    op.drop_index('uq_report_templates_owner_name_key', table_name='report_templates')
    op.drop_table('report_templates')
