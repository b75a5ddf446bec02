"""Key Object Selection documents (KOS, PS3.3 A.35.4; the content of TID
2010, IHE Key Image Note): what a radiologist's key images are written as,
and how one is read back, whoever wrote it (a modality's, another archive's).

A KOS is an SR document without an SR Document General module: its root
container's concept is the document title (CID 7010: "Of Interest", "For
Referring Provider", ...), and under it, in this order, the observer
context (TID 1002: who selected), an optional Key Object Description (TEXT)
and one IMAGE item per selected instance (its frames for a multi-frame
one). The Current Requested Procedure Evidence Sequence lists every
instance referenced, by study and series.

The archive identifies a radiologist's own selection by the observer's
login name (TID 1003 row (128774, DCM, "Person Observer's Login Name")):
a display name may be shared or renamed, a login is not.

Pure: no index, no storage (:mod:`pacs.key_images` reads and stores them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .dicomdir import record_type
from .part10 import new_instance
from .query.results import as_written
from .sr_content import CompositeRef, SrDocument

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_TEMPLATE = "2010"
DEFAULT_TITLE = "113000"
# The document titles a radiologist may give a selection: CID 7010's for
# images chosen by a reader (the manifests, RT and export purposes left out).
TITLES: dict[str, str] = {
    "113000": "Of Interest",
    "113001": "Rejected for Quality Reasons",
    "113002": "For Referring Provider",
    "113003": "For Surgery",
    "113004": "For Teaching",
    "113005": "For Conference",
    "113006": "For Therapy",
    "113007": "For Patient",
    "113008": "For Peer Review",
    "113009": "For Research",
    "113010": "Quality Issue",
    "113013": "Best In Set",
    "113018": "For Printing",
    "113020": "For Report Attachment",
}
# CID 7011 "Rejected for Quality Reasons" and its siblings: the titles of
# rejection notes (IHE IOCM), which withdraw the images they list
# (pacs.rejections).
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
# Titles whose images are set aside: rejection notes and quality flags name
# images never to show a patient or print in a report, whoever marked them
# as key images too.
SET_ASIDE_TITLES = frozenset(REJECTION_TITLES) | {"113010"}
# Titles whose images are NOT key images: those set aside, and the manifests
# (an XDS-I source's, "Complete Study Content"...) that list a whole study or
# acquisition for exchange, not the few images a reader chose.
MANIFEST_TITLES = frozenset({"113030", "113031", "113032", "113033", "113034", "113035"})
NOT_KEY_TITLES = SET_ASIDE_TITLES | MANIFEST_TITLES
SERIES_DESCRIPTION = "Ảnh chính / Key images"
SERIES_NUMBER = 950
MANUFACTURER = "filmless-pacs"
# TID 1002 / 1003 concepts.
OBSERVER_TYPE = ("121005", "DCM", "Observer Type")
PERSON = ("121006", "DCM", "Person")
PERSON_NAME = ("121008", "DCM", "Person Observer Name")
LOGIN_NAME = ("128774", "DCM", "Person Observer's Login Name")
DESCRIPTION = ("113012", "DCM", "Key Object Description")
# A PN component group holds at most 64 characters (PS3.5 6.2).
_PN_MAX = 64


@dataclass(frozen=True)
class Selected:
    """One selected image: its instance (class, series) and, for a
    multi-frame one, the frames selected (empty: the whole instance)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestRef:
    """The Requested Procedure a study was ordered as (an HIS order, or an
    accession alone), for the Referenced Request Sequence: its values fitted
    to their VRs already; *code* the procedure's (value, scheme, meaning)."""

    accession_number: str
    placer_order: str = ""
    filler_order: str = ""
    procedure_id: str = ""
    description: str = ""
    code: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class StudyHeader:
    """The patient and study attributes a new object of the study carries,
    as the index holds them now (after the HIS's corrections)."""

    study_uid: str
    patient_name: str
    patient_id: str
    issuer: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    referring_physician: str
    description: str
    # The Requested Procedure the study was ordered as (None: not ordered).
    request: RequestRef | None = None


