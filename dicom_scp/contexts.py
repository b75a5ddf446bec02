"""Which SOP classes and transfer syntaxes the DICOM listener accepts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, register_uid
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    uid_to_service_class,
)

from pacs.transcode import ENCODABLE, LITTLE_ENDIAN_NATIVE

# Query/Retrieve information models: (FIND, MOVE, GET) SOP classes.
QR_MODELS: dict[str, tuple[UID, UID, UID]] = {
    "study": (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ),
    "patient": (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
    ),
}

_UNCOMPRESSED = [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]

# Every syntax we store as received. The order does not matter: each
# presentation context follows the requestor's own preference there
# (prefer_requestor_order).
# JPIP-referenced and SMPTE ST 2110 syntaxes carry no storable pixel data.
STORAGE_TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    *[
        ts
        for ts in AllTransferSyntaxes
        if ts.is_encapsulated and "JPIP" not in ts.name and "SMPTE" not in ts.name
    ],
    *_UNCOMPRESSED,
]


# Storage classes retired from the standard that pynetdicom does not know,
# yet old machines still send them: an ultrasound bought before 2000 sends
# 1.2.840.10008.5.1.4.1.1.6 for every image. DCMTK's storescp and Orthanc
# accept them, so a hospital replacing either must too (PS3.4 2003 Annex B).
RETIRED_STORAGE_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.1.27": "StoredPrintStorageRetired",
    "1.2.840.10008.5.1.1.29": "HardcopyGrayscaleImageStorageRetired",
    "1.2.840.10008.5.1.1.30": "HardcopyColorImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.8": "StandaloneOverlayStorageRetired",
    "1.2.840.10008.5.1.4.1.1.9": "StandaloneCurveStorageRetired",
    "1.2.840.10008.5.1.4.1.1.9.1": "WaveformStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.10": "StandaloneModalityLUTStorageRetired",
    "1.2.840.10008.5.1.4.1.1.11": "StandaloneVOILUTStorageRetired",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.1": "TextSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.2": "AudioSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.3": "DetailSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.88.4": "ComprehensiveSRStorageTrialRetired",
    "1.2.840.10008.5.1.4.1.1.129": "StandalonePETCurveStorageRetired",
}


def register_storage_classes(extra: Iterable[str] = ()) -> None:
    """Register the retired classes and *extra* (the operator's
    ``extra_storage_classes``) with pynetdicom as storage classes.

    pynetdicom serves a C-STORE by the service class of its context's SOP
    class: for a class it does not know it has none, so it would abort an
    association that sends one (to the listener, or to ``pacs remote get``)
    and refuse to send one back on a C-GET. Registering twice is harmless.
    """
    for uid, keyword in RETIRED_STORAGE_CLASSES.items():
        register_uid(uid, keyword, StorageServiceClass)
    for uid in extra:
        if uid_to_service_class(uid) is not StorageServiceClass:
            # A keyword of our own: a vendor's class has none, and one
            # pynetdicom already uses would be taken over.
            register_uid(uid, "ExtraStorage_" + uid.replace(".", "_"), StorageServiceClass)


def storage_classes(extra: Iterable[str] = ()) -> list[str]:
    """Every storage SOP class we accept: pynetdicom's, the retired ones and
    *extra* (``extra_storage_classes``, checked by the settings), each once."""
    register_storage_classes(extra)
    known = [cx.abstract_syntax for cx in AllStoragePresentationContexts] + list(RETIRED_STORAGE_CLASSES)
    return list(dict.fromkeys([*known, *extra]))


# What the archive can give any stored object in (pacs.transcode converts to
# them from every stored syntax it can decode): a C-GET requester proposing
# one of them gets it. Big Endian is retired and never written (PS3.5 A.3).
ANY_OBJECT_SYNTAXES = LITTLE_ENDIAN_NATIVE


def _sent_order(wanted: list[str]) -> list[str]:
    """The requestor's syntaxes for a context where this node sends (C-GET),
    in the order to accept them: those any stored object can be given in,
    then the lossless encodings transcode writes (most objects can be
    encoded in them), then the rest (Big Endian, lossy: what is
    stored in them goes as is, nothing else), each group in the
    requestor's order. pynetdicom then accepts, per context, the first of
    these it proposed: never Big Endian or a lossy syntax beside an
    uncompressed one the archive can always produce."""
    return sorted(wanted, key=lambda ts: 0 if ts in ANY_OBJECT_SYNTAXES else 1 if ts in ENCODABLE else 2)


def _scp_role_proposed(primitive: A_ASSOCIATE) -> set[str]:
    """The SOP classes whose SCP role the requestor proposed to take
    (SCP/SCU Role Selection, PS3.7 D.3.3.4): a C-GET's storage classes, on
    which this node sends the C-STOREs."""
    return {str(item.sop_class_uid) for item in primitive.user_information or []
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.scp_role}


def prefer_requestor_order(event: Any) -> None:
    """EVT_ACSE_RECV handler: accept, in each presentation context, the
    syntax the requestor lists first there (that this node supports).

    pynetdicom picks the first syntax of the *acceptor's* list that the
    requestor proposed. A modality lists its own preference first (the
    syntax its data is in), so following the requestor keeps a big-endian,
    deflated or compressed object exactly as the modality holds it instead
    of making it convert. Each context answers for itself (PS3.8 9.3.3.2):
    a modality proposing [JPEG Baseline, Explicit LE] beside [Explicit LE]
    for the same SOP class gets JPEG Baseline in the first, as DCMTK's
    storescp gives it; one preference list per SOP class gave it Explicit LE
    in both, and it had to decompress its JPEG images or fail to send them.
    Where the requestor takes the SCP role (C-GET), this node sends, so only
    its first syntax the archive can produce from anything stored is put
    first (see :func:`_sent_order`): getscu +xb or +xs accepted in Big
    Endian or JPEG got none of the other objects.

    pynetdicom negotiates each proposed context against the one acceptor
    context of its SOP class, so the per-context choice is made here by
    leaving in each proposed context only the syntax to accept (in this
    association's copy of the request; the server's contexts are not
    touched). A context with no syntax we support is left as proposed,
    for pynetdicom to reject (result 4).
    """
    primitive = event.primitive
    if not isinstance(primitive, A_ASSOCIATE) or primitive.result is not None:
        return
    proposed = primitive.presentation_context_definition_list or []
    if not any(len(rq.transfer_syntax) > 1 for rq in proposed):
        return  # one syntax per context (most modalities): nothing to choose
    try:
        contexts = event.assoc.acceptor.supported_contexts
    except Exception:
        return
    ours = {cx.abstract_syntax: cx.transfer_syntax for cx in contexts}
    sends = _scp_role_proposed(primitive)
    for rq in proposed:
        supported = ours.get(rq.abstract_syntax)
        if not supported or len(rq.transfer_syntax) < 2:
            continue
        wanted = _sent_order(rq.transfer_syntax) if rq.abstract_syntax in sends else rq.transfer_syntax
        first = next((ts for ts in wanted if ts in supported), None)
        if first is not None:
            rq.transfer_syntax = [first]


class ContextList(list):  # type: ignore[type-arg]
    """The server's supported contexts, cheap to copy per association.

    pynetdicom deep-copies the acceptor's contexts for every association:
    ~40 ms for 170 SOP classes x 34 syntaxes, paid by every C-ECHO and every
    findscu; even a shallow copy of each was ~0.5 ms. Each association gets
    a new list of the same context objects: pynetdicom's negotiation only
    reads them (:func:`prefer_requestor_order` changes the request, not them).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


# The Error Comment of that refusal (at most 64 characters); the log names the classes.
OFF_CONTEXT_COMMENT = "SOP Class not the one negotiated for this context"


def off_context(assoc: Any, abstract_syntax: str, sop_class: str) -> str | None:
    """Why a C-STORE-RQ of *sop_class* may not be served on a presentation
    context negotiated for *abstract_syntax*; None when it may.

    A context is negotiated for one SOP class and transfer syntax (PS3.7
    D.3.2); a request for another class on it was stored under a class and
    read in a syntax never agreed for it (a CT on the MR context, or on the
    Verification context, whose syntax may not even be the data set's). It
    is refused 0122H, "SOP Class not supported" (PS3.4 B.2.3), on the one
    request: DCMTK's storescp aborts the association, which loses the
    modality's other objects on it and makes many resend the whole study.
    A specialized class on its related general class's context (SOP Class
    Common Extended Negotiation, PS3.7 D.3.3.6) is allowed.
    """
    if sop_class == abstract_syntax:
        return None
    related = assoc.acceptor.accepted_common_extended.get(sop_class)
    if related is not None and abstract_syntax in related[1]:
        return None
    return f"SOP Class {sop_class} sent on the context of {abstract_syntax}"
