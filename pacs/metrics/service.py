"""What GET /metrics answers: the index's figures (cached), this node's.

The index is read by one scrape at a time, at most once per
``metrics_cache_seconds``: the scrapes meanwhile answer the last read, so
any number of scrapers costs the index one read per period. The read is
plain SELECTs (a SQLite WAL reader never blocks the writer; PostgreSQL
readers take no row locks), bounded on PostgreSQL by a statement timeout,
and an index that cannot be read gives ``pacs_index_up 0`` with this node's
own figures rather than an error.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from .. import __version__
from ..pixel_memory import PIXELS
from .counters import IndexCounters
from .exposition import Family, render
from .index_figures import (
    NOTHING_WAITING,
    archive_families,
    critical_families,
    index_size_family,
    last_received_family,
    outbox_families,
    routing_families,
)

if TYPE_CHECKING:
    from ..app import Pacs

log = logging.getLogger(__name__)
# PostgreSQL: a scrape never holds a connection longer than this.
STATEMENT_TIMEOUT_MS = 10_000
# An index that cannot be read is said in the log at most this often.
_LOG_EVERY = 300.0
_AGES = {"pacs_routing_oldest_job_age_seconds", "pacs_outbox_oldest_message_age_seconds",
         "pacs_critical_results_oldest_open_age_seconds"}


def process_start_time() -> float:
    """Unix time this process started (Linux: from /proc), else now."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # Field 22, after the command name in parentheses (which may hold spaces).
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class MetricsService:
    """The /metrics figures of one process."""

    def __init__(self, pacs: Pacs) -> None:
        self.pacs = pacs
        self.node = pacs.settings.node_name
        self.started = process_start_time()
        self.counters = IndexCounters()
        self._lock = threading.Lock()
        self._cached: list[Family] = []
        self._read_at = float("-inf")
        self._logged_at = float("-inf")

    def text(self, extra: list[Family]) -> str:
        """The exposition text: cached index figures, node figures and *extra*
        (the HTTP app's own counters), ages computed now."""
        now = time.time()
        families = [*self._snapshot(), *self._node_now(), *extra]
        return render(_with_ages(families, now))

    def _snapshot(self) -> list[Family]:
        """The cached figures, read again once older than the period. While
        one scrape reads, the others answer the previous read (they wait
        only for the first read of all): a storm of scrapes holds no
        threads of the HTTP server's pool behind the index."""
        if time.monotonic() - self._read_at < self.pacs.settings.metrics_cache_seconds:
            return self._cached
        if not self._lock.acquire(blocking=self._read_at == float("-inf")):
            return self._cached  # another scrape is reading: the previous figures
        try:
            if time.monotonic() - self._read_at >= self.pacs.settings.metrics_cache_seconds:
                self._cached = self._read()
                self._read_at = time.monotonic()
            return self._cached
        finally:
            self._lock.release()

    def _read(self) -> list[Family]:
        """Everything worth a cache: the index, the health probes, the disks."""
        started = time.perf_counter()
        up = Family("pacs_index_up", "gauge", "1 when the index database answered this scrape's reads, else 0")
        families: list[Family] = []
        try:
            with self.pacs.engine.connect() as conn, conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
                families += archive_families(conn)
                families.append(last_received_family(conn))
                families += routing_families(conn)
                families += outbox_families(conn)
                families += critical_families(conn)
                families.append(index_size_family(conn, self.pacs.engine))
                self.counters.refresh(conn)
            families += self.counters.families()
            up.add(1, {"node": self.node})
        except SQLAlchemyError as exc:
            families = []
            up.add(0, {"node": self.node})
            if time.monotonic() - self._logged_at >= _LOG_EVERY:
                self._logged_at = time.monotonic()
                log.warning("/metrics: the index could not be read: %s", str(exc).splitlines()[0][:300])
        read = Family("pacs_metrics_index_read_seconds", "gauge",
                      "Seconds the last read of the index's figures for /metrics took")
        read.add(round(time.perf_counter() - started, 6), {"node": self.node})
        return [up, read, *families, *self._health(), *self._disks()]

    def _health(self) -> list[Family]:
        from ..app import health

        family = Family("pacs_health_ok", "gauge",
                        "1 when this node's check passes (as /health: index reachable; store writable and above "
                        "min_free_bytes), else 0")
        for check, result in health(self.pacs).items():
            family.add(1 if result == "ok" else 0, {"node": self.node, "check": check})
        return [family]

    def _disks(self) -> list[Family]:
        settings = self.pacs.settings
        free = Family("pacs_filesystem_free_bytes", "gauge",
                      "Free bytes (for this user) of the filesystem holding: objects (a filesystem store), "
                      "data (the data dir), index (a SQLite index)")
        size = Family("pacs_filesystem_size_bytes", "gauge", "Size of the same filesystems")
        paths = {"data": str(settings.data_dir)}
        root = getattr(self.pacs.store, "root", None)
        if root is not None and not self.pacs.store.remote:
            paths["objects"] = str(root)
        database = self.pacs.engine.url.database or ""
        if self.pacs.engine.dialect.name == "sqlite" and database and database != ":memory:":
            paths["index"] = os.path.dirname(os.path.abspath(database))
        for volume, path in paths.items():
            try:
                usage = shutil.disk_usage(path)
            except OSError:
                continue
            labels = {"node": self.node, "volume": volume}
            free.add(usage.free, labels)
            size.add(usage.total, labels)
        floor = Family("pacs_storage_min_free_bytes", "gauge",
                       "min_free_bytes: below this much free space new objects are refused (C-STORE 0xA700)")
        return [free, size, floor.add(settings.min_free_bytes, {"node": self.node})]

    def _node_now(self) -> list[Family]:
        """This process's figures, read at each scrape (cheap)."""
        settings = self.pacs.settings
        node = {"node": self.node}
        families = [
            Family("pacs_build_info", "gauge", "The running version (value 1)").add(
                1, {"version": __version__, "python": platform.python_version()}),
            Family("pacs_node_info", "gauge", "This node's name, AE title and backends (value 1)").add(
                1, {**node, "ae_title": settings.ae_title, "index": self.pacs.engine.dialect.name,
                    "storage": "s3" if self.pacs.store.remote else "file"}),
            Family("process_start_time_seconds", "gauge", "Unix time this process started").add(self.started, node),
            Family("pacs_dicom_associations_open", "gauge",
                   "DICOM associations (connections) open on this node, all its DICOM worker processes together"
                   ).add(self.pacs.live.dicom_open(), node),
            Family("pacs_dicom_max_associations", "gauge", "max_associations: DICOM associations this node takes "
                   "at once").add(settings.max_associations, node),
        ]
        pixels = PIXELS.stats()
        memory = Family("pacs_conversion_memory_bytes", "gauge",
                        "Decoded pixels this process's conversions hold now (see conversion_memory_bytes)")
        memory.add(pixels.get("in_use"), node)
        waiting = Family("pacs_conversions_waiting", "gauge", "Conversions of this process waiting for memory now")
        waiting.add(pixels.get("waiting"), node)
        refused = Family("pacs_conversions_refused_total", "counter",
                         "Conversions of this process refused after waiting conversion_wait_seconds (HTTP 503)")
        refused.add(pixels.get("refused"), node)
        return [*families, memory, waiting, refused]


def _with_ages(families: list[Family], now: float) -> list[Family]:
    """The age families (cached as Unix times) as seconds before *now*;
    0 where nothing waits (NOTHING_WAITING)."""
    out = []
    for family in families:
        if family.name in _AGES:
            aged = Family(family.name, family.kind, family.help)
            aged.samples = [(suffix, labels, 0.0 if value == NOTHING_WAITING else max(0.0, round(now - value, 3)))
                            for suffix, labels, value in family.samples]
            family = aged
        out.append(family)
    return out
