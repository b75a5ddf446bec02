"""Known AEs: the DICOM services each may use, and a pinned TLS client certificate.

Existing AEs keep every service ("*"), as before this revision.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('known_aes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('services', sa.String(), server_default='*', nullable=False))
        batch_op.add_column(sa.Column('cert_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('known_aes', schema=None) as batch_op:
        batch_op.drop_column('cert_sha256')
        batch_op.drop_column('services')
