"""Grayscale Softcopy Presentation States (GSPS, PS3.3 A.33.1): what a
radiologist's measurements are written as, and how any GSPS is read back,
whoever wrote it (a modality's, another archive's).

A measurement is a graphic object of the image (or frame) it was drawn on,
in PIXEL units ((0, 0) the top left corner of the first pixel, (Columns,
Rows) the bottom right corner of the last: the viewer's own grid): a length
a POLYLINE of 2 points, an angle a POLYLINE of 3 (the vertex second), an
elliptical ROI an ELLIPSE (its major axis' ends, then its minor axis'),
each followed by a text object with its label ("32.0 mm") anchored by the
shape, all on one graphic layer (MEASUREMENTS). One Graphic Annotation
Sequence item per image and frame.

The archive tells a radiologist's own presentation state by the login in
its Content Creator's Identification Code Sequence (a display name may be
shared or renamed, a login is not), as a Key Object Selection by its
observer's login.

Reading converts DISPLAY units (fractions of the displayed area) to pixels
when the presentation state's Displayed Area Selection for that image says
where that area is (SCALE TO FIT, no rotation nor flip); otherwise the
object is skipped and counted. Pure: no index, no storage
(:mod:`pacs.annotations` reads and stores them).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .key_objects import MANUFACTURER, StudyHeader, person_name, put_patient_and_study
from .part10 import new_instance

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
# A colour image's (RGB, YBR, PALETTE COLOR): a Grayscale one is for grayscale images alone (PS3.3 A.33.1, A.33.2).
CSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.2"
STATE_CLASSES = (GSPS_CLASS, CSPS_CLASS)
COLOUR_PHOTOMETRICS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
                                 "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
SERIES_DESCRIPTION = "Đo đạc / Measurements"
SERIES_NUMBER = 951
LAYER = "MEASUREMENTS"
LAYER_DESCRIPTION = "Đo đạc / Measurements"
CONTENT_LABEL = "MEASUREMENTS"
# The coding scheme of the login code in the Content Creator's Identification (a private one: PS3.16 8.2).
LOGIN_SCHEME = "99FILMLESS"
KINDS = {"length": 2, "angle": 3, "roi": 2}
# Points (a text object: 2, and one per 8 characters) drawn of one presentation state at most: a few thousand in
# a real one; beyond it a hostile one (an annotation on every frame of a long clip, polylines of thousands of
# points) is skipped, counted.
MAX_POINTS = 100_000
# Characters of a text object kept (its Unformatted Text Value is ST: 1024); each 8 count as a point of the budget.
MAX_TEXT = 4096
# Graphic types a GSPS may hold (PS3.3 C.10.5.1.2).
GRAPHIC_TYPES = frozenset({"POINT", "POLYLINE", "INTERPOLATED", "CIRCLE", "ELLIPSE"})


@dataclass(frozen=True)
class Target:
    """An image a measurement is drawn on: its instance, class, series, grid
    (columns, rows) and, for a multi-frame one, the frame (else None)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    columns: int
    rows: int
    frame: int | None = None
    monochrome1: bool = False
    # The image's Modality LUT as Rescale Slope, Intercept and Type (None: none, the stored values as they are):
    # a presentation state's replaces the image's (PS3.4 N.2.1.1), so it carries the image's.
    rescale: tuple[float, float, str] | None = None
    # The window (centre, width, after the Modality LUT) the image is shown with: the state's Softcopy VOI LUT
    # (PS3.4 N.2.1.2: without one another viewer applies none, a CT shown black).
    window: tuple[float, float] | None = None
    # Its pixels' vertical to horizontal size (Pixel Spacing, Pixel Aspect Ratio) as integers, as the viewer shows
    # them: the Displayed Area's Presentation Pixel Aspect Ratio (1:1 squashed a CR of non-square pixels).
    aspect: tuple[int, int] = (1, 1)
    # A colour image: its measurements a Color Softcopy Presentation State, with its ICC profile (b"": sRGB).
    color: bool = False
    icc: bytes = field(default=b"", repr=False)
    # Without a window: the image's VOI LUT table (an item of LUT Descriptor, Data, Explanation), its state's then.
    voi_lut: Dataset | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Measurement:
    """One measurement: *kind* length, angle or roi; *points* in the image's
    pixel grid (an ROI: the corners of the box its ellipse is inscribed in,
    top left then bottom right); *label* the value as the viewer showed it."""

    target: Target
    kind: str
    points: tuple[tuple[float, float], ...]
    label: str = ""


