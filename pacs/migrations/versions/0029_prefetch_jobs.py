"""prefetch_jobs: prior studies to fetch from the old PACS when the HIS places an order.

A hospital that moved to this archive keeps its old PACS for years; the
radiologist reading a new CT needs the patient's prior studies here before
the scan. A new order queues a job (in the order's transaction) that a node
of `pacs serve` runs under a lease: C-FIND of the old PACS for the patient,
retrieve of the newest priors not complete here (pacs.prefetch).

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('prefetch_jobs',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.String(), nullable=False),
    sa.Column('issuer', sa.String(), nullable=False),
    sa.Column('other_ids', sa.String(), nullable=False),
    sa.Column('modality', sa.String(), nullable=False),
    sa.Column('accession_number', sa.String(), nullable=False),
    sa.Column('state', sa.String(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.String(), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(), nullable=False),
    sa.Column('progress', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_prefetch_jobs'))
    )
    with op.batch_alter_table('prefetch_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prefetch_jobs_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_prefetch_jobs_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index('ix_prefetch_jobs_state_next_attempt_at', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    op.drop_table('prefetch_jobs')
