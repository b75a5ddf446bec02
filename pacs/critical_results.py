"""Critical results (kết quả nguy kịch): a finding the referring doctor must
act on at once (a tension pneumothorax, an intracranial bleed, a free
perforation), flagged by the radiologist when signing the report.

The flag is written in the signature's transaction (pacs.reports); the
signed PDF says so under its title, the ORU^R01 to the HIS carries OBX-8
"AA" (critically abnormal, HL7 table 0078) with the radiologist's note, and
the FHIR DiagnosticReport a conclusionCode "AA". A signed report cannot
tell whether anyone read it: the result stays open until someone records
who was told and how (:func:`acknowledge`: "BS. Lan, khoa Cấp cứu, qua điện
thoại lúc 10:05"), as hospital quality standards ask of critical results.
:func:`listing` gives the open ones, oldest first, for the radiologists and
the quality staff (``GET /api/critical`` and ``pacs critical list``);
:func:`open_summary` how many are open and since when (GET /metrics, for an
alert on one left unacknowledged); ``pacs activity`` counts them and the
time to their acknowledgement.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select, update

from .errors import RefusedRequest
from .index.db import retry_write
from .index.models import CriticalResult, Patient, Study

critical_t: Table = CriticalResult.__table__  # type: ignore[assignment]
studies_t: Table = Study.__table__  # type: ignore[assignment]
patients_t: Table = Patient.__table__  # type: ignore[assignment]

# Characters of a note or an acknowledgement (it goes into HL7 and the PDF).
MAX_TEXT = 500
STATES = ("open", "acknowledged", "all")
# Open: nobody recorded yet who was told.
OPEN = critical_t.c.acknowledged_at.is_(None)


class CriticalError(RefusedRequest):
    """Refused, with the HTTP status a client sees."""


def clean_text(text: str, what: str, *, required: bool) -> str:
    """*text* with its runs of white space as one space; 400 for one too long
    or with control characters, or empty when *required*."""
    cleaned = " ".join(unicodedata.normalize("NFC", text or "").split())
    if required and not cleaned:
        raise CriticalError(f"{what} must say something", 400)
    if len(cleaned) > MAX_TEXT:
        raise CriticalError(f"{what} is longer than {MAX_TEXT} characters", 400)
    if any(unicodedata.category(c) == "Cc" for c in cleaned):
        raise CriticalError(f"{what} holds control characters", 400)
    return cleaned


@dataclass
class Critical:
    """One flagged critical result, with the study it is about."""

    study_uid: str
    version: int
    note: str
    flagged_by: str
    flagged_at: datetime
    acknowledged_by: str
    acknowledged_at: datetime | None
    acknowledgement: str
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    modalities: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; times ISO 8601 UTC."""
        found = asdict(self)
        found["flagged_at"] = self.flagged_at.isoformat()
        found["acknowledged_at"] = self.acknowledged_at.isoformat() if self.acknowledged_at else None
        return found

    def listed(self, now: datetime) -> dict[str, Any]:
        """The JSON form as listings show it: also the minutes it has stayed open at *now*
        and the examination's modality."""
        return {**self.as_dict(), "minutes_open": self.minutes_open(now), "modality": self.modality}

    @property
    def modality(self) -> str:
        """The examination's modality (CT), not the signed PDF stored beside it (CT\\DOC)."""
        from .reports import procedure_modalities  # pacs.reports imports this module

        return procedure_modalities(self.modalities)

    def minutes_open(self, now: datetime) -> int:
        """Whole minutes it stayed open: from the flag to its acknowledgement,
        or to *now* while nobody has recorded one."""
        return max(0, int(((self.acknowledged_at or now) - self.flagged_at).total_seconds() // 60))


def flag(conn: Connection, study_pk: int, version: int, note: str, by: str, at: datetime) -> None:
    """Record, in the signature's transaction, that *version* holds a critical result."""
    conn.execute(critical_t.insert().values(study_pk=study_pk, version=version, note=note, flagged_by=by,
                                            flagged_at=at, acknowledged_by="", acknowledgement=""))


def of_study(conn: Connection, study_pk: int) -> dict[int, dict[str, Any]]:
    """The study's critical results by report version, as
    :meth:`Critical.as_dict` without the study's fields."""
    found: dict[int, dict[str, Any]] = {}
    for row in conn.execute(select(critical_t).where(critical_t.c.study_pk == study_pk)):
        found[row.version] = {"note": row.note, "flagged_by": row.flagged_by,
                              "flagged_at": row.flagged_at.isoformat(), "acknowledged_by": row.acknowledged_by,
                              "acknowledged_at": row.acknowledged_at.isoformat() if row.acknowledged_at else None,
                              "acknowledgement": row.acknowledgement}
    return found


def _query() -> Any:
    return (select(critical_t, studies_t.c.study_uid, studies_t.c.accession_number, studies_t.c.modalities,
                   patients_t.c.patient_id, patients_t.c.name.label("patient_name"))
            .select_from(critical_t.join(studies_t, studies_t.c.pk == critical_t.c.study_pk)
                         .join(patients_t, patients_t.c.pk == studies_t.c.patient_pk)))


def _critical(row: Any) -> Critical:
    return Critical(row.study_uid, row.version, row.note, row.flagged_by, row.flagged_at, row.acknowledged_by,
                    row.acknowledged_at, row.acknowledgement, row.patient_id or "", row.patient_name or "",
                    row.accession_number or "", row.modalities or "")


def listing(engine: Engine, state: str = "open", limit: int = 100) -> tuple[list[Critical], int]:
    """Critical results in *state* (open: not acknowledged yet, oldest
    first, the longest waiting on top; else newest first) and how many."""
    if state not in STATES:
        raise CriticalError(f"state must be one of {', '.join(STATES)}", 400)
    conditions = {"open": [OPEN], "acknowledged": [~OPEN], "all": []}[state]
    order = critical_t.c.flagged_at.asc() if state == "open" else critical_t.c.flagged_at.desc()
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(critical_t).where(*conditions)).scalar_one()
        rows = conn.execute(_query().where(*conditions).order_by(order, critical_t.c.pk).limit(limit)).all()
    return [_critical(r) for r in rows], int(total)


def open_summary(conn: Connection) -> tuple[int, datetime | None]:
    """How many critical results are open, and when the oldest of them was
    flagged (None when none is): one read of the (small) table, for the
    figures of GET /metrics."""
    # min() keeps the column's type: the instant comes back aware (UTC) on SQLite too.
    count, oldest = conn.execute(select(func.count(), func.min(critical_t.c.flagged_at)).where(OPEN)).one()
    return int(count), oldest


def acknowledge(engine: Engine, study_uid: str, by: str, acknowledgement: str) -> Critical:
    """Record who was told of the study's open critical result, and how:
    404 when the study has none, 409 when it was acknowledged already (the
    first acknowledgement stands). Versions flagged before it and still open
    are acknowledged with it: whoever is told of the latest finding is told
    of what it amends, and nothing else could ever acknowledge them."""
    said = clean_text(acknowledgement, "the acknowledgement (who was told, how)", required=True)

    def once(conn: Connection) -> Critical:
        rows = conn.execute(_query().where(studies_t.c.study_uid == study_uid)
                            .order_by(critical_t.c.version.desc())).all()
        if not rows:
            raise CriticalError("no critical result was flagged on this study", 404)
        latest, still_open = rows[0], [row.pk for row in rows if row.acknowledged_at is None]
        if not still_open:
            raise CriticalError(f"the critical result was acknowledged already by {latest.acknowledged_by} "
                                f"at {latest.acknowledged_at.isoformat()}", 409)
        now = datetime.now(UTC)
        done = conn.execute(update(critical_t).where(critical_t.c.pk.in_(still_open), OPEN)
                            .values(acknowledged_by=by, acknowledged_at=now, acknowledgement=said)).rowcount
        if done != len(still_open):
            raise CriticalError("the critical result was acknowledged at the same moment by someone else", 409)
        return _critical(conn.execute(_query().where(critical_t.c.pk == latest.pk)).one())

    return retry_write(engine, once, what="critical result acknowledgement")
