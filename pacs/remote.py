"""The SCU side: echo, find, move and get against remote PACS in the AE registry.

Prior studies from the referring hospital are pulled with C-MOVE (to our own
listener) or C-GET (received on this association); either way every object
enters through the normal ingest path.
"""

from __future__ import annotations

import difflib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom import sop_class as sop
from pynetdicom.sop_class import Verification

from dicom_scp.contexts import QR_MODELS as _MODELS

from .aes import RemoteAE
from .app import Pacs
from .dicom_net import apply_limits, failure, refusal, request, stop_aware, tune_socket
from .errors import PacsError
from .tls import association_tls

log = logging.getLogger(__name__)

# A C-GET's storage contexts. The SCP accepts one syntax per context (PS3.8
# 9.3.2.2) and sends each object in an accepted one, converting it when none
# is its own: one context listing every syntax made the old PACS pick one
# (Explicit VR LE, listed first) and decompress everything into it, or fail
# an object it could not decompress. So the uncompressed syntaxes go in one
# context and each common compression in a context of its own, most common
# first (what does not fit in 128 contexts is left out).
GET_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
GET_COMPRESSED = [str(ts) for ts in (JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless, RLELossless)]
GET_COMPRESSED_RARE = [str(ts) for ts in (
    JPEGLosslessSV1, JPEG2000, JPEGExtended12Bit, JPEGLSNearLossless, DeflatedExplicitVRLittleEndian)]
# When the remote does not say which SOP classes a study holds: the image
# classes given the compressed contexts, and the other classes that come
# next (then the rest of pynetdicom's storage classes, uncompressed only).
COMMON_IMAGE_CLASSES = [str(uid) for uid in (
    sop.CTImageStorage, sop.MRImageStorage, sop.ComputedRadiographyImageStorage,
    sop.DigitalXRayImageStorageForPresentation, sop.DigitalMammographyXRayImageStorageForPresentation,
    sop.UltrasoundImageStorage, sop.UltrasoundMultiFrameImageStorage, sop.SecondaryCaptureImageStorage,
    sop.MultiFrameTrueColorSecondaryCaptureImageStorage, sop.XRayAngiographicImageStorage,
    sop.XRayRadiofluoroscopicImageStorage, sop.NuclearMedicineImageStorage,
    sop.PositronEmissionTomographyImageStorage)]
COMMON_OTHER_CLASSES = [str(uid) for uid in (
    sop.BasicTextSRStorage, sop.EnhancedSRStorage, sop.ComprehensiveSRStorage,
    sop.KeyObjectSelectionDocumentStorage, sop.GrayscaleSoftcopyPresentationStateStorage,
    sop.EncapsulatedPDFStorage, sop.TwelveLeadECGWaveformStorage, sop.EnhancedCTImageStorage)]
MAX_CONTEXTS = 128



class RemoteError(PacsError):
    """The remote AE is unknown, unreachable or refused the request."""


class Unreachable(RemoteError):
    """No association with the remote AE (unknown, down, or it refused us)."""


class Truncated(RemoteError):
    """The remote ended a C-FIND with 0xFE00 after some matches: it stopped
    (Orthanc does at its LimitFindResults) and more may exist. Raised after
    the matches it did send were yielded."""


@dataclass
class RetrieveSummary:
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": f"0x{self.status:04X}",
            "completed": self.completed,
            "failed": self.failed,
            "warning": self.warning,
            "stored": self.stored,
            "failed_uids": self.failed_uids,
        }


