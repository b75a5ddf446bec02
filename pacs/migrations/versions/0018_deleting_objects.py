"""Tombstones of deletions: the keys whose objects a deletion is removing.

``pacs delete`` and ``pacs purge`` record, in the transaction that deletes
the index rows, the storage keys whose objects they will delete; the ingest
checks them in its index transaction, so a modality resending an instance
of a study being deleted (same UIDs, same key) is never acknowledged with
its object deleted under it (see pacs.index.tombstones).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deleting_objects',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('storage_key', sa.String(), nullable=False),
    sa.Column('deletion', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_deleting_objects'))
    )
    with op.batch_alter_table('deleting_objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deleting_objects_storage_key'), ['storage_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_deleting_objects_finished_at'), ['finished_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deleting_objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deleting_objects_finished_at'))
        batch_op.drop_index(batch_op.f('ix_deleting_objects_storage_key'))
    op.drop_table('deleting_objects')
