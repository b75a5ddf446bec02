"""share_links: a study, or an order's studies, shown to the patient without an account.

Hospitals going filmless hand the patient a printed QR code instead of
film; it opens /share/{token}, the study's images and signed report (see
pacs.shares). Only the SHA-256 of the token is kept. A link names either a
study (study_pk) or an order (order_pk: the receipt printed at
registration, before the scan, when no study exists yet; it shows the
studies later linked to that order), never both nor neither (a CHECK).
A link goes with its study (ON DELETE CASCADE): a study deleted as sent in
error is no longer shown by the links printed for it; an order link with
its order's row. The birth-year check's wrong answers and lock are columns
of the link, so that every node sees them.

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
    sa.Column('study_pk', PK, nullable=True),
    sa.Column('order_pk', PK, nullable=True),
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
    sa.CheckConstraint('(study_pk IS NULL) <> (order_pk IS NULL)', name='ck_share_links_one_target'),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], name=op.f('fk_share_links_study_pk_studies'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['order_pk'], ['orders.pk'], name=op.f('fk_share_links_order_pk_orders'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_share_links')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_share_links_token_hash'))
    )
    op.create_index(op.f('ix_share_links_study_pk'), 'share_links', ['study_pk'], unique=False)
    op.create_index(op.f('ix_share_links_order_pk'), 'share_links', ['order_pk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_share_links_order_pk'), table_name='share_links')
    op.drop_index(op.f('ix_share_links_study_pk'), table_name='share_links')
    op.drop_table('share_links')
