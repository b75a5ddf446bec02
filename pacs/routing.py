"""Routing rules and the durable routing queue.

A rule matches on the calling AE, SOP class, modality or any tag (equality,
wildcard, regular expression) and forwards to a registered AE (C-STORE) or a
DICOMweb endpoint (STOW-RS), optionally transcoded, de-identified or with
tags changed. Matching happens at ingest and the jobs are written in the
same index transaction as the instance, so an acknowledged object is never
left unrouted. Jobs are claimed with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL (a single writer on SQLite): several nodes drain one queue and
no job is sent twice at once.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
from struct import error as struct_error
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, update

from .errors import PacsError
from .index.db import db_now, write_transaction
from .index.models import RouteJob, RoutingRule
from .index.writer_helpers import insert_ignore

if TYPE_CHECKING:
    from .settings import RouteEntry

rules_t = RoutingRule.__table__
jobs_t = RouteJob.__table__
LEASE = timedelta(minutes=5)
# Jobs that still mean to deliver (or, dead, wait for the operator).
UNFINISHED = ("pending", "sending", "dead")
TRANSCODES = {
    "": "",
    "uncompressed": "1.2.840.10008.1.2.1",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "jpegls-lossless": "1.2.840.10008.1.2.4.80",
    "rle": "1.2.840.10008.1.2.5",
}
OPS = ("eq", "wildcard", "regex")


class RoutingError(PacsError):
    pass


@dataclass(frozen=True)
class Condition:
    attribute: str
    op: str
    value: str

    def matches(self, values: dict[str, str]) -> bool:
        actual = values.get(self.attribute, "")
        if self.op == "eq":
            return actual == self.value
        if self.op == "wildcard":
            return fnmatch.fnmatchcase(actual.upper(), self.value.upper())
        return re.search(self.value, actual) is not None


@dataclass(frozen=True)
class Rule:
    pk: int
    name: str
    conditions: tuple[Condition, ...]
    destination_kind: str
    destination: str
    destination_auth: str = ""
    transcode: str = ""
    deidentify: bool = False
    morph: tuple[tuple[str, str], ...] = ()
    stable_seconds: int = 0
    enabled: bool = True

    @property
    def destination_key(self) -> str:
        return f"{self.destination_kind}:{self.destination}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "enabled": self.enabled,
            "conditions": [c.__dict__ for c in self.conditions],
            "destination_kind": self.destination_kind, "destination": self.destination,
            "transcode": self.transcode, "deidentify": self.deidentify, "morph": dict(self.morph),
            "stable_seconds": self.stable_seconds,
        }


@dataclass(frozen=True)
class PlannedRoute:
    """A job to create with the instance's index row.

    *rule_name* is checked when the job is written: a rule removed while
    ingest still had it cached (2 s) gets no job, and its primary key,
    which SQLite gives to the next rule added, does not send the object
    under that other rule (say, without de-identification)."""

    rule_pk: int
    destination_key: str
    stable_seconds: int
    rule_name: str = ""
    # This job alone waits so long (an object the viewer saves while the
    # radiologist works: see VIEWER_SAVE_HOLD_SECONDS); the study's other jobs
    # are not pushed back, as a stable-study rule's are.
    hold_seconds: int = 0


# Key images and measurements are saved by the viewer at each change, each
# save a new object replacing the previous (whose deletion cancels its job): a
# rule forwarding them waits this long, so that a reading session sends its
# last selection rather than one object per key pressed.
VIEWER_SAVE_HOLD_SECONDS = 120


@dataclass
class Job:
    pk: int
    rule_pk: int
    sop_uid: str
    study_uid: str
    attempts: int
    rule: Rule | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_condition(text: str) -> Condition:
    """``Modality=CT``, ``CallingAE~CT_*`` (wildcard), ``StudyDescription/regex/``."""
    for op, sep in (("regex", "/"), ("wildcard", "~"), ("eq", "=")):
        if op == "regex" and "=/" in text and text.endswith("/"):
            attribute, value = text.split("=/", 1)
            return _condition(attribute, "regex", value[:-1])
        if op != "regex" and sep in text:
            attribute, value = text.split(sep, 1)
            return _condition(attribute, op, value)
    raise RoutingError(f"cannot read condition {text!r}: use Key=value, Key~wild*card or Key=/regex/")


# Binary numeric VRs: a --set value is converted to numbers (the text "512" cannot be written as US).
_INT_VRS = {"US": (0, 2**16 - 1), "SS": (-(2**15), 2**15 - 1), "UL": (0, 2**32 - 1), "SL": (-(2**31), 2**31 - 1),
            "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1)}
_FLOAT_VRS = ("FL", "FD")
# VRs a value given as text cannot stand for.
_NOT_SETTABLE = ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT")


def morph_element(keyword: str, value: str) -> DataElement:
    """The element a rule's ``--set Keyword=value`` puts on the copy, checked
    against the keyword's VR and VM and encoded once (RoutingError if the
    value does not fit: refused at ``route add``, a job fails for good)."""
    tag = tag_for_keyword(keyword) if keyword in keyword_dict else None
    if tag is None:
        raise RoutingError(f"unknown attribute to set: {keyword!r}")
    vrs = dictionary_VR(tag).split(" or ")
    if any(vr in _NOT_SETTABLE for vr in vrs):
        raise RoutingError(f"--set {keyword}: its VR ({dictionary_VR(tag)}) cannot be set from text")
    parts = value.split("\\") if value else []
    vm = dictionary_VM(tag)
    if vm == "1" and len(parts) > 1:
        raise RoutingError(f"--set {keyword}={value!r}: {keyword} takes one value")
    vr = vrs[0]
    converted: Any = value
    try:
        if vr in _INT_VRS:
            numbers = [int(p) for p in parts]
            if len(vrs) > 1 and any(n < 0 for n in numbers):  # "US or SS"
                vr = next((v for v in vrs if _INT_VRS.get(v, (0,))[0] < 0), vr)
            low, high = _INT_VRS[vr]
            if any(not low <= n <= high for n in numbers):
                raise ValueError(f"out of range for {vr} ({low}..{high})")
            converted = numbers[0] if len(numbers) == 1 else numbers
        elif vr in _FLOAT_VRS:
            floats = [float(p) for p in parts]
            converted = floats[0] if len(floats) == 1 else floats
        elem = DataElement(tag, vr, converted if parts else None, validation_mode=pydicom_config.RAISE)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, ["UTF8"])
    except (ValueError, TypeError, OverflowError, OSError, struct_error) as exc:
        raise RoutingError(f"--set {keyword}={value!r} does not fit its VR {vr}: {str(exc).splitlines()[0]}") from None
    return elem


def _condition(attribute: str, op: str, value: str) -> Condition:
    attribute = attribute.strip()
    if attribute not in ("CallingAE",) and attribute not in keyword_dict:
        raise RoutingError(f"unknown attribute {attribute!r} (a DICOM keyword or CallingAE)")
    if op == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise RoutingError(f"bad regular expression {value!r}: {exc}") from None
    return Condition(attribute, op, value)


class RoutingRules:
    """CRUD on rules plus a short-lived cache for matching at ingest: a
    change made elsewhere (`pacs route`, another node) applies to the
    objects received *cache_seconds* later at the latest."""

    CACHE_SECONDS = 2.0

    def __init__(self, engine: Engine, cache_seconds: float = CACHE_SECONDS) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: list[Rule] | None = None
        self._cached_at = 0.0
        self._lock = threading.Lock()

    def add(self, name: str, conditions: list[Condition], destination_kind: str, destination: str, *,
            destination_auth: str = "", transcode: str = "", deidentify: bool = False,
            morph: dict[str, str] | None = None, stable_seconds: int = 0) -> Rule:
        if destination_kind not in ("dicom", "dicomweb"):
            raise RoutingError("destination kind is dicom or dicomweb")
        if transcode not in TRANSCODES and not re.fullmatch(r"[0-9.]{3,64}", transcode):
            raise RoutingError(f"transcode must be one of {', '.join(k for k in TRANSCODES if k)} or a UID")
        for keyword, value in (morph or {}).items():
            morph_element(keyword, value)
        values = {
            "enabled": True, "conditions": json.dumps([c.__dict__ for c in conditions]),
            "destination_kind": destination_kind, "destination": destination, "destination_auth": destination_auth,
            "transcode": transcode, "deidentify": deidentify, "morph": json.dumps(morph or {}),
            "stable_seconds": max(0, stable_seconds),
        }
        with self.engine.begin() as conn:
            pk = insert_ignore(conn, rules_t, {"name": name, "created_at": datetime.now(UTC), **values}, ["name"])
            if pk is None:
                conn.execute(update(rules_t).where(rules_t.c.name == name).values(**values))
        self._cache = None
        return next(r for r in self.list() if r.name == name)

    def remove(self, name: str, *, force: bool = False) -> int | None:
        """Remove a rule; None if there is none by that name, else how many
        unfinished jobs (pending, sending, dead) went with it. A rule with
        unfinished jobs is removed only with *force* (RoutingError): its jobs
        are deleted with it (ON DELETE CASCADE), dead letters included."""
        with write_transaction(self.engine) as conn:
            # Locked first: an ingest writing a job for this rule (which
            # key-share locks it) finishes before the count, none starts after.
            pk = conn.execute(select(rules_t.c.pk).where(rules_t.c.name == name).with_for_update()).scalar()
            if pk is None:
                return None
            unfinished = dict(conn.execute(
                select(jobs_t.c.state, func.count()).where(jobs_t.c.rule_pk == pk, jobs_t.c.state.in_(UNFINISHED))
                .group_by(jobs_t.c.state)).all())
            total = sum(unfinished.values())
            if total and not force:
                detail = ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items()))
                raise RoutingError(
                    f"rule {name} has {total} unfinished jobs ({detail}); `pacs route remove {name} --force` "
                    f"discards them (or wait for them, or `pacs route cancel --rule {name}` first)")
            conn.execute(delete(jobs_t).where(jobs_t.c.rule_pk == pk))
            conn.execute(delete(rules_t).where(rules_t.c.pk == pk))
        self._cache = None
        return total

    def list(self) -> list[Rule]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rules_t).order_by(rules_t.c.name)).all()
        return [_rule(r) for r in rows]

    def enabled(self) -> list[Rule]:
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cached_at >= self.cache_seconds:
                self._cache = [r for r in self.list() if r.enabled]
                self._cached_at = now
            return self._cache

    def plan(self, dataset: Dataset | Callable[[], Dataset | None] | None, calling_ae: str, sop_class: str,
             modality: str) -> list[PlannedRoute]:
        """The routes an incoming instance takes (evaluated before its commit).

        *dataset* may be a function returning it: called only if a rule
        needs a tag beyond the calling AE, SOP class and modality."""
        rules = self.enabled()
        if not rules:
            return []
        values = _Values(dataset, {"CallingAE": calling_ae, "SOPClassUID": sop_class, "Modality": modality})
        return [
            PlannedRoute(r.pk, r.destination_key, r.stable_seconds, r.name)
            for r in rules
            if all(c.matches(values) for c in r.conditions)
        ]


class _Values(dict):  # type: ignore[type-arg]
    """Tag values of an instance, read lazily from its header dataset."""

    def __init__(self, dataset: Dataset | Callable[[], Dataset | None] | None, known: dict[str, str]) -> None:
        super().__init__(known)
        self._dataset = dataset

    def get(self, key: str, default: str = "") -> str:  # type: ignore[override]
        if key in self:
            return str(self[key])
        value = ""
        if callable(self._dataset):
            try:
                self._dataset = self._dataset()
            except Exception:
                self._dataset = None
        if self._dataset is not None:
            try:
                raw = self._dataset.get(key)
                if raw is not None:
                    value = "\\".join(str(v) for v in raw) if isinstance(raw, list | tuple) or raw.__class__.__name__ == "MultiValue" else str(raw)
            except Exception:
                value = ""
        self[key] = value
        return value


def load_rule(rules: RoutingRules, entry: RouteEntry) -> Rule:
    """A rule from the config file::

        [[route]]
        name = "ct-to-reading"
        if = ["Modality=CT", "CallingAE~SATELLITE_*"]
        to_ae = "READING"          # or to_url = "https://.../dicom-web"
        transcode = "j2k-lossless"
        stable_seconds = 30
    """
    destination_kind, destination = ("dicomweb", entry.to_url) if entry.to_url is not None else ("dicom", entry.to_ae)
    return rules.add(
        entry.name, [parse_condition(c) for c in entry.conditions], destination_kind, destination or "",
        destination_auth=entry.auth, transcode=entry.transcode, deidentify=entry.deidentify, morph=entry.morph,
        stable_seconds=entry.stable_seconds,
    )


def _rule(row: Any) -> Rule:
    return Rule(
        pk=row.pk, name=row.name,
        conditions=tuple(Condition(**c) for c in json.loads(row.conditions or "[]")),
        destination_kind=row.destination_kind, destination=row.destination, destination_auth=row.destination_auth,
        transcode=row.transcode, deidentify=row.deidentify,
        morph=tuple(sorted(json.loads(row.morph or "{}").items())), stable_seconds=row.stable_seconds,
        enabled=row.enabled,
    )


# -- the queue ----------------------------------------------------------------------------------
def create_jobs(conn: Connection, routes: list[PlannedRoute], sop_uid: str, study_uid: str, now: datetime) -> None:
    """Inside the index transaction: one job per route; a stable-study route
    pushes back the study's jobs that have not been tried yet. *now* is
    when the instance was received; jobs are due by the database's clock."""
    if not routes:
        return
    # Every node compares next_attempt_at with the database's clock: one whose
    # own clock runs ahead would otherwise hold its jobs back that much.
    shared_now = db_now(conn)
    for route in routes:
        due = shared_now + timedelta(seconds=route.stable_seconds)
        values = {"rule_pk": route.rule_pk, "sop_uid": sop_uid, "study_uid": study_uid,
                  "destination_key": route.destination_key, "state": "pending", "attempts": 0,
                  "next_attempt_at": max(due, shared_now + timedelta(seconds=route.hold_seconds)),
                  "created_at": now, "updated_at": now}
        if not route.rule_name:
            insert_ignore(conn, jobs_t, values, ["rule_pk", "sop_uid"])
        elif not _insert_job_of_rule(conn, values, route.rule_name):
            continue  # the rule was removed (or its key given to another) since ingest cached it
        if route.stable_seconds:
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.rule_pk == route.rule_pk, jobs_t.c.study_uid == study_uid,
                       jobs_t.c.state == "pending", jobs_t.c.attempts == 0)
                .values(next_attempt_at=due)
            )