@dataclass
class Graphic:
    """A graphic object as read: its type, points (pixels), filled."""

    type: str
    points: list[list[float]]
    filled: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"type": self.type, "points": self.points, "filled": self.filled}


@dataclass
class Text:
    """A text object as read: its text, anchor point and bounding box (pixels, each optional)."""

    text: str
    anchor: list[float] | None = None
    box: list[list[float]] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "anchor": self.anchor, "box": self.box}


@dataclass
class Annotation:
    """What a presentation state draws on one image (frame None: every frame of it)."""

    sop_uid: str
    frame: int | None
    layer: str
    graphics: list[Graphic] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


@dataclass
class PresentationState:
    """A GSPS as read back: who made it, when, and what it draws where."""

    sop_uid: str
    series_uid: str
    label: str
    description: str
    author: str
    login: str
    created_date: str
    created_time: str
    annotations: list[Annotation]
    skipped: int = 0  # graphic or text objects that could not be placed (DISPLAY units without a known area)
    # Its Softcopy VOI LUT windows (centre, width) by image ("": every image it references).
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    points: int = 0  # of the drawing budget it used (points, texts by length)

    def as_json(self, *, own: bool) -> dict[str, Any]:
        created = _iso(self.created_date, self.created_time)
        return {"sop_uid": self.sop_uid, "series_uid": self.series_uid, "label": self.label,
                "description": self.description, "author": self.author, "login": self.login, "own": own,
                "created": created, "skipped": self.skipped}


def _iso(day: str, clock: str) -> str:
    """A DICOM date and time as ISO 8601 (as far as they go); "" when no date."""
    day = day.strip()
    if len(day) != 8 or not day.isdigit():
        return ""
    text = f"{day[:4]}-{day[4:6]}-{day[6:]}"
    clock = clock.strip().split(".")[0]
    if len(clock) >= 4 and clock.isdigit():
        text += f"T{clock[:2]}:{clock[2:4]}" + (f":{clock[4:6]}" if len(clock) >= 6 else "")
    return text


# -- writing ---------------------------------------------------------------------------------------
def _floats(points: Any) -> list[float]:
    return [float(v) for p in points for v in p]


def _graphic(kind: str, points: tuple[tuple[float, float], ...]) -> Dataset:
    item = Dataset()
    item.GraphicAnnotationUnits = "PIXEL"
    item.GraphicDimensions = 2
    if kind == "roi":
        (x0, y0), (x1, y1) = points
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        # Major axis' ends, then minor axis' (PS3.3 C.10.5.1.2: ELLIPSE).
        if rx >= ry:
            drawn = [(cx - rx, cy), (cx + rx, cy), (cx, cy - ry), (cx, cy + ry)]
        else:
            drawn = [(cx, cy - ry), (cx, cy + ry), (cx - rx, cy), (cx + rx, cy)]
        item.GraphicType = "ELLIPSE"
        item.GraphicFilled = "N"  # Type 1C: a closed shape
    else:
        drawn = list(points)
        item.GraphicType = "POLYLINE"
    item.NumberOfGraphicPoints = len(drawn)
    item.GraphicData = _floats(drawn)
    return item


def _anchor(measurement: Measurement) -> tuple[float, float]:
    """Where the label belongs: a length's second end, an angle's vertex, an ROI's bottom right corner."""
    if measurement.kind == "angle":
        return measurement.points[1]
    return measurement.points[-1]