class Cancel:
    """Ends the requests a worker makes under :func:`cancellable` once
    :meth:`set` (the server stopping): each open association is aborted, its
    wait for a response ends at once, and no new one is made. An old PACS
    moving a large study answers only at its end: the prefetch worker that
    waited for it held `pacs serve`'s stop for as long (pynetdicom's
    reactor thread keeps the process alive), and systemd or Docker killed it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def is_set(self) -> bool:
        return self.event.is_set()

    def watch(self, assoc: Any) -> None:
        """Make *assoc*'s waits end on :meth:`set`, and abort it then."""
        stop_aware(assoc, self.event)
        with self._lock:
            self._open.add(assoc)
        if self.event.is_set():
            assoc.abort(block=False)

    def set(self) -> None:
        self.event.set()
        with self._lock:
            assocs = list(self._open)
        for assoc in assocs:
            if assoc.is_established:
                assoc.abort(block=False)


_cancel: ContextVar[Cancel | None] = ContextVar("remote_cancel", default=None)


@contextmanager
def cancellable(cancel: Cancel) -> Iterator[None]:
    """The requests of this thread in the block end when *cancel* is set."""
    token = _cancel.set(cancel)
    try:
        yield
    finally:
        _cancel.reset(token)


def _remote(pacs: Pacs, title: str) -> RemoteAE:
    remote = pacs.aes.get(title)
    if remote is None:
        raise Unreachable(f"{title} is not in the AE registry (pacs ae add {title} --host H --port P)")
    return remote


def local_ae(pacs: Pacs) -> AE:
    """This node as the calling AE of an outbound association, with its timeouts."""
    return apply_limits(AE(ae_title=pacs.settings.ae_title), pacs.settings)


def associate(pacs: Pacs, ae: AE, remote: RemoteAE, **kwargs: Any) -> Any:
    """An established association with *remote* (TLS when registered so, TCP_NODELAY);
    RemoteError when it cannot be had."""
    cancel = _cancel.get()
    if cancel is not None and cancel.is_set():
        raise Unreachable(f"association with {remote.title} not requested: the server is stopping")
    tls = association_tls(pacs.settings, remote)
    assoc = request(ae.associate, remote.host, remote.port, ae_title=remote.title, **tls, **kwargs)
    if not assoc.is_established:
        if (why := refusal(assoc)) is not None:
            outcome = f"aborted: it {why}"
        else:
            outcome = f"failed: {why}" if (why := failure(assoc)) else "failed"
        raise Unreachable(f"association with {remote.title} at {remote.host}:{remote.port} {outcome}")
    tune_socket(assoc)
    if cancel is not None:
        cancel.watch(assoc)
    return assoc


def identifier(level: str, keys: dict[str, str]) -> Dataset:
    """The C-FIND/C-MOVE/C-GET identifier of *level* with *keys* (keyword:
    value; empty value: a return key). Raises RemoteError for a keyword
    that is no DICOM attribute: pydicom kept it as a plain Python attribute,
    dropped from the request, and a typo then matched every study."""
    unknown = [k for k in keys if tag_for_keyword(k) is None]
    if unknown:
        raise RemoteError("unknown attribute(s) " + ", ".join(_unknown_keyword(k) for k in unknown)
                          + ": use DICOM keywords, e.g. PatientName=NGUYEN*")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level.upper()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _unknown_keyword(name: str) -> str:
    close = difflib.get_close_matches(name.replace(" ", ""), list(keyword_dict), n=1)
    return f"{name!r}" + (f" (did you mean {close[0]}?)" if close else "")


def echo(pacs: Pacs, title: str) -> int:
    """C-ECHO the remote AE; returns the status."""
    ae = local_ae(pacs)
    ae.add_requested_context(Verification)
    assoc = associate(pacs, ae, _remote(pacs, title))
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else 0xC000
    finally:
        assoc.release()


def find(pacs: Pacs, title: str, level: str, keys: dict[str, str], model: str = "study") -> Iterator[Dataset]:
    """C-FIND on the remote AE; yields each matching identifier."""
    find_class = _MODELS[model][0]
    ae = local_ae(pacs)
    ae.add_requested_context(find_class)
    assoc = associate(pacs, ae, _remote(pacs, title))
    try:
        for status, match in assoc.send_c_find(identifier(level, keys), find_class):
            code = _status_code(status, "C-FIND")
            if code in (0xFF00, 0xFF01):
                yield match
            elif code == 0xFE00:
                raise Truncated(f"{title} ended its C-FIND answer early (0xFE00): it may hold more matches")
            elif code != 0x0000:
                raise RemoteError(f"C-FIND failed with status 0x{code:04X} {status.get('ErrorComment', '')}")
    finally:
        assoc.release()