def _insert_job_of_rule(conn: Connection, values: dict[str, Any], rule_name: str) -> bool:
    """INSERT the job only if its rule still exists under that name; False if not.

    Inside the ingest's write transaction (SQLite holds the write lock by
    now); on PostgreSQL the rule's row is key-share locked, so a `route
    remove` waits for this transaction and counts its job."""
    found = conn.execute(
        select(rules_t.c.pk).where(rules_t.c.pk == values["rule_pk"], rules_t.c.name == rule_name)
        .with_for_update(key_share=True)
    ).scalar()
    if found is None:
        return False
    insert_ignore(conn, jobs_t, values, ["rule_pk", "sop_uid"])
    return True


def due_destinations(engine: Engine) -> list[str]:
    """Destinations with a job due now (by the database's clock)."""
    with engine.connect() as conn:
        now = db_now(conn)
        return [r[0] for r in conn.execute(
            select(jobs_t.c.destination_key).distinct()
            .where(jobs_t.c.state.in_(["pending", "sending"]), jobs_t.c.next_attempt_at <= now)
        )]


def claim(engine: Engine, destination_key: str, node: str, limit: int = 50, lease: timedelta = LEASE) -> list[Job]:
    """Claim due jobs of one destination; a job claimed here is invisible to
    every other node until it is finished or its lease expires (by the
    database's clock: a node whose clock runs ahead would take over jobs
    another node is still sending)."""
    # Reads, then writes: on SQLite a deferred transaction would fail at
    # once with "database is locked" if an ingest committed in between.
    with write_transaction(engine) as conn:
        now = db_now(conn)
        due = and_(jobs_t.c.destination_key == destination_key, jobs_t.c.state.in_(["pending", "sending"]),
                   jobs_t.c.next_attempt_at <= now)
        pks = conn.execute(
            select(jobs_t.c.pk).where(due).order_by(jobs_t.c.pk).limit(limit).with_for_update(skip_locked=True)
        ).scalars().all()
        if not pks:
            return []
        conn.execute(
            update(jobs_t).where(jobs_t.c.pk.in_(pks), due)
            .values(state="sending", claimed_by=node, next_attempt_at=now + lease, updated_at=now)
        )
        rows = conn.execute(
            select(jobs_t).where(jobs_t.c.pk.in_(pks), jobs_t.c.claimed_by == node, jobs_t.c.state == "sending")
            .order_by(jobs_t.c.pk)
        ).all()
    return [Job(r.pk, r.rule_pk, r.sop_uid, r.study_uid, r.attempts) for r in rows]