def _text(measurement: Measurement) -> Dataset:
    """The label as a text object: anchored at the shape, its box beside it, within the image."""
    target = measurement.target
    ax, ay = _anchor(measurement)
    lines = measurement.label.split("\n")
    # The box's size in the image's pixels: a line about 1/25 of the image high (a label is read at any zoom).
    height = max(4.0, min(target.columns, target.rows) / 25) * len(lines)
    width = max(4.0, max(len(line) for line in lines) * height / len(lines) * 0.6)
    left = min(max(0.0, ax + height / 2), max(0.0, target.columns - width))
    top = min(max(0.0, ay), max(0.0, target.rows - height))
    right, bottom = min(float(target.columns), left + width), min(float(target.rows), top + height)
    item = Dataset()
    item.BoundingBoxAnnotationUnits = "PIXEL"
    item.AnchorPointAnnotationUnits = "PIXEL"
    item.UnformattedTextValue = measurement.label.replace("\n", "\r\n")
    item.BoundingBoxTopLeftHandCorner = [round(left, 2), round(top, 2)]
    item.BoundingBoxBottomRightHandCorner = [round(right, 2), round(bottom, 2)]
    item.BoundingBoxTextHorizontalJustification = "LEFT"
    item.AnchorPoint = [float(ax), float(ay)]
    item.AnchorPointVisibility = "N"
    return item


def _image_ref(target: Target) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = target.sop_class_uid
    ref.ReferencedSOPInstanceUID = target.sop_uid
    if target.frame is not None:
        ref.ReferencedFrameNumber = target.frame
    return ref


def _instance_ref(target: Target) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = target.sop_class_uid
    ref.ReferencedSOPInstanceUID = target.sop_uid
    return ref


def grouped(measurements: list[Measurement]) -> list[tuple[Target, list[Measurement]]]:
    """The measurements by image and frame, in the order each was first measured."""
    groups: dict[tuple[str, int | None], tuple[Target, list[Measurement]]] = {}
    for m in measurements:
        groups.setdefault((m.target.sop_uid, m.target.frame), (m.target, []))[1].append(m)
    return list(groups.values())


def by_class(measurements: list[Measurement]) -> list[list[Measurement]]:
    """*measurements* split by the SOP class of their images: a presentation
    state references images of one class (DCMTK's dcmpschk refuses others),
    so measurements of a CT and of an ultrasound clip are two of them; and by
    what one presentation state says of all its images alike: the Modality
    LUT (a PET's slices each have their own rescale), the Presentation
    LUT Shape (MONOCHROME1 or not) and colour (a Color Softcopy one)."""
    classes: dict[tuple[Any, ...], list[Measurement]] = {}
    for m in measurements:
        key = (m.target.sop_class_uid, m.target.color, m.target.rescale, m.target.monochrome1)
        classes.setdefault(key, []).append(m)
    return list(classes.values())