@dataclass(frozen=True)
class KeyDocument:
    """A KOS of a study as read back: who selected what, and why."""

    sop_uid: str
    series_uid: str
    title_code: str
    title_scheme: str
    title: str
    author: str
    login: str
    description: str
    content_date: str
    content_time: str
    images: tuple[CompositeRef, ...]

    @property
    def key(self) -> bool:
        """Whether its images are key images (not a rejection or quality note)."""
        return not (self.title_scheme.upper() in ("DCM", "") and self.title_code in NOT_KEY_TITLES)

    def as_json(self, *, own: bool) -> dict[str, Any]:
        return {"sop_uid": self.sop_uid, "series_uid": self.series_uid,
                "title": {"value": self.title_code, "scheme": self.title_scheme, "meaning": self.title},
                "author": self.author, "login": self.login, "description": self.description,
                "content_date": self.content_date, "content_time": self.content_time, "key": self.key,
                "own": own, "images": len(self.images)}


def title_code(value: str | None, titles: dict[str, str], default: str, what: str) -> str:
    """The code of one of *titles* given as its code ("113000") or meaning
    ("Of Interest", case ignored); *default* when none is given. ValueError
    naming *what* and the choices for any other."""
    wanted = " ".join((value or "").split())
    if not wanted:
        return default
    if wanted in titles:
        return wanted
    for code, meaning in titles.items():
        if meaning.casefold() == wanted.casefold():
            return code
    choices = "; ".join(f"{code} {meaning}" for code, meaning in titles.items())
    raise ValueError(f"unknown {what} {wanted[:80]!r}: one of {choices}")


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _item(relationship: str, value_type: str, concept: tuple[str, str, str], **values: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([_code(concept)])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _image(selected: Selected) -> Dataset:
    """An IMAGE item (no concept name: TID 2010 gives the purpose in the title);
    WAVEFORM or COMPOSITE for an object of another class (a rejection note
    made here withdraws a study's dose report and presentation states too)."""
    kind = record_type(selected.sop_class_uid)
    kind = "IMAGE" if kind == "RT DOSE" else kind  # pixel data, as a viewer shows it
    ref = Dataset()
    ref.ReferencedSOPClassUID = selected.sop_class_uid
    ref.ReferencedSOPInstanceUID = selected.sop_uid
    if selected.frames and kind == "IMAGE":
        ref.ReferencedFrameNumber = list(selected.frames)
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = kind if kind in ("IMAGE", "WAVEFORM") else "COMPOSITE"
    item.ReferencedSOPSequence = Sequence([ref])
    return item


def _evidence(study_uid: str, selected: list[Selected]) -> Sequence:
    """Current Requested Procedure Evidence: every referenced instance, by series."""
    by_series: dict[str, dict[str, str]] = {}
    for s in selected:
        by_series.setdefault(s.series_uid, {})[s.sop_uid] = s.sop_class_uid
    series_items = []
    for series_uid, instances in by_series.items():
        refs = []
        for sop_uid, sop_class in instances.items():
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
            refs.append(ref)
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = Sequence(refs)
        series_items.append(series)
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = Sequence(series_items)
    return Sequence([item])


def _request(study_uid: str, request: RequestRef) -> Sequence:
    """The Referenced Request Sequence (Referenced Request Macro, PS3.3
    Table C.17-3c): the Type 2 attributes present, empty when unknown."""
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedStudySequence = Sequence()
    item.AccessionNumber = request.accession_number
    item.PlacerOrderNumberImagingServiceRequest = request.placer_order
    item.FillerOrderNumberImagingServiceRequest = request.filler_order
    item.RequestedProcedureID = request.procedure_id
    item.RequestedProcedureDescription = request.description
    codes = []
    if request.code is not None:
        value, scheme, meaning = request.code
        code = Dataset()
        # A code longer than SH's 16 characters is a Long Code Value (UC), as the Code Sequence Macro says.
        if len(value) > 16:
            code.LongCodeValue = value
        else:
            code.CodeValue = value
        code.CodingSchemeDesignator, code.CodeMeaning = scheme, meaning
        codes.append(code)
    item.RequestedProcedureCodeSequence = Sequence(codes)
    return Sequence([item])


def person_name(name: str) -> str:
    """*name* (a user's display name) as a PN value: no backslash (a value
    separator) or "=" (a component group separator), at most 64 characters."""
    return " ".join(name.replace("\\", " ").replace("=", " ").split())[:_PN_MAX]


def put_patient_and_study(ds: Dataset, study: StudyHeader) -> None:
    """The Patient and General Study modules of an object made here (a key image
    note, a presentation state): the index's values, after the HIS's
    corrections, as reports' PDFs carry them."""
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = study.issuer
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = as_written("CS", study.sex)
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.description


def build_kos(study: StudyHeader, selected: list[Selected], *, title: str, author_name: str, login: str,
              description: str, when: tuple[str, str, str], series_description: str = SERIES_DESCRIPTION,
              series_number: int = SERIES_NUMBER) -> tuple[str, bytes]:
    """A KOS of *study* selecting *selected*, as Part 10 bytes (Explicit VR
    Little Endian, ISO_IR 192), in a new series of its own; (its SOP
    Instance UID, the bytes). *when*: the hospital's (date, time, offset);
    *title* one of :data:`TITLES` or :data:`REJECTION_TITLES` (a rejection
    note, pacs.rejection_notes)."""
    if not selected:
        raise ValueError("a Key Object Selection selects at least one image")
    day, clock, offset = when
    ds = new_instance(KOS_CLASS)
    ds.InstanceCreationDate, ds.InstanceCreationTime = day, clock
    ds.TimezoneOffsetFromUTC = offset
    put_patient_and_study(ds, study)
    # Key Object Document Series and General Equipment modules.
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = day, clock
    ds.SeriesDescription = series_description
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = MANUFACTURER
    # Key Object Document module.
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = day, clock
    # Type 1C: required when the document pertains to a Requested Procedure (PS3.3 C.17.6.2), as a
    # study ordered by the HIS does: how another PACS or the RIS ties the key images to the order.
    if study.request is not None:
        ds.ReferencedRequestSequence = _request(study.study_uid, study.request)
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study.study_uid, selected)
    # SR Document Content module: the TID 2010 tree.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code((title, "DCM", TITLES.get(title) or REJECTION_TITLES[title]))])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = KOS_TEMPLATE
    ds.ContentTemplateSequence = Sequence([template])
    children = [
        _item("HAS OBS CONTEXT", "CODE", OBSERVER_TYPE, ConceptCodeSequence=Sequence([_code(PERSON)])),
        _item("HAS OBS CONTEXT", "PNAME", PERSON_NAME, PersonName=person_name(author_name) or login),
    ]
    if login:  # without: no one's own selection (a rejection note made here, which a selection must not replace)
        children.append(_item("HAS OBS CONTEXT", "TEXT", LOGIN_NAME, TextValue=login))
    if description:
        children.append(_item("CONTAINS", "TEXT", DESCRIPTION, TextValue=description))
    children.extend(_image(s) for s in selected)
    ds.ContentSequence = Sequence(children)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SOPInstanceUID), out.getvalue()


def key_document(sop_uid: str, series_uid: str, document: SrDocument) -> KeyDocument:
    """The KOS *document* as a :class:`KeyDocument`: its title, observer
    (name and login) and description from the root's own items, its images
    the IMAGE items directly under the root (TID 2010 puts them there)."""
    root = document.root
    login = description = ""
    for item in root.children:
        concept = item.concept
        if concept is None or not isinstance(item.value, str):
            continue
        if item.relationship == "HAS OBS CONTEXT" and concept.is_(LOGIN_NAME[0]) and not login:
            login = item.value.strip()
        elif item.relationship == "CONTAINS" and concept.is_(DESCRIPTION[0]) and not description:
            description = item.value
    images = tuple(item.value for item in root.children
                   if item.value_type == "IMAGE" and isinstance(item.value, CompositeRef) and item.value.sop_uid)
    observers = document.observers()
    title = document.title
    return KeyDocument(
        sop_uid=sop_uid, series_uid=series_uid,
        title_code=title.value if title else "", title_scheme=title.scheme if title else "",
        title=title.meaning if title else "", author=observers[0] if observers else "", login=login,
        description=description, content_date=document.content_date, content_time=document.content_time,
        images=images,
    )

