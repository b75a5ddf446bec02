"""The department's activity over a period (thống kê hoạt động): the
figures a head of radiology reports every month to the hospital and the
health department, read from the index alone.

- **Examinations** (ca chụp): studies by the day of their examination (the
  Study Date, the hospital's own calendar; the day they arrived, on the
  hospital's clock, for a study without one), per modality and per machine
  (the AE title that sent the images), with their instances (every object:
  images, dose reports, the signed reports' PDFs) and bytes, and per day.
  Studies withdrawn by rejection notes are not examinations
  (pacs.query.READABLE); deleted and purged studies are no longer counted.
- **Reads** (ca đọc): first signatures of reports made in the period, and
  amendments, per radiologist and modality.
- **Turnaround** (thời gian trả kết quả): from the images' arrival to the
  first signature, for the reads of the period: median, 90th percentile and
  longest, per modality and for urgent (STAT, HIGH) against other studies.
- **Waiting**: the examinations of the period not signed yet.
- **Critical results** (kết quả nguy kịch, pacs.critical_results) flagged in
  the period, those still not acknowledged, and the minutes from the flag
  to the acknowledgement (turnaround group "critical-ack").

A study's modality is that of its images: rejection notes, presentation
states, structured reports and the signed report's PDF (KO, PR, SR, DOC)
are left out of "CT\\SR\\DOC"; one of several modalities (PT and CT) counts
under "CT/PT".
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from statistics import median
from typing import Any

from sqlalchemy import Engine, Table, select

from .index.models import CriticalResult, Instance, Order, Report, Series, Study, StudyOrderLink, User
from .maintenance.common import batched
from .query import READABLE
from .reports import NOT_PROCEDURE

studies_t: Table = Study.__table__  # type: ignore[assignment]
series_t: Table = Series.__table__  # type: ignore[assignment]
instances_t: Table = Instance.__table__  # type: ignore[assignment]
reports_t: Table = Report.__table__  # type: ignore[assignment]
users_t: Table = User.__table__  # type: ignore[assignment]
orders_t: Table = Order.__table__  # type: ignore[assignment]
study_orders_t: Table = StudyOrderLink.__table__  # type: ignore[assignment]
critical_t: Table = CriticalResult.__table__  # type: ignore[assignment]

# A year and a day: a yearly report (báo cáo năm) of a leap year.
MAX_DAYS = 366
_URGENT = {"STAT", "HIGH"}


class PeriodError(ValueError):
    """A period that cannot be reported (HTTP 400, exit 2)."""


@dataclass(frozen=True)
class Period:
    """Days of the hospital's calendar, *first* to *last* included."""

    first: date
    last: date

    @classmethod
    def parse(cls, first: str, last: str, today: date) -> Period:
        """From YYYY-MM-DD (or YYYYMMDD) texts; *first* defaults to the first
        of *today*'s month, *last* to *today*."""
        start = _day(first, "from") if first else today.replace(day=1)
        end = _day(last, "to") if last else today
        if end < start:
            raise PeriodError(f"the period ends ({end}) before it starts ({start})")
        if (end - start).days + 1 > MAX_DAYS:
            raise PeriodError(f"a period of at most {MAX_DAYS} days is reported at once")
        return cls(start, end)

    def bounds(self, zone: tzinfo) -> tuple[datetime, datetime]:
        """Its first and after-last moments on the hospital's clock."""
        return (datetime.combine(self.first, time(), zone),
                datetime.combine(self.last + timedelta(days=1), time(), zone))


def _day(text: str, name: str) -> date:
    digits = text.strip().replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(text)
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise PeriodError(f"{name} must be a date, YYYY-MM-DD (got {text!r})") from None


@dataclass
class ExamRow:
    """Examinations of one modality from one machine."""

    modality: str
    station: str
    studies: int = 0
    instances: int = 0
    bytes: int = 0


@dataclass
class ProcedureRow:
    """Examinations of one ordered procedure: the order's Requested Procedure
    Code and its meaning (else the order's description); all empty for the
    studies no order explains (pacs orders unmatched)."""

    modality: str
    code: str
    procedure: str
    studies: int = 0


