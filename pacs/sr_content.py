"""DICOM Structured Reports (PS3.3 C.17.3): the content tree of an SR object
as a typed tree the viewer can show as a document.

An SR has no pixels: its content *is* the dataset, a tree of content items
(value type, relationship to the parent, concept name, value) nested in
Content Sequences. Every SR family is read alike (Basic Text, Enhanced,
Comprehensive, Comprehensive 3D, Extensible, the X-Ray and Enhanced X-Ray
Radiation Dose SRs, Key Object Selection, measurement reports of
ultrasound and CAD), since they differ in the templates they fill, not in
the encoding of the tree.

The object comes from whichever modality sent it, so the walk is bounded:
at most :data:`MAX_DEPTH` levels and :data:`MAX_ITEMS` items (the rest is
marked ``truncated``), an item that cannot be read is shown as such rather
than failing the document, and a by-reference relationship
(ReferencedContentItemIdentifier) is shown as a reference to the item it
names, never followed (a reference may point anywhere, itself included).

Pure: no index, no storage (:mod:`pacs.sr_reads` reads the object).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .header import dataset_codec, decode_text

log = logging.getLogger(__name__)

# Content levels below the document's root container shown at most: a real
# report is a handful deep (an RDSR 4, a measurement report with its
# coordinates 6, a CAD report 8). The ingest refuses sequences nested more
# than 32 deep (a content level is a sequence and an item: 16 levels).
MAX_DEPTH = 12
# Content items shown at most: an interventional RDSR of a long procedure
# holds a few hundred irradiation events of ~40 items each.
MAX_ITEMS = 20_000
# Coordinates shown of a SCOORD / SCOORD3D (a summary, not a drawing).
MAX_COORDINATES = 12

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# The SR storage SOP classes (PS3.4 B.5), by name. Any other ...1.1.88.x is
# taken as an SR too (a class added to the standard after this list).
SR_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR",
    "1.2.840.10008.5.1.4.1.1.88.40": "Procedure Log",
    "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document",
    "1.2.840.10008.5.1.4.1.1.88.65": "Chest CAD SR",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.69": "Colon CAD SR",
    "1.2.840.10008.5.1.4.1.1.88.70": "Implantation Plan SR",
    "1.2.840.10008.5.1.4.1.1.88.71": "Acquisition Context SR",
    "1.2.840.10008.5.1.4.1.1.88.72": "Simplified Adult Echo SR",
    "1.2.840.10008.5.1.4.1.1.88.73": "Patient Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.74": "Planned Imaging Agent Administration SR",
    "1.2.840.10008.5.1.4.1.1.88.75": "Performed Imaging Agent Administration SR",
    "1.2.840.10008.5.1.4.1.1.88.76": "Enhanced X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.77": "Waveform Annotation SR",
    # SR documents of other families (PS3.3 A.35.x).
    "1.2.840.10008.5.1.4.1.1.78.6": "Spectacle Prescription Report",
    "1.2.840.10008.5.1.4.1.1.79.1": "Macular Grid Thickness and Volume Report",
}
# The radiation dose SRs (a study's dose summary reads these).
DOSE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.76"})

# Value types whose value is a reference to a composite object (PS3.3 C.17.3.2.1).
COMPOSITE_TYPES = frozenset({"IMAGE", "COMPOSITE", "WAVEFORM"})
VALUE_TYPES = frozenset({"CONTAINER", "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "PNAME", "UIDREF",
                         "SCOORD", "SCOORD3D", "TCOORD", "TABLE", *COMPOSITE_TYPES})
# Shown when a by-reference item names an item: the value type of the reference itself.
REFERENCE = "REFERENCE"


def is_sr_class(sop_class_uid: str) -> bool:
    """Whether *sop_class_uid* is a Structured Report storage class."""
    return sop_class_uid in SR_CLASSES or sop_class_uid.startswith(SR_PREFIX)


class SrUnreadable(ValueError):
    """The object is not an SR document this module can read (no root container)."""


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 8.8): value, scheme and meaning as written."""

    value: str
    scheme: str
    meaning: str
    version: str = ""

    def is_(self, value: str, scheme: str = "DCM") -> bool:
        """Whether this is the code *value* of *scheme* (a missing scheme matches: some senders leave it out)."""
        return self.value == value and self.scheme.upper() in (scheme, "")

    def as_json(self) -> dict[str, str]:
        out = {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}
        if self.version:
            out["version"] = self.version
        return out


