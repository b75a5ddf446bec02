"""critical_results: critical findings flagged at a report's signature, and their acknowledgement;
reports found by their signing time.

A radiologist signing a report that holds a finding the referring doctor must
act on at once (kết quả nguy kịch: a tension pneumothorax, an intracranial
bleed) flags it; the HIS receives the ORU^R01 with OBX-8 "AA", and the record
stays open until someone says who was told and how (pacs.critical_results).
``pacs activity`` counts the reports signed in a period: ix_reports_signed_at.

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-07 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0036'
down_revision = '0035'
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('critical_results',
    sa.Column('pk', PK, autoincrement=True, nullable=False),
    sa.Column('study_pk', PK, nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('note', sa.String(), nullable=False),
    sa.Column('flagged_by', sa.String(length=64), nullable=False),
    sa.Column('flagged_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('acknowledged_by', sa.String(length=64), nullable=False),
    sa.Column('acknowledged_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('acknowledgement', sa.String(), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_critical_results_study_pk_studies'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_critical_results')),
    sa.UniqueConstraint('study_pk', 'version', name=op.f('uq_critical_results_study_pk_version'))
    )
    op.create_index(op.f('ix_critical_results_flagged_at'), 'critical_results', ['flagged_at'], unique=False)
    op.create_index(op.f('ix_reports_signed_at'), 'reports', ['signed_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_reports_signed_at'), table_name='reports')
    op.drop_index(op.f('ix_critical_results_flagged_at'), table_name='critical_results')
    op.drop_table('critical_results')
