"""The figures /metrics reads from the shared index: the same on every node
and whichever process serves the scrape (DICOM workers and other nodes
write the same tables).

Each query is chosen to stay cheap on a large archive: the archive's size
comes from the study and series counters the triggers keep (as `pacs
stats`), the queues from their unfinished rows only (through the state
index: done routing jobs and sent messages, kept for weeks, are not
counted), the last arrival from the received-time index, the open
critical results from their own small table (a few per hundred reports).
Nothing here names a patient or a study: labels are modalities, AE titles,
routing destinations (without credentials) and states.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Connection, Engine, func, select, text

from ..critical_results import open_summary
from ..index.models import Instance, OutboundMessage, RouteJob, Series
from ..reads import archive_counts
from ..routing import without_userinfo
from .exposition import Family

# Routing jobs and outbox messages still to deliver, and those parked.
QUEUE_STATES = ("pending", "sending", "dead")
jobs_t = RouteJob.__table__
outbox_t = OutboundMessage.__table__
series_t = Series.__table__
instances_t = Instance.__table__
# The value of an age family (cached as a Unix time, see metrics.service)
# when nothing waits: rendered as an age of 0, so that the series exists for
# an alert while nothing waits.
NOTHING_WAITING = math.inf


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def archive_families(conn: Connection) -> list[Family]:
    """Patients, studies, series, instances and bytes held; instances,
    series and bytes per modality (from the series counters)."""
    counts = archive_counts(conn)
    families = [
        Family("pacs_patients", "gauge", "Patients with at least one study in the archive").add(counts.patients),
        Family("pacs_studies", "gauge", "Studies in the archive").add(counts.studies),
        Family("pacs_series", "gauge", "Series in the archive").add(counts.series),
        Family("pacs_instances", "gauge", "Instances (DICOM objects) in the archive").add(counts.instances),
        Family("pacs_stored_bytes", "gauge", "Bytes of the objects in the archive, as received").add(counts.bytes),
    ]
    by_series = Family("pacs_series_by_modality", "gauge", "Series in the archive per modality")
    by_instances = Family("pacs_instances_by_modality", "gauge", "Instances in the archive per modality")
    by_bytes = Family("pacs_stored_bytes_by_modality", "gauge", "Bytes in the archive per modality")
    for modality, series, instances, size in conn.execute(
        select(series_t.c.modality, func.count(), func.coalesce(func.sum(series_t.c.num_instances), 0),
               func.coalesce(func.sum(series_t.c.size_bytes), 0))
        .group_by(series_t.c.modality).order_by(series_t.c.modality)
    ):
        labels = {"modality": modality or "unknown"}
        by_series.add(series, labels)
        by_instances.add(instances, labels)
        by_bytes.add(size, labels)
    return [*families, by_series, by_instances, by_bytes]


def last_received_family(conn: Connection) -> Family:
    """When the newest object was received (any node, any protocol)."""
    newest = conn.execute(select(func.max(instances_t.c.received_at))).scalar()
    if isinstance(newest, str):  # SQLite's max() gives the stored text back
        newest = datetime.fromisoformat(newest)
    newest = _aware(newest)
    return Family("pacs_last_instance_received_timestamp_seconds", "gauge",
                  "Unix time the newest object in the archive was received (alert on time() minus it)"
                  ).add(_epoch(newest))


def critical_families(conn: Connection) -> list[Family]:
    """Critical results not acknowledged yet (pacs.critical_results), and
    when the oldest of them was flagged (turned into an age when rendered;
    0 when none is open)."""
    count, oldest = open_summary(conn)
    return [Family("pacs_critical_results_open", "gauge",
                   "Critical results flagged on signed reports whose acknowledgement (who was told, how) is not "
                   "recorded yet").add(count),
            Family("pacs_critical_results_oldest_open_age_seconds", "gauge",
                   "Seconds since the oldest unacknowledged critical result was flagged (0: none open)"
                   ).add(_epoch(oldest) if oldest is not None else NOTHING_WAITING)]


def destination_labels(key: str) -> dict[str, str]:
    """A routing job's destination as labels: its kind (dicom, dicomweb)
    and the AE title or the URL without user, password or query (a URL's
    credentials must not reach a monitoring system)."""
    kind, _, destination = key.partition(":")
    if kind == "dicomweb":
        parts = urlsplit(without_userinfo(destination))
        destination = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return {"kind": kind, "destination": destination}


def routing_families(conn: Connection) -> list[Family]:
    """Routing jobs pending, being sent and dead, per destination, and the
    creation time of the oldest unfinished one (turned into an age when
    rendered)."""
    jobs = Family("pacs_routing_jobs", "gauge",
                  "Routing jobs not yet delivered (pending, sending) or given up (dead), per destination")
    oldest = Family("pacs_routing_oldest_job_age_seconds", "gauge",
                    "Age of the oldest routing job per destination and state (pending, sending, dead)")
    # Destinations whose URLs differ only in what the labels leave out (user,
    # password, query) are one series: two samples of the same labels are a
    # duplicate Prometheus drops one of (dead jobs hidden behind a zero).
    merged: dict[tuple[str, str, str], tuple[int, datetime | None]] = {}
    # Grouped by state first: SQLite then reads the unfinished rows through
    # the state index (by destination first, it read every row, done ones too).
    for state, key, count, created in conn.execute(
        select(jobs_t.c.state, jobs_t.c.destination_key, func.count(), func.min(jobs_t.c.created_at))
        .where(jobs_t.c.state.in_(QUEUE_STATES))
        .group_by(jobs_t.c.state, jobs_t.c.destination_key)
    ):
        labels = destination_labels(key)
        group = (labels["kind"], labels["destination"], state)
        total, first = merged.get(group, (0, None))
        created = _aware(created)
        merged[group] = (total + count, created if first is None or (created is not None and created < first)
                         else first)
    for (kind, destination, state), (count, created) in merged.items():
        labels = {"kind": kind, "destination": destination, "state": state}
        jobs.add(count, labels)
        oldest.add(_epoch(created), labels)
    # Every state shown for each destination with jobs, 0 included: an alert
    # on dead jobs needs the series to exist while there are none.
    _fill_states(jobs, ("kind", "destination"))
    return [jobs, oldest]


def outbox_families(conn: Connection) -> list[Family]:
    """Outbox messages (HL7 to the HIS, storage commitment reports to
    modalities) pending, being sent and dead, per destination and kind,
    and the creation time of the oldest one."""
    messages = Family("pacs_outbox_messages", "gauge",
                      "Outbox messages not yet delivered (pending, sending) or given up (dead), per destination "
                      "(his: HL7 to the HIS; commitment: storage commitment reports) and kind")
    oldest = Family("pacs_outbox_oldest_message_age_seconds", "gauge",
                    "Age of the oldest outbox message per destination, kind and state")
    for state, destination, kind, count, created in conn.execute(
        select(outbox_t.c.state, outbox_t.c.destination, outbox_t.c.kind, func.count(),
               func.min(outbox_t.c.created_at))
        .where(outbox_t.c.state.in_(QUEUE_STATES))
        .group_by(outbox_t.c.state, outbox_t.c.destination, outbox_t.c.kind)  # by state first: see routing
    ):
        labels = {"destination": destination, "kind": kind, "state": state}
        messages.add(count, labels)
        oldest.add(_epoch(_aware(created)), labels)
    _fill_states(messages, ("destination", "kind"))
    return [messages, oldest]


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes: the index writes UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _fill_states(family: Family, keys: tuple[str, ...]) -> None:
    """A zero sample for each queue state a group of *keys* lacks, and the
    three states with no group label at all when the queue is empty."""
    groups = {tuple(labels[k] for k in keys) for _, labels, _ in family.samples}
    present = {(tuple(labels[k] for k in keys), labels["state"]) for _, labels, _ in family.samples}
    for group in sorted(groups):
        for state in QUEUE_STATES:
            if (group, state) not in present:
                family.add(0, {**dict(zip(keys, group, strict=True)), "state": state})


def index_size_family(conn: Connection, engine: Engine) -> Family:
    """Bytes the index database takes: the SQLite file and its -wal, or
    PostgreSQL's pg_database_size."""
    family = Family("pacs_index_database_bytes", "gauge", "Size of the index database (SQLite: file and -wal)")
    if conn.dialect.name == "postgresql":
        family.add(conn.execute(text("SELECT pg_database_size(current_database())")).scalar())
        return family
    database = engine.url.database or ""
    if database and database != ":memory:":
        total = 0
        for path in (database, database + "-wal"):
            try:
                total += os.stat(path).st_size
            except OSError:
                pass
        family.add(total)
    return family
