"""Orders hold several scheduled procedure steps per requested procedure.

IHE RAD-4 (OMI^O23, ORM^O01) places one requested procedure -- one
accession, one Study Instance UID -- with several Scheduled Procedure
Steps (CT without, then with contrast; two modalities). A row of `orders`
is one step: the accession alone was unique (so was the study UID), and
such an order was refused whole. The key is now (accession, step ID); the
study UID, shared by the steps of one procedure, keeps a plain index.

Every existing row stays, as the one step of its procedure. Rows without a
step ID (none are written so, but older versions may have) take their
accession as step ID, what a new order without one gets: the key then
names every step.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

OLD_KEYS = ('uq_orders_accession_number', 'uq_orders_study_uid')
STEP_KEY = 'uq_orders_accession_number_step_id'
STUDY_INDEX = 'ix_orders_study_uid'


def upgrade() -> None:
    op.execute(sa.text("UPDATE orders SET step_id = accession_number WHERE step_id = ''"))
    if op.get_bind().dialect.name == 'sqlite':
        # SQLite cannot drop a table constraint: the table is rebuilt, with
        # foreign keys off (pacs.index.upgrade_schema), or dropping the old
        # table would delete every study's link to its order (ON DELETE
        # CASCADE) and refuse the performed steps that name an order.
        _refuse_with_foreign_keys_on()
        with op.batch_alter_table('orders', recreate='always') as batch:
            for key in OLD_KEYS:
                batch.drop_constraint(key, type_='unique')
            batch.create_unique_constraint(STEP_KEY, ['accession_number', 'step_id'])
            batch.create_index(STUDY_INDEX, ['study_uid'], unique=False)
        _check_foreign_keys()
    else:
        for key in OLD_KEYS:
            op.drop_constraint(key, 'orders', type_='unique')
        op.create_unique_constraint(STEP_KEY, 'orders', ['accession_number', 'step_id'])
        op.create_index(STUDY_INDEX, 'orders', ['study_uid'], unique=False)


def downgrade() -> None:
    # The old keys cannot hold a procedure of several steps: say so rather
    # than fail on a constraint, or silently drop scheduled steps.
    several = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM (SELECT accession_number FROM orders GROUP BY accession_number "
        "HAVING count(*) > 1) AS multi")).scalar()
    if several:
        raise RuntimeError(f'{several} orders have several scheduled procedure steps (cancelled ones count: '
                           'they are rows too); revision 0015 holds one row per accession: delete the extra '
                           'steps first')
    if op.get_bind().dialect.name == 'sqlite':
        _refuse_with_foreign_keys_on()
        with op.batch_alter_table('orders', recreate='always') as batch:
            batch.drop_index(STUDY_INDEX)
            batch.drop_constraint(STEP_KEY, type_='unique')
            for key, column in zip(OLD_KEYS, ('accession_number', 'study_uid'), strict=True):
                batch.create_unique_constraint(key, [column])
        _check_foreign_keys()
    else:
        op.drop_index(STUDY_INDEX, table_name='orders')
        op.drop_constraint(STEP_KEY, 'orders', type_='unique')
        for key, column in zip(OLD_KEYS, ('accession_number', 'study_uid'), strict=True):
            op.create_unique_constraint(key, 'orders', [column])


def _refuse_with_foreign_keys_on() -> None:
    if op.get_bind().exec_driver_sql('PRAGMA foreign_keys').scalar():
        raise RuntimeError('the orders table must be rebuilt with foreign keys off (run it through pacs)')


def _check_foreign_keys() -> None:
    broken = op.get_bind().exec_driver_sql('PRAGMA foreign_key_check').all()
    if broken:
        raise RuntimeError(f'foreign keys broken by the orders rebuild: {broken[:5]}')
