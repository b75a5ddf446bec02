"""Known AEs: whether we reach the peer over DICOM TLS (C-MOVE, routing, remote Q/R).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('known_aes') as batch:
        batch.add_column(sa.Column('tls', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('known_aes') as batch:
        batch.drop_column('tls')
