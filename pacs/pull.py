"""Copy a remote archive into ours: newest studies first, resumable, verified.

A hospital replacing its PACS keeps years of studies in the old one, and the
radiologists need the priors here from the first day. ``pacs remote pull``
asks the old PACS what it holds, date window by date window, and retrieves
each study that is not complete here, then checks instance by instance that
everything the remote listed is indexed. It keeps no state of its own: what
the index holds is the progress, so running it again after an interruption
(a dropped link, a night window ending, Ctrl-C) goes on where it stopped, and
a study already complete costs one comparison and no retrieve.

Old archives often cap C-FIND answers (500 or 1,000 matches) without saying
so: a window that comes back with ``find_limit`` matches or more is split in
two (newest half first) down to single days, then into hours by Study Time.
"""

from __future__ import annotations

import logging
import time as clock
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select

from . import remote
from .app import Pacs
from .audit import Event, patient_cx
from .index.models import Instance, Patient, Series, Study
from .timezones import hospital_now

log = logging.getLogger(__name__)

EARLIEST = date(1900, 1, 1)
UNDATED = "studies without a Study Date"
# SOP Instance UIDs per IMAGE-level retrieve: up to ~6.5 KB of identifier
# (64-character UIDs), which old PACS accept, and few associations per series.
UID_CHUNK = 100


@dataclass
class PullOptions:
    """What to pull and how gently."""

    # Neither given: the first query asks for every study, so those without
    # a Study Date are found too (unless the remote's limit splits it).
    since: date | None = None
    until: date | None = None
    patient_id: str = ""
    # "move" needs our AE registered at the remote and `pacs serve` running
    # to receive; "get" receives on the query's own association.
    method: str = "move"
    find_limit: int = 500
    max_studies: int = 0
    stop_at: time | None = None
    pause: float = 0.0
    dry_run: bool = False


@dataclass
class StudyResult:
    study_uid: str
    study_date: str
    patient_id: str
    remote_count: int | None
    before: int
    after: int
    state: str  # complete (nothing to do), pulled, incomplete, failed, missing (dry run)
    detail: str = ""


@dataclass
class PullReport:
    remote: str
    since: str
    until: str
    queries: int = 0
    studies: int = 0
    complete: int = 0
    pulled: int = 0
    missing: int = 0
    incomplete: int = 0
    failed: int = 0
    instances: int = 0
    capped: list[str] = field(default_factory=list)
    # Each capped window: what the remote did (its answer cut with 0xFE00,
    # or exactly --find-limit matches) and what may be left out.
    capped_detail: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    problems: list[StudyResult] = field(default_factory=list)

    def add(self, result: StudyResult) -> None:
        self.studies += 1
        setattr(self, result.state, getattr(self, result.state) + 1)
        self.instances += max(0, result.after - result.before)
        if result.state in ("incomplete", "failed"):
            self.problems.append(result)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not (self.incomplete or self.failed or self.capped or self.stopped)


def _da(day: date) -> str:
    return day.strftime("%Y%m%d")


def _count(value: Any) -> int | None:
    """A count the remote sent (IS), or None when it sent none or nonsense."""
    try:
        first = str(value).split("\\")[0].strip() if value not in (None, "") else ""
        return int(first) if first else None
    except (TypeError, ValueError):
        return None


def _date_keys(start: date, end: date) -> str:
    return _da(start) if start == end else f"{_da(start)}-{_da(end)}"


