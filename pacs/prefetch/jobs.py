"""The prefetch queue: one row per new order, run by one node at a time.

A job is queued in the transaction that places the order
(:func:`enqueue_for_order`), so an order the HIS was told is accepted always
has its job, and a message refused leaves none. A node claims a due job with
a conditional UPDATE (state, due time or expired lease in its WHERE clause:
atomic on SQLite and PostgreSQL alike) that writes its claim (``claimed_by``:
the node and a token of this claim) and a lease it renews while it runs
(:class:`Heartbeat`); every later write of the run names that claim, so a
node whose lease ran out (stalled, or killed: another node took the job
over) changes nothing any more. At most one job of a patient runs at once
(its rows are locked while one is claimed): two orders for one patient
placed together do not fetch the same priors twice in parallel.

A run that did not finish (an old PACS down, a study it could not send
whole) is pending again after ``prefetch_retry_seconds``, doubled per try
(at most :data:`RETRY_MAX`), and dead after ``prefetch_max_attempts`` tries;
``pacs prefetch retry`` gives it another round. The job's ``progress``
(what each source was asked, each prior's outcome) is kept, so the next
run fetches only what is still missing.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, String, and_, case, delete, false, func, or_, select, update

from ..index.db import db_now, write_transaction
from ..index.models import Order, Patient, PatientIdentifier, PrefetchJob

log = logging.getLogger(__name__)

jobs_t = PrefetchJob.__table__
orders_t = Order.__table__
patients_t = Patient.__table__
identifiers_t = PatientIdentifier.__table__

STATES = ("pending", "running", "done", "dead")
# The longest wait between two tries of a job: an old PACS down for the
# night is asked again within the hour of its return.
RETRY_MAX = 3600.0
# Finished jobs are kept this long (what came for an order, for `pacs prefetch list`).
KEEP_DONE = timedelta(days=30)
# The last error of a job whose node stopped while running it.
DIED = "the server stopped while running it (killed or crashed)"
# Orders whose steps are all withdrawn need no priors.
WITHDRAWN = ("CANCELLED", "DISCONTINUED")


@dataclass(frozen=True)
class Job:
    """A claimed job: what to fetch, and the claim its writes must name."""

    pk: int
    patient_id: str
    issuer: str
    other_ids: list[tuple[str, str, str]]
    modalities: list[str]
    accession: str
    attempts: int
    claim: str
    progress: dict[str, Any] = field(default_factory=dict)

    def identifiers(self, trusted: Collection[str] = ("*",)) -> list[str]:
        """The patient ID values to search the old PACS by: the patient ID,
        then each other identifier whose type or issuer is *trusted* (the
        ``prefetch_other_ids`` setting: a citizen ID the old PACS filed the
        patient under), each once. A value with a wildcard or a backslash
        would match other patients (or several values): left out."""
        values = [self.patient_id, *(value for value, _issuer, _type in self.trusted_others(trusted))]
        return [v for v in dict.fromkeys(v.strip() for v in values) if v and not any(c in v for c in "*?\\")]

    def trusted_others(self, trusted: Collection[str] = ("*",)) -> list[tuple[str, str, str]]:
        """The other identifiers (value, issuer, type) whose type or issuer
        is *trusted* (see :meth:`identifiers`)."""
        allowed = {t.upper() for t in trusted}
        return [(value, issuer, id_type) for value, issuer, id_type in self.other_ids
                if "*" in allowed or id_type.upper() in allowed or issuer.upper() in allowed]


def _is_due(now: datetime) -> Any:
    """WHERE clause: a job a node may claim now (pending and due, or
    running under a lease that ran out: its node died or stalled)."""
    return or_(and_(jobs_t.c.state == "pending", jobs_t.c.next_attempt_at <= now),
               and_(jobs_t.c.state == "running", jobs_t.c.lease_until < now))


def _held(job: Job) -> Any:
    """WHERE clause: *job*'s row still carries its holder's claim."""
    return and_(jobs_t.c.pk == job.pk, jobs_t.c.state == "running", jobs_t.c.claimed_by == job.claim)


def _job(row: Any, claim: str, attempts: int) -> Job:
    return Job(pk=int(row.pk), patient_id=row.patient_id, issuer=row.issuer,
               other_ids=[tuple(o) for o in json.loads(row.other_ids or "[]")],  # type: ignore[misc]
               modalities=[m for m in (row.modality or "").split("\\") if m], accession=row.accession_number,
               attempts=attempts, claim=claim, progress=json.loads(row.progress or "{}"))


def _claim_token(node: str) -> str:
    return f"{node} {uuid.uuid4().hex[:12]}"


# -- queueing ---------------------------------------------------------------------------
def enqueue(conn: Connection, *, patient_id: str, issuer: str = "", other_ids: list[tuple[str, str, str]] | None = None,
            modalities: list[str] | None = None, accession: str = "") -> int:
    """Queue a job in *conn*'s transaction, due now; its pk."""
    now = db_now(conn)
    return int(conn.execute(jobs_t.insert().values(
        patient_id=patient_id, issuer=issuer, other_ids=json.dumps(list(other_ids or []), ensure_ascii=False),
        modality="\\".join(modalities or []), accession_number=accession, state="pending", attempts=0,
        next_attempt_at=now, claimed_by="", lease_until=None, last_error="", progress="{}",
        created_at=now, updated_at=now,
    )).inserted_primary_key[0])