def extend(engine: Engine, pks: list[int], node: str, lease: timedelta = LEASE) -> None:
    """Keep *node*'s claim on jobs it is still sending: over a slow link a
    batch outlasts the lease, and another node would send them again."""
    if not pks:
        return
    with engine.begin() as conn:
        now = db_now(conn)
        conn.execute(update(jobs_t).where(jobs_t.c.pk.in_(pks), jobs_t.c.claimed_by == node,
                                          jobs_t.c.state == "sending").values(next_attempt_at=now + lease))


def finish(engine: Engine, job: Job) -> None:
    """The job's object reached its destination: done, whoever holds the job
    now. Unlike :func:`fail`, no claim is checked: a send that succeeded
    after its lease expired (another node took the job over, or an operator
    cancelled it as stuck) still delivered the object, and "done" says so;
    kept "sending" or "cancelled", the job would be sent again (the other
    node failing) or shown as never sent."""
    with engine.begin() as conn:
        now = db_now(conn)
        conn.execute(update(jobs_t).where(jobs_t.c.pk == job.pk).values(state="done", last_error="", updated_at=now))


def drop(engine: Engine, job: Job, reason: str, node: str) -> None:
    """Cancel a job *node* claimed whose object is no longer in the archive
    (deleted, purged, a key image selection replaced): there is nothing to
    deliver and nothing for an operator to retry. Only while *node*'s claim
    holds, as :func:`fail`."""
    with engine.begin() as conn:
        now = db_now(conn)
        conn.execute(update(jobs_t).where(jobs_t.c.pk == job.pk, jobs_t.c.state == "sending",
                                          jobs_t.c.claimed_by == node).values(
            state="cancelled", last_error=reason[:500], updated_at=now))


