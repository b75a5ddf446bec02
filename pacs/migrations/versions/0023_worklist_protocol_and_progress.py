"""Scheduled steps keep their protocol code and who moved them.

Protocol: a HIS's OMI IPC-6 (Protocol Code, a CE: code^text^scheme) names
the protocol a modality selects for the step; it was kept as the step's
description text only, and the worklist's Scheduled Protocol Code Sequence
(an IHE SWF integration-critical attribute) was always empty.
orders.protocol_code, protocol_code_scheme and protocol_code_meaning hold it.

Progress: a modality without MPPS (most ultrasound, older X-ray) never moved
its step, which stayed SCHEDULED for ever. The images linked to an order now
move it (pacs.orders.OrderService.progress_from_images): IN PROGRESS on the
first, COMPLETED once the study is stable. orders.progress_source says what
moved a step last: "" nothing, "images" its images (completed by them once
stable), "mpps" a performed procedure step -- which then decides alone (an
MPPS that comes later wins). Existing steps get "" (a step an MPPS moved
before is IN PROGRESS or final: images only ever start a SCHEDULED step,
and only complete one they started).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None

_COLUMNS = ("protocol_code", "protocol_code_scheme", "protocol_code_meaning", "progress_source")


def upgrade() -> None:
    with op.batch_alter_table('orders', schema=None) as batch_op:
        for column in _COLUMNS:
            batch_op.add_column(sa.Column(column, sa.String(), server_default='', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('orders', schema=None) as batch_op:
        for column in reversed(_COLUMNS):
            batch_op.drop_column(column)
