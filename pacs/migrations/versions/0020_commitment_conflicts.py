"""Objects refused as UID conflicts (0111H), kept for storage commitment.

An object whose SOP Instance UID the archive keeps in another study or
series is refused and not stored; a storage commitment request naming the
UID must then fail for that sender, not be answered "committed" from the
kept copy's row (the modality would delete the only copy of its object).
The refusal left no trace but a log line: it is now a row, written by the
ingest, removed when the sender stores the UID into the kept study/series
(see pacs.commitment).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('commitment_conflicts',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_commitment_conflicts'))
    )
    with op.batch_alter_table('commitment_conflicts', schema=None) as batch_op:
        batch_op.create_index('ix_commitment_conflicts_sop_uid_calling_ae', ['sop_uid', 'calling_ae'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('commitment_conflicts', schema=None) as batch_op:
        batch_op.drop_index('ix_commitment_conflicts_sop_uid_calling_ae')
    op.drop_table('commitment_conflicts')