def build_gsps(study: StudyHeader, measurements: list[Measurement], *, author_name: str, login: str,
               when: tuple[str, str, str], series_uid: str = "", number: int = 1,
               institution: str = "") -> tuple[str, bytes]:
    """A GSPS of *study* drawing *measurements* (images of one SOP class:
    :func:`by_class`), as Part 10 bytes (Explicit VR Little Endian, ISO_IR
    192), instance *number* of series *series_uid* (a new one when empty);
    (its SOP Instance UID, the bytes). *when*: the hospital's (date, time, offset)."""
    if not measurements:
        raise ValueError("a presentation state of measurements holds at least one")
    if len(by_class(measurements)) > 1:
        raise ValueError("a presentation state references images of one SOP class, rescale and polarity")
    day, clock, offset = when
    color = measurements[0].target.color
    ds = new_instance(CSPS_CLASS if color else GSPS_CLASS)
    ds.InstanceCreationDate, ds.InstanceCreationTime = day, clock
    ds.TimezoneOffsetFromUTC = offset
    put_patient_and_study(ds, study)
    # General Series, Presentation Series and General Equipment modules.
    ds.Modality = "PR"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDate, ds.SeriesTime = day, clock
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.Manufacturer = MANUFACTURER
    # Presentation State Identification module (the Content Identification Macro).
    ds.InstanceNumber = number
    ds.ContentLabel = CONTENT_LABEL
    ds.ContentDescription = "Đo đạc của bác sĩ / Radiologist's measurements"
    name = person_name(author_name) or login[:64]
    ds.ContentCreatorName = name
    code = Dataset()
    if len(login) > 16:  # SH holds 16 characters: a longer login is a Long Code Value (UC)
        code.LongCodeValue = login
    else:
        code.CodeValue = login
    code.CodingSchemeDesignator = LOGIN_SCHEME
    code.CodeMeaning = name
    creator = Dataset()
    creator.PersonIdentificationCodeSequence = Sequence([code])
    creator.InstitutionName = institution or MANUFACTURER  # Type 1C: no Institution Code Sequence
    ds.ContentCreatorIdentificationCodeSequence = Sequence([creator])
    ds.PresentationCreationDate, ds.PresentationCreationTime = day, clock
    groups = grouped(measurements)
    # Presentation State Relationship module: every image annotated, by series (frames in the annotations).
    by_series: dict[str, dict[str, Target]] = {}
    for target, _ in groups:
        by_series.setdefault(target.series_uid, {}).setdefault(target.sop_uid, target)
    series_items = []
    for series_uid, targets in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedImageSequence = Sequence([_instance_ref(t) for t in targets.values()])
        series_items.append(item)
    ds.ReferencedSeriesSequence = Sequence(series_items)
    # Displayed Area module: each image whole, scaled to fit, its pixels in their true proportions.
    areas = []
    for targets in by_series.values():
        for target in targets.values():
            area = Dataset()
            area.ReferencedImageSequence = Sequence([_instance_ref(target)])
            area.DisplayedAreaTopLeftHandCorner = [1, 1]
            area.DisplayedAreaBottomRightHandCorner = [target.columns, target.rows]
            area.PresentationSizeMode = "SCALE TO FIT"
            area.PresentationPixelAspectRatio = list(target.aspect)
            areas.append(area)
    ds.DisplayedAreaSelectionSequence = Sequence(areas)
    # Graphic Annotation and Graphic Layer modules.
    annotations = []
    for target, items in groups:
        annotation = Dataset()
        annotation.ReferencedImageSequence = Sequence([_image_ref(target)])
        annotation.GraphicLayer = LAYER
        annotation.GraphicObjectSequence = Sequence([_graphic(m.kind, m.points) for m in items])
        texts = [_text(m) for m in items if m.label]
        if texts:
            annotation.TextObjectSequence = Sequence(texts)
        annotations.append(annotation)
    ds.GraphicAnnotationSequence = Sequence(annotations)
    layer = Dataset()
    layer.GraphicLayer = LAYER
    layer.GraphicLayerOrder = 1
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    layer.GraphicLayerDescription = LAYER_DESCRIPTION
    ds.GraphicLayerSequence = Sequence([layer])
    if color:
        # ICC Profile module (a Color Softcopy state has no grayscale pipeline): the image's own, else sRGB's.
        ds.ICCProfile = groups[0][0].icc or srgb_profile()
        if not groups[0][0].icc:
            ds.ColorSpace = "SRGB"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return str(ds.SOPInstanceUID), out.getvalue()
    # Modality LUT module: the images' rescale (one for all: by_class), which replaces theirs (PS3.4 N.2.1.1).
    rescale = groups[0][0].rescale
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = _ds_number(rescale[0]), _ds_number(rescale[1])
        ds.RescaleType = rescale[2]
    # Softcopy VOI LUT module: each image's window as the viewer shows it (images alike share an item).
    windows: dict[tuple[float, float], dict[str, Target]] = {}
    for target, _ in groups:  # an image's every frame: the window of its first measured
        if target.window is not None and not any(target.sop_uid in seen for seen in windows.values()):
            windows.setdefault(target.window, {})[target.sop_uid] = target
    voi_items = []
    for (centre, width), targets in windows.items():
        voi = Dataset()
        voi.ReferencedImageSequence = Sequence([_instance_ref(t) for t in targets.values()])
        voi.WindowCenter, voi.WindowWidth = _ds_number(centre), _ds_number(width)
        voi_items.append(voi)
    tabled: dict[str, Target] = {}
    for target, _ in groups:
        if target.window is None and target.voi_lut is not None and not any(
                target.sop_uid in seen for seen in windows.values()):
            tabled.setdefault(target.sop_uid, target)
    for target in tabled.values():
        voi = Dataset()
        voi.ReferencedImageSequence = Sequence([_instance_ref(target)])
        voi.VOILUTSequence = Sequence([target.voi_lut])
        voi_items.append(voi)
    if voi_items:
        ds.SoftcopyVOILUTSequence = Sequence(voi_items)
    # Softcopy Presentation LUT module: grey levels as the image gives them (inverted for MONOCHROME1).
    ds.PresentationLUTShape = "INVERSE" if groups[0][0].monochrome1 else "IDENTITY"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SOPInstanceUID), out.getvalue()


