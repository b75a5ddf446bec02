"""One prefetch job: find the patient's priors at the old PACS and make the
newest of them complete here.

For each source (``prefetch_sources``, in order) not asked yet, one STUDY
level C-FIND per identifier of the patient (the patient ID, then its other
IDs: the old PACS may have filed the patient under the citizen ID), with the
date window (``prefetch_years`` back from today) as a range key (an answer
the old PACS cuts short is asked again date range by date range). Only
answers whose Patient ID is the one asked and whose date falls in the
window count (an old PACS may ignore a key). A study found at two sources is
taken from the first.

The priors are ranked newest first (Study Date, then Time) and the first
``prefetch_max_studies`` of them that fit (``prefetch_modality = "same"``:
a modality of the order among the study's, from Modalities in Study or,
when the old PACS does not return it, a SERIES level C-FIND) are chosen.
Each chosen prior not known complete goes through
:meth:`pacs.pull.Puller.pull_study`: complete here already (instance counts
compared as `pacs remote pull` does: no retrieve), else retrieved (C-MOVE to
this archive or C-GET, per source), checked instance by instance and
audited. Retrieved objects are ingested as the pull's are and take no
routing rule (their Move Originator is our AE, or our own C-GET).

A prior complete here that was found only by a trusted other identifier
(the old PACS filed the patient under the citizen ID; the ingest made it a
patient of its own) is then filed under the job's patient (:mod:`.filing`).

A source that cannot be reached leaves the job unfinished (retried later,
see :mod:`.jobs`); a study that came incomplete is tried again by the next
run, which neither asks a source again nor retries what is complete. A
prior found at a source since taken out of ``prefetch_sources`` is dropped
(unless here) and looked for at the sources configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pydicom.dataset import Dataset

from .. import remote
from ..app import Pacs
from ..audit import Event, patient_cx
from ..leases import lease_ttl
from ..pull import PullOptions, Puller, StudyResult, _count
from ..timezones import hospital_now
from . import jobs
from .filing import file_prior
from .jobs import Job

log = logging.getLogger(__name__)

# A prior's state once nothing more is to be done for it.
SETTLED = ("complete", "pulled")


@dataclass
class Outcome:
    """How a run ended: whether the job is done, the problems left (its
    last error), and its progress to keep."""

    complete: bool
    error: str
    progress: dict[str, Any]


def lease() -> timedelta:
    """How long a claim lasts without renewal (PACS_LEASE_TTL, as the cluster's other leases)."""
    return timedelta(seconds=lease_ttl())


def _modalities(value: Any) -> list[str] | None:
    """Modalities in Study as a list; None when the old PACS sent none."""
    if value in (None, ""):
        return None
    values = [str(v).strip() for v in (value if isinstance(value, list | tuple) or value.__class__.__name__
                                        == "MultiValue" else str(value).split("\\"))]
    return sorted({v for v in values if v}) or None


def _since(pacs: Pacs, years: int) -> str:
    """The first day of the window (YYYYMMDD), *years* before the hospital's today; "" for any date."""
    if not years:
        return ""
    today = hospital_now(pacs.settings).date()
    try:
        start = today.replace(year=today.year - years)
    except ValueError:  # 29 February
        start = today.replace(year=today.year - years, day=28)
    return start.strftime("%Y%m%d")


class JobRun:
    """One run of a claimed job (see the module docstring).

    *alive* is asked before each retrieve: False (the lease was lost, the
    server stops) ends the run where it is; what it did stays recorded.
    *user* and *role* are who the audit trail says retrieved."""

    def __init__(self, pacs: Pacs, job: Job, *, user: str = "prefetch", role: str = "system",
                 alive: Callable[[], bool] = lambda: True,
                 on_study: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.pacs = pacs
        self.job = job
        self.user, self.role = user, role
        self.alive = alive
        self.on_study = on_study or (lambda _uid, _entry: None)
        settings = pacs.settings
        self.sources = dict(settings.prefetch_source_methods)
        self.limit = settings.prefetch_max_studies
        self.same_modality = settings.prefetch_modality == "same" and bool(job.modalities)
        self.progress: dict[str, Any] = {"studies": {}, "searched": [], "chosen": [], **job.progress}
        self.studies: dict[str, dict[str, Any]] = self.progress["studies"]
        self.problems: list[str] = []
        self.down: set[str] = set()
        self._pullers: dict[str, Puller] = {}
        what = f"order {job.accession}" if job.accession else f"patient {job.patient_id}"
        self.purpose = f"prefetch of the priors for {what} (job {job.pk})"

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Search, choose, retrieve; see the module docstring."""
        if not self.sources:
            return Outcome(False, "no prefetch_sources configured", self.progress)
        current = jobs.as_ordered(self.pacs.engine, self.job)
        if current is None:
            return Outcome(True, f"order {self.job.accession} was cancelled before its priors were fetched",
                           self.progress)
        # Its patient as the order names it now (merged, given its hospital number since it was queued).
        self.job = current
        self.same_modality = self.pacs.settings.prefetch_modality == "same" and bool(current.modalities)
        self._drop_retired_sources()
        if "since" not in self.progress:
            # Fixed at the first run: a retry days later asks for the same priors.
            self.progress["since"] = _since(self.pacs, self.pacs.settings.prefetch_years)
        for title in self.sources:
            if title not in self.progress["searched"]:
                self._search(title)
        chosen, undecided = self._choose()
        self.progress["chosen"] = chosen
        self._save()
        stopped = False
        for uid in chosen:
            entry = self.studies[uid]
            if entry.get("state") in SETTLED or uid in undecided:
                continue
            if not self.alive():
                stopped = True
                break
            self._fetch(uid, entry)
            self._save()
        if not stopped:
            self._file_priors(chosen)
        unsettled = [uid for uid in chosen if self.studies[uid].get("state") not in SETTLED]
        searched_all = all(title in self.progress["searched"] for title in self.sources)
        if stopped:
            self.problems.append("stopped before every prior was fetched")
        if unsettled and not self.problems:
            self.problems.append(f"{len(unsettled)} prior(s) not complete here")
        complete = searched_all and not unsettled and not stopped
        self._audit(complete)
        return Outcome(complete, "; ".join(self.problems), self.progress)

    def _drop_retired_sources(self) -> None:
        """Priors an earlier run found at a source no longer in
        ``prefetch_sources`` (retired, replaced) and that are not here are
        dropped, with a note, and every source configured is asked again:
        each had skipped them as found already, and the job asked the
        retired source for them on every try until it died. What came from
        it stays (it is here)."""
        retired: dict[str, int] = {}
        for uid, entry in list(self.studies.items()):
            if entry.get("source") not in self.sources and entry.get("state") not in SETTLED:
                retired[entry["source"]] = retired.get(entry["source"], 0) + 1
                del self.studies[uid]
        if not retired:
            return
        self.progress["chosen"] = [uid for uid in self.progress.get("chosen", []) if uid in self.studies]
        self.progress["searched"] = []
        notes = self.progress.setdefault("notes", [])
        for title, count in retired.items():
            notes.append(f"{count} prior(s) found at {title}, no longer in prefetch_sources, not fetched from it: "
                         f"looked for at {', '.join(self.sources)}")
            log.warning("prefetch job %d: %s is no longer in prefetch_sources: %d prior(s) it found are looked "
                        "for at %s", self.job.pk, title, count, ", ".join(self.sources))

    def _save(self) -> None:
        if not jobs.save_progress(self.pacs.engine, self.job, self.progress):
            self.alive = lambda: False  # another node holds the job now: do nothing more of it

    # -- what the old PACS holds ---------------------------------------------------------
    def _search(self, title: str) -> None:
        """Ask *title* for the patient's studies in the window, by each of
        its identifiers; the source counts as asked once every one answered."""
        since = self.progress["since"]
        for value in self.job.identifiers(self.pacs.settings.prefetch_other_ids):
            keys = {"PatientID": value, "StudyDate": f"{since}-" if since else "", "StudyTime": "",
                    "StudyInstanceUID": "", "AccessionNumber": "", "ModalitiesInStudy": "",
                    "NumberOfStudyRelatedInstances": "", "StudyDescription": ""}
            try:
                if not self._ask(title, value, since, keys):
                    self._ask_by_dates(title, value, since)
            except remote.Unreachable as exc:
                self.down.add(title)
                self.problems.append(f"{title}: {exc}")
                return
            except remote.RemoteError as exc:
                self.problems.append(f"{title}: C-FIND for the patient: {exc}")
                return
        self.progress["searched"].append(title)

    def _ask(self, title: str, value: str, since: str, keys: dict[str, str]) -> bool:
        """One C-FIND of the patient's studies; False when the old PACS cut
        its answer short (0xFE00), the matches it did send taken."""
        try:
            for match in remote.find(self.pacs, title, "STUDY", keys):
                if match is not None:
                    self._found(title, value, since, match)
        except remote.Truncated:
            return False
        return True

    def _ask_by_dates(self, title: str, value: str, since: str) -> None:
        """The window again, date range by date range, newest first, as a
        pull splits it (:meth:`pacs.pull.Puller.windows`): an old PACS that
        caps its answers (Orthanc's LimitFindResults) sends the studies it
        stored first, the oldest, and the newest priors were beyond the cut.
        What even a single day's or hour's answer leaves out is noted."""
        first = date(int(since[:4]), int(since[4:6]), int(since[6:8])) if since else None
        puller = Puller(self.pacs, title, PullOptions(since=first, patient_id=value), user=self.user,
                        role=self.role, purpose=self.purpose)
        for window in puller.windows(puller.since, puller.until, any_date=first is None):
            for match in window:
                self._found(title, value, since, match)
        for window, detail in puller.report.capped_detail.items():
            self.progress.setdefault("notes", []).append(f"{title} ({value}) {window}: {detail}")

    def _found(self, title: str, value: str, since: str, match: Dataset) -> None:
        uid = str(match.get("StudyInstanceUID", "") or "").strip()
        if not uid or uid in self.studies:
            return
        if str(match.get("PatientID", "") or "").strip() != value:
            return  # an old PACS that matched loosely (wildcards, case): not this patient's
        day = str(match.get("StudyDate", "") or "").strip()
        if since and not (day and day >= since):
            return  # outside the window (an old PACS may ignore the range)
        self.studies[uid] = {
            "source": title, "patient_id": value, "date": day, "time": str(match.get("StudyTime", "") or "").strip(),
            "count": _count(match.get("NumberOfStudyRelatedInstances")),
            "modalities": _modalities(match.get("ModalitiesInStudy")), "state": "", "detail": "", "instances": 0,
        }

    def _choose(self) -> tuple[list[str], set[str]]:
        """The newest priors that fit, at most the limit; and those among
        them whose modalities could not be learnt (their source is down):
        they hold their place until a later run decides."""
        ranked = sorted(self.studies, key=lambda uid: (self.studies[uid]["date"], self.studies[uid]["time"], uid),
                        reverse=True)
        chosen: list[str] = []
        undecided: set[str] = set()
        for uid in ranked:
            if len(chosen) >= self.limit:
                break
            fits = self._fits(uid, self.studies[uid])
            if fits is None:
                undecided.add(uid)
            if fits is not False:
                chosen.append(uid)
        return chosen, undecided

    def _fits(self, uid: str, entry: dict[str, Any]) -> bool | None:
        """Whether the prior has a modality of the order (always, unless
        prefetch_modality is "same"); None when it cannot be known now."""
        if not self.same_modality or entry.get("state") in SETTLED:
            return True
        if entry.get("modalities") is None:
            source = entry["source"]
            if source in self.down:
                return None
            try:
                found = remote.find(self.pacs, source, "SERIES",
                                    {"StudyInstanceUID": uid, "SeriesInstanceUID": "", "Modality": ""})
                entry["modalities"] = sorted({str(m.get("Modality", "") or "").strip() for m in found
                                              if m is not None} - {""})
            except remote.Unreachable as exc:
                self.down.add(source)
                self.problems.append(f"{source}: {exc}")
                return None
            except remote.RemoteError as exc:
                self.problems.append(f"{source}: the modalities of study {uid}: {exc}")
                return None
        return bool(set(entry["modalities"]) & set(self.job.modalities))

    # -- fetching -------------------------------------------------------------------------
    def _puller(self, title: str) -> Puller:
        if title not in self._pullers:
            options = PullOptions(method=self.sources.get(title, "move"))
            self._pullers[title] = Puller(self.pacs, title, options, user=self.user, role=self.role,
                                          purpose=self.purpose)
        return self._pullers[title]

    def _fetch(self, uid: str, entry: dict[str, Any]) -> None:
        """Make one prior complete here, through the pull's own path."""
        source = entry["source"]
        if source in self.down:
            return
        match = Dataset()
        match.StudyInstanceUID = uid
        match.StudyDate = entry["date"]
        match.PatientID = entry["patient_id"]
        if entry.get("count") is not None:
            match.NumberOfStudyRelatedInstances = str(entry["count"])
        try:
            result: StudyResult = self._puller(source).pull_study(match)
        except remote.Unreachable as exc:
            self.down.add(source)
            self.problems.append(f"{source}: {exc}")
            return
        entry["state"], entry["detail"] = result.state, result.detail
        entry["instances"] = int(entry.get("instances", 0) or 0) + max(0, result.after - result.before)
        if result.state not in SETTLED:
            self.problems.append(f"study {uid} from {source}: {result.state}: {result.detail}")
        self.on_study(uid, entry)

    # -- filing -----------------------------------------------------------------------
    def _file_priors(self, chosen: list[str]) -> None:
        """File each prior complete here that was found only by a trusted
        other identifier of the patient under the job's patient
        (:mod:`.filing`), unless a run did already; a prior left where it is
        is noted in the progress with the reason (asked again by a rerun)."""
        trusted = self.job.trusted_others(self.pacs.settings.prefetch_other_ids)
        for uid in chosen:
            entry = self.studies[uid]
            value = entry.get("patient_id", "")
            identifier = next((o for o in trusted if o[0].strip() == value), None)
            if (entry.get("state") not in SETTLED or entry.get("filing") in ("filed", "here")
                    or value == self.job.patient_id.strip() or identifier is None):
                continue
            if not self.alive():
                return
            filing = file_prior(self.pacs, self.job, uid, identifier, entry["source"], user=self.user,
                                role=self.role)
            if filing.state == "lost":
                self.alive = lambda: False  # another node holds the job now: do nothing more of it
                return
            entry["filing"], entry["filing_detail"] = filing.state, filing.detail
            notes = [n for n in self.progress.get("notes", []) if not n.startswith(f"study {uid} ")]
            if filing.state == "left":
                notes.append(f"study {uid} ({value}) not filed under "
                             f"{patient_cx(self.job.patient_id, self.job.issuer)}: {filing.detail}")
            self.progress["notes"] = notes
            self._save()

    def _audit(self, complete: bool) -> None:
        """One event per run: which priors came from where, and what is missing."""
        counts = jobs.summary(self.progress)
        by_source: dict[str, int] = {}
        for uid in self.progress["chosen"]:
            entry = self.studies[uid]
            if entry.get("state") == "pulled":
                by_source[entry["source"]] = by_source.get(entry["source"], 0) + 1
        came = ", ".join(f"{n} from {title}" for title, n in by_source.items()) or "none retrieved"
        what = f"order {self.job.accession}" if self.job.accession else "a run by hand"
        detail = (f"prefetch job {self.job.pk} ({what}): {counts['found']} prior(s) found at "
                  f"{', '.join(self.progress['searched']) or 'no source'}, {counts['chosen']} chosen: {came}, "
                  f"{counts['already_here']} already here, {counts['missing']} missing")
        if counts["filed"]:
            detail += f", {counts['filed']} filed under the patient (found by another of its IDs)"
        if self.problems:
            detail += "; " + "; ".join(self.problems)
        if self.progress.get("notes"):
            detail += "; " + "; ".join(self.progress["notes"])
        self.pacs.audit.record(Event(
            "retrieve", user=self.user, role=self.role, protocol="dicom", client=", ".join(self.sources)[:200],
            outcome="success" if complete else "failure", patient_id=patient_cx(self.job.patient_id, self.job.issuer),
            detail=detail[:500]))


def run_claimed(pacs: Pacs, job: Job, *, user: str = "prefetch", role: str = "system",
                stopping: Callable[[], bool] = lambda: False,
                on_study: Callable[[str, dict[str, Any]], None] | None = None) -> str | None:
    """Run a claimed job under its renewed lease and record how it ended:
    its new state ("done", "pending", "dead"; "released" when *stopping*
    ended it first; None when another node took it over meanwhile)."""
    span = lease()
    with jobs.Heartbeat(pacs.engine, job, span).running() as beat:
        run = JobRun(pacs, job, user=user, role=role, alive=lambda: not beat.lost and not stopping(),
                     on_study=on_study)
        try:
            outcome = run.run()
        except Exception as exc:  # a bug or an index hiccup: the try counts and waits its backoff
            log.exception("prefetch job %d failed", job.pk)
            outcome = Outcome(False, f"internal error: {exc.__class__.__name__}: {exc}", run.progress)
    if beat.lost:
        return None
    if stopping() and not outcome.complete:
        jobs.save_progress(pacs.engine, job, outcome.progress)
        return "released" if jobs.release(pacs.engine, job) else None
    settings = pacs.settings
    state = jobs.finish(pacs.engine, job, outcome.progress, complete=outcome.complete, error=outcome.error,
                        max_attempts=settings.prefetch_max_attempts, retry_seconds=settings.prefetch_retry_seconds)
    if state is not None and state != "done":
        log.warning("prefetch job %d (try %d): %s; %s", job.pk, job.attempts, outcome.error[:300],
                    "dead: pacs prefetch retry --id %d to try again" % job.pk if state == "dead"
                    else "tried again later")
    return state
