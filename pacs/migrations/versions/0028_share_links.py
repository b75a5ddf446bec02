"""share_links: a study shown to its patient without an account.

Hospitals going filmless hand the patient a printed QR code instead of
film; it opens /share/{token}, the study's images and signed report (see
pacs.shares). Only the SHA-256 of the token is kept. A link goes with its
study (ON DELETE CASCADE): a study deleted as sent in error is no longer
shown by the links printed for it. The birth-year check's wrong answers and
lock are columns of the link, so that every node sees them.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('share_links',
    sa.Column('pk', PK, autoincrement=True, nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('study_pk', PK, nullable=False),
    sa.Column('created_by', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('uses', sa.Integer(), nullable=False),
    sa.Column('failed_answers', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lockouts', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('cookie_key', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_share_links_study_pk_studies'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_share_links')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_share_links_token_hash'))
    )
    op.create_index(op.f('ix_share_links_study_pk'), 'share_links', ['study_pk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_share_links_study_pk'), table_name='share_links')
    op.drop_table('share_links')