@dataclass(frozen=True)
class _Ordered:
    """What an order asks for now: its patient's ID, issuer and other
    identifiers as the index holds them, and the modalities of its steps."""

    patient_id: str
    issuer: str
    other_ids: list[tuple[str, str, str]]
    modalities: list[str]


def _ordered(conn: Connection, accession: str) -> _Ordered | str:
    """The order *accession* as it stands (:class:`_Ordered`), else why
    nothing is to be fetched for it: "gone" (no such order), "withdrawn"
    (every step cancelled or discontinued), "no patient ID"."""
    steps = conn.execute(select(orders_t.c.modality, orders_t.c.status, orders_t.c.patient_pk)
                         .where(orders_t.c.accession_number == accession).order_by(orders_t.c.pk)).all()
    if not steps:
        return "gone"
    if all(step.status in WITHDRAWN for step in steps):
        return "withdrawn"
    patient = conn.execute(select(patients_t.c.pk, patients_t.c.patient_id, patients_t.c.issuer)
                           .where(patients_t.c.pk == steps[0].patient_pk)).first()
    if patient is None or not patient.patient_id:
        return "no patient ID"
    others = conn.execute(select(identifiers_t.c.value, identifiers_t.c.issuer, identifiers_t.c.id_type)
                          .where(identifiers_t.c.patient_pk == patient.pk).order_by(identifiers_t.c.pk)).all()
    modalities = sorted({step.modality for step in steps if step.modality and step.status not in WITHDRAWN})
    return _Ordered(patient.patient_id, patient.issuer, [(o.value, o.issuer, o.id_type) for o in others],
                    modalities)


def enqueue_for_order(conn: Connection, accession: str) -> int | None:
    """Queue the prefetch of the priors of the new order *accession* in the
    transaction placing it (pacs.orders): its patient's ID, issuer and other
    identifiers as the index holds them now, and the modalities of its
    steps. None when nothing is to be fetched (no such order, every step
    withdrawn, a patient without an ID)."""
    ordered = _ordered(conn, accession)
    if isinstance(ordered, str):
        return None
    return enqueue(conn, patient_id=ordered.patient_id, issuer=ordered.issuer, other_ids=ordered.other_ids,
                   modalities=ordered.modalities, accession=accession)


def as_ordered(engine: Engine, job: Job) -> Job | None:
    """*job* as its order stands when it runs, or None when every step of
    the order was withdrawn since it was queued (the HIS cancelled it: no
    examination needs the priors). The patient's identifiers and the
    ordered modalities are read again, and recorded on the job's row under
    its claim: an ADT^A40 merge moves the order to the surviving patient and
    an ADT^A08 gives the hospital number to a patient registered by citizen
    ID, and the identifiers of the queueing time missed the priors the old
    PACS holds under the patient's own. A job run by hand, or whose order is
    gone, runs as it was queued."""
    if not job.accession:
        return job
    with engine.begin() as conn:
        ordered = _ordered(conn, job.accession)
        if ordered == "withdrawn":
            return None
        if isinstance(ordered, str):
            return job
        if (ordered.patient_id, ordered.issuer, ordered.other_ids, ordered.modalities) == (
                job.patient_id, job.issuer, job.other_ids, job.modalities):
            return job
        conn.execute(update(jobs_t).where(_held(job)).values(
            patient_id=ordered.patient_id, issuer=ordered.issuer,
            other_ids=json.dumps(ordered.other_ids, ensure_ascii=False), modality="\\".join(ordered.modalities),
            updated_at=db_now(conn)))
    return replace(job, patient_id=ordered.patient_id, issuer=ordered.issuer, other_ids=ordered.other_ids,
                   modalities=ordered.modalities)


