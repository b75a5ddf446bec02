"""The routing worker: drains the job queue to DICOM AEs and DICOMweb endpoints.

Per destination, one association (or one STOW-RS request per batch) carries
many objects; destinations are served in parallel up to a limit. Each job is
marked done right after its peer confirmed it, so a crash resends at most
the object in flight. Objects go as stored (streamed from the file) unless
the rule transcodes, de-identifies or changes tags, or the index holds
corrections for the study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, evt
from pynetdicom.presentation import PresentationContext
from sqlalchemy.exc import SQLAlchemyError
from storage import ObjectNotFound, StorageError

from . import routing
from .app import Pacs
from .audit import Event
from .deidentify import UidMap
from .dicom_net import stop_aware
from .maintenance.export import deidentify_salt, study_patient
from .periodic import Periodic
from .pixel_memory import PIXELS
from .query import Level
from .remote import RemoteError, associate, local_ae
from .retrieve import RetrieveItem, apply_overrides, contexts_for, for_peer, resolve
from .routing import TRANSCODES, Job, Rule, morph_element
from .transcode import (
    CHUNK,
    LITTLE_ENDIAN_NATIVE,
    MAX_WHOLE_DECODED,
    UNCOMPRESSED,
    CodecPlan,
    StreamPlan,
    TransferSyntaxError,
    convert_dataset,
    decode_plan,
    encode_plan,
    has_pixels,
    recode_plan,
    stream_plan,
    streamable,
    whole_size,
)

if TYPE_CHECKING:
    from viewer_api.multipart import Part

log = logging.getLogger(__name__)

# Send stored files as they are, without decoding (an exact context is needed).
_config.STORE_SEND_CHUNKED_DATASET = True
STOW_BATCH = 20
# Streamed copies are written to DATA_DIR/tmp/<prefix>*.dcm while they are sent.
STAGED_PREFIX = "route-"


def node_name(pacs: Pacs) -> str:
    """Who claims jobs: stable across restarts of this node."""
    return pacs.settings.node_name


def _target_syntax(rule: Rule) -> str:
    return TRANSCODES.get(rule.transcode, rule.transcode)


@dataclasses.dataclass
class Copy:
    """The copy of a stored object a rule sends. Laid out to stream (*plan*)
    when only its header changes (de-identification, --set values,
    corrections, Big Endian to Little Endian): the header is rewritten, the
    stored Pixel Data are copied by byte range as it is sent, never held
    whole; and when its pixels change codec, frame by frame
    (:mod:`pacs.transcode`). In memory (*dataset*) when it has no pixels (a
    report, an SR) or a layout only a whole conversion takes."""

    syntax: str
    sop_uid: str
    dataset: Dataset | None = None
    plan: StreamPlan | CodecPlan | None = None

    def part10(self) -> Iterator[bytes]:
        """The copy's Part 10 bytes, chunk by chunk."""
        if self.plan is not None:
            yield from self.plan.part10()
        elif self.dataset is not None:
            yield from _encoded(self.dataset)


def transformed(pacs: Pacs, item: RetrieveItem, rule: Rule, *, target: str | None = None) -> Copy | None:
    """The copy a rule sends, or None when the stored bytes go as they are.

    *target*: the syntax a destination takes instead of the rule's (e.g.
    Explicit VR Little Endian where no compressed syntax is taken).
    Raises ObjectNotFound / StorageError when the object cannot be read,
    anything else when the copy cannot be made (a job failing for good)."""
    target = target if target is not None else _target_syntax(rule)
    # Checked before any read: a bad value from a rule older than the check
    # at `route add` fails here, not as a failure of the destination.
    morph = [morph_element(keyword, value) for keyword, value in rule.morph]
    if not (target and target != item.transfer_syntax_uid) and not rule.deidentify and not morph \
            and not item.overrides:
        return None
    edit, made = _editor(pacs, item, rule, morph)
    streamed = _streamed_target(item, target)
    if streamed is not None:
        opener = lambda offset, length: pacs.store.open(item.storage_key, offset, length)  # noqa: E731
        plan = stream_plan(opener, item, streamed, edit)
        if plan is not None:
            return Copy(str(plan.target), made["sop_uid"], plan=plan)
    stored = UID(item.transfer_syntax_uid)
    wanted = UID(target) if target else None
    if wanted is not None and wanted != stored:
        try:
            codec = _codec_plan(pacs, item, str(wanted), edit)
        except TransferSyntaxError as exc:
            if wanted in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                raise ValueError(str(exc)) from None
            # Compression only saves bandwidth: pixels the codec cannot take
            # (smaller than JPEG 2000's resolution levels, bits above Bits
            # Stored in use) go uncompressed rather than not at all.
            log.warning("%s goes uncompressed: %s", item.sop_uid, str(exc).splitlines()[0][:160])
            return transformed(pacs, item, rule, target=str(ExplicitVRLittleEndian))
        if codec is not None:
            return Copy(str(codec.target), made["sop_uid"], plan=codec)
        with pacs.store.local_path(item.storage_key) as path:
            size = whole_size(path, item)
        if size > MAX_WHOLE_DECODED:
            # Only a conversion in memory does this layout (Big Endian or
            # Deflated to a compression, 1-bit...): several times the object.
            if wanted != ExplicitVRLittleEndian:
                log.warning("%s goes uncompressed: %s would be converted in memory (%d MB decoded)",
                            item.sop_uid, wanted.name, size >> 20)
                return transformed(pacs, item, rule, target=str(ExplicitVRLittleEndian))
            raise ValueError(f"cannot convert {item.sop_uid} to {wanted.name}: it would be converted in memory, "
                             f"{size >> 20} MB decoded (at most {MAX_WHOLE_DECODED >> 20} MB)")

    def stored_copy() -> Dataset:
        with pacs.store.local_path(item.storage_key) as path:
            return apply_overrides(dcmread(path), item.overrides)

    ds = stored_copy()
    if wanted is not None and wanted.is_encapsulated and not has_pixels(ds):
        # Nothing to compress (a report, an SR, an RT plan): Explicit VR Little
        # Endian, which every peer accepts (only the compressed syntax was proposed).
        wanted = ExplicitVRLittleEndian
    if wanted is not None and wanted != stored:
        try:
            # Lossless: the pixels decode identically, so the instance keeps its UID.
            convert_dataset(ds, stored, wanted)
        except Exception as exc:  # noqa: BLE001 - the codec refuses this pixel format
            if wanted == ExplicitVRLittleEndian:
                raise
            # Compression only saves bandwidth: an image the codec cannot
            # take (e.g. smaller than JPEG 2000's resolution levels, bits
            # above Bits Stored in use) goes uncompressed rather than not at all.
            log.warning("%s goes uncompressed: %s cannot encode it (%s)", item.sop_uid, wanted.name,
                        str(exc).splitlines()[0][:120])
            ds = stored_copy()
            convert_dataset(ds, stored, ExplicitVRLittleEndian)
    edit(ds)
    return Copy(str(ds.file_meta.TransferSyntaxUID), made["sop_uid"], dataset=ds)


