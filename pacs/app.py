"""The application object: settings, storage, index and the services on them.

One :class:`Pacs` per process; entry points (DIMSE, HTTP, HL7, CLI) receive it
and call its services. It is the only holder of shared mutable state.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from storage import ObjectStore, open_store

from .aes import AeRegistry, parse_services
from .audit import AuditTrail
from .auth import AuthService
from .errors import IngestError
from .index import create_index_engine
from .index.schema import prepare_schema
from .index.committer import GroupCommitter
from .index.db import is_sqlite
from .index.writer import IndexWriter
from .ingest import Ingestor, IngestResult, Origin
from .instance_locks import InstanceFileLocks
from .metrics.live import NodeFigures
from .part10 import FileSource
from .pixel_memory import PIXELS
from .reads import IndexReader
from .routing import RoutingRules, load_rule
from .settings import Settings
from .recent_keys import RecentKeys
from .tls import certificate_pin

log = logging.getLogger(__name__)


@dataclass
class Pacs:
    settings: Settings
    engine: Engine
    store: ObjectStore
    reader: IndexReader
    aes: AeRegistry
    committer: GroupCommitter
    ingestor: Ingestor
    audit: AuditTrail
    auth: AuthService
    _closed: bool = field(default=False, repr=False)
    # This node's live figures for /metrics (pacs serve registers its DICOM listeners).
    live: NodeFigures = field(default_factory=NodeFigures, repr=False)
    # Structured reports read once for a study's dose summary and found to hold no dose report (by instance,
    # storage key and checksum): a page load does not read them again (pacs.sr_reads.study_dose).
    sr_without_dose: RecentKeys = field(default_factory=lambda: RecentKeys(50_000), repr=False)
    # (user, patient, hour) a worklist answer showed: the viewer's automatic refresh names in its audit event only
    # the patients its user was not shown in that hour (viewer_api.ui_api.worklist).
    patients_shown: RecentKeys = field(default_factory=lambda: RecentKeys(200_000), repr=False)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True, upgrade: bool = False, others: str = "",
             create_store: bool = True) -> Pacs:
        """Open storage and index and start the committer. A new index is
        created (unless not *migrate*); an older one is upgraded only with
        *upgrade* and no *others* (see :func:`pacs.index.schema.prepare_schema`).
        A missing S3 bucket is created only with *create_store*."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_index_engine(settings.resolved_index_url)
        if migrate:
            try:
                prepare_schema(engine, upgrade=upgrade, others=others)
            except BaseException:
                engine.dispose()
                raise
        store = open_store(
            settings.resolved_storage_url,
            access_key=settings.s3_access_key or os.environ.get("PACS_S3_ACCESS_KEY"),
            secret_key=settings.s3_secret_key or os.environ.get("PACS_S3_SECRET_KEY"),
            create=create_store,
            cache_dir=settings.resolved_s3_cache_dir,
            cache_bytes=settings.s3_cache_bytes,
        )
        reader = IndexReader(engine)
        committer = GroupCommitter(
            engine,
            IndexWriter(overwrite=settings.duplicate_policy == "overwrite"),
            batch_max=settings.commit_batch_max,
        )
        ingestor = Ingestor(
            store,
            committer,
            reader,
            overwrite=settings.duplicate_policy == "overwrite",
            max_object_bytes=settings.max_object_bytes,
            min_free_bytes=settings.min_free_bytes,
            # One node (a local store, or a SQLite index): its processes
            # serialise copies of one instance among themselves.
            instance_locks=(InstanceFileLocks(settings.data_dir / "locks")
                            if not store.remote or is_sqlite(engine) else None),
        )
        ingestor.routes = RoutingRules(engine, settings.route_rules_refresh_seconds)
        for entry in settings.route:
            load_rule(ingestor.routes, entry)
        # One budget for the process's conversions, whichever archive opened last.
        PIXELS.configure(settings.conversion_memory_bytes, settings.conversion_wait_seconds)
        aes = AeRegistry(engine)
        for entry in settings.ae:
            # The config file is the truth for its AEs: services and pin as written (none: no pin).
            aes.add(entry.title, entry.host, entry.port, entry.description, tls=entry.tls,
                    services=parse_services(entry.services),
                    cert_sha256=certificate_pin(entry.client_cert) if entry.client_cert else None,
                    forget_cert=not entry.client_cert, charset=entry.charset)
        return cls(settings, engine, store, reader, aes, committer, ingestor, AuditTrail(engine), AuthService(engine))

    def ingest_file(self, path: Path, origin: Origin, *, look_up_first: bool = False) -> IngestResult:
        """Ingest one Part 10 file from disk (import, tests); *look_up_first*:
        see :meth:`pacs.ingest.Ingestor.ingest`."""
        return self.ingestor.ingest(FileSource(path), origin, look_up_first=look_up_first)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.audit.close()
        self.committer.close()
        self.reader.close()
        self.store.close()
        self.engine.dispose()


