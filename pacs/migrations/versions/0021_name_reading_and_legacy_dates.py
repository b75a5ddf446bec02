"""Names searched as they are read; DA/TM values in their DICOM form.

Person names: a name stored Family^Given^Middle ("Trịnh^Bình^Văn", as
modalities and the HIS order its components) is typed family, middle,
given ("Trịnh Văn Bình"), which the word form (name_words: "TRINH BINH VAN")
did not find. patients.name_reading holds that order (the word order where
there is no middle name); the Referring Physician's Name gets both word
forms (it had none: "Do Thanh Tung" found nothing). Indexed as name_words
is: a plain index (SQLite prefix LIKE), a text_pattern_ops one and finer
statistics on PostgreSQL (0003, 0008).

Dates and times written before DICOM 3.0 (PS3.5 Table 6.2-1: "2024.01.15",
"10:15:00", "08:30") were indexed as received and compared as text; they
are kept in the DICOM form now (pacs.header.index_date / index_time), and
existing rows holding them are rewritten so. The stored objects are not
touched.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pacs.names import name_reading, name_words

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None

_COLUMNS = [("patients", "name_reading"), ("studies", "referring_physician_words"),
            ("studies", "referring_physician_reading")]
# (table, DA columns, TM columns) the index keeps from the objects' headers.
_DATES_TIMES = [("patients", ["birth_date"], []), ("studies", ["study_date"], ["study_time"]),
                ("series", ["series_date"], ["series_time"]), ("instances", ["content_date"], ["content_time"])]
_BATCH = 1000


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, column in _COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(column, sa.String(), nullable=False, server_default=""))
            batch.create_index(f"ix_{table}_{column}", [column])
        if postgresql:
            op.execute(f"CREATE INDEX ix_{table}_{column}_pattern ON {table} ({column} text_pattern_ops)")
    if postgresql:
        op.execute("ALTER TABLE patients ALTER COLUMN name_reading SET STATISTICS 1000")
    _backfill_names()
    for table, dates, times in _DATES_TIMES:
        for column in dates:
            op.execute(f"UPDATE {table} SET {column} = REPLACE({column}, '.', '') WHERE {_legacy(column, 'date')}")
        for column in times:
            op.execute(f"UPDATE {table} SET {column} = REPLACE({column}, ':', '') WHERE {_legacy(column, 'time')}")
    if postgresql:
        op.execute("ANALYZE patients")


def _legacy(column: str, kind: str) -> str:
    """SQL: *column* holds a pre-3.0 date ("yyyy.mm.dd") or time
    ("hh:mm[:ss[.f{1,6}]]"), as pacs.header.index_date / index_time read it."""
    if op.get_bind().dialect.name == "postgresql":
        pattern = r"^\d{4}\.\d{2}\.\d{2}$" if kind == "date" else r"^\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$"
        return f"{column} ~ '{pattern}'"
    d = "[0-9]"
    if kind == "date":
        return f"{column} GLOB '{d * 4}.{d * 2}.{d * 2}'"
    hhmm, ss = f"{d * 2}:{d * 2}", f":{d * 2}"
    fractions = " OR ".join(f"{column} GLOB '{hhmm}{ss}.{d * n}'" for n in range(1, 7))
    return f"({column} GLOB '{hhmm}' OR {column} GLOB '{hhmm}{ss}' OR {fractions})"


def _backfill_names() -> None:
    """The word forms of existing rows, computed as new rows get them
    (pacs.names): in SQL where they are the folded name with its separators
    read as spaces (as 0003 did for name_words), in Python for the others
    (a middle name; empty components, which leave two spaces together)."""
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE patients SET name_reading = TRIM(REPLACE(name_folded, '^', ' ')) "
                         "WHERE name_folded <> '' AND name_folded NOT LIKE '%=%'"))
    _update_each(conn, "SELECT pk, name FROM patients WHERE (name_folded LIKE '%^%^%' OR name_folded LIKE '%=%' "
                       "OR name_reading LIKE '%  %') AND pk > :last ORDER BY pk",
                 "UPDATE patients SET name_reading = :reading WHERE pk = :pk",
                 lambda name: {"reading": name_reading(name)})
    conn.execute(sa.text(
        "UPDATE studies SET referring_physician_words = TRIM(REPLACE(REPLACE(referring_physician_folded, '^', ' '), "
        "'=', ' ')), referring_physician_reading = TRIM(REPLACE(referring_physician_folded, '^', ' ')) "
        "WHERE referring_physician_folded <> ''"))
    _update_each(conn, "SELECT pk, referring_physician FROM studies WHERE (referring_physician_folded LIKE '%^%^%' "
                       "OR referring_physician_folded LIKE '%=%' OR referring_physician_words LIKE '%  %') "
                       "AND pk > :last ORDER BY pk",
                 "UPDATE studies SET referring_physician_words = :words, referring_physician_reading = :reading "
                 "WHERE pk = :pk",
                 lambda name: {"words": name_words(name), "reading": name_reading(name)})


def _update_each(conn: sa.Connection, query: str, update: str, values: object) -> None:
    """Run *update* with *values*(name) for each row of *query* (pk, name), a batch at a time."""
    last = 0
    while True:
        rows = conn.execute(sa.text(query + f" LIMIT {_BATCH}"), {"last": last}).all()
        if not rows:
            return
        conn.execute(sa.text(update), [{"pk": pk, **values(name or "")} for pk, name in rows])  # type: ignore[operator]
        last = rows[-1][0]


def downgrade() -> None:
    # The dates and times keep their DICOM form: valid under every revision.
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, column in reversed(_COLUMNS):
        if postgresql:
            op.execute(f"DROP INDEX IF EXISTS ix_{table}_{column}_pattern")
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_{column}")
            batch.drop_column(column)