def _codec_plan(pacs: Pacs, item: RetrieveItem, target: str, edit: Callable[[Dataset], None]) -> CodecPlan | None:
    """The copy in *target* with its pixels changing codec frame by frame:
    native pixels encoded, compressed ones decoded or encoded in another
    compression; None when only a whole conversion does it. Raises
    :class:`TransferSyntaxError` when the codec refuses these pixels."""
    opener = lambda offset, length: pacs.store.open(item.storage_key, offset, length)  # noqa: E731
    plan = encode_plan(opener, item, target, edit)
    if plan is None:
        plan = decode_plan(pacs, item, target, edit)
    if plan is None:
        plan = recode_plan(pacs, item, target, edit)
    return plan


def _streamed_target(item: RetrieveItem, target: str) -> str | None:
    """The syntax *item*'s copy streams in when no codec changes: the
    stored one (Big Endian, retired, becomes Explicit VR Little Endian), or
    a little endian *target* of uncompressed pixel data. None: a codec
    change, or an object not laid out to stream."""
    stored = UID(item.transfer_syntax_uid)
    if not target or target == stored:
        wanted = str(ExplicitVRLittleEndian) if stored == ExplicitVRBigEndian else str(stored)
    elif stored in UNCOMPRESSED and UID(target) in LITTLE_ENDIAN_NATIVE:
        wanted = target
    else:
        return None
    return wanted if streamable(item, wanted) else None


def _editor(pacs: Pacs, item: RetrieveItem, rule: Rule,
            morph: list[Any]) -> tuple[Callable[[Dataset], None], dict[str, str]]:
    """What the rule changes in a copy (de-identification, --set values), as
    an edit of its dataset; and where the edit notes the copy's SOP Instance
    UID (a new one when de-identified: a STOW-RS answer names that one)."""
    deid = None
    patient = None
    if rule.deidentify:
        from .deidentify import Deidentifier

        deid = Deidentifier(deidentify_salt(pacs))
        # The index's patient: one pseudonym for the patient however each
        # modality filled Issuer of Patient ID.
        patient = study_patient(pacs, item.study_uid)
    made = {"sop_uid": item.sop_uid}

    def edit(ds: Dataset) -> None:
        if deid is not None:
            from .deidentify import may_release

            release = may_release(ds)
            if not release.allowed:
                # Nobody cleans text burned into the pixels: such an object does
                # not leave under a de-identifying rule (the job fails for good, with this reason).
                raise ValueError(f"not sent de-identified: {release.reason}")
            if release.reason:
                log.warning("%s sent de-identified: %s", item.sop_uid, release.reason)
            deid.apply(ds, patient=patient)
        if morph:
            _unicode_if_needed(ds, [value for _, value in rule.morph])
            for element in morph:
                ds[element.tag] = element
        _check_encodes(ds)
        made["sop_uid"] = str(ds.get("SOPInstanceUID", item.sop_uid))

    return edit, made