def _batches(study_uid: str, missing: dict[str, str], *, whole: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """The retrieves that bring *missing* (SOP Instance UID -> Series
    Instance UID): the study whole when nothing of it is here, else only the
    missing instances, series by series (the hierarchical model wants the
    series named), UID_CHUNK UIDs at a time. Asking for a whole series again
    re-sent what a dropped link had already brought, in the same order, and
    stopped at the same point each run."""
    if whole:
        yield "STUDY", {"StudyInstanceUID": study_uid}
        return
    by_series: dict[str, list[str]] = {}
    for sop_uid, series_uid in missing.items():
        by_series.setdefault(series_uid, []).append(sop_uid)
    for series_uid in sorted(by_series):
        uids = by_series[series_uid]  # in the remote's listing order
        for start in range(0, len(uids), UID_CHUNK):
            yield "IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                            "SOPInstanceUID": "\\".join(uids[start:start + UID_CHUNK])}


class Puller:
    """One pull from one remote AE; see the module docstring."""

    def __init__(self, pacs: Pacs, title: str, options: PullOptions,
                 on_study: Callable[[StudyResult], None] | None = None, *, user: str = "", role: str = "",
                 purpose: str = "pacs remote pull") -> None:
        self.pacs = pacs
        self.title = title
        self.options = options
        self.on_study = on_study or (lambda _r: None)
        # What each study's audit event says the retrieval was for (a pull,
        # or the prefetch of an order's priors: pacs.prefetch), and as whom.
        self.purpose = purpose
        self.role = role
        # Who pulls, for the audit trail: the person who ran `pacs remote pull`.
        if not user:
            from .maintenance.common import os_user

            user = os_user()
        self.user = user
        # "Today" and the clock of --stop-at are the hospital's (the timezone
        # setting): on a server in UTC, date.today() is yesterday for the first
        # 7 hours of a Vietnamese day, and 06:00 would be 13:00 in Hanoi.
        now = hospital_now(pacs.settings)
        self.since = options.since or EARLIEST
        self.until = options.until or now.date()
        self.report = PullReport(title, _da(self.since), _da(self.until))
        self._pulled = 0
        # Every study the windows listed, and how the last C-FIND ended
        # (matches, cut with 0xFE00): what a capped window is said to be.
        self._listed: set[str] = set()
        self._last_answer = (0, False)
        self._deadline: datetime | None = None
        if options.stop_at is not None:
            # The next time the clock shows stop_at: a night run started at
            # 19:00 with --stop-at 06:00 stops tomorrow morning. Aware: the
            # comparison holds whatever the server's own zone.
            self._deadline = datetime.combine(now.date(), options.stop_at, tzinfo=now.tzinfo)
            if self._deadline <= now:
                self._deadline = datetime.combine(now.date() + timedelta(days=1), options.stop_at,
                                                  tzinfo=now.tzinfo)

    # -- what the remote holds --------------------------------------------
    def _find_studies(self, day_keys: str, time_keys: str = "", *,
                      also: Callable[[Dataset], bool] = lambda _m: False) -> tuple[list[Dataset], bool, bool]:
        """Matches of one window (the first find_limit, and beyond them those
        *also* keeps: what splitting the window cannot find),
        whether the window must be split (as many as the limit, or the remote
        ended early with 0xFE00), and whether the remote seems to have cut its
        answer (0xFE00, or exactly the limit: a silent cap)."""
        keys = {
            "StudyDate": day_keys, "StudyTime": time_keys, "StudyInstanceUID": "", "PatientID": self.options.patient_id,
            "PatientName": "", "AccessionNumber": "", "NumberOfStudyRelatedInstances": "",
        }
        self.report.queries += 1
        matches: list[Dataset] = []
        count = 0
        truncated = False
        try:
            for match in remote.find(self.pacs, self.title, "STUDY", keys):
                count += 1
                # Beyond the limit the window is split and asked again.
                if match is not None and (count <= self.options.find_limit or also(match)):
                    matches.append(match)
        except remote.Truncated:
            truncated = True
        limit = self.options.find_limit
        self._last_answer = (count, truncated)
        self._listed.update(str(m.get("StudyInstanceUID", "") or "") for m in matches)
        return matches, truncated or count >= limit, truncated or count == limit

    def windows(self, start: date, end: date, *, any_date: bool = False) -> Iterator[list[Dataset]]:
        """The remote's studies from *start* to *end* (*any_date*: with or
        without a date), newest windows first, each window small enough to
        be answered whole."""
        span = (_da(start), _da(end))
        if any_date:
            def unsplittable(m: Dataset) -> bool:  # no date, or one outside the range
                return not span[0] <= str(m.get("StudyDate", "") or "") <= span[1]
        else:
            def unsplittable(m: Dataset) -> bool:  # no time (only a single day is split by hour)
                return start == end and not str(m.get("StudyTime", "") or "").strip()
        matches, split, cut = self._find_studies("" if any_date else _date_keys(start, end), also=unsplittable)
        answer = self._answered()
        if not split:
            yield matches
            return
        if start < end:
            middle = start + (end - start) // 2
            yield from self.windows(middle + timedelta(days=1), end)
            yield from self.windows(start, middle)
        else:
            yield from self._hours(start, matches, cut)
        if any_date:
            # Splitting by date cannot find what has no date, or one outside
            # the range (a modality's clock wrong): those of the first answer
            # are taken, and if the remote cut that answer others may exist.
            undated = [m for m in matches if unsplittable(m)]
            yield undated
            if cut:
                self._undated_beyond_the_cut(answer, len(undated))

    def _answered(self) -> str:
        """How the remote ended its last answer, in words."""
        count, truncated = self._last_answer
        if truncated:
            return f"{self.title} cut its answer short after {count} studies (0xFE00: more exist)"
        return f"{self.title} answered exactly {count} studies, the --find-limit (it may cap its answers there)"

    def _capped(self, window: str, detail: str) -> None:
        self.report.capped.append(window)
        self.report.capped_detail[window] = detail

    def _remote_total(self) -> int | None:
        """How many studies the remote holds (for --patient, that patient's),
        from its patient-level answer; None when it cannot say: no counts,
        an answer cut short, or no patient-level queries."""
        keys = {"PatientID": self.options.patient_id, "NumberOfPatientRelatedStudies": ""}
        self.report.queries += 1
        total = patients = 0
        try:
            for m in remote.find(self.pacs, self.title, "PATIENT", keys, "patient"):
                if m is None:
                    continue
                count = _count(m.get("NumberOfPatientRelatedStudies"))
                if count is None:
                    return None
                total, patients = total + count, patients + 1
        except remote.Unreachable:
            raise
        except remote.RemoteError:  # Truncated too
            return None
        return None if patients >= self.options.find_limit else total

    def _undated_beyond_the_cut(self, answer: str, undated: int) -> None:
        """The first answer (every study, any date) was cut: studies without a
        date (or outside the range) past the cut cannot be found by date. Said
        unless the remote's own count of its studies (patient level) is no
        more than the windows listed: then every study was found."""
        total = self._remote_total()
        listed = len(self._listed - {""})
        if total is not None and total <= listed:
            return
        if undated:
            self._capped(UNDATED, f"{answer}, {undated} of them without a Study Date (or outside the dates): "
                                  "more may be beyond the cut")
        elif total is None:
            self._capped(UNDATED, f"{answer}, all with a Study Date, and it does not say how many studies it "
                                  "holds: some without a date may be beyond the cut")
        else:
            self._capped(UNDATED, f"{answer}; it holds {total} studies and {listed} were found by date: "
                                  f"{total - listed} may have no Study Date (or one outside the dates)")

    def _hours(self, day: date, day_matches: list[Dataset], cut: bool) -> Iterator[list[Dataset]]:
        """One day with too many studies, hour by hour (newest first)."""
        answer = self._answered()
        found: set[str] = set()
        for hour in range(23, -1, -1):
            # Up to the last fraction of the hour's last second (095959.5).
            matches, split, _cut = self._find_studies(_da(day), f"{hour:02d}0000-{hour:02d}5959.999999")
            if split:
                window = f"{_da(day)} {hour:02d}h"
                log.warning("pull from %s: %s: %s; only those are pulled", self.title, window, self._answered())
                self._capped(window, f"{self._answered()}; studies beyond it are left out")
            found.update(str(m.get("StudyInstanceUID", "")) for m in matches)
            yield matches
        # A study without a Study Time is in no hour: those of the day's own
        # answer are taken; if the remote cut that answer, more may exist.
        yield [m for m in day_matches if str(m.get("StudyInstanceUID", "")) not in found]
        if cut:
            self._capped(f"{_da(day)}: studies without a Study Time",
                         f"{answer}; a study without a Study Time beyond it is in no hour's answer")

    def _remote_series(self, study_uid: str) -> list[tuple[str, int | None]]:
        """Each series of the study at the remote, with the number of
        instances it says the series has (None: it does not say)."""
        self.report.queries += 1
        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""}
        series: dict[str, int | None] = {}
        for m in remote.find(self.pacs, self.title, "SERIES", keys):
            if m is not None and m.get("SeriesInstanceUID"):
                series[str(m.SeriesInstanceUID)] = _count(m.get("NumberOfSeriesRelatedInstances"))
        return list(series.items())

    def _remote_instances(self, study_uid: str, series: list[tuple[str, int | None]]) -> dict[str, str]:
        """SOP Instance UID -> Series Instance UID of everything the remote
        lists in the study (hierarchical: series by series)."""
        found: dict[str, str] = {}
        for series_uid, _count_ in series:
            self.report.queries += 1
            keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""}
            for m in remote.find(self.pacs, self.title, "IMAGE", keys):
                if m is not None and m.get("SOPInstanceUID"):
                    found[str(m.SOPInstanceUID)] = series_uid
        return found

    # -- what we hold ------------------------------------------------------
    def _local_series_counts(self, study_uid: str) -> dict[str, int]:
        with self.pacs.engine.connect() as conn:
            rows = conn.execute(
                select(Series.series_uid, func.count(Instance.pk)).join(Instance, Instance.series_pk == Series.pk)
                .join(Study, Study.pk == Series.study_pk).where(Study.study_uid == study_uid)
                .group_by(Series.series_uid)
            ).all()
        return {str(uid): int(n) for uid, n in rows}

    def _filed_under(self, study_uid: str) -> str:
        """The patient the study is filed under here, as events name one
        (``BN100^^^BVDK``); "" when nothing of it is. The remote's Patient
        ID often lacks the issuer the HIS gave the patient: an event naming
        it so was not found by `pacs audit --patient BN100^^^BVDK`."""
        with self.pacs.engine.connect() as conn:
            row = conn.execute(select(Patient.patient_id, Patient.issuer).join(Study, Study.patient_pk == Patient.pk)
                               .where(Study.study_uid == study_uid)).first()
        return patient_cx(row.patient_id, row.issuer) if row is not None else ""

    def _local_uids(self, study_uid: str) -> set[str]:
        return {item.sop_uid for item in self.pacs.reader.iter_stored(study_uid)}

    def _rejected_uids(self, listed: dict[str, str]) -> set[str]:
        """Those of *listed* a rejection note withdrew here (pacs.rejections):
        the ingest refuses them (0xA771), so they are not missing. Counted
        missing, the study stayed incomplete (exit 1) and each run, and each
        prefetch, retrieved them again to have them refused."""
        from .rejections import rejected_among  # its deletion path imports much of the core

        return rejected_among(self.pacs.engine, listed)

    # -- one study ---------------------------------------------------------
    def _retrieve(self, level: str, keys: dict[str, str]) -> remote.RetrieveSummary:
        if self.options.method == "get":
            return remote.get(self.pacs, self.title, level, keys)
        # The remote may send no Pending response while it moves: the study
        # growing here shows it is at work (see remote._wait_while).
        study_uid = keys["StudyInstanceUID"]
        return remote.move(self.pacs, self.title, level, keys,
                           alive=lambda: sum(self._local_series_counts(study_uid).values()))

    def pull_study(self, match: Dataset) -> StudyResult:
        """Make one study complete here, or say what is missing. A study the
        remote cannot answer for is failed, and the pull goes on with the
        next; only a remote that cannot be reached at all ends it."""
        study_uid = str(match.StudyInstanceUID)
        local_series = self._local_series_counts(study_uid)
        before = sum(local_series.values())
        result = StudyResult(study_uid, str(match.get("StudyDate", "") or ""), str(match.get("PatientID", "") or ""),
                             _count(match.get("NumberOfStudyRelatedInstances")), before, before, "complete")
        try:
            series = self._remote_series(study_uid)
            # Complete without listing instances when the remote counts its
            # series and each is here with as many (a count for the whole
            # study could match with other series here: not enough).
            if before and series and all(n is not None and local_series.get(uid, 0) >= n for uid, n in series):
                return result
            listed = self._remote_instances(study_uid, series)
        except remote.Truncated as exc:
            result.state = "failed"
            result.detail = f"{exc} while listing the study's instances: raise its limit (Orthanc: LimitFindInstances)"
            return result
        except remote.Unreachable:
            raise
        except remote.RemoteError as exc:
            result.state, result.detail = "failed", str(exc)
            return result
        rejected = self._rejected_uids(listed)
        local = (self._local_uids(study_uid) if before else set()) | rejected
        missing = {uid: series_uid for uid, series_uid in listed.items() if uid not in local}
        if not missing:
            if not listed:
                result.state, result.detail = "failed", "the remote lists no instances in this study"
            return result
        if self.options.dry_run:
            result.state, result.detail = "missing", f"{len(missing)} of {len(listed)} instances to pull"
            return result
        notes: list[str] = []
        for level, keys in _batches(study_uid, missing, whole=not local):
            try:
                summary = self._retrieve(level, keys)
            except remote.Unreachable:
                raise
            except remote.RemoteError as exc:
                notes.append(str(exc))
                continue
            if summary.status not in (0x0000, 0xB000) or summary.failed:
                # The counts tell a link dropped mid-study (some completed,
                # the rest failed) from a node the remote cannot send to.
                notes.append(f"C-{self.options.method.upper()} status 0x{summary.status:04X}: "
                             f"{summary.completed} completed, {summary.failed} failed, {summary.warning} warning")
        here = self._local_uids(study_uid)
        still = [uid for uid in listed if uid not in here and uid not in rejected]
        result.after = len(here)
        if not still:
            result.state = "pulled"
        else:
            result.state = "incomplete" if len(still) < len(listed) else "failed"
            if self.options.method == "move" and result.after == before:
                # Nothing arrived at all: the remote cannot send to us.
                notes.append(f"is this node ({self.pacs.settings.ae_title}) registered at {self.title} "
                             "and pacs serve running to receive?")
            result.detail = f"{len(still)} of {len(listed)} instances missing; " + "; ".join(notes)
        self.pacs.audit.record(Event(
            "retrieve", user=self.user, role=self.role, protocol="dicom", client=self.title,
            outcome="success" if result.state == "pulled" else "failure", study_uid=study_uid,
            patient_id=self._filed_under(study_uid) or result.patient_id,
            detail=f"{self.purpose}: {len(listed) - len(still)} of {len(listed)} instances "
                   f"(C-{self.options.method.upper()})",
        ))
        return result

    # -- the whole pull ----------------------------------------------------
    def _should_stop(self) -> str:
        if self.options.max_studies and self._pulled >= self.options.max_studies:
            return f"--max-studies {self.options.max_studies} reached"
        if self._deadline is not None and datetime.now(self._deadline.tzinfo) >= self._deadline:
            return f"--stop-at {self._deadline.strftime('%H:%M')} reached"
        return ""

    def run(self) -> PullReport:
        """Pull every study of the remote between the options' dates."""
        seen: set[str] = set()
        try:
            any_date = self.options.since is None and self.options.until is None
            for window in self.windows(self.since, self.until, any_date=any_date):
                window.sort(key=lambda m: (str(m.get("StudyDate", "")), str(m.get("StudyTime", ""))), reverse=True)
                for match in window:
                    uid = str(match.get("StudyInstanceUID", "") or "")
                    if not uid or uid in seen:
                        continue
                    seen.add(uid)
                    self.report.stopped = self._should_stop()
                    if self.report.stopped:
                        return self.report
                    result = self.pull_study(match)
                    if result.state in ("pulled", "incomplete", "failed"):
                        self._pulled += 1
                        if self.options.pause:
                            clock.sleep(self.options.pause)
                    self.report.add(result)
                    self.on_study(result)
        except remote.RemoteError as exc:
            self.report.stopped = str(exc)
        except KeyboardInterrupt:
            self.report.stopped = "interrupted"
        return self.report
