"""signing_certificates: a radiologist's certificate and sealed key for the digital signature of reports.

Vietnamese EMR rules (Thông tư 46/2018/TT-BYT, Nghị định 130/2018) want
imaging reports to carry a digital signature (chữ ký số) by a certificate.
The radiologist's PKCS#12 is imported with `pacs user certificate import`:
the certificate (DER), the CA certificates that came with it (PEM) and the
private key encrypted under the radiologist's PIN (never in clear). The
wrong PINs given when signing are counted, and lock signing, in the row.
See pacs.signing_keys.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('signing_certificates',
    sa.Column('pk', PK, autoincrement=True, nullable=False),
    sa.Column('user_pk', PK, nullable=False),
    sa.Column('certificate', sa.LargeBinary(), nullable=False),
    sa.Column('chain_pem', sa.String(), nullable=False),
    sa.Column('subject', sa.String(), nullable=False),
    sa.Column('issuer', sa.String(), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sealed_key', sa.LargeBinary(), nullable=False),
    sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('imported_by', sa.String(), nullable=False),
    sa.Column('failed_pins', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lockouts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['user_pk'], ['users.pk'], name=op.f('fk_signing_certificates_user_pk_users'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk', name=op.f('pk_signing_certificates')),
    sa.UniqueConstraint('user_pk', name=op.f('uq_signing_certificates_user_pk'))
    )


def downgrade() -> None:
    op.drop_table('signing_certificates')