def _unicode_if_needed(ds: Dataset, values: list[str]) -> None:
    """Values the dataset's character set cannot hold (Vietnamese text in an
    ISO_IR 100 or ASCII object) would arrive as "?": the dataset's text is
    decoded and the copy goes in UTF-8 (ISO_IR 192), every value exact."""
    texts = [v for v in values if not v.isascii()]
    if not texts:
        return
    charset = ds.get("SpecificCharacterSet")
    names = [charset] if isinstance(charset, str) else [str(c) for c in (charset or [])]
    if names == ["ISO_IR 192"]:
        return
    if len(names) == 1 and names[0] not in ("", "ISO_IR 6"):
        with contextlib.suppress(UnicodeError, LookupError):
            codec = convert_encodings(names)[0]
            for text in texts:
                text.encode(codec)
            return
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def _check_encodes(ds: Dataset) -> None:
    """Encode what changed in the copy's header (elements read from the
    object are written as read; Pixel Data is bytes): a value that cannot be
    encoded fails the job here, as "cannot prepare", not at the peer."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    encodings = convert_encodings(ds.get("SpecificCharacterSet"))
    for tag in list(ds.keys()):
        if tag.group == 0x7FE0:
            continue
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            continue
        try:
            write_data_element(fp, element, encodings)
        except Exception as exc:
            raise ValueError(f"{element.keyword or element.tag} cannot be encoded: {str(exc).splitlines()[0]}") \
                from None


# Warnings of PS3.7 Annex C besides Bxxx (PS3.4 B.2.3), as C-MOVE counts them: the peer stored the object.
GENERAL_WARNINGS = (0x0107, 0x0116)


def stored(code: int) -> bool:
    """Whether a C-STORE status says the peer has the object: success or a
    warning. 0107H and 0116H were taken for failures: an object the peer
    had stored was sent again at each try, then parked dead."""
    return code == 0 or 0xB000 <= code <= 0xBFFF or code in GENERAL_WARNINGS


class _NotAccepted(Exception):
    """The destination accepted no presentation context for the SOP class."""


# Seconds at most the jobs of a destination that cannot be reached wait before it is tried again.
UNREACHABLE_WAIT = 60.0
# A batch being sent renews its claim this many times per lease (route_lease_seconds).
RENEWALS_PER_LEASE = 5
# An association lost before it delivered anything: the rest of its batch
# waits this long (no try counted) rather than reconnecting at once, again
# and again, to a peer that accepts and then drops.
LOST_PAUSE = 5.0


class Forwarder(Periodic):
    """Background delivery of routing jobs."""

    thread_name = "routing"
    round_at_start = True

    def __init__(self, pacs: Pacs, *, interval: float = 1.0, max_attempts: int = 10, concurrency: int = 4,
                 prune_every: float = 3600.0) -> None:
        super().__init__(interval)
        self.pacs = pacs
        self.node = node_name(pacs)
        self.max_attempts = max_attempts
        self.lease = timedelta(seconds=pacs.settings.route_lease_seconds)
        self.prune_every = prune_every
        self._pruned_at: float | None = None
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="route")
        self._busy: set[str] = set()
        self.concurrency = concurrency
        # Destinations whose last round failed (a satellite whose link is
        # down): they may hold at most concurrency - 1 workers, so one is
        # always left for the healthy ones.
        self._suspect: set[str] = set()
        # Destinations not reached (no connection, no association), with
        # when they were first found so: their jobs wait longer the longer
        # they are down (see _unreachable).
        self._down: dict[str, float] = {}
        # This round's failures per destination: (new state, error, the peer's fault).
        self._failures: dict[str, list[tuple[str, str, bool]]] = {}
        self._lock = threading.Lock()
        # Index writes that failed while the index was down (a delivery to
        # record as done, claims to give back), in order, retried each round:
        # a delivered object is not sent again, the rest of its batch not held
        # for the 5-minute lease.
        self._unsettled: deque[Callable[[], object]] = deque()
        self._outage_logged = 0.0
        # Associations being sent on: aborted by stop(), so that a frozen
        # satellite link does not hold the server's shutdown for the network
        # timeout (a minute: the port stayed taken, systemd or Docker killed it).
        self._sending: set[Any] = set()
        # The HTTPS context of STOW-RS destinations, made on first use.
        self._tls_client: ssl.SSLContext | None = None
        # What an http:// destination's client is given, made once: httpx otherwise makes an SSL
        # context per request (reading its CA bundle, 20-40 ms: 1-2 ms an object of a 20-object batch).
        self._plain_http: ssl.SSLContext | None = None

    def start(self) -> Forwarder:
        released = routing.release_node(self.pacs.engine, self.node)
        if released:
            log.info("routing: %d jobs claimed before a restart are queued again", released)
        # Copies a killed server was sending: nobody else writes them (one
        # `pacs serve` per data dir), and each may be an object's size.
        for stale in (Path(self.pacs.settings.data_dir) / "tmp").glob(f"{STAGED_PREFIX}*.dcm"):
            stale.unlink(missing_ok=True)
        return super().start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sending = list(self._sending)
        for assoc in sending:
            if assoc.is_established:
                assoc.abort(block=False)
            else:
                # Still waiting for the peer's A-ASSOCIATE-AC (a link frozen
                # at connect): end the wait, it would last the ACSE timeout.
                with contextlib.suppress(OSError, AttributeError):
                    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        super().stop()
        self._pool.shutdown(wait=True)
        routing.release_node(self.pacs.engine, self.node)

    def _prune(self) -> None:
        # Every node prunes: the DELETE is the same whoever runs it first.
        keep_days = self.pacs.settings.route_keep_days
        now = time.monotonic()
        if not keep_days or (self._pruned_at is not None and now - self._pruned_at < self.prune_every):
            return
        self._pruned_at = now
        pruned = routing.prune(self.pacs.engine, timedelta(days=keep_days))
        if pruned:
            log.info("routing: %d finished jobs older than %d days deleted", pruned, keep_days)

    def _outage(self, exc: Exception) -> None:
        """One line a minute while the index is down, not a traceback a second."""
        now = time.monotonic()
        if now - self._outage_logged >= 60:
            self._outage_logged = now
            log.warning("routing paused: the index is unavailable (%s)", str(exc).splitlines()[0][:200])

    def _record(self, action: Callable[[], object]) -> bool:
        """Run an index write of the queue; kept for later if the index is down."""
        with self._lock:
            if self._unsettled:  # keep the order of the writes
                self._unsettled.append(action)
                return False
        try:
            action()
            return True
        except SQLAlchemyError as exc:
            self._outage(exc)
            with self._lock:
                self._unsettled.append(action)
            return False

    def _settle(self) -> None:
        while True:
            with self._lock:
                if not self._unsettled:
                    return
                action = self._unsettled[0]
            try:
                action()
            except SQLAlchemyError as exc:
                self._outage(exc)
                return
            with self._lock:
                self._unsettled.popleft()

    def _finish(self, job: Job) -> bool:
        return self._record(lambda: routing.finish(self.pacs.engine, job))

    def _give_back(self, jobs: list[Job], after: float = 0.0) -> None:
        self._record(lambda: routing.release(self.pacs.engine, [j.pk for j in jobs], self.node, after=after))

    def round(self) -> None:
        self._settle()
        try:
            self._prune()
        except SQLAlchemyError as exc:
            self._outage(exc)
        except Exception:
            log.exception("pruning finished routing jobs failed")
        due = routing.due_destinations(self.pacs.engine)
        for destination in sorted(due, key=lambda d: d in self._suspect):  # healthy ones first
            with self._lock:
                if destination in self._busy:
                    continue
                suspects_busy = len(self._busy & self._suspect)
                if destination in self._suspect and suspects_busy >= max(1, self.concurrency - 1):
                    continue
                self._busy.add(destination)
            self._pool.submit(self._drain_guarded, destination)

    def round_failed(self, exc: Exception) -> None:
        if isinstance(exc, SQLAlchemyError):
            self._outage(exc)
        else:
            log.error("routing round failed", exc_info=exc)

    def _drain_guarded(self, destination: str) -> None:
        try:
            while not self._stop.is_set() and not self._unsettled and self.drain(destination):
                pass
        except SQLAlchemyError as exc:
            self._outage(exc)
        except Exception:
            log.exception("routing to %s failed", destination)
        finally:
            with self._lock:
                self._busy.discard(destination)

    def _fail(self, destination: str, job: Job, error: str, *, permanent: bool = False, peer: bool = True) -> None:
        """Count a failed try (or park the job as dead). *peer*: the
        destination's failure (it then counts as suspect); not for an object
        that cannot be read or prepared here."""
        states: list[str] = []
        self._record(lambda: states.append(
            routing.fail(self.pacs.engine, job, error, max_attempts=self.max_attempts, permanent=permanent,
                         node=self.node, retry_seconds=self.pacs.settings.route_retry_seconds)))
        self._failures.setdefault(destination, []).append((states[0] if states else "pending", error, peer))

    def _unreachable(self, destination: str, jobs: list[Job], error: str) -> None:
        """The destination could not be reached: its jobs wait, no try
        counted (see :func:`routing.postpone`); the round still counts as
        failed. The wait is half the time it has been down, at most
        UNREACHABLE_WAIT: a link back up is used within a minute. (Doubled
        per failed round, every new object of a study being received made
        one: after a dozen, the whole queue waited 10 minutes for a link
        that had come back.)"""
        now = time.monotonic()
        with self._lock:
            since = self._down.setdefault(destination, now)
        after = min(UNREACHABLE_WAIT, max(self.pacs.settings.route_retry_seconds, (now - since) / 2))
        pks = [job.pk for job in jobs]
        self._record(lambda: routing.postpone(self.pacs.engine, destination, pks, self.node, error, after))
        self._failures.setdefault(destination, []).extend(("pending", error, True) for _ in jobs)

    def _reached(self, destination: str) -> None:
        """The destination answered: its next outage backs off from the start."""
        with self._lock:
            self._down.pop(destination, None)

    def _unreadable(self, destination: str, job: Job, exc: Exception) -> None:
        """The stored object cannot be read: gone for good, or the store is down."""
        if isinstance(exc, ObjectNotFound):
            self._fail(destination, job, "the object is missing from the store", permanent=True, peer=False)
        else:
            self._fail(destination, job, f"cannot read the stored object: {exc}", peer=False)

    def drain(self, destination: str) -> int:
        """Send one batch for *destination*; returns how many jobs were claimed."""
        jobs = routing.claim(self.pacs.engine, destination, self.node, lease=self.lease)
        if not jobs:
            return 0
        self._failures[destination] = []
        try:
            with self._kept(jobs):
                self._drain(destination, jobs)
        except SQLAlchemyError:
            # Down before the batch was sent: its claims go back (recorded
            # deliveries and failures come first in the queue of writes).
            self._give_back(jobs)
            raise
        except Exception as exc:
            # Whatever went wrong, the batch's jobs are not left claimed (they
            # stalled in "sending" until the lease expired, again and again):
            # those not settled yet count a failed try, so a job that always
            # breaks the batch ends as dead.
            log.exception("routing to %s failed", destination)
            error = f"internal error: {(str(exc).splitlines() or [repr(exc)])[0][:200]}"
            for job in jobs:
                self._fail(destination, job, error, peer=False)
        finally:
            self._report(destination, len(jobs), self._failures.pop(destination, []))
        return len(jobs)

    @contextlib.contextmanager
    def _kept(self, jobs: list[Job]) -> Iterator[None]:
        """Renew the claim on *jobs* while they are sent, from a thread of its
        own: renewed only between two objects, one object (or one STOW-RS
        request) slower than the lease on a slow link was taken over by
        another node and sent a second time, over the same link. Jobs
        settled meanwhile are no longer "sending" and stay as they are."""
        pks = [job.pk for job in jobs]
        done = threading.Event()
        every = self.lease.total_seconds() / RENEWALS_PER_LEASE

        def renew() -> None:
            while not done.wait(every):
                try:
                    routing.extend(self.pacs.engine, pks, self.node, self.lease)
                except SQLAlchemyError as exc:  # the batch gives its jobs back when it notices
                    self._outage(exc)
                except Exception:
                    log.exception("routing: renewing the claim on %d jobs failed", len(pks))

        keeper = threading.Thread(target=renew, name="route-claim", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def _report(self, destination: str, claimed: int, failures: list[tuple[str, str, bool]]) -> None:
        """One log line per failed round (not one per object), naming the
        destination: the operator sees which satellite is down."""
        with self._lock:
            if any(peer for _, _, peer in failures):
                self._suspect.add(destination)
            else:
                self._suspect.discard(destination)
        if not failures:
            return
        dead = sum(1 for state, _, _ in failures if state == "dead")
        log.warning("routing to %s: %d of %d jobs failed (%s); last error: %s", destination, len(failures), claimed,
                    f"{dead} parked as dead, see pacs route list --state dead" if dead else "retried later",
                    failures[-1][1])

    def _drain(self, destination: str, jobs: list[Job]) -> None:
        rules = {r.pk: r for r in routing.RoutingRules(self.pacs.engine).list()}
        items = {
            i.sop_uid: i
            for i in resolve(self.pacs, Level.IMAGE, {"SOPInstanceUID": "\\".join(j.sop_uid for j in jobs)})
        }
        ready: list[tuple[Job, Rule, RetrieveItem]] = []
        for job in jobs:
            rule, item = rules.get(job.rule_pk), items.get(job.sop_uid)
            if rule is not None and item is None:
                # Deleted before it was sent (a radiologist's replaced key image selection, every time they
                # mark one while the study waits to be stable or the peer is down): parked dead, each was an
                # alert (pacs_route_jobs dead) an operator could only cancel.
                log.info("routing to %s: instance %s was deleted before it was sent: job %d cancelled",
                         destination, job.sop_uid, job.pk)
                self._record(lambda job=job: routing.drop(self.pacs.engine, job, "the instance was deleted before "
                                                          "it was sent", self.node))
                continue
            if rule is None:
                self._fail(destination, job, "rule or instance no longer exists", permanent=True, peer=False)
                continue
            ready.append((job, rule, item))
        if not ready:
            return
        kind, _, target = destination.partition(":")
        if kind == "dicom":
            # The batch's copies are prepared (each converted copy's first
            # frame made) before the first is sent: this thread holds their
            # frames' shares of the pixel budget and must not wait for more.
            with PIXELS.one_holder():
                self._send_dicom(destination, target, ready)
        else:
            self._send_dicomweb(destination, target, ready)

    # -- C-STORE ----------------------------------------------------------------------------
    def _send_dicom(self, destination: str, title: str, batch: list[tuple[Job, Rule, RetrieveItem]]) -> None:
        remote = self.pacs.aes.lookup(title)
        if remote is None:
            for job, _, _ in batch:
                self._fail(destination, job, f"AE {title} is not registered")
            return
        prepared = []
        for job, rule, item in batch:
            try:
                prepared.append((job, rule, item, transformed(self.pacs, item, rule)))
            except StorageError as exc:
                self._unreadable(destination, job, exc)
            except Exception as exc:
                self._fail(destination, job, f"cannot prepare: {exc}", permanent=True, peer=False)
        if not prepared:
            return
        # The operator's dicom_timeout and PDU size apply to routing too: a
        # slow satellite link is configured once, not per service.
        ae = local_ae(self.pacs)
        for cx in _contexts(prepared):
            ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
        opened: list[Any] = []

        def connected(event: Any) -> None:  # stop() may end the association from here on
            with self._lock:
                opened.append(event.assoc)
                self._sending.add(event.assoc)

        try:
            assoc = associate(self.pacs, ae, remote, evt_handlers=[(evt.EVT_CONN_OPEN, connected)])
        except RemoteError as exc:
            with self._lock:
                self._sending.difference_update(opened)
            if self._stop.is_set():  # cut by stop(): not the destination's failure
                self._give_back([job for job, _, _, _ in prepared])
            else:
                self._unreachable(destination, [job for job, _, _, _ in prepared], str(exc))
            return
        stop_aware(assoc, self._stop)
        with self._lock:
            self._sending.add(assoc)
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        delivered = 0
        # What the destination confirmed or refused, for the audit trail.
        answered: list[tuple[Rule, RetrieveItem, bool]] = []
        try:
            for index, (job, rule, item, copy) in enumerate(prepared):
                if self._unsettled or self._stop.is_set():
                    # The index went down (or the server stops): what was sent
                    # is kept to record, the rest goes back to the queue
                    # instead of being held.
                    self._give_back([j for j, _, _, _ in prepared[index:]])
                    break
                if not assoc.is_established:
                    # The link dropped: the object in flight counted its try,
                    # the rest were never tried and go back without one (on a
                    # flaky link that keeps delivering they went dead, 10
                    # tries counted for one attempt). Due at once when this
                    # association delivered something: the link works.
                    rest = [j for j, _, _, _ in prepared[index:]]
                    if index == 0:  # lost before any object: as unreachable, backing off
                        self._unreachable(destination, rest, f"association with {title} lost before any object")
                    else:
                        self._give_back(rest, after=0.0 if delivered else LOST_PAUSE)
                    break
                try:
                    copy = self._for_destination(title, rule, item, copy, accepted)
                except _NotAccepted as exc:
                    self._fail(destination, job, str(exc))
                    continue
                except StorageError as exc:
                    self._unreadable(destination, job, exc)
                    continue
                except Exception as exc:
                    self._fail(destination, job, str(exc), permanent=True, peer=False)
                    continue
                try:
                    if copy is None:
                        with self.pacs.store.local_path(item.storage_key) as path:
                            status = assoc.send_c_store(path)
                    elif copy.plan is not None:
                        with self._staged(copy) as path:
                            status = assoc.send_c_store(path)
                    else:
                        status = assoc.send_c_store(copy.dataset)
                    code = int(status.Status) if status is not None and "Status" in status else None
                except Exception as exc:
                    code, error = None, str(exc)
                else:
                    error = f"status 0x{code:04X}" if code is not None else "no response"
                if code is not None:
                    self._reached(destination)
                    answered.append((rule, item, stored(code)))
                if code is not None and stored(code):
                    self._finish(job)
                    delivered += 1
                elif self._stop.is_set():  # aborted by stop(): not the destination's failure
                    self._give_back([j for j, _, _, _ in prepared[index:]])
                    break
                else:
                    self._fail(destination, job, f"C-STORE to {title}: {error}")
        finally:
            with self._lock:
                self._sending.discard(assoc)
            if self._stop.is_set():
                assoc.abort(block=False)  # a release would wait for a frozen peer's answer
            elif assoc.is_established:
                assoc.release()
            self._audit(f"AE {title}", "dicom", title, answered)

    def _for_destination(self, title: str, rule: Rule, item: RetrieveItem, copy: Copy | None,
                         accepted: set[tuple[str, str]]) -> Copy | None:
        """The copy in a syntax the destination accepted: as prepared when it
        takes that syntax; else in Explicit/Implicit VR Little Endian (the
        fallbacks proposed with every SOP class, as C-MOVE does): uncompressed
        pixel data streamed with the header re-encoded (Big Endian
        byte-swapped: pynetdicom converts only between the little endian
        syntaxes, and a Big Endian object never reached a little endian
        only destination), compressed ones decoded."""
        syntax = copy.syntax if copy is not None else item.transfer_syntax_uid
        if (item.sop_class_uid, syntax) in accepted:
            return copy
        if not any(sop_class == item.sop_class_uid for sop_class, _ in accepted):
            raise _NotAccepted(f"C-STORE to {title}: it accepted no presentation context for "
                               f"{UID(item.sop_class_uid).name}")
        if copy is not None and copy.dataset is not None and UID(syntax) in (ExplicitVRLittleEndian,
                                                                            ImplicitVRLittleEndian):
            return copy  # pynetdicom converts between the little endian syntaxes
        little = next((str(ts) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                       if (item.sop_class_uid, str(ts)) in accepted), None)
        try:
            if little is not None and _streamed_target(item, little) == little:
                again = transformed(self.pacs, item, rule, target=little)
                if again is None or (item.sop_class_uid, again.syntax) in accepted:
                    return again  # None: stored in that syntax, nothing to change
            if copy is None:
                return _as_copy(for_peer(self.pacs, item, accepted))  # decoded, or uncompressed as stored
            # The little endian syntax it takes: a copy decoded frame by
            # frame is not converted again by pynetdicom (a dataset was).
            return transformed(self.pacs, item, rule, target=little or str(ExplicitVRLittleEndian))
        except StorageError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot send {UID(syntax).name} to {title}, which accepts only uncompressed syntaxes "
                             f"for {UID(item.sop_class_uid).name}: {exc}") from None

    @contextlib.contextmanager
    def _staged(self, copy: Copy) -> Iterator[Path]:
        """The streamed *copy* written to a file of the data dir's tmp/ (what
        pynetdicom sends from, in chunks), removed after."""
        folder = Path(self.pacs.settings.data_dir) / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=STAGED_PREFIX, suffix=".dcm", dir=folder)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in copy.part10():
                    out.write(chunk)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _audit(self, destination: str, protocol: str, client: str,
               answered: list[tuple[Rule, RetrieveItem, bool]]) -> None:
        """One ``export`` event per study and rule for what a destination
        confirmed or refused: routing sends patients' studies out of the
        archive as C-MOVE does, and the trail must show where they went,
        de-identified or not."""
        groups: dict[tuple[str, int], tuple[Rule, list[bool]]] = {}
        for rule, item, ok in answered:
            groups.setdefault((item.study_uid, rule.pk), (rule, []))[1].append(ok)
        mapped: UidMap | None = None
        for (study_uid, _), (rule, outcomes) in groups.items():
            delivered = sum(outcomes)
            detail = f"routed to {destination} by rule {rule.name}"
            if rule.deidentify:
                mapped = mapped or UidMap(deidentify_salt(self.pacs))
                detail += f", de-identified as study {mapped.map(study_uid)}"
            detail += f": {delivered} instances delivered"
            if delivered < len(outcomes):
                detail += f", {len(outcomes) - delivered} refused"
            self.pacs.audit.record(Event(
                action="export", user="routing", role="system", client=client[:200], protocol=protocol,
                outcome="success" if delivered == len(outcomes) else "failure", study_uid=study_uid,
                detail=detail[:500]))

    # -- STOW-RS -----------------------------------------------------------------------------
    def _https_context(self) -> ssl.SSLContext:
        """What STOW-RS checks a destination's certificate with: the hospital
        CA (``tls_ca``; httpx alone trusted only certifi's public CAs, so a
        destination with a hospital certificate failed every try), and our
        ``tls_cert`` presented for its mutual TLS, as DIMSE routing does."""
        if self._tls_client is None:
            from . import tls

            self._tls_client = tls.client_context(self.pacs.settings)
        return self._tls_client

    def _plain_http_context(self) -> ssl.SSLContext:
        """The SSL context an http:// destination's request carries (never used over plain HTTP)."""
        if self._plain_http is None:
            self._plain_http = httpx.create_ssl_context()
        return self._plain_http

    def _send_dicomweb(self, destination: str, url: str, batch: list[tuple[Job, Rule, RetrieveItem]]) -> None:
        from viewer_api.multipart import content_type_header, multipart_related_iter, new_boundary

        for start in range(0, len(batch), STOW_BATCH):
            chunk = batch[start : start + STOW_BATCH]
            if self._unsettled:  # the index went down: give the rest back
                self._give_back([job for job, _, _ in batch[start:]])
                return
            # Each part is prepared (and read from the store) only as the
            # request body reaches it: one object's chunk in memory at a time.
            # Each job with the SOP Instance UID it was sent under (a
            # de-identified copy has a new one: the answer names that one).
            sent: list[tuple[Job, str]] = []
            rules = {job.pk: (rule, item) for job, rule, item in chunk}
            dropped: list[Job] = []
            # A stored object whose read failed while the body was being sent.
            broken: list[tuple[Job, Exception]] = []
            parts = self._stow_parts(destination, chunk, sent, dropped, broken)
            first = next(parts, None)
            if first is None:
                continue  # nothing could be prepared: no request
            boundary = new_boundary()
            headers = {"Content-Type": content_type_header("application/dicom", boundary),
                       "Accept": "application/dicom+json"}
            if chunk[0][1].destination_auth:
                headers["Authorization"] = chunk[0][1].destination_auth
            body = multipart_related_iter(itertools.chain([first], parts), boundary)
            response = None
            try:
                response = httpx.post(url.rstrip("/") + "/studies", content=body, headers=headers, timeout=120,
                                      verify=self._https_context() if url.lower().startswith("https:")
                                      else self._plain_http_context())
            except Exception as exc:
                # Any error, not only httpx's: one escaping here left the
                # whole batch claimed ("sending") and retried every 5 minutes.
                if broken:
                    # An object could not be read mid-request: that job
                    # fails; the others did not reach the destination whole
                    # and go back to the queue without a try counted.
                    culprit, error = broken[0]
                    self._unreadable(destination, culprit, error)
                    self._give_back([job for job, _, _ in chunk
                                     if job.pk != culprit.pk and job.pk not in {d.pk for d in dropped}])
                    continue
                if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                    # Nothing reached the destination: the rest of the batch
                    # waits for it, no try counted.
                    skip = {job.pk for job in dropped}
                    self._unreachable(destination, [job for job, _, _ in batch[start:] if job.pk not in skip],
                                      f"STOW-RS to {url}: {str(exc) or repr(exc)}")
                    return
                peer = isinstance(exc, httpx.HTTPError)
                if not peer:
                    log.exception("STOW-RS to %s failed", url)
                for job, _ in sent:
                    self._fail(destination, job, f"STOW-RS to {url}: {str(exc) or repr(exc)}", peer=peer)
            finally:
                with contextlib.suppress(Exception):
                    parts.close()  # a part's stored object left open by a request that ended early
            # Jobs the body never reached (the request ended early) go back to the queue.
            reached = {job.pk for job, _ in sent} | {job.pk for job in dropped}
            for job, _, _ in chunk:
                if job.pk not in reached:
                    self._fail(destination, job, f"STOW-RS to {url}: not sent, the request ended early")
            if response is None:
                continue
            self._reached(destination)
            failed = _stow_failures(response)
            answered: list[tuple[Rule, RetrieveItem, bool]] = []
            for job, uid in sent:
                ok = response.status_code in (200, 202) and uid not in failed
                answered.append((*rules[job.pk], ok))
                if ok:
                    self._finish(job)
                else:
                    reason = failed.get(uid) or f"HTTP {response.status_code}"
                    self._fail(destination, job, f"STOW-RS to {url}: {reason}")
            self._audit(f"STOW-RS {url}", "dicomweb", url, answered)

    def _stow_parts(self, destination: str, chunk: list[tuple[Job, Rule, RetrieveItem]],
                    sent: list[tuple[Job, str]], dropped: list[Job],
                    broken: list[tuple[Job, Exception]]) -> Iterator[Part]:
        """The parts of one STOW-RS request, each made when the body needs
        it; a job that cannot be prepared, or whose stored object cannot be
        opened, fails and is left out (the others are sent)."""
        from viewer_api.multipart import Part

        for job, rule, item in chunk:
            stream = None
            try:
                copy = transformed(self.pacs, item, rule)
                if copy is None:
                    # Opened before its part starts: a missing object is
                    # this job's failure, not an error inside the request.
                    stream = self.pacs.store.open(item.storage_key)
            except StorageError as exc:
                self._unreadable(destination, job, exc)
                dropped.append(job)
                continue
            except Exception as exc:
                self._fail(destination, job, f"cannot prepare: {exc}", permanent=True, peer=False)
                dropped.append(job)
                continue
            sent.append((job, item.sop_uid if copy is None else copy.sop_uid))
            if stream is not None:
                body = _streamed(_read_chunks(stream), job, broken)
            else:
                assert copy is not None
                # A streamed copy reads the stored pixel data as the body goes.
                body = _streamed(copy.part10(), job, broken)
            yield Part("application/dicom", body=body)


