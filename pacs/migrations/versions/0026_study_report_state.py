"""studies.report_state: each study's report status, for the reading worklist.

The radiologist's worklist is the unread studies, newest first
(pacs.studylist.study_list, status=unread). The status was a subquery on
reports per study, which no index serves: in an archive where most studies
are reported, the few unread ones were found by reading every study
(89 ms at 100,000 studies, 300 unread; 150 ms with modality=CT), growing
with the archive.

One column: 'unread' (no report), 'draft' (a first version not yet signed),
'signed' (the newest version signed), 'amending' (an amendment in draft
over a signed version: a reader of signed reports sees it signed, its
author a draft). Indexed with the study date and time, so a state's
studies are read newest first from the index.

Kept by triggers on reports, as changed_at is (0022, 0024): every path that
writes a report (save, amendment, signature, deletion, any written later)
moves it, with no code of its own to forget. A save of a draft's text
(no status change) fires nothing.

Existing studies get theirs from their reports.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def _state_of(study_pk: str) -> str:
    """The report state of the study *study_pk* (an SQL expression)."""
    newest = f"(SELECT status FROM reports WHERE study_pk = {study_pk} ORDER BY version DESC LIMIT 1)"
    signed = f"EXISTS (SELECT 1 FROM reports WHERE study_pk = {study_pk} AND status = 'signed')"
    return (f"CASE WHEN {newest} IS NULL THEN 'unread' WHEN {newest} = 'signed' THEN 'signed' "
            f"WHEN {signed} THEN 'amending' ELSE 'draft' END")


_SET = f"UPDATE studies SET report_state = {_state_of('studies.pk')}"

_SQLITE_TRIGGERS = {
    "trg_reports_state_insert": f"AFTER INSERT ON reports BEGIN {_SET} WHERE pk = NEW.study_pk; END",
    "trg_reports_state_delete": f"AFTER DELETE ON reports BEGIN {_SET} WHERE pk = OLD.study_pk; END",
    "trg_reports_state_update": (f"AFTER UPDATE OF status, study_pk, version ON reports "
                                 f"BEGIN {_SET} WHERE pk IN (OLD.study_pk, NEW.study_pk); END"),
}

_PG_FUNCTION = f"""
CREATE FUNCTION reports_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_SET} WHERE pk = OLD.study_pk;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        {_SET} WHERE pk = NEW.study_pk;
    END IF;
    RETURN NULL;
END $$
"""
_PG_TRIGGERS = {
    "trg_reports_state": "AFTER INSERT OR DELETE ON reports",
    "trg_reports_state_update": "AFTER UPDATE OF status, study_pk, version ON reports",
}


def upgrade() -> None:
    # A constant default: an instant ALTER on both databases, whatever the
    # archive's size; only the reported studies are then written.
    op.add_column("studies", sa.Column("report_state", sa.String(), server_default="unread", nullable=False))
    op.execute(f"{_SET} WHERE pk IN (SELECT study_pk FROM reports)")
    op.create_index("ix_studies_report_state", "studies", ["report_state", "study_date", "study_time"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        for trigger, when in _PG_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {trigger} {when} FOR EACH ROW EXECUTE FUNCTION reports_state()")
        return
    for trigger, body in _SQLITE_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {trigger} {body}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for trigger in _PG_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON reports")
        op.execute("DROP FUNCTION IF EXISTS reports_state()")
    else:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_index("ix_studies_report_state", table_name="studies")
    op.drop_column("studies", "report_state")