def enqueue_claimed(engine: Engine, node: str, lease: timedelta, *, patient_id: str, issuer: str = "",
                    other_ids: list[tuple[str, str, str]] | None = None) -> Job:
    """A job queued and claimed by the caller at once (``pacs prefetch
    run``: one patient now); if the caller stops before finishing it, any
    node's worker takes it over once the lease has run out."""
    claim = _claim_token(node)
    with write_transaction(engine) as conn:
        pk = enqueue(conn, patient_id=patient_id, issuer=issuer, other_ids=other_ids)
        conn.execute(update(jobs_t).where(jobs_t.c.pk == pk).values(
            state="running", attempts=1, claimed_by=claim, lease_until=db_now(conn) + lease))
        row = conn.execute(select(jobs_t).where(jobs_t.c.pk == pk)).one()
    return _job(row, claim, 1)


# -- claiming ---------------------------------------------------------------------------
def claim_next(engine: Engine, node: str, lease: timedelta, max_attempts: int | None = None) -> Job | None:
    """Claim the job due longest (see the module docstring); None when no
    job is due, or each due one is another node's or waits for another
    job of its patient. A job whose holder died (lease run out) after
    *max_attempts* tries is made dead instead (see :func:`claim`)."""
    with engine.connect() as conn:
        candidates = conn.execute(select(jobs_t.c.pk).where(_is_due(db_now(conn)))
                                  .order_by(jobs_t.c.next_attempt_at, jobs_t.c.pk).limit(20)).scalars().all()
    for pk in candidates:
        job = claim(engine, int(pk), node, lease, max_attempts)
        if job is not None:
            return job
    return None


def _died_running(attempts: Any) -> Any:
    """The last error of a job whose run ended with its node (see release_node)."""
    return func.substr(f"{DIED} (try " + func.cast(attempts, String) + "); " + jobs_t.c.last_error, 1, 1000)


def claim(engine: Engine, pk: int, node: str, lease: timedelta, max_attempts: int | None = None) -> Job | None:
    """Claim job *pk* if it is due and no other job of its patient runs;
    the job with its claim (its try counted), or None. A running job whose
    lease ran out (its node died in the run, never finished it) that has had
    *max_attempts* tries is made dead, not claimed: a job that kills the
    node running it (memory, a crash in a codec) would otherwise go from node
    to node forever, its tries counted by each claim but never ended."""
    with write_transaction(engine) as conn:
        key = conn.execute(select(jobs_t.c.patient_id, jobs_t.c.issuer).where(jobs_t.c.pk == pk)).first()
        if key is None:
            return None
        if max_attempts is not None:
            now = db_now(conn)
            if conn.execute(update(jobs_t).where(
                    jobs_t.c.pk == pk, jobs_t.c.state == "running", jobs_t.c.lease_until < now,
                    jobs_t.c.attempts >= max_attempts).values(
                    state="dead", last_error=_died_running(jobs_t.c.attempts), lease_until=None,
                    updated_at=now)).rowcount:
                log.error("prefetch job %d: dead, its node stopped while running it on its last try "
                          "(pacs prefetch retry --id %d to try again)", pk, pk)
                return None
        same_patient = and_(jobs_t.c.patient_id == key.patient_id, jobs_t.c.issuer == key.issuer)
        if conn.dialect.name == "postgresql":
            # The patient's rows, locked in one order: a node claiming
            # another job of the patient waits here, then sees this claim.
            conn.execute(select(jobs_t.c.pk).where(same_patient).order_by(jobs_t.c.pk).with_for_update())
        now = db_now(conn)
        running = conn.execute(select(jobs_t.c.pk).where(
            same_patient, jobs_t.c.pk != pk, jobs_t.c.state == "running", jobs_t.c.lease_until >= now).limit(1)).first()
        if running is not None:
            return None
        token = _claim_token(node)
        won = conn.execute(update(jobs_t).where(jobs_t.c.pk == pk, _is_due(now)).values(
            state="running", attempts=jobs_t.c.attempts + 1, claimed_by=token, lease_until=now + lease,
            updated_at=now)).rowcount
        if not won:
            return None
        row = conn.execute(select(jobs_t).where(jobs_t.c.pk == pk)).one()
    return _job(row, token, int(row.attempts))