@dataclass(frozen=True)
class Numeric:
    """A NUM item's measured value: the number as written (DS), as a float
    where it is one, its unit (UCUM, from the Measurement Units Code) and
    a qualifier (a value not given: NaN, infinity...)."""

    number: str
    value: float | None
    unit: Code | None
    qualifier: Code | None = None

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "float": self.value, "unit": self.unit.as_json() if self.unit else None,
                "qualifier": self.qualifier.as_json() if self.qualifier else None}


@dataclass(frozen=True)
class CompositeRef:
    """An IMAGE / COMPOSITE / WAVEFORM item's object, and (filled by
    :mod:`pacs.sr_reads`) where it is in the archive."""

    sop_class_uid: str
    sop_uid: str
    frames: tuple[int, ...] = ()
    segments: tuple[int, ...] = ()
    presentation_state_uid: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"sop_class_uid": self.sop_class_uid, "sop_uid": self.sop_uid, "frames": list(self.frames),
                "segments": list(self.segments), "presentation_state_uid": self.presentation_state_uid}


@dataclass(frozen=True)
class Coordinates:
    """A SCOORD / SCOORD3D / TCOORD summary: its type and how many points or
    samples, with the first few values."""

    kind: str
    points: int
    data: tuple[float, ...] = ()
    frame_of_reference_uid: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"graphic_type": self.kind, "points": self.points, "data": list(self.data)}
        if self.frame_of_reference_uid:
            out["frame_of_reference_uid"] = self.frame_of_reference_uid
        return out


ItemValue = str | Code | Numeric | CompositeRef | Coordinates | None


@dataclass
class ContentItem:
    """One node of the content tree. *id* is its position (PS3.3
    C.17.3.2.5: the root is ``1``, its second child ``1.2``), the form a
    by-reference relationship names its target in (*target*)."""

    id: str
    value_type: str
    relationship: str = ""
    concept: Code | None = None
    value: ItemValue = None
    children: list[ContentItem] = field(default_factory=list)
    # The target's id, for a by-reference item (value_type REFERENCE).
    target: str = ""
    observed_at: str = ""
    # CONTAINER: SEPARATE or CONTINUOUS; its template (TID) when named.
    continuity: str = ""
    template: str = ""
    # Children left out (depth or item cap), or the item could not be read.
    truncated: bool = False
    error: str = ""

    def walk(self) -> Iterator[ContentItem]:
        """This item and every item below it, depth first (iteratively: the
        tree's depth is bounded, the habit is not to rely on it)."""
        stack = [self]
        while stack:
            item = stack.pop()
            yield item
            stack.extend(reversed(item.children))

    def find(self, value: str, scheme: str = "DCM") -> ContentItem | None:
        """The first item below (or at) this one whose concept is *value*."""
        return next((i for i in self.walk() if i.concept is not None and i.concept.is_(value, scheme)), None)

    def find_all(self, value: str, scheme: str = "DCM") -> list[ContentItem]:
        return [i for i in self.walk() if i.concept is not None and i.concept.is_(value, scheme)]

    def as_json(self, targets: dict[str, ContentItem] | None = None) -> dict[str, Any]:
        """The item as the JSON API gives it (*targets*: items by id, to
        name a reference's target)."""
        out: dict[str, Any] = {"id": self.id, "value_type": self.value_type, "relationship": self.relationship,
                               "concept": self.concept.as_json() if self.concept else None,
                               "value": _value_json(self.value)}
        if self.value_type == REFERENCE:
            target = (targets or {}).get(self.target)
            out["value"] = {"target": self.target, "found": target is not None,
                            "concept": target.concept.as_json() if target and target.concept else None,
                            "value_type": target.value_type if target else None}
        if self.value_type == "CONTAINER":
            out["continuity"] = self.continuity
            if self.template:
                out["template"] = self.template
        if self.observed_at:
            out["observed_at"] = self.observed_at
        if self.truncated:
            out["truncated"] = True
        if self.error:
            out["error"] = self.error
        out["children"] = [c.as_json(targets) for c in self.children]
        return out


