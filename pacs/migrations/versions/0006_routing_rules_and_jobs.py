"""Routing: rules and the durable job queue.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 14:45:32.017959
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('routing_rules',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('conditions', sa.String(), nullable=False),
    sa.Column('destination_kind', sa.String(length=16), nullable=False),
    sa.Column('destination', sa.String(), nullable=False),
    sa.Column('destination_auth', sa.String(), nullable=False),
    sa.Column('transcode', sa.String(), nullable=False),
    sa.Column('deidentify', sa.Boolean(), nullable=False),
    sa.Column('morph', sa.String(), nullable=False),
    sa.Column('stable_seconds', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_routing_rules')),
    sa.UniqueConstraint('name', name=op.f('uq_routing_rules_name'))
    )
    op.create_table('route_jobs',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('rule_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('destination_key', sa.String(), nullable=False),
    sa.Column('state', sa.String(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.String(), nullable=False),
    sa.Column('last_error', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['rule_pk'], ['routing_rules.pk'], name=op.f('fk_route_jobs_rule_pk_routing_rules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_route_jobs')),
    sa.UniqueConstraint('rule_pk', 'sop_uid', name=op.f('uq_route_jobs_rule_pk_sop_uid'))
    )
    with op.batch_alter_table('route_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_route_jobs_destination_key'), ['destination_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_route_jobs_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_route_jobs_rule_pk'), ['rule_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_route_jobs_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_route_jobs_study_uid'), ['study_uid'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('route_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_route_jobs_study_uid'))
        batch_op.drop_index(batch_op.f('ix_route_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_route_jobs_rule_pk'))
        batch_op.drop_index(batch_op.f('ix_route_jobs_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_route_jobs_destination_key'))

    op.drop_table('route_jobs')
    op.drop_table('routing_rules')