def renew(engine: Engine, job: Job, lease: timedelta) -> bool:
    """Extend *job*'s lease; False when the claim is no longer its holder's."""
    with engine.begin() as conn:
        return bool(conn.execute(update(jobs_t).where(_held(job)).values(
            lease_until=db_now(conn) + lease)).rowcount)


def save_progress(engine: Engine, job: Job, progress: dict[str, Any]) -> bool:
    """Record what the run did so far (a crash keeps it); False when the
    claim passed to another node."""
    with engine.begin() as conn:
        return bool(conn.execute(update(jobs_t).where(_held(job)).values(
            progress=json.dumps(progress, ensure_ascii=False), updated_at=db_now(conn))).rowcount)


def still_held(conn: Connection, job: Job) -> bool:
    """In *conn*'s transaction: whether *job*'s claim is still its holder's.
    On PostgreSQL its row stays locked until commit: no node takes the job
    over while the transaction writes for it (SQLite: the transaction holds
    the one write lock already, see write_transaction)."""
    query = select(jobs_t.c.pk).where(_held(job))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).first() is not None


def retry_delay(attempts: int, base: float) -> float:
    """Seconds before try *attempts* + 1: *base* doubled per try, at most RETRY_MAX."""
    return min(RETRY_MAX, base * 2 ** max(0, min(attempts - 1, 30)))


def finish(engine: Engine, job: Job, progress: dict[str, Any], *, complete: bool, error: str, max_attempts: int,
           retry_seconds: float) -> str | None:
    """End a run: done, pending again after the backoff, or dead after
    *max_attempts* tries. The new state; None (nothing changed) when the
    claim passed to another node meanwhile."""
    state = "done" if complete else "dead" if job.attempts >= max_attempts else "pending"
    with engine.begin() as conn:
        now = db_now(conn)
        due = now + timedelta(seconds=retry_delay(job.attempts, retry_seconds)) if state == "pending" else now
        changed = conn.execute(update(jobs_t).where(_held(job)).values(
            state=state, progress=json.dumps(progress, ensure_ascii=False), last_error=error[:1000],
            next_attempt_at=due, lease_until=None, updated_at=now)).rowcount
    if not changed:
        log.warning("prefetch job %d: its claim ran out and passed to another node; its outcome is not recorded "
                    "here", job.pk)
        return None
    return state


def release(engine: Engine, job: Job) -> bool:
    """Give a job back unfinished without counting the try (the server is
    stopping): pending, due at once."""
    with engine.begin() as conn:
        now = db_now(conn)
        return bool(conn.execute(update(jobs_t).where(_held(job)).values(
            state="pending", attempts=jobs_t.c.attempts - 1, next_attempt_at=now, lease_until=None,
            updated_at=now)).rowcount)


def release_node(engine: Engine, node: str, max_attempts: int | None = None) -> int:
    """Jobs this node was running when it stopped without giving them back
    (a crash, a kill: a clean stop releases its job, see :func:`release`):
    due again now, or dead after *max_attempts* tries; how many. The try
    counts: not counted, a job that kills the server each time it runs
    (memory, a crash in a codec) kept it restarting forever."""
    with engine.begin() as conn:
        now = db_now(conn)
        last = jobs_t.c.attempts >= max_attempts if max_attempts is not None else false()
        return int(conn.execute(update(jobs_t).where(
            jobs_t.c.state == "running", func.substr(jobs_t.c.claimed_by, 1, len(node) + 1) == f"{node} ").values(
            state=case((last, "dead"), else_="pending"), last_error=_died_running(jobs_t.c.attempts),
            next_attempt_at=now, lease_until=None, updated_at=now)).rowcount)


