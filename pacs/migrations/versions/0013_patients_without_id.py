"""Patients without a Patient ID are not one patient.

A modality may send an object with an empty Patient ID (an unconscious
emergency patient registered at the console without one). The unique key
(patient_id, issuer) made every such object, of every such person, one
patient: the second person's study was listed under the first person's name.
The key now covers patients that have an ID only (a partial unique index);
each study received without an ID gets its own patient.

Studies already filed under one shared empty-ID patient stay where they are
(the index does not hold what each study's objects said); ``pacs reindex``
on a fresh index separates them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 22:00:00
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

KEY = 'uq_patients_patient_id_issuer'
WITH_ID = "patient_id <> ''"


def upgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        # SQLite cannot drop a table constraint: the table is rebuilt, with
        # foreign keys off (pacs.index.upgrade_schema), or dropping the old
        # table would delete every patient's identifiers (ON DELETE CASCADE).
        _refuse_with_foreign_keys_on()
        with op.batch_alter_table('patients', recreate='always') as batch:
            batch.drop_constraint(KEY, type_='unique')
    else:
        op.drop_constraint(KEY, 'patients', type_='unique')
    op.create_index(KEY, 'patients', ['patient_id', 'issuer'], unique=True,
                    sqlite_where=sa.text(WITH_ID), postgresql_where=sa.text(WITH_ID))
    if op.get_bind().dialect.name == 'sqlite':
        broken = op.get_bind().exec_driver_sql('PRAGMA foreign_key_check').all()
        if broken:
            raise RuntimeError(f'foreign keys broken by the patients rebuild: {broken[:5]}')
    shared = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM studies JOIN patients ON patients.pk = studies.patient_pk "
        "WHERE patients.patient_id = '' AND patients.pk IN (SELECT patient_pk FROM studies GROUP BY patient_pk "
        "HAVING count(*) > 1)")).scalar()
    if shared:
        logging.getLogger('pacs.migrations').warning(
            '%d studies received without a Patient ID share one patient (their names may be wrong in queries); '
            'new studies get a patient each. To separate these too: pacs backup, then pacs reindex into a new, '
            'empty index (it rebuilds patients from the objects; orders, reports and users are not in the objects)',
            shared)


def downgrade() -> None:
    op.drop_index(KEY, table_name='patients')
    if op.get_bind().dialect.name == 'sqlite':
        _refuse_with_foreign_keys_on()
        with op.batch_alter_table('patients', recreate='always') as batch:
            batch.create_unique_constraint(KEY, ['patient_id', 'issuer'])
    else:
        op.create_unique_constraint(KEY, 'patients', ['patient_id', 'issuer'])


def _refuse_with_foreign_keys_on() -> None:
    if op.get_bind().exec_driver_sql('PRAGMA foreign_keys').scalar():
        raise RuntimeError('the patients table must be rebuilt with foreign keys off (run it through pacs)')