def _status_code(status: Dataset | None, what: str) -> int:
    """The Status of a response; RemoteError when there is none. pynetdicom
    yields an empty Dataset (not None) when the association was aborted or
    lost, or the DIMSE timeout passed: reading its Status crashed the whole
    pull on a dropped link."""
    if status is None or "Status" not in status:
        raise RemoteError(f"no {what} response: the association was lost (link dropped, aborted or timed out)")
    return int(status.Status)


def _summary(responses: Iterator[tuple[Any, Any]], summary: RetrieveSummary, what: str) -> RetrieveSummary:
    for status, ident in responses:
        code = _status_code(status, what)
        summary.status = code
        summary.completed = int(status.get("NumberOfCompletedSuboperations", summary.completed) or 0)
        summary.failed = int(status.get("NumberOfFailedSuboperations", summary.failed) or 0)
        summary.warning = int(status.get("NumberOfWarningSuboperations", summary.warning) or 0)
        if ident is not None and "FailedSOPInstanceUIDList" in ident:
            summary.failed_uids = list(ident.FailedSOPInstanceUIDList or [])
    return summary


def move(
    pacs: Pacs, title: str, level: str, keys: dict[str, str], destination: str | None = None, model: str = "study",
    *, alive: Callable[[], object] | None = None,
) -> RetrieveSummary:
    """C-MOVE from the remote AE to *destination* (default: our own AE).

    *alive*: what shows the sub-operations progressing (the count of the
    study's instances here): the wait for a response then lasts while it
    changes, see :func:`_wait_while`."""
    move_class = _MODELS[model][1]
    ae = local_ae(pacs)
    ae.add_requested_context(move_class)
    assoc = associate(pacs, ae, _remote(pacs, title))
    if alive is not None:
        _wait_while(assoc, alive)
    try:
        responses = assoc.send_c_move(identifier(level, keys), destination or pacs.settings.ae_title, move_class)
        return _summary(responses, RetrieveSummary(0xC000), "C-MOVE")
    finally:
        assoc.release()


def _wait_while(assoc: Any, alive: Callable[[], object]) -> None:
    """Let *assoc* wait for its C-MOVE responses as long as *alive*'s value
    changes from one dicom_timeout to the next.

    Pending responses are optional (PS3.4 C.1.3) and some archives send
    none: such an old PACS says nothing until its last sub-operation is
    done. Waiting dicom_timeout for a response
    aborted every move of a study that takes longer (a large CT) while its
    objects were still arriving, and the study was left incomplete. The
    association's network timeout is off for the same reason: the silence
    is bounded here, a dead link by TCP keepalive."""
    dimse = assoc.dimse
    get_msg = dimse.get_msg
    try:
        last = alive()
    except Exception:  # the index not answering: no sign of progress, the usual timeout
        return
    assoc.network_timeout = None

    def wait(block: bool = False) -> Any:
        nonlocal last
        while True:
            item = get_msg(block)
            if item[1] is not None or not block or not assoc.is_established:
                return item
            try:
                now = alive()
            except Exception:
                return item
            if now == last:
                return item  # nothing came for dicom_timeout: given up as before
            last = now

    dimse.get_msg = wait