@functools.cache
def srgb_profile() -> bytes:
    """An sRGB ICC profile (littleCMS's, through Pillow): a colour state's when its image names none."""
    from PIL import ImageCms

    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def ds_value(value: float) -> float:
    """*value* as a presentation state keeps it (a Decimal String of 6 significant digits)."""
    return float(_ds_number(value))


def _ds_number(value: float) -> str:
    """*value* as a Decimal String (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.6e}"


# -- reading ---------------------------------------------------------------------------------------
def _text_of(value: Any) -> str:
    return str(value or "").strip()


def _login(ds: Dataset) -> str:
    """The login of the creator's identification code of our scheme ("" when none: a foreign GSPS)."""
    for creator in ds.get("ContentCreatorIdentificationCodeSequence") or []:
        for code in creator.get("PersonIdentificationCodeSequence") or []:
            if _text_of(code.get("CodingSchemeDesignator")) == LOGIN_SCHEME:
                return _text_of(code.get("CodeValue") or code.get("LongCodeValue"))
    return ""


def _refs(items: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(SOP Instance UID, frames) of a Referenced Image Sequence (no frames: every frame)."""
    found = []
    for ref in items or []:
        sop = _text_of(ref.get("ReferencedSOPInstanceUID"))
        if not sop:
            continue
        try:  # pydicom converts on access: "1e400" raises OverflowError, not ValueError
            frames = ref.get("ReferencedFrameNumber")
        except (ArithmeticError, TypeError, ValueError):
            frames = None  # a malformed frame number names no frame
        values = [] if frames is None or frames == "" else (
            list(frames) if isinstance(frames, (list, MultiValue)) else [frames])
        numbers = []
        for value in values:
            try:
                if int(value) >= 1:
                    numbers.append(int(value))
            except (ArithmeticError, TypeError, ValueError):
                continue  # a malformed frame number names no frame
        found.append((sop, tuple(numbers)))
    return found


@dataclass(frozen=True)
class _Area:
    """A displayed area (pixels, 1-based corners as written) and whether DISPLAY units can be placed in it."""

    tlhc: tuple[float, float]
    brhc: tuple[float, float]
    usable: bool


def _areas(ds: Dataset, transformed: bool) -> dict[tuple[str, int | None], _Area]:
    """The Displayed Area Selection by (instance, frame) ((instance, None): its every frame; ("", None): all)."""
    found: dict[tuple[str, int | None], _Area] = {}
    for item in ds.get("DisplayedAreaSelectionSequence") or []:
        try:
            tl = [float(v) for v in item.DisplayedAreaTopLeftHandCorner]
            br = [float(v) for v in item.DisplayedAreaBottomRightHandCorner]
        except (AttributeError, TypeError, ValueError):
            continue
        mode = _text_of(item.get("PresentationSizeMode")).upper() or "SCALE TO FIT"
        area = _Area((tl[0], tl[1]), (br[0], br[1]), mode == "SCALE TO FIT" and not transformed and len(tl) == 2
                     and len(br) == 2 and br[0] > tl[0] - 1 and br[1] > tl[1] - 1)
        refs = _refs(item.get("ReferencedImageSequence"))
        if not refs:
            found[("", None)] = area
        for sop, frames in refs:
            for frame in frames or (None,):
                found[(sop, frame)] = area
    return found


def _area_for(areas: dict[tuple[str, int | None], _Area], sop: str, frame: int | None) -> _Area | None:
    return areas.get((sop, frame)) or areas.get((sop, None)) or areas.get(("", None))


def _to_pixels(values: list[float], area: _Area | None) -> list[list[float]] | None:
    """DISPLAY points (fractions of the displayed area) as pixels; None when the area is not known."""
    if area is None or not area.usable:
        return None
    # The area's corners are pixel numbers (1-based, inclusive): (1, 1)..(Columns, Rows) is 0..Columns.
    x0, y0 = area.tlhc[0] - 1, area.tlhc[1] - 1
    width, height = area.brhc[0] - x0, area.brhc[1] - y0
    return [[round(x0 + values[i] * width, 3), round(y0 + values[i + 1] * height, 3)]
            for i in range(0, len(values) - 1, 2)]


def _points(values: Any, units: str, area: _Area | None) -> list[list[float]] | None:
    try:
        numbers = [float(v) for v in (values if hasattr(values, "__iter__") else [values])]
    except (TypeError, ValueError):
        return None
    if not numbers or len(numbers) % 2 or not all(math.isfinite(v) for v in numbers):
        return None
    if units == "PIXEL":
        return [[round(numbers[i], 3), round(numbers[i + 1], 3)] for i in range(0, len(numbers), 2)]
    if units == "DISPLAY":
        return _to_pixels(numbers, area)
    return None


def _annotation_objects(item: Dataset, area: _Area | None) -> tuple[list[Graphic], list[Text], int]:
    """The graphic and text objects of a Graphic Annotation item in pixels, and how many were skipped."""
    graphics: list[Graphic] = []
    texts: list[Text] = []
    skipped = 0
    for obj in item.get("GraphicObjectSequence") or []:
        kind = _text_of(obj.get("GraphicType")).upper()
        points = _points(obj.get("GraphicData"), _text_of(obj.get("GraphicAnnotationUnits")).upper(), area)
        if kind not in GRAPHIC_TYPES or points is None:
            skipped += 1
            continue
        graphics.append(Graphic(kind, points, _text_of(obj.get("GraphicFilled")).upper() == "Y"))
    # Compound graphics (arrows, rulers...) are not drawn here: counted as skipped.
    skipped += len(item.get("CompoundGraphicSequence") or [])
    for obj in item.get("TextObjectSequence") or []:
        text = str(obj.get("UnformattedTextValue") or "")[:MAX_TEXT].replace("\r\n", "\n").strip()
        box = anchor = None
        placed = False
        if "BoundingBoxTopLeftHandCorner" in obj and "BoundingBoxBottomRightHandCorner" in obj:
            box = _points(list(obj.BoundingBoxTopLeftHandCorner) + list(obj.BoundingBoxBottomRightHandCorner),
                          _text_of(obj.get("BoundingBoxAnnotationUnits")).upper(), area)
            placed = box is not None
        if "AnchorPoint" in obj:
            found = _points(obj.AnchorPoint, _text_of(obj.get("AnchorPointAnnotationUnits")).upper(), area)
            anchor = found[0] if found else None
            placed = placed or anchor is not None
        if not placed or not text:
            skipped += 1
            continue
        texts.append(Text(text, anchor, box))
    return graphics, texts, skipped


def read_presentation_state(ds: Dataset, series_uid: str = "", max_points: int = MAX_POINTS) -> PresentationState:
    """The GSPS *ds* as a :class:`PresentationState` (its annotations by
    image and frame, in pixels; at most *max_points* of them: the rest
    skipped). Raises ValueError for no GSPS."""
    if _text_of(ds.get("SOPClassUID")) not in STATE_CLASSES:
        raise ValueError(f"not a grayscale or color softcopy presentation state (SOP class {ds.get('SOPClassUID')})")
    rotation = _text_of(ds.get("ImageRotation")) or "0"
    transformed = rotation not in ("0", "0.0") or _text_of(ds.get("ImageHorizontalFlip")).upper() == "Y"
    areas = _areas(ds, transformed)
    # Images the presentation state applies to: an annotation naming none applies to them all.
    every = [(sop, frames) for series in ds.get("ReferencedSeriesSequence") or []
             for sop, frames in _refs(series.get("ReferencedImageSequence"))]
    annotations: list[Annotation] = []
    skipped = 0
    budget = max(0, min(max_points, MAX_POINTS))
    for item in ds.get("GraphicAnnotationSequence") or []:
        layer = _text_of(item.get("GraphicLayer"))
        # Read once per displayed area (an item naming no image applies to every image and frame referenced).
        read: dict[int, tuple[list[Graphic], list[Text], int, int]] = {}
        for sop, frames in _refs(item.get("ReferencedImageSequence")) or every:
            for frame in frames or (None,):
                area = _area_for(areas, sop, frame)
                if id(area) not in read:
                    graphics, texts, missed = _annotation_objects(item, area)
                    cost = sum(len(g.points) for g in graphics) + sum(2 + len(t.text) // 8 for t in texts)
                    read[id(area)] = (graphics, texts, missed, cost)
                graphics, texts, missed, cost = read[id(area)]
                skipped += missed
                if not (graphics or texts):
                    continue
                if cost > budget:  # a hostile (or absurd) state: what is beyond the budget is not drawn
                    skipped += len(graphics) + len(texts)
                    continue
                budget -= cost
                annotations.append(Annotation(sop, frame, layer, graphics, texts))
    windows: dict[str, tuple[float, float]] = {}
    for voi in ds.get("SoftcopyVOILUTSequence") or []:
        try:
            centre, width = (float(_first(voi.get(k))) for k in ("WindowCenter", "WindowWidth"))
        except (TypeError, ValueError):
            continue  # a VOI LUT table, or no usable window
        if math.isfinite(centre) and math.isfinite(width):
            for sop, _ in _refs(voi.get("ReferencedImageSequence")) or [("", ())]:
                windows.setdefault(sop, (centre, width))
    return PresentationState(
        sop_uid=_text_of(ds.get("SOPInstanceUID")), series_uid=series_uid or _text_of(ds.get("SeriesInstanceUID")),
        label=_text_of(ds.get("ContentLabel")), description=_text_of(ds.get("ContentDescription")),
        author=str(ds.get("ContentCreatorName") or "").strip(), login=_login(ds),
        created_date=_text_of(ds.get("PresentationCreationDate")),
        created_time=_text_of(ds.get("PresentationCreationTime")),
        annotations=annotations, skipped=skipped, windows=windows, points=min(max_points, MAX_POINTS) - budget,
    )


def _first(value: Any) -> Any:
    """The first value of a possibly multi-valued element (None when empty)."""
    if isinstance(value, (list, MultiValue)):
        return value[0] if len(value) else None
    return value


def measurements_of(state: PresentationState) -> list[dict[str, Any]]:
    """The measurements one of our own presentation states holds, as the
    viewer sends them (kind, points, label): a POLYLINE of 2 points a
    length, of 3 an angle, an axis-aligned ELLIPSE an ROI (its box);
    each graphic's label the text object anchored at it; its window the
    image's Softcopy VOI LUT window (None: none)."""
    found = []
    for annotation in state.annotations:
        unused = list(annotation.texts)
        for graphic in annotation.graphics:
            kind, points = "", graphic.points
            if graphic.type == "POLYLINE" and len(points) in (2, 3):
                kind = "length" if len(points) == 2 else "angle"
            elif graphic.type == "ELLIPSE" and len(points) == 4:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                kind, points = "roi", [[min(xs), min(ys)], [max(xs), max(ys)]]
            if not kind:
                continue
            # Its label: the text object anchored where build_gsps anchors this shape's.
            at = points[1] if kind == "angle" else points[-1]
            text = next((t for t in unused if t.anchor is not None
                         and abs(t.anchor[0] - at[0]) < 0.01 and abs(t.anchor[1] - at[1]) < 0.01), None)
            if text is not None:
                unused.remove(text)
            window = state.windows.get(annotation.sop_uid) or state.windows.get("")
            found.append({"sop_uid": annotation.sop_uid, "frame": annotation.frame or 1, "kind": kind,
                          "points": [[round(x, 2), round(y, 2)] for x, y in points],
                          "label": text.text if text is not None else "",
                          "window": list(window) if window is not None else None})
    return found