def cancel_jobs_of(conn: Connection, study_uid: str, sop_uids: list[str] | None, reason: str) -> int:
    """Inside a deletion's transaction: cancel the pending jobs of the study's
    instances *sop_uids* (None: of the whole study); how many."""
    now = db_now(conn)
    pending = and_(jobs_t.c.study_uid == study_uid, jobs_t.c.state == "pending")
    if sop_uids is None:
        chunks: list[list[str] | None] = [None]
    else:
        chunks = [sop_uids[i:i + 500] for i in range(0, len(sop_uids), 500)]
    cancelled = 0
    for chunk in chunks:
        where = pending if chunk is None else and_(pending, jobs_t.c.sop_uid.in_(chunk))
        cancelled += int(conn.execute(update(jobs_t).where(where).values(
            state="cancelled", last_error=reason[:500], updated_at=now)).rowcount)
    return cancelled


def follow_rejection(conn: Connection, study_uid: str, sop_uids: list[str], note_uid: str) -> int:
    """Inside a rejection note's transaction (pacs.rejections): a job sending
    the note to each destination a rule sent (or is sending) any of the
    withdrawn *sop_uids* to, under that rule, whatever its conditions, so
    that it withdraws them there too (IHE IOCM: the wrong patient's images
    forwarded to a reading site or an AI node). A rule that routes the note
    itself already has its job. How many jobs were made. Only as far as the
    done jobs are kept (``route_keep_days``)."""
    sent: set[tuple[int, str]] = set()
    for i in range(0, len(sop_uids), 500):
        sent.update((r.rule_pk, r.destination_key) for r in conn.execute(
            select(jobs_t.c.rule_pk, jobs_t.c.destination_key).distinct()
            .where(jobs_t.c.study_uid == study_uid, jobs_t.c.sop_uid.in_(sop_uids[i:i + 500]),
                   jobs_t.c.state.in_(("done", "sending")))))
    now = db_now(conn)
    made = 0
    for rule_pk, destination_key in sorted(sent):
        made += insert_ignore(conn, jobs_t, {
            "rule_pk": rule_pk, "sop_uid": note_uid, "study_uid": study_uid, "destination_key": destination_key,
            "state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now,
        }, ["rule_pk", "sop_uid"]) is not None
    return made