def _value_json(value: ItemValue) -> Any:
    if value is None or isinstance(value, str):
        return value
    return value.as_json()


@dataclass
class Observer:
    """A verifying observer (who verified the report, PS3.3 C.17.2)."""

    name: str
    organization: str
    at: str


@dataclass
class SrDocument:
    """An SR document: the header fields a reader needs and the content tree."""

    sop_class_uid: str
    root: ContentItem
    completion: str = ""
    completion_description: str = ""
    verification: str = ""
    preliminary: str = ""
    content_date: str = ""
    content_time: str = ""
    verifying_observers: list[Observer] = field(default_factory=list)
    author_observers: list[str] = field(default_factory=list)
    items: int = 0
    truncated: bool = False

    @property
    def title(self) -> Code | None:
        return self.root.concept

    def by_id(self) -> dict[str, ContentItem]:
        return {item.id: item for item in self.root.walk()}

    def references(self) -> list[CompositeRef]:
        """The composite objects the content refers to (images, waveforms, other SRs)."""
        return [i.value for i in self.root.walk() if isinstance(i.value, CompositeRef)]

    def observers(self) -> list[str]:
        """Who observed (TID 1002 observer context at the document's top
        level: Person Observer Name, Device Observer Name), then the
        header's author observers."""
        names = [item.value for item in self.root.children
                 if item.relationship == "HAS OBS CONTEXT" and isinstance(item.value, str) and item.value
                 and item.concept is not None and (item.concept.is_("121008") or item.concept.is_("121013"))]
        return list(dict.fromkeys([*names, *self.author_observers]))

    def as_json(self) -> dict[str, Any]:
        return {
            "sop_class_uid": self.sop_class_uid,
            "sop_class": SR_CLASSES.get(self.sop_class_uid, "Structured Report"),
            "title": self.title.as_json() if self.title else None,
            "completion": self.completion,
            "completion_description": self.completion_description,
            "verification": self.verification,
            "preliminary": self.preliminary,
            "content_date": self.content_date,
            "content_time": self.content_time,
            "verifying_observers": [{"name": o.name, "organization": o.organization, "at": o.at}
                                    for o in self.verifying_observers],
            "observers": self.observers(),
            "items": self.items,
            "truncated": self.truncated,
            "content": self.root.as_json(self.by_id()),
        }


# -- reading ------------------------------------------------------------------------------------
# Values the data set's character set applies to (pacs.header reads them alike).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "CS"})


