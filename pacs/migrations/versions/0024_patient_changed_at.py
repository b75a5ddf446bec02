"""patients.changed_at: when what a patient's FHIR Patient shows last changed.

The FHIR Patient had no meta.lastUpdated (ImagingStudy has one since 0022),
so an EMR keeping its copy of our patients in step could not poll "every
patient that changed since": its name, birth date, sex, Patient ID or issuer
corrected (ADT^A08, a hospital number promoted to the key), an identifier
added or removed (citizen ID, insurance, a merged-away ID: ADT^A40), a
`replaces` link that comes or goes as another patient takes or gives up a
merged-away key, and, for a patient without Patient ID, the study its id is
derived from. patients.updated_at is none of those (the HIS sets it on its
own updates only).

Kept by triggers, as studies.changed_at is (0022): every path that changes
those rows -- the ingest, the HIS's updates, merges and promotions,
reconciliation, pruning, and any written later -- moves it, with no code of
its own to forget; an insert names it (as studies' do). A write that changes
nothing shown (a DICOM object repeating the patient's values: ON CONFLICT DO
NOTHING, no row written) moves nothing. The time is the database's clock,
written on SQLite as SQLAlchemy writes a DateTime (see 0022).

Existing patients start from updated_at, the latest time known.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

# What the Patient shows of each row (viewer_api.fhir.patient_resource):
# the name's search forms and the times change nothing it shows.
_PATIENT_SHOWN = ("patient_id", "issuer", "name", "birth_date", "sex")
# Its key: a merged-away ID it takes or gives up changes another's links.
_KEY = ("patient_id", "issuer")
_IDENTIFIER_SHOWN = ("patient_pk", "value", "issuer", "id_type")
# A patient without Patient ID has its id from its first study (by UID).
_STUDY_ANCHOR = ("patient_pk", "study_uid")
# pacs.index.writer.MERGED_ID_TYPE, as 0024 knows it.
_MERGED = "'MERGED'"

_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def _changed(columns: tuple[str, ...], distinct: str) -> str:
    return " OR ".join(f"OLD.{c} {distinct} NEW.{c}" for c in columns)


def _alias_holders(row: str) -> str:
    """The patients holding *row*'s key (OLD or NEW) as a merged-away ID:
    their ``replaces`` link shows only while no patient has that key."""
    return (f"SELECT patient_pk FROM patient_identifiers WHERE id_type = {_MERGED} "
            f"AND value = {row}.patient_id AND issuer = {row}.issuer")


def _sqlite(name: str, event: str, patients: str, when: str = "") -> tuple[str, str]:
    """A SQLite trigger *name* firing on *event* (WHEN *when*) that moves
    the changed_at of the *patients* (a condition on their rows)."""
    return name, f"""
    CREATE TRIGGER {name} {event}{f" WHEN {when}" if when else ""}
    BEGIN
        UPDATE patients SET changed_at = {_SQLITE_NOW} WHERE {patients};
    END
    """


def _update_of(columns: tuple[str, ...], table: str) -> str:
    return f"AFTER UPDATE OF {', '.join(columns)} ON {table}"


_SQLITE_TRIGGERS = dict([
    _sqlite("trg_patients_shown", _update_of(_PATIENT_SHOWN, "patients"), "pk = NEW.pk",
            _changed(_PATIENT_SHOWN, "IS NOT")),
    _sqlite("trg_patients_key_update", _update_of(_KEY, "patients"),
            f"pk IN ({_alias_holders('OLD')}) OR pk IN ({_alias_holders('NEW')})", _changed(_KEY, "IS NOT")),
    _sqlite("trg_patients_key_insert", "AFTER INSERT ON patients", f"pk IN ({_alias_holders('NEW')})",
            "NEW.patient_id != ''"),
    _sqlite("trg_patients_key_delete", "AFTER DELETE ON patients", f"pk IN ({_alias_holders('OLD')})",
            "OLD.patient_id != ''"),
    _sqlite("trg_identifiers_insert", "AFTER INSERT ON patient_identifiers", "pk = NEW.patient_pk"),
    _sqlite("trg_identifiers_delete", "AFTER DELETE ON patient_identifiers", "pk = OLD.patient_pk"),
    _sqlite("trg_identifiers_update", _update_of(_IDENTIFIER_SHOWN, "patient_identifiers"),
            "pk IN (OLD.patient_pk, NEW.patient_pk)", _changed(_IDENTIFIER_SHOWN, "IS NOT")),
    _sqlite("trg_studies_anchor_insert", "AFTER INSERT ON studies", "pk = NEW.patient_pk AND patient_id = ''"),
    _sqlite("trg_studies_anchor_delete", "AFTER DELETE ON studies", "pk = OLD.patient_pk AND patient_id = ''"),
    _sqlite("trg_studies_anchor_update", _update_of(_STUDY_ANCHOR, "studies"),
            "pk IN (OLD.patient_pk, NEW.patient_pk) AND patient_id = ''", _changed(_STUDY_ANCHOR, "IS NOT")),
])


def _pg_of_row(name: str, patients: str) -> str:
    """A PostgreSQL trigger function *name* moving the changed_at of the
    *patients* ({row}: a condition on them naming OLD or NEW) of the row
    deleted, inserted, or before and after an update."""
    return f"""
    CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            UPDATE patients SET changed_at = clock_timestamp() WHERE {patients.format(row="OLD")};
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            UPDATE patients SET changed_at = clock_timestamp() WHERE {patients.format(row="NEW")};
        END IF;
        RETURN NULL;
    END $$
    """


# PostgreSQL: one function per table, each trigger's rows as in SQLite.
_PG_FUNCTIONS = {
    "patients_changed_at": f"""
    CREATE FUNCTION patients_changed_at() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' THEN
            UPDATE patients SET changed_at = clock_timestamp() WHERE pk = NEW.pk;
            IF NOT ({_changed(_KEY, "IS DISTINCT FROM")}) THEN
                RETURN NULL;  -- the same key: no one's links change
            END IF;
        END IF;
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            UPDATE patients SET changed_at = clock_timestamp() WHERE pk IN ({_alias_holders("OLD")});
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            UPDATE patients SET changed_at = clock_timestamp() WHERE pk IN ({_alias_holders("NEW")});
        END IF;
        RETURN NULL;
    END $$
    """,
    "identifiers_changed_at": _pg_of_row("identifiers_changed_at", "pk = {row}.patient_pk"),
    "studies_anchor_changed_at": _pg_of_row("studies_anchor_changed_at", "pk = {row}.patient_pk AND patient_id = ''"),
}
# (trigger, table, when it fires, function)
_PG_TRIGGERS = [
    ("trg_patients_shown", "patients",
     f"{_update_of(_PATIENT_SHOWN, 'patients')} FOR EACH ROW WHEN ({_changed(_PATIENT_SHOWN, 'IS DISTINCT FROM')})",
     "patients_changed_at"),
    ("trg_patients_key", "patients", "AFTER INSERT OR DELETE ON patients FOR EACH ROW", "patients_changed_at"),
    ("trg_identifiers", "patient_identifiers", "AFTER INSERT OR DELETE ON patient_identifiers FOR EACH ROW",
     "identifiers_changed_at"),
    ("trg_identifiers_update", "patient_identifiers",
     f"{_update_of(_IDENTIFIER_SHOWN, 'patient_identifiers')} FOR EACH ROW "
     f"WHEN ({_changed(_IDENTIFIER_SHOWN, 'IS DISTINCT FROM')})", "identifiers_changed_at"),
    ("trg_studies_anchor", "studies", "AFTER INSERT OR DELETE ON studies FOR EACH ROW", "studies_anchor_changed_at"),
    ("trg_studies_anchor_update", "studies",
     f"{_update_of(_STUDY_ANCHOR, 'studies')} FOR EACH ROW WHEN ({_changed(_STUDY_ANCHOR, 'IS DISTINCT FROM')})",
     "studies_anchor_changed_at"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.add_column("patients", sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))
        op.execute("UPDATE patients SET changed_at = updated_at")
        op.alter_column("patients", "changed_at", nullable=False)
        op.create_index("ix_patients_changed_at", "patients", ["changed_at"])
        for sql in _PG_FUNCTIONS.values():
            op.execute(sql)
        for trigger, _, when, function in _PG_TRIGGERS:
            op.execute(f"CREATE TRIGGER {trigger} {when} EXECUTE FUNCTION {function}()")
        return
    # SQLite adds a NOT NULL column only with a constant default: never
    # used (the writers name the column), the rows get updated_at.
    op.execute("ALTER TABLE patients ADD COLUMN changed_at DATETIME NOT NULL DEFAULT '1970-01-01 00:00:00.000000'")
    op.execute("UPDATE patients SET changed_at = updated_at")
    op.create_index("ix_patients_changed_at", "patients", ["changed_at"])
    for sql in _SQLITE_TRIGGERS.values():
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger, table, _, _ in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    else:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_index("ix_patients_changed_at", table_name="patients")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("patients", "changed_at")
    else:
        op.execute("ALTER TABLE patients DROP COLUMN changed_at")  # SQLite 3.35+: no table rebuild
