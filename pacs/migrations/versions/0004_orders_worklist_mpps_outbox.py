"""Orders (the worklist), study-order links, corrections, MPPS and the outbox.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 14:02:46.526151
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbound_messages',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('destination', sa.String(), nullable=False),
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('payload', sa.String(), nullable=False),
    sa.Column('state', sa.String(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_outbound_messages'))
    )
    with op.batch_alter_table('outbound_messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbound_messages_destination'), ['destination'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbound_messages_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbound_messages_state'), ['state'], unique=False)

    op.create_table('orders',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('patient_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('placer_order_number', sa.String(), nullable=False),
    sa.Column('filler_order_number', sa.String(), nullable=False),
    sa.Column('accession_number', sa.String(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('requested_procedure_id', sa.String(), nullable=False),
    sa.Column('requested_procedure_description', sa.String(), nullable=False),
    sa.Column('procedure_code', sa.String(), nullable=False),
    sa.Column('procedure_code_scheme', sa.String(), nullable=False),
    sa.Column('procedure_code_meaning', sa.String(), nullable=False),
    sa.Column('step_id', sa.String(), nullable=False),
    sa.Column('step_description', sa.String(), nullable=False),
    sa.Column('modality', sa.String(), nullable=False),
    sa.Column('station_ae_title', sa.String(), nullable=False),
    sa.Column('station_name', sa.String(), nullable=False),
    sa.Column('location', sa.String(), nullable=False),
    sa.Column('start_date', sa.String(), nullable=False),
    sa.Column('start_time', sa.String(), nullable=False),
    sa.Column('performing_physician', sa.String(), nullable=False),
    sa.Column('referring_physician', sa.String(), nullable=False),
    sa.Column('priority', sa.String(), nullable=False),
    sa.Column('reason', sa.String(), nullable=False),
    sa.Column('status', sa.String(), nullable=False),
    sa.Column('source', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_pk'], ['patients.pk'], name=op.f('fk_orders_patient_pk_patients')),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_orders')),
    sa.UniqueConstraint('accession_number', name=op.f('uq_orders_accession_number')),
    sa.UniqueConstraint('study_uid', name=op.f('uq_orders_study_uid'))
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_orders_modality'), ['modality'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_patient_pk'), ['patient_pk'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_placer_order_number'), ['placer_order_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_start_date'), ['start_date'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_station_ae_title'), ['station_ae_title'], unique=False)
        batch_op.create_index(batch_op.f('ix_orders_status'), ['status'], unique=False)

    op.create_table('corrections',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('study_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('keyword', sa.String(), nullable=False),
    sa.Column('received', sa.String(), nullable=False),
    sa.Column('corrected', sa.String(), nullable=False),
    sa.Column('reason', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_corrections_study_pk_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_corrections'))
    )
    with op.batch_alter_table('corrections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_corrections_study_pk'), ['study_pk'], unique=False)

    op.create_table('performed_steps',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('order_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('status', sa.String(), nullable=False),
    sa.Column('modality', sa.String(), nullable=False),
    sa.Column('station_ae_title', sa.String(), nullable=False),
    sa.Column('start', sa.String(), nullable=False),
    sa.Column('end', sa.String(), nullable=False),
    sa.Column('performed_series', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_pk'], ['orders.pk'], name=op.f('fk_performed_steps_order_pk_orders')),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_performed_steps')),
    sa.UniqueConstraint('sop_uid', name=op.f('uq_performed_steps_sop_uid'))
    )
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_performed_steps_order_pk'), ['order_pk'], unique=False)

    op.create_table('study_orders',
    sa.Column('study_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('order_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('matched_by', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_pk'], ['orders.pk'], name=op.f('fk_study_orders_order_pk_orders'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_study_orders_study_pk_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('study_pk', name=op.f('pk_study_orders'))
    )
    with op.batch_alter_table('study_orders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_orders_order_pk'), ['order_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('study_orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_orders_order_pk'))

    op.drop_table('study_orders')
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_performed_steps_order_pk'))

    op.drop_table('performed_steps')
    with op.batch_alter_table('corrections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_corrections_study_pk'))

    op.drop_table('corrections')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_orders_status'))
        batch_op.drop_index(batch_op.f('ix_orders_station_ae_title'))
        batch_op.drop_index(batch_op.f('ix_orders_start_date'))
        batch_op.drop_index(batch_op.f('ix_orders_placer_order_number'))
        batch_op.drop_index(batch_op.f('ix_orders_patient_pk'))
        batch_op.drop_index(batch_op.f('ix_orders_modality'))

    op.drop_table('orders')
    with op.batch_alter_table('outbound_messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbound_messages_state'))
        batch_op.drop_index(batch_op.f('ix_outbound_messages_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_outbound_messages_destination'))

    op.drop_table('outbound_messages')