def _values(value: Any) -> list[Any]:
    """The values of an element's value: none, one, or a multi-valued one's."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    sequence = ds.get(keyword) if ds is not None else None
    return sequence[0] if sequence else None


class _Reader:
    """Reads one document's content items: its text values in the data
    set's character set as the index reads them (:func:`pacs.header.decode_text`:
    UTF-8 that a Vietnamese modality labelled Latin-1, or not at all, is read
    as UTF-8, not as "Nguyá»…n"), within the document's item budget."""

    def __init__(self, ds: Dataset, max_items: int) -> None:
        # None for ISO 2022 code extensions: pydicom's own conversion then.
        self.codec = dataset_codec(ds)
        self.left = max_items
        self.read = 0
        self.truncated = False

    def text(self, ds: Dataset | None, keyword: str, *, strip: bool = True) -> str:
        """A text value as a str ('' when absent), a multi-valued one's
        values joined by backslashes as written."""
        if ds is None:
            return ""
        element = ds.get_item(keyword)
        if element is None:
            return ""
        raw = element.value
        if isinstance(raw, bytes):  # not yet converted by pydicom: decode it as the index does
            vr = element.VR if element.VR not in (None, "UN") else dictionary_VR(keyword)
            if vr in _TEXT_VRS and self.codec is not None:
                text = decode_text(raw, vr, self.codec)
            elif vr not in _TEXT_VRS:
                text = raw.decode("latin-1")  # UI, DA, TM, DT, DS, IS: ASCII
            else:
                text = None
            if text is not None:
                return text.strip(" \x00") if strip else text.rstrip(" \x00")
        value = ds.get(keyword)
        if value is None:
            return ""
        text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
        return text.strip(" \x00") if strip else text.rstrip(" \x00")

    def code(self, item: Dataset | None) -> Code | None:
        """The code an item of a code sequence holds (Code Value, else Long
        Code Value, else URN Code Value); None for an absent item."""
        if item is None:
            return None
        value = self.text(item, "CodeValue") or self.text(item, "LongCodeValue") or self.text(item, "URNCodeValue")
        return Code(value, self.text(item, "CodingSchemeDesignator"), self.text(item, "CodeMeaning"),
                    self.text(item, "CodingSchemeVersion"))

    def numeric(self, ds: Dataset) -> Numeric | None:
        measured = _first(ds, "MeasuredValueSequence")
        qualifier = self.code(_first(ds, "NumericValueQualifierCodeSequence"))
        if measured is None:
            return Numeric("", None, None, qualifier) if qualifier else None
        number = self.text(measured, "NumericValue")
        value: float | None
        try:
            # The FD value when given: DS keeps 16 characters, FD the whole precision.
            floating = measured.get("FloatingPointValue")
            value = float(floating) if floating is not None else float(number) if number else None
        except (TypeError, ValueError):
            value = None
        if value is not None and not math.isfinite(value):
            value = None  # JSON has no NaN; the qualifier says why there is no number
        return Numeric(number, value, self.code(_first(measured, "MeasurementUnitsCodeSequence")), qualifier)

    def composite(self, ds: Dataset) -> CompositeRef | None:
        ref = _first(ds, "ReferencedSOPSequence")
        if ref is None:
            return None
        state = _first(ref, "ReferencedSOPSequence")  # IMAGE: a presentation state to show it with
        return CompositeRef(
            sop_class_uid=self.text(ref, "ReferencedSOPClassUID"),
            sop_uid=self.text(ref, "ReferencedSOPInstanceUID"),
            frames=tuple(int(v) for v in _values(ref.get("ReferencedFrameNumber"))),
            segments=tuple(int(v) for v in _values(ref.get("ReferencedSegmentNumber"))),
            presentation_state_uid=self.text(state, "ReferencedSOPInstanceUID"),
        )

    def coordinates(self, ds: Dataset, value_type: str) -> Coordinates:
        if value_type == "TCOORD":
            # Which of the three ways of naming the samples is used, and how many.
            for keyword in ("ReferencedSamplePositions", "ReferencedTimeOffsets", "ReferencedDateTime"):
                count = len(_values(ds.get(keyword)))
                if count:
                    return Coordinates(self.text(ds, "TemporalRangeType"), count)
            return Coordinates(self.text(ds, "TemporalRangeType"), 0)
        data = tuple(float(v) for v in _values(ds.get("GraphicData")))
        per_point = 3 if value_type == "SCOORD3D" else 2
        shown = tuple(v for v in data[:MAX_COORDINATES] if math.isfinite(v))
        return Coordinates(self.text(ds, "GraphicType"), len(data) // per_point, shown,
                           self.text(ds, "ReferencedFrameOfReferenceUID"))

    def value(self, ds: Dataset, value_type: str) -> ItemValue:
        if value_type == "TEXT":
            return self.text(ds, "TextValue", strip=False)  # as written: leading spaces and line breaks kept
        if value_type == "CODE":
            return self.code(_first(ds, "ConceptCodeSequence"))
        if value_type == "NUM":
            return self.numeric(ds)
        if value_type in _DATE_KEYWORDS:
            return self.text(ds, _DATE_KEYWORDS[value_type])
        if value_type == "PNAME":
            return self.text(ds, "PersonName")
        if value_type == "UIDREF":
            return self.text(ds, "UID")
        if value_type in COMPOSITE_TYPES:
            return self.composite(ds)
        if value_type in ("SCOORD", "SCOORD3D", "TCOORD"):
            return self.coordinates(ds, value_type)
        return None

    def item(self, ds: Dataset, item_id: str, depth: int) -> ContentItem:
        """The content item *ds* and (within the caps) the items below it."""
        self.left -= 1
        self.read += 1
        node = ContentItem(id=item_id, value_type="")
        try:
            node.relationship = self.text(ds, "RelationshipType")
            target = ds.get("ReferencedContentItemIdentifier")
            if target is not None and "ValueType" not in ds:
                # By reference (PS3.3 C.17.3.2.5): named, never followed.
                node.value_type = REFERENCE
                node.target = ".".join(str(int(v)) for v in _values(target))
                return node
            # The root container may leave its Value Type out (older SRs do).
            node.value_type = self.text(ds, "ValueType").upper() or ("CONTAINER" if depth == 0 else "UNKNOWN")
            node.concept = self.code(_first(ds, "ConceptNameCodeSequence"))
            node.value = self.value(ds, node.value_type)
            node.observed_at = self.text(ds, "ObservationDateTime")
            if node.value_type == "CONTAINER":
                node.continuity = self.text(ds, "ContinuityOfContent")
                node.template = self.text(_first(ds, "ContentTemplateSequence"), "TemplateIdentifier")
            children = ds.get("ContentSequence") or []
        except RecursionError:
            raise
        except Exception as exc:  # a malformed value of an untrusted object: shown as unreadable, the rest goes on
            log.debug("SR content item %s unreadable: %s", item_id, exc)
            node.value_type = node.value_type or "UNKNOWN"
            node.error = f"unreadable content item ({exc.__class__.__name__})"
            return node
        if children and depth >= MAX_DEPTH:
            node.truncated = self.truncated = True
            return node
        for index, child in enumerate(children, start=1):
            if self.left <= 0:
                node.truncated = self.truncated = True
                break
            node.children.append(self.item(child, f"{item_id}.{index}", depth + 1))
        return node


