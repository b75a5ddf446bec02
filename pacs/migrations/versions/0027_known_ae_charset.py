"""known_aes.charset: answers without diacritics for a modality that reads no UTF-8.

Many modalities in service in Vietnamese hospitals (older ultrasound, CR
and endoscopy consoles) read only the default repertoire: a worklist name
"Nguyễn Văn An" sent in ISO_IR 192 shows as "NguyÃ¡Â»â€¦n VÃ„Æ’n An" on
the console and goes into its images that way. ``pacs ae add NAME --charset
ascii`` has the C-FIND and worklist answers to that AE carry the text
without its marks ("Nguyen Van An"), as Vietnamese write a name without
diacritics, and no Specific Character Set. '' (every AE so far): UTF-8.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("known_aes", sa.Column("charset", sa.String(), server_default="", nullable=False))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("known_aes", "charset")
    else:
        op.execute("ALTER TABLE known_aes DROP COLUMN charset")