class Heartbeat:
    """Renews a claimed job's lease every third of it while the job runs,
    in a thread of its own; :attr:`lost` once the claim is no longer ours."""

    def __init__(self, engine: Engine, job: Job, lease: timedelta) -> None:
        self.engine, self.job, self.lease = engine, job, lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"prefetch-lease-{job.pk}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.lease.total_seconds() / 3, 0.1)):
            try:
                if not renew(self.engine, self.job, self.lease):
                    self.lost = True
                    log.error("prefetch job %d: lease lost (another node took it over)", self.job.pk)
                    return
            except Exception as exc:  # noqa: BLE001 - the index may answer again before the lease runs out
                log.warning("prefetch job %d: lease renewal failed (%s), retrying", self.job.pk,
                            exc.__class__.__name__)

    @contextmanager
    def running(self) -> Iterator[Heartbeat]:
        """Renew while the block runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


# -- operators --------------------------------------------------------------------------
def retry(engine: Engine, *, pk: int | None = None) -> list[int]:
    """Make jobs due now: job *pk* when pending (waiting for its next try)
    or dead, else every dead job. A dead job's tries are counted afresh.
    The ids retried (a running or done job is not)."""
    wanted = ("pending", "dead") if pk is not None else ("dead",)
    with write_transaction(engine) as conn:
        now = db_now(conn)
        which = [jobs_t.c.state.in_(wanted), *([jobs_t.c.pk == pk] if pk is not None else [])]
        rows = conn.execute(select(jobs_t.c.pk, jobs_t.c.state).where(*which)).all()
        for row in rows:
            values: dict[str, Any] = {"state": "pending", "next_attempt_at": now, "updated_at": now}
            if row.state == "dead":
                values.update(attempts=0, last_error=func.substr("retried by an operator; " + jobs_t.c.last_error,
                                                                   1, 1000))
            conn.execute(update(jobs_t).where(jobs_t.c.pk == row.pk, jobs_t.c.state == row.state).values(**values))
    return [int(row.pk) for row in rows]


def state_of(engine: Engine, pk: int) -> str | None:
    """A job's state, or None when there is no such job."""
    with engine.connect() as conn:
        return conn.execute(select(jobs_t.c.state).where(jobs_t.c.pk == pk)).scalar()


def depth(engine: Engine) -> dict[str, int]:
    """Jobs per state."""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs_t.c.state, func.count()).group_by(jobs_t.c.state)).all()
    return {state: int(n) for state, n in rows}


def summary(progress: dict[str, Any]) -> dict[str, Any]:
    """What a job's progress says, in counts: priors found at the sources,
    chosen, retrieved, already here, still missing; the sources asked."""
    studies = progress.get("studies", {})
    chosen = [studies[uid] for uid in progress.get("chosen", []) if uid in studies]
    states = [s.get("state", "") for s in chosen]
    return {"found": len(studies), "chosen": len(chosen), "retrieved": states.count("pulled"),
            "already_here": states.count("complete"),
            "missing": sum(1 for s in states if s not in ("pulled", "complete")),
            "instances": sum(int(s.get("instances", 0) or 0) for s in chosen),
            # Found by a citizen ID the old PACS filed them under, and filed under the patient (.filing).
            "filed": sum(1 for s in chosen if s.get("filing") == "filed"),
            "searched": list(progress.get("searched", []))}


def list_jobs(engine: Engine, state: str = "", limit: int = 100, pk: int | None = None) -> list[dict[str, Any]]:
    """Jobs for an operator, newest first: order, patient ID, state, tries,
    next try, last error, and what came (:func:`summary`)."""
    stmt = select(jobs_t).order_by(jobs_t.c.pk.desc()).limit(limit)
    if state:
        stmt = stmt.where(jobs_t.c.state == state)
    if pk is not None:
        stmt = stmt.where(jobs_t.c.pk == pk)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    listed = []
    for row in rows:
        progress = json.loads(row.progress or "{}")
        studies = progress.get("studies", {})
        listed.append({
            "id": int(row.pk), "accession": row.accession_number, "patient_id": row.patient_id,
            "issuer": row.issuer, "modality": row.modality, "state": row.state, "attempts": row.attempts,
            "next_attempt_at": row.next_attempt_at if row.state == "pending" else None,
            "node": (row.claimed_by or "").rsplit(" ", 1)[0], "last_error": row.last_error or "",
            "created_at": row.created_at, "updated_at": row.updated_at, **summary(progress),
            # What a source's answers may have left out (cut short even for a single day).
            "notes": list(progress.get("notes", [])),
            "studies": [{"study_uid": uid, **{k: studies[uid].get(k) for k in
                                              ("source", "date", "patient_id", "modalities", "state", "detail",
                                               "instances", "filing", "filing_detail")}}
                        for uid in progress.get("chosen", []) if uid in studies],
        })
    return listed


def prune(engine: Engine, keep: timedelta = KEEP_DONE) -> int:
    """Delete done jobs last changed more than *keep* ago; how many."""
    with engine.begin() as conn:
        return int(conn.execute(delete(jobs_t).where(jobs_t.c.state == "done",
                                                     jobs_t.c.updated_at < db_now(conn) - keep)).rowcount)
