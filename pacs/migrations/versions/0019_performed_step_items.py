"""Performed steps keep the scheduled steps their MPPS N-CREATE named.

An exam done before its HIS order exists (an emergency: the accession typed
at the console) has an MPPS that matches no order. When the order comes,
the performed step is adopted by it (pacs.orders.OrderService): the order
follows the step's status and the HIS is told, as if the MPPS had come
after the order. That needs what the N-CREATE named: its Scheduled Step
Attributes items, (accession, Study Instance UID, SPS ID) each, as JSON.
Existing rows get an empty list: their items were never kept.

Scheduled steps stored with a date but no time (a HIS scheduling by day)
get 000000, what a new one gets (pacs.orders.UNTIMED_START): the worklist
returned their Type 1 start time empty, and no time range query found them.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheduled', sa.String(), server_default='[]', nullable=False))
    op.execute(sa.text("UPDATE orders SET start_time = '000000' WHERE start_time = '' AND start_date <> ''"))


def downgrade() -> None:
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.drop_column('scheduled')
