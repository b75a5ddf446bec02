"""patients.registered: the patient's demographics were set by the HIS or an administrator.

A new study received under a registered patient's ID with other
demographics (the modality's patient list still holds the name typed
without diacritics before the correction, a walk-in exam without an order)
is corrected to the registered ones on retrieval, as a later series of a
study is to its study's: C-FIND shows the registered name, and C-GET,
C-MOVE and WADO-RS now send it too. A patient known only from what
modalities sent is not registered: its studies keep their own values.

Patients with an HIS order are registered here: the order's patient is the
HIS's (a patient only an ADT message named is not known as such any more).

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on SQLite too: a batch copy of the table would trip
    # over the triggers that name it (migration 0024).
    op.add_column("patients", sa.Column("registered", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE patients SET registered = " + ("true" if op.get_bind().dialect.name == "postgresql" else "1")
               + " WHERE pk IN (SELECT patient_pk FROM orders)")


def downgrade() -> None:
    op.drop_column("patients", "registered")