def _read_chunks(stream: Any) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(CHUNK):
            yield chunk


def _streamed(chunks: Iterator[bytes], job: Job, broken: list[tuple[Job, Exception]]) -> Iterator[bytes]:
    """An object's bytes; a read error is noted for *job* (then raised)."""
    try:
        yield from chunks
    except GeneratorExit:
        raise
    except Exception as exc:
        broken.append((job, exc))
        raise


def _as_copy(ds: Dataset) -> Copy:
    return Copy(str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID), dataset=ds)


def _encoded(ds: Dataset) -> Iterator[bytes]:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    yield out.getvalue()


def _stow_failures(response: httpx.Response) -> dict[str, str]:
    """SOP Instance UID -> failure reason from a STOW-RS response body."""
    try:
        body = response.json()
    except ValueError:
        return {}
    failures = {}
    for item in (body.get("00081198") or {}).get("Value", []) if isinstance(body, dict) else []:
        uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [0])[0]
        failures[uid] = f"failure reason 0x{int(reason):04X}"
    return failures


def _contexts(prepared: list[tuple[Job, Rule, RetrieveItem, Copy | None]]) -> list[PresentationContext]:
    """Per SOP class Explicit/Implicit VR Little Endian, then each syntax to
    send alone (see :func:`pacs.retrieve.contexts_for`): a destination that
    takes no compressed syntax still gets the object, decoded."""
    items = [item if copy is None else dataclasses.replace(item, transfer_syntax_uid=copy.syntax)
             for _, _, item, copy in prepared]
    contexts = []
    for sop_class, syntaxes in contexts_for(items):
        cx = PresentationContext()
        cx.abstract_syntax = sop_class
        cx.transfer_syntax = syntaxes
        contexts.append(cx)
    return contexts
