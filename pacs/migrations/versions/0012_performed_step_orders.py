"""Performed steps: every order an MPPS performs. One N-CREATE may list
several scheduled steps (IHE SWF "group case": two requested procedures
acquired together); the N-SET that completes it must complete them all.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('performed_steps') as batch:
        batch.add_column(sa.Column('order_pks', sa.String(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('performed_steps') as batch:
        batch.drop_column('order_pks')