def fail(engine: Engine, job: Job, error: str, *, max_attempts: int, permanent: bool = False,
         retry_seconds: float = 1.0, node: str | None = None) -> str:
    """Back off (*retry_seconds* x 2^n, at most 10 min) or park as dead;
    returns the new state. *node*: only while that node's claim holds."""
    attempts = job.attempts + 1
    dead = permanent or attempts >= max_attempts
    with engine.begin() as conn:
        now = db_now(conn)
        # Only a job still being sent: one cancelled meanwhile (its lease had
        # expired) stays cancelled. And only by its sender: a node whose
        # claim expired must not put back a job another node now sends.
        claimed = (jobs_t.c.claimed_by == node,) if node is not None else ()
        conn.execute(
            update(jobs_t).where(jobs_t.c.pk == job.pk, jobs_t.c.state == "sending", *claimed).values(
                state="dead" if dead else "pending", attempts=attempts, last_error=error[:500],
                next_attempt_at=now + timedelta(seconds=min(600, retry_seconds * 2 ** min(attempts, 10))),
                updated_at=now,
            )
        )
    return "dead" if dead else "pending"


def postpone(engine: Engine, destination_key: str, pks: list[int], node: str, error: str, after: float) -> None:
    """The destination could not be reached (its link is down, it is
    stopped): the jobs *node* claimed, and the other jobs of the destination
    due before then, wait *after* seconds with *error*, no try counted.
    A try counts only when the destination was reached: counted here, a
    satellite whose link stayed down for route_max_attempts rounds (about 17
    minutes by default) had all its jobs parked dead, and nothing flowed once
    it was back until an operator retried them."""
    with engine.begin() as conn:
        now = db_now(conn)
        due = now + timedelta(seconds=after)
        if pks:
            conn.execute(update(jobs_t).where(jobs_t.c.pk.in_(pks), jobs_t.c.claimed_by == node,
                                              jobs_t.c.state == "sending").values(
                state="pending", next_attempt_at=due, last_error=error[:500], updated_at=now))
        # Not claimed one batch after another, each waiting for the same
        # connection timeout: the whole queue of a blackholed link waits.
        conn.execute(update(jobs_t).where(jobs_t.c.destination_key == destination_key, jobs_t.c.state == "pending",
                                          jobs_t.c.next_attempt_at < due).values(
            next_attempt_at=due, last_error=error[:500], updated_at=now))


