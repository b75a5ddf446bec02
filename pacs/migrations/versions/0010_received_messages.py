"""Inbound HL7 messages already applied: a resend (lost ACK) is acknowledged, not applied twice.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 15:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('received_messages',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sender', sa.String(), nullable=False),
    sa.Column('control_id', sa.String(), nullable=False),
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_received_messages')),
    sa.UniqueConstraint('sender', 'control_id', name=op.f('uq_received_messages_sender_control_id'))
    )
    with op.batch_alter_table('received_messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_received_messages_received_at'), ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_table('received_messages')