# Below this much free space where the SQLite index lives, commits start to
# fail ("database or disk is full", every C-STORE refused 0xA703) while
# SELECT 1 still answers: /health says so before a load balancer sends more.
# Never more than the store's own mark (min_free_bytes): an index beside the
# store, with the mark lowered, was "full" while every C-STORE succeeded.
INDEX_MIN_FREE_BYTES = 64 * 1024**2


def index_disk_full(pacs: Pacs) -> str | None:
    """"error: ..." when the filesystem of a SQLite index file has less than
    :data:`INDEX_MIN_FREE_BYTES` (or the lower ``min_free_bytes``) free, else
    None (also for a server index such as PostgreSQL, whose disk is not ours
    to see, and in-memory SQLite)."""
    url = pacs.engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (uri=true)
        database = database[len("file:"):].split("?", 1)[0]
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    directory = os.path.dirname(os.path.abspath(database))
    try:
        st = os.statvfs(directory)
    except OSError:
        return None  # the SELECT 1 above is the judge of a missing directory
    free = st.f_bavail * st.f_frsize
    needed = min(INDEX_MIN_FREE_BYTES, pacs.settings.min_free_bytes)
    if free >= needed:
        return None
    return (f"error: disk full: {free} bytes free where the index is ({directory}), "
            f"under the {needed} it needs to take new objects")


def health(pacs: Pacs) -> dict[str, str]:
    """Probe index and storage; each entry is "ok" or the error text."""
    from sqlalchemy import text

    report: dict[str, str] = {}
    try:
        with pacs.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        report["index"] = index_disk_full(pacs) or "ok"
    except Exception as exc:
        report["index"] = f"error: {exc.__class__.__name__}"
    try:
        pacs.store.check()
        # The very test every received object gets: a store below its
        # low-water mark refuses each C-STORE (0xA700) and STOW-RS (503),
        # and /health said "ok" meanwhile.
        pacs.ingestor.check_space(0)
        report["storage"] = "ok"
    except IngestError as exc:
        report["storage"] = f"error: new objects refused, {exc}"
    except Exception as exc:
        report["storage"] = f"error: {exc}"
    return report


def freeze_startup_heap() -> None:
    """Move everything alive once a server has started out of the garbage
    collector's reach.

    A full collection walks every tracked object: ~30 ms with the modules a
    server imports (SQLAlchemy, pydicom's dictionaries, pynetdicom), taken
    while holding the GIL, which stalls every association. pynetdicom runs
    one every 59 associations, and Python's own full collections come on
    top. What exists at startup lives until the process ends, so it is
    frozen (``gc.freeze``) and collections only look at newer objects.
    """
    gc.collect()
    gc.freeze()


# glibc's mallopt parameter number for the arena limit (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """At most two glibc malloc arenas in a server process (unless the
    operator set ``MALLOC_ARENA_MAX``).

    glibc gives threads that allocate at once arenas of their own, up to
    eight per core, and returns little of them: every DICOM association and
    HTTP request runs on a thread, and after 15 minutes of mixed load the
    server stayed at ~760 MB (160 MB at start), in 17 fragmented 32-48 MB
    arenas. With two it stayed under 300 MB. Call before threads start; the
    variable is set too so that worker processes start with the same limit.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    os.environ["MALLOC_ARENA_MAX"] = str(MALLOC_ARENAS)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc: nothing to limit
        pass
