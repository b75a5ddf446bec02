"""The counters /metrics reads from the index (see :mod:`.tail`): objects
received, audit events, and refused C-STOREs (from the audit trail).

Every node counts every node's rows: a scrape of any node gives the whole
archive's rate (aggregate nodes with max, not sum).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, and_, case, literal, select

from ..index.models import AuditEvent, Instance, Series
from .exposition import Family
from .tail import LabelCounts, TableTail

instances_t = Instance.__table__
series_t = Series.__table__
events_t = AuditEvent.__table__
# Audit actions, protocols and outcomes are words the code writes; anything
# else (a future free-text value) is not made a label.
_WORD = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# The details pacs writes for refused C-STOREs (dicom_scp.server): the first
# refusal of a study and status on an association, and, when it ends, how
# many there were in all (the first one included).
_REFUSED = re.compile(r"C-STORE refused 0x([0-9A-F]{4})")
_IN_ALL = re.compile(r" for (\d+) instances on this association in all")


def _word(value: str | None) -> str:
    value = value or ""
    return value if _WORD.fullmatch(value) else "other"


def _text(value: str | None, limit: int = 64) -> str:
    """A peer's AE title (or another short value) as a label: printable, at most *limit* characters."""
    value = (value or "").strip()
    return "".join(c if c.isprintable() else "?" for c in value)[:limit]


def _instances_query(after: int) -> Any:
    return (select(instances_t.c.pk, series_t.c.modality, instances_t.c.calling_ae, instances_t.c.source)
            .join(series_t, series_t.c.pk == instances_t.c.series_pk)
            .where(instances_t.c.pk > after))


def _events_query(after: int) -> Any:
    # The detail only where it says how many C-STOREs were refused.
    refusal = and_(events_t.c.action == "store", events_t.c.protocol == "dicom", events_t.c.outcome != "success")
    return (select(events_t.c.pk, events_t.c.protocol, events_t.c.action, events_t.c.outcome,
                   case((refusal, events_t.c.detail), else_=literal("")).label("detail"))
            .where(events_t.c.pk > after))


def store_refusals(row: Any) -> tuple[str, int] | None:
    """A refused C-STORE's status and how many objects its audit event
    stands for; None for any other event."""
    if row.action != "store" or row.protocol != "dicom" or row.outcome == "success":
        return None
    detail = row.detail or ""
    match = _REFUSED.search(detail)
    # Refused by the AE's permissions (0124H): its detail says "store not permitted for AE".
    status = f"0x{match.group(1)}" if match else ("0x0124" if row.outcome == "denied" else "other")
    in_all = _IN_ALL.search(detail)
    # The closing event counts the refusals after the first one (recorded already).
    return status, int(in_all.group(1)) - 1 if in_all else 1


class IndexCounters:
    """The counters of one process, refreshed from the index on each scrape."""

    def __init__(self) -> None:
        self.received = LabelCounts(("modality", "calling_ae", "source"))
        self.events = LabelCounts(("protocol", "action", "outcome"))
        self.refused = LabelCounts(("status",))
        self._tails = (TableTail(instances_t.c.pk, _instances_query, self._instance),
                       TableTail(events_t.c.pk, _events_query, self._event))

    def _instance(self, row: Any) -> None:
        self.received.add((row.modality or "unknown", _text(row.calling_ae), _word(row.source)))

    def _event(self, row: Any) -> None:
        self.events.add((_word(row.protocol), _word(row.action), _word(row.outcome)))
        refused = store_refusals(row)
        if refused is not None:
            self.refused.add((refused[0],), refused[1])

    def refresh(self, conn: Connection) -> None:
        """Count what the index gained since the last refresh."""
        for tail in self._tails:
            tail.refresh(conn)

    def families(self) -> list[Family]:
        received = Family(
            "pacs_instances_received_total", "counter",
            "Objects newly indexed (any node) since this process started counting, per modality, calling AE "
            "title and source (dimse, stow, import...); a resent duplicate is not counted")
        events = Family("pacs_audit_events_total", "counter",
                        "Audit trail events written (any node) since this process started counting, per protocol, "
                        "action and outcome (success, failure, denied)")
        refused = Family("pacs_dicom_store_refused_total", "counter",
                         "C-STORE requests refused (any node) since this process started counting, per DIMSE "
                         "status, from the audit trail")
        for family, counts in ((received, self.received), (events, self.events), (refused, self.refused)):
            for labels, value in counts.samples():
                family.add(value, labels)
        return [received, events, refused]
