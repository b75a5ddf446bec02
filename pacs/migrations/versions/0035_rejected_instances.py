"""rejected_instances: the instances rejection notes withdrew, refused when sent again.

A modality resending a whole study (its automatic retry, a technologist
sending it again), or a router forwarding it late, brought images that a
rejection note (IHE IOCM) had withdrawn back into the patient's record.
The ingest now refuses such an instance (0xA771) until an administrator
lifts the rejection (``pacs rejections lift``: ``lifted_at``, kept so that
the same note sent again does not withdraw the instance again;
``rejection_listings``: every note that listed it, each of them sent again
leaving it).

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-07 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_instances",
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("note_uid", sa.String(length=64), nullable=False),
        sa.Column("rejected_by", sa.String(length=64), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lifted_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sop_uid", name=op.f("pk_rejected_instances")),
    )
    op.create_index(op.f("ix_rejected_instances_study_uid"), "rejected_instances", ["study_uid"], unique=False)
    # Every note that listed each (a lift stands against each of them sent again).
    op.create_table(
        "rejection_listings",
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("note_uid", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sop_uid", "note_uid", name=op.f("pk_rejection_listings")),
    )


def downgrade() -> None:
    op.drop_table("rejection_listings")
    op.drop_index(op.f("ix_rejected_instances_study_uid"), table_name="rejected_instances")
    op.drop_table("rejected_instances")