def release(engine: Engine, pks: list[int], node: str, *, after: float = 0.0) -> None:
    """Put back jobs *node* claimed but will not send now, without counting
    a try: due at once, or in *after* seconds."""
    if not pks:
        return
    with engine.begin() as conn:
        now = db_now(conn)
        conn.execute(update(jobs_t).where(jobs_t.c.pk.in_(pks), jobs_t.c.claimed_by == node,
                                          jobs_t.c.state == "sending").values(
            state="pending", next_attempt_at=now + timedelta(seconds=after), updated_at=now))


def release_node(engine: Engine, node: str) -> int:
    """Put back what this node had claimed (start-up after a crash, shutdown)."""
    with engine.begin() as conn:
        now = db_now(conn)
        return int(conn.execute(
            update(jobs_t).where(jobs_t.c.claimed_by == node, jobs_t.c.state == "sending")
            .values(state="pending", next_attempt_at=now, updated_at=now)
        ).rowcount)


def list_jobs(engine: Engine, state: str = "", limit: int = 100) -> list[dict[str, Any]]:
    stmt = (select(jobs_t, rules_t.c.name.label("rule")).join(rules_t, rules_t.c.pk == jobs_t.c.rule_pk)
            .order_by(jobs_t.c.pk.desc()).limit(limit))
    if state:
        stmt = stmt.where(jobs_t.c.state == state)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {s: int(n) for s, n in conn.execute(select(jobs_t.c.state, func.count()).group_by(jobs_t.c.state))}


