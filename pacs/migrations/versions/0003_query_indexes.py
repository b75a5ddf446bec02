"""Query support: word form of patient names and prefix-searchable indexes.

PostgreSQL only uses a btree index for ``LIKE 'ABC%'`` when it is built with
``text_pattern_ops`` (or the database collation is C); SQLite uses a plain
index for prefix LIKE once ``case_sensitive_like`` is on (set per connection).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (index name, table, column) searched with DICOM wildcards.
_PATTERN_INDEXES = [
    ("ix_patients_name_folded_pattern", "patients", "name_folded"),
    ("ix_patients_name_words_pattern", "patients", "name_words"),
    ("ix_patients_patient_id_pattern", "patients", "patient_id"),
    ("ix_patient_identifiers_value_pattern", "patient_identifiers", "value"),
    ("ix_studies_accession_number_pattern", "studies", "accession_number"),
    ("ix_studies_referring_physician_folded_pattern", "studies", "referring_physician_folded"),
]


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("name_words", sa.String(), nullable=False, server_default=""))
        batch.create_index("ix_patients_name_words", ["name_words"])
    with op.batch_alter_table("studies") as batch:
        batch.create_index("ix_studies_referring_physician_folded", ["referring_physician_folded"])
    # Existing rows: the word form is the folded form with separators as spaces.
    op.execute(
        "UPDATE patients SET name_words = TRIM(REPLACE(REPLACE(name_folded, '^', ' '), '=', ' '))"
    )
    if op.get_bind().dialect.name == "postgresql":
        for name, table, column in _PATTERN_INDEXES:
            op.execute(f"CREATE INDEX {name} ON {table} ({column} text_pattern_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name, _table, _column in _PATTERN_INDEXES:
            op.execute(f"DROP INDEX IF EXISTS {name}")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_referring_physician_folded")
    with op.batch_alter_table("patients") as batch:
        batch.drop_index("ix_patients_name_words")
        batch.drop_column("name_words")