def _sop_classes(pacs: Pacs, title: str, level: str, keys: dict[str, str], model: str) -> set[str]:
    """SOP classes of what a retrieve at *level* would send, asked level by
    level: a remote that only knows the hierarchical model (PS3.4 C.4.1.3.1,
    as most do) refuses an IMAGE-level query without its Series Instance UID."""
    if level in ("SERIES", "IMAGE"):
        image_keys = {**keys, "SOPInstanceUID": keys.get("SOPInstanceUID", ""), "SOPClassUID": ""}
        return {str(m.SOPClassUID) for m in find(pacs, title, "IMAGE", image_keys, model)
                if m is not None and m.get("SOPClassUID")}
    below, key = ("SERIES", "SeriesInstanceUID") if level == "STUDY" else ("STUDY", "StudyInstanceUID")
    classes: set[str] = set()
    for uid in {str(m.get(key)) for m in find(pacs, title, below, {**keys, key: ""}, model) if m is not None and m.get(key)}:
        classes |= _sop_classes(pacs, title, below, {**keys, key: uid}, model)
    return classes


def get_contexts(sop_classes: list[str], limit: int = MAX_CONTEXTS - 1) -> list[tuple[str, list[str]]]:
    """The storage contexts a C-GET proposes (SCP role), at most *limit*:
    for each SOP class one with Explicit and Implicit VR Little Endian, so
    that every object can come, then one per compressed syntax so that a
    compressed object comes as the remote holds it (:data:`GET_COMPRESSED`,
    then :data:`GET_COMPRESSED_RARE`).

    *sop_classes* are those the remote said the request covers; without
    them, the common image classes get the compressed contexts and other
    storage classes the uncompressed one, as many as fit."""
    imaging, common, rest = sop_classes, [], []
    if not sop_classes:
        imaging, common = COMMON_IMAGE_CLASSES, COMMON_OTHER_CLASSES
        rest = [str(cx.abstract_syntax) for cx in StoragePresentationContexts
                if cx.abstract_syntax not in imaging + common]
    # In order of need, cut at the limit: every class at all, the common
    # compressions (syntax by syntax), the other classes, the rare compressions.
    contexts = [(sc, GET_UNCOMPRESSED) for sc in imaging + common]
    contexts += [(sc, [ts]) for ts in GET_COMPRESSED for sc in imaging]
    contexts += [(sc, GET_UNCOMPRESSED) for sc in rest]
    contexts += [(sc, [ts]) for ts in GET_COMPRESSED_RARE for sc in imaging]
    return contexts[:limit]


def get(pacs: Pacs, title: str, level: str, keys: dict[str, str], model: str = "study") -> RetrieveSummary:
    """C-GET from the remote AE; received objects are ingested here as they
    arrive (compressed ones stay compressed: see :func:`get_contexts`)."""
    from dicom_scp.contexts import register_storage_classes
    from dicom_scp.server import make_store_handler

    # The remote may send the configured private classes too.
    register_storage_classes(pacs.settings.extra_storage_classes)

    # Ask for the SOP classes first: at most 128 contexts fit in an
    # association, far fewer than all storage classes with their syntaxes.
    # A remote that does not return SOP Class UID (dcmqrscp, many old PACS)
    # is offered the common storage classes instead.
    sop_classes = sorted(_sop_classes(pacs, title, level.upper(), keys, model))
    get_class = _MODELS[model][2]
    ae = local_ae(pacs)
    ae.add_requested_context(get_class)
    roles: dict[str, Any] = {}
    for sop_class, syntaxes in get_contexts(sop_classes):
        ae.add_requested_context(sop_class, syntaxes)
        roles.setdefault(sop_class, build_role(sop_class, scp_role=True))
    store = make_store_handler(pacs, source="c-get", retrieving=True)
    stored = {"n": 0}

    def on_store(event: Any) -> Any:
        status = store(event)
        if status == 0:
            stored["n"] += 1
        return status

    assoc = associate(pacs, ae, _remote(pacs, title), ext_neg=list(roles.values()),
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        responses = assoc.send_c_get(identifier(level, keys), get_class)
        summary = _summary(responses, RetrieveSummary(0xC000), "C-GET")
    finally:
        assoc.release()
    summary.stored = stored["n"]
    return summary