def retry(engine: Engine, *, pk: int | None = None, state: str = "dead") -> int:
    """Give dead (or cancelled) jobs another round; *pk*: that job, unless a
    node is sending it now (its claim not expired): reset, it was claimed
    and sent again by another node beside the one sending it."""
    with engine.begin() as conn:
        now = db_now(conn)
        stmt = update(jobs_t).values(state="pending", attempts=0, next_attempt_at=now, updated_at=now)
        if pk is None:
            stmt = stmt.where(jobs_t.c.state == state)
        else:
            stmt = stmt.where(jobs_t.c.pk == pk, or_(jobs_t.c.state != "sending", jobs_t.c.next_attempt_at <= now))
        return int(conn.execute(stmt).rowcount)


def prune(engine: Engine, older_than: timedelta, *, batch: int = 5000) -> int:
    """Delete finished jobs (done, cancelled) last changed more than
    *older_than* ago; returns how many. Dead jobs stay until retried or
    cancelled: they are what an operator has to see. Deleted in batches so
    that no transaction holds SQLite's write lock long while modalities send."""
    total = 0
    while True:
        with engine.begin() as conn:
            finished = (
                select(jobs_t.c.pk)
                .where(jobs_t.c.state.in_(("done", "cancelled")), jobs_t.c.updated_at < db_now(conn) - older_than)
                .limit(batch)
                .scalar_subquery()
            )
            deleted = int(conn.execute(delete(jobs_t).where(jobs_t.c.pk.in_(finished))).rowcount)
        total += deleted
        if deleted < batch:
            return total


def cancel(engine: Engine, *, pk: int | None = None, rule: str = "") -> int:
    """Cancel pending and dead jobs, and jobs left in ``sending`` whose lease
    expired (their sender is gone or stuck); one being sent keeps its lease
    renewed and is left alone."""
    with engine.begin() as conn:
        now = db_now(conn)
        stmt = update(jobs_t).values(state="cancelled", updated_at=now).where(or_(
            jobs_t.c.state.in_(["pending", "dead"]),
            and_(jobs_t.c.state == "sending", jobs_t.c.next_attempt_at <= now),
        ))
        if pk is not None:
            stmt = stmt.where(jobs_t.c.pk == pk)
        elif rule:
            stmt = stmt.where(jobs_t.c.rule_pk == select(rules_t.c.pk).where(rules_t.c.name == rule).scalar_subquery())
        return int(conn.execute(stmt).rowcount)


def without_userinfo(url: str) -> str:
    """A destination URL without the credentials it may carry: everything up
    to the authority's last "@" (a password typed with "/", "?" or "#" not
    percent-encoded ends the authority early as urlsplit reads it, which
    left part of it in what was shown). Anything but a URL is returned as is."""
    scheme, slashes, rest = url.partition("://")
    if not slashes or "@" not in rest:
        return url
    return f"{scheme}://{rest.rsplit('@', 1)[1]}"