@dataclass
class ReadRow:
    """One radiologist's signatures on one modality's studies: the name the
    reports were signed with (printed on them), and the login of the user
    who bears that name, where one does."""

    radiologist: str
    login: str
    modality: str
    reads: int = 0
    amendments: int = 0


@dataclass
class TurnaroundRow:
    """Minutes from the images' arrival to the first signature."""

    group: str
    reads: int
    median_minutes: float
    p90_minutes: float
    max_minutes: float


@dataclass
class WaitingRow:
    """Examinations of the period not signed yet, of one modality."""

    modality: str
    studies: int
    oldest_arrived: str  # ISO 8601 on the hospital's clock


@dataclass
class Activity:
    """What :func:`activity` found (see the module docstring)."""

    first: date
    last: date
    exams: list[ExamRow] = field(default_factory=list)
    days: list[tuple[str, int]] = field(default_factory=list)
    procedures: list[ProcedureRow] = field(default_factory=list)
    reads: list[ReadRow] = field(default_factory=list)
    turnaround: list[TurnaroundRow] = field(default_factory=list)
    waiting: list[WaitingRow] = field(default_factory=list)
    critical: int = 0
    critical_open: int = 0

    @property
    def totals(self) -> dict[str, int]:
        """The period's totals."""
        return {"studies": sum(r.studies for r in self.exams), "instances": sum(r.instances for r in self.exams),
                "bytes": sum(r.bytes for r in self.exams), "reads": sum(r.reads for r in self.reads),
                "amendments": sum(r.amendments for r in self.reads),
                "waiting": sum(r.studies for r in self.waiting), "critical": self.critical,
                "critical_open": self.critical_open}

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``pacs activity --json``, ``GET /api/activity``)."""
        return {"from": self.first.isoformat(), "to": self.last.isoformat(), "totals": self.totals,
                "exams": [asdict(r) for r in self.exams],
                "days": [{"day": d, "studies": n} for d, n in self.days],
                "procedures": [asdict(r) for r in self.procedures],
                "reads": [asdict(r) for r in self.reads],
                "turnaround": [asdict(r) for r in self.turnaround],
                "waiting": [asdict(r) for r in self.waiting]}

    def table(self, name: str) -> tuple[list[str], list[list[Any]]]:
        """One of :data:`TABLES` as a header and rows."""
        rows: list[Any] = {"exams": self.exams, "procedures": self.procedures, "reads": self.reads,
                           "turnaround": self.turnaround, "waiting": self.waiting}.get(name, [])
        if name == "days":
            return ["day", "studies"], [list(d) for d in self.days]
        if name not in TABLES:
            raise KeyError(name)
        header = list(_FIELDS[name])
        return header, [[getattr(r, f) for f in header] for r in rows]

    def csv(self, name: str) -> str:
        """One table as CSV with a byte order mark: Excel, as Vietnamese
        offices open it, reads UTF-8 (the radiologists' names) only so."""
        header, rows = self.table(name)
        buffer = io.StringIO()
        buffer.write("\ufeff")
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows([[_cell(v) for v in row] for row in rows])
        return buffer.getvalue()


# A text cell Excel would run as a formula (a name, an AE title or a
# procedure the HIS sent, "=HYPERLINK(...)"): written as text instead.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


TABLES = ("exams", "days", "procedures", "reads", "turnaround", "waiting")
_FIELDS = {"exams": ExamRow.__dataclass_fields__, "procedures": ProcedureRow.__dataclass_fields__,
           "reads": ReadRow.__dataclass_fields__,
           "turnaround": TurnaroundRow.__dataclass_fields__, "waiting": WaitingRow.__dataclass_fields__}


def examination_modality(modalities: Iterable[str]) -> str:
    """The modality a study counts under: its images' ("CT" of CT\\SR,
    "CT/PT" of both), else what it holds ("SR" of a dose report alone),
    "OT" for nothing."""
    named = {m.strip().upper() for m in modalities if m and m.strip()}
    imaging = named - NOT_PROCEDURE
    return "/".join(sorted(imaging or named)) or "OT"


@dataclass
class _Study:
    pk: int
    modality: str
    day: str
    instances: int
    bytes: int
    arrived: datetime
    priority: str
    state: str
    station: str = ""
    procedure: tuple[str, str] = ("", "")


def activity(engine: Engine, period: Period, zone: tzinfo) -> Activity:
    """The department's activity over *period* (days on the clock of *zone*,
    the hospital's)."""
    start, end = period.bounds(zone)
    result = Activity(period.first, period.last)
    found = list(_examinations(engine, period, start, end, zone))
    _stations(engine, found)
    _procedures(engine, found)
    exams: dict[tuple[str, str], ExamRow] = {}
    days: Counter[str] = Counter()
    waiting: dict[str, list[datetime]] = defaultdict(list)
    for study in found:
        row = exams.setdefault((study.modality, study.station), ExamRow(study.modality, study.station))
        row.studies += 1
        row.instances += study.instances
        row.bytes += study.bytes
        days[study.day] += 1
        if study.state in ("unread", "draft"):
            waiting[study.modality].append(study.arrived)
    result.exams = sorted(exams.values(), key=lambda r: (r.modality, r.station))
    procedures: Counter[tuple[str, str, str]] = Counter((s.modality, *s.procedure) for s in found)
    result.procedures = [ProcedureRow(*key, studies=n) for key, n in sorted(procedures.items())]
    result.days = sorted(days.items())
    result.waiting = [WaitingRow(m, len(times), min(times).astimezone(zone).isoformat(timespec="seconds"))
                      for m, times in sorted(waiting.items())]
    _reads(engine, start, end, result)
    _critical(engine, start, end, result)
    return result


def _examinations(engine: Engine, period: Period, start: datetime, end: datetime,
                  zone: tzinfo) -> Iterator[_Study]:
    """The studies examined in *period*, withdrawn ones left out."""
    first, last = period.first.strftime("%Y%m%d"), period.last.strftime("%Y%m%d")
    columns = select(studies_t.c.pk, studies_t.c.modalities, studies_t.c.study_date, studies_t.c.num_instances,
                     studies_t.c.size_bytes, studies_t.c.created_at, studies_t.c.priority, studies_t.c.report_state)
    # Two queries, each on the study date index: as one OR, both databases
    # read every study (0.9-2.2 s a month at 100,000 studies).
    dated = columns.where(studies_t.c.study_date.between(first, last), READABLE)
    undated = columns.where(studies_t.c.study_date == "", studies_t.c.created_at >= start,
                            studies_t.c.created_at < end, READABLE)
    with engine.connect() as conn:
        for row in [*conn.execute(dated), *conn.execute(undated)]:
            arrived = row.created_at  # aware (UTCDateTime)
            day = row.study_date if len(row.study_date or "") == 8 else arrived.astimezone(zone).strftime("%Y%m%d")
            yield _Study(row.pk, examination_modality((row.modalities or "").split("\\")),
                         f"{day[:4]}-{day[4:6]}-{day[6:]}", int(row.num_instances or 0), int(row.size_bytes or 0),
                         arrived, row.priority or "", row.report_state or "")


def _stations(engine: Engine, found: list[_Study]) -> None:
    """Each study's machine: the calling AE of an image of its first series
    of an examination modality (a workstation's presentation state or
    a report sent later does not make it another machine's)."""
    # Any one image of the series (they come from one sender): ORDER BY pk
    # made PostgreSQL walk the primary key through every instance instead
    # of the series' own (1.1 s a month of 79 studies at 5,000).
    first_instance = (select(instances_t.c.calling_ae).where(instances_t.c.series_pk == series_t.c.pk)
                      .limit(1).scalar_subquery())
    with engine.connect() as conn:
        for chunk in batched(found):  # an IN list within every database's limits
            batch = {s.pk: s for s in chunk}
            stations: dict[int, tuple[bool, str]] = {}
            for row in conn.execute(select(series_t.c.study_pk, series_t.c.modality, first_instance.label("ae"))
                                    .where(series_t.c.study_pk.in_(list(batch))).order_by(series_t.c.pk)):
                imaging = (row.modality or "").upper() not in NOT_PROCEDURE
                known = stations.get(row.study_pk)
                if known is None or (imaging and not known[0]):
                    stations[row.study_pk] = (imaging, (row.ae or "").strip())
            for pk, (_, ae) in stations.items():
                batch[pk].station = ae


def _procedures(engine: Engine, found: list[_Study]) -> None:
    """Each study's ordered procedure, from the order it was reconciled with."""
    query = (select(study_orders_t.c.study_pk, orders_t.c.procedure_code, orders_t.c.procedure_code_meaning,
                    orders_t.c.requested_procedure_description)
             .select_from(study_orders_t.join(orders_t, orders_t.c.pk == study_orders_t.c.order_pk)))
    with engine.connect() as conn:
        for chunk in batched(found):  # an IN list within every database's limits
            batch = {s.pk: s for s in chunk}
            for row in conn.execute(query.where(study_orders_t.c.study_pk.in_(list(batch)))):
                named = row.procedure_code_meaning or row.requested_procedure_description or ""
                batch[row.study_pk].procedure = (row.procedure_code or "", named)


def _reads(engine: Engine, start: datetime, end: datetime, result: Activity) -> None:
    """Reads, amendments and turnaround of the reports signed in the period."""
    query = (select(reports_t.c.version, reports_t.c.signed_by, reports_t.c.signed_at,
                    studies_t.c.modalities, studies_t.c.created_at, studies_t.c.priority)
             .select_from(reports_t.join(studies_t, studies_t.c.pk == reports_t.c.study_pk))
             .where(reports_t.c.status == "signed", reports_t.c.signed_at >= start, reports_t.c.signed_at < end))
    reads: dict[tuple[str, str], ReadRow] = {}
    minutes: dict[str, list[float]] = defaultdict(list)
    with engine.connect() as conn:
        logins = _logins(conn)
        for row in conn.execute(query):
            modality = examination_modality((row.modalities or "").split("\\"))
            signer = row.signed_by or ""
            entry = reads.setdefault((signer, modality), ReadRow(signer, logins.get(signer, ""), modality))
            if row.version > 1:
                entry.amendments += 1
                continue
            entry.reads += 1
            waited = (row.signed_at - row.created_at).total_seconds() / 60
            if waited >= 0:  # a report of a study imported after it was signed elsewhere says nothing
                minutes[modality].append(waited)
                minutes["urgent" if (row.priority or "") in _URGENT else "routine"].append(waited)
    result.reads = sorted(reads.values(), key=lambda r: (r.radiologist, r.modality))
    groups = sorted(k for k in minutes if k not in ("urgent", "routine")) + [
        k for k in ("urgent", "routine") if k in minutes]
    result.turnaround = [_turnaround(g, minutes[g]) for g in groups]


def _critical(engine: Engine, start: datetime, end: datetime, result: Activity) -> None:
    """Critical results flagged in the period, the open ones, and the time to acknowledge."""
    with engine.connect() as conn:
        rows = conn.execute(select(critical_t.c.flagged_at, critical_t.c.acknowledged_at)
                            .where(critical_t.c.flagged_at >= start, critical_t.c.flagged_at < end)).all()
    result.critical = len(rows)
    result.critical_open = sum(1 for r in rows if r.acknowledged_at is None)
    waited = [(r.acknowledged_at - r.flagged_at).total_seconds() / 60 for r in rows if r.acknowledged_at is not None]
    if waited:
        result.turnaround.append(_turnaround("critical-ack", waited))


def _logins(conn: Any) -> dict[str, str]:
    """The login of each name a report may be signed with: a user's display
    name (or their login, for one without), where only one user bears it."""
    bearers: dict[str, set[str]] = defaultdict(set)
    for user in conn.execute(select(users_t.c.username, users_t.c.display_name)):
        bearers[user.display_name or user.username].add(user.username)
    return {name: next(iter(users)) for name, users in bearers.items() if len(users) == 1}


def _turnaround(group: str, values: list[float]) -> TurnaroundRow:
    ordered = sorted(values)
    p90 = ordered[max(0, -(-len(ordered) * 9 // 10) - 1)]  # nearest rank
    return TurnaroundRow(group, len(ordered), round(median(ordered), 1), round(p90, 1), round(ordered[-1], 1))