_DATE_KEYWORDS = {"DATETIME": "DateTime", "DATE": "Date", "TIME": "Time"}


def read_document(ds: Dataset, max_items: int = MAX_ITEMS) -> SrDocument:
    """The SR document *ds* holds: its header's flags and observers and its
    content tree (at most *max_items* items, :data:`MAX_DEPTH` deep).
    :class:`SrUnreadable` when the data set holds no content tree."""
    if "ContentSequence" not in ds and "ConceptNameCodeSequence" not in ds:
        raise SrUnreadable("the object holds no SR content tree (no Content Sequence)")
    reader = _Reader(ds, max_items)
    root_type = reader.text(ds, "ValueType").upper()
    if root_type not in ("CONTAINER", ""):
        raise SrUnreadable(f"the root content item is {root_type[:16]!r}, not a CONTAINER")
    try:
        root = reader.item(ds, "1", 0)
        observers = [Observer(reader.text(item, "VerifyingObserverName"), reader.text(item, "VerifyingOrganization"),
                              reader.text(item, "VerificationDateTime"))
                     for item in ds.get("VerifyingObserverSequence") or []]
        authors = [reader.text(item, "PersonName") or reader.text(item, "InstitutionName")
                   for item in ds.get("AuthorObserverSequence") or []]
    except RecursionError:
        # pydicom reads nested sequences recursively: an object nested deeper than Python's stack.
        raise SrUnreadable("the content tree is nested too deeply to read") from None
    root.relationship = ""
    return SrDocument(
        sop_class_uid=reader.text(ds, "SOPClassUID"),
        root=root,
        completion=reader.text(ds, "CompletionFlag"),
        completion_description=reader.text(ds, "CompletionFlagDescription"),
        verification=reader.text(ds, "VerificationFlag"),
        preliminary=reader.text(ds, "PreliminaryFlag"),
        content_date=reader.text(ds, "ContentDate"),
        content_time=reader.text(ds, "ContentTime"),
        verifying_observers=observers,
        author_observers=[a for a in authors if a],
        items=reader.read,
        truncated=reader.truncated,
    )
