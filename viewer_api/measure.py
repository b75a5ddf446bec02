"""Measurements on a frame: its calibration (how many mm a pixel is) and
the statistics of a region of its stored pixel values in modality units.

Coordinates are in the frame's own pixel grid, as a Graphic Annotation's
PIXEL units are (PS3.3 C.10.5.1.2): (0, 0) is the top left corner of the top
left pixel, (Columns, Rows) the bottom right corner of the last one; the
centre of the first pixel is (0.5, 0.5). A pixel is in a region when its
centre is.

Calibration, for frame *i* (0-based) of an object:

- Pixel Spacing of the Pixel Measures functional group (per-frame, then
  shared) of an enhanced object, else the top level Pixel Spacing: the
  patient's own size (CT, MR, PET...), ``basis`` "patient".
- Projection radiographs (CR, DX, MG, IO, XA, RF...: Imager Pixel Spacing,
  top level or in the Frame Pixel Data Properties group of enhanced XA /
  XRF) follow PS3.3 10.7.1.1 and C.8.11.7: Imager Pixel Spacing is measured
  at the detector, larger than the patient by the geometric magnification.
  A Pixel Spacing that differs from it is a calibrated one ("calibrated",
  e.g. against a fiducial of known size), unless its Pixel Spacing
  Calibration Type is GEOMETRY or it is the Imager Pixel Spacing over the
  ERMF: an estimate at an assumed depth ("magnification"); else an
  Estimated Radiographic Magnification Factor gives an estimate at the
  isocenter (the detector spacing divided by it: "magnification"); else the
  distance is the one at the detector ("detector"). A radiograph with a Pixel Spacing but no
  Imager Pixel Spacing (nor a Pixel Spacing Calibration Type) may be measured
  at the detector or not: "unknown", and said so.
- Ultrasound: each item of the Sequence of Ultrasound Regions whose X and Y
  Physical Units are cm (code 3) calibrates its own rectangle (Physical
  Delta X / Y, cm per pixel): a measurement is calibrated when it lies in
  one region ("region"), and in pixels when it crosses from one to another.
- Nothing of the above: pixels ("px"), Pixel Aspect Ratio still giving the
  proportions of a pixel for angles.

Statistics (mean, population standard deviation, minimum, maximum) are of
the stored values after the Modality LUT stage (:func:`render.modality_samples`:
Rescale Slope / Intercept, so HU for a CT Image, a PET's Units), never of
the 8-bit rendering.
Colour frames (3 samples) have statistics per channel of the decoded
samples (R, G, B; Y, Cb, Cr for the partial-range YBR a decoder leaves);
PALETTE COLOR indices have no unit to average (422). Pixels of the Pixel
Padding Value (to the Pixel Padding Range Limit: PS3.3 C.7.5.1.1.2; a CT's
outside of the scan field, -3024 or -2000 HU) are not the patient: left out
of the statistics and counted as ``padding``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .render import RenderError, decoded_photometric, functional_group, modality_samples

SHAPES = ("ellipse", "rectangle")
# SOP Classes whose values after the Rescale are HU without a Rescale Type
# (PS3.3 C.8.2.1.1.2: CT Image; the enhanced ones state it). A secondary
# capture, a dose screen or a 3D snapshot keeps Modality CT, but its 8-bit
# grey levels are not HU.
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
# Modalities of projection radiographs (PS3.3 10.7.1.1): a Pixel Spacing
# there may be the detector's, unless Imager Pixel Spacing says otherwise.
PROJECTION = frozenset({"CR", "DX", "MG", "IO", "PX", "XA", "RF"})
# Physical Units X / Y Direction (0018,6024 / 6026) of a region measured in cm.
US_UNIT_CM = 3
MM_PER_CM = 10.0
# Rows of the region's bounding box decoded to float64 at a time (what the
# statistics hold beside the frame): a whole 3000x3000 radiograph as float64
# would be 72 MB, past the pixel budget its frame was counted in.
STATS_BLOCK = 1 << 20
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class MeasureError(ValueError):
    """A measurement that cannot be made: ``http_status`` 400 for a bad
    parameter, 422 for a frame without values to measure."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


# -- calibration ------------------------------------------------------------------------
@dataclass(frozen=True)
class Spacing:
    """Millimetres between the centres of adjacent rows and of adjacent columns."""

    row: float
    column: float
    basis: str  # "patient", "calibrated", "detector", "magnification", "unknown" or "region"
    source: str  # the attribute(s) it comes from, for the user who asks

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "basis": self.basis, "source": self.source}


@dataclass(frozen=True)
class Region:
    """An ultrasound region calibrated in cm: pixels x0..x1, y0..y1 (inclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    spacing: Spacing

    def holds(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the box (grid coordinates) lies inside the region's pixels."""
        return (self.x0 <= min(x0, x1) and max(x0, x1) <= self.x1 + 1
                and self.y0 <= min(y0, y1) and max(y0, y1) <= self.y1 + 1)

    def as_json(self) -> dict[str, Any]:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1, **self.spacing.as_json()}


@dataclass(frozen=True)
class Calibration:
    """What measuring frame *frame* (1-based) of an object needs."""

    frame: int
    rows: int
    columns: int
    spacing: Spacing | None
    regions: tuple[Region, ...]
    aspect: tuple[float, float]  # a pixel's height : width (Pixel Aspect Ratio), for angles
    units: str  # of the values after the Modality LUT ("HU"); "" when unknown
    photometric: str

    def spacing_for(self, x0: float, y0: float, x1: float, y1: float) -> Spacing | None:
        """The spacing of a measurement spanning the box: the ultrasound
        region holding it, else the frame's own; None: in pixels."""
        if self.regions:
            region = next((r for r in self.regions if r.holds(x0, y0, x1, y1)), None)
            if region is not None:
                return region.spacing
        return self.spacing

    def as_json(self) -> dict[str, Any]:
        return {
            "frame": self.frame, "rows": self.rows, "columns": self.columns,
            "spacing": self.spacing.as_json() if self.spacing else None,
            "regions": [r.as_json() for r in self.regions],
            "aspect": list(self.aspect), "units": self.units, "photometric": self.photometric,
        }


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _pair(holder: Dataset | None, keyword: str) -> tuple[float, float] | None:
    """Two positive finite numbers of *holder*'s *keyword* (row, column); None otherwise."""
    raw = _values(holder.get(keyword) if holder is not None else None)
    try:
        values = [float(v) for v in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return values[0], values[1]


def _number(holder: Dataset | None, keyword: str) -> float | None:
    """The first value of *holder*'s *keyword* when it is a finite number."""
    values = _values(holder.get(keyword) if holder is not None else None)
    try:
        number = float(values[0])  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _same(a: tuple[float, float], b: tuple[float, float], tolerance: float = 1e-6) -> bool:
    return all(math.isclose(x, y, rel_tol=tolerance) for x, y in zip(a, b))


def frame_spacing(ds: Dataset, frame_index: int) -> Spacing | None:
    """The spacing of frame *frame_index* (0-based) outside any ultrasound region (see the module's text)."""
    measures = functional_group(ds, frame_index, "PixelMeasuresSequence")
    properties = functional_group(ds, frame_index, "FramePixelDataPropertiesSequence")
    pixel = _pair(measures, "PixelSpacing") or _pair(ds, "PixelSpacing")
    imager = _pair(properties, "ImagerPixelSpacing") or _pair(ds, "ImagerPixelSpacing")
    kind = str(ds.get("PixelSpacingCalibrationType") or "").strip()
    magnification = _number(ds, "EstimatedRadiographicMagnificationFactor")
    if pixel is not None and (imager is None or not _same(pixel, imager)):
        source = f"PixelSpacing ({kind})" if kind else "PixelSpacing"
        estimated = imager is not None and magnification is not None and magnification > 0 and _same(
            pixel, (imager[0] / magnification, imager[1] / magnification), 1e-3)
        if kind.upper() == "GEOMETRY" or (not kind and estimated):
            # PS3.3 10.7.1.3: GEOMETRY is a correction for the magnification
            # (at an assumed depth, as the ERMF is), not a calibration against
            # an object of known size (FIDUCIAL): an estimate, and said so.
            return Spacing(*pixel, "magnification", source)
        if kind or imager is not None:
            return Spacing(*pixel, "calibrated", source)
        if str(ds.get("Modality") or "").strip().upper() in PROJECTION:
            # A radiograph without Imager Pixel Spacing (CR of older
            # readers): its Pixel Spacing is most often the plate's, 10-20 %
            # larger than the patient; whether anything corrected it is unknown.
            return Spacing(*pixel, "unknown", "PixelSpacing (no Imager Pixel Spacing)")
        return Spacing(*pixel, "patient", "PixelSpacing")
    if imager is None:
        return None
    if magnification is not None and magnification > 0:
        return Spacing(imager[0] / magnification, imager[1] / magnification, "magnification",
                       "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor")
    return Spacing(*imager, "detector", "ImagerPixelSpacing")


def ultrasound_regions(ds: Dataset) -> tuple[Region, ...]:
    """The Sequence of Ultrasound Regions items calibrated in cm both ways."""
    found: list[Region] = []
    for item in ds.get("SequenceOfUltrasoundRegions") or ():
        try:
            units = int(item.get("PhysicalUnitsXDirection", -1)), int(item.get("PhysicalUnitsYDirection", -1))
            box = [int(item.get(k)) for k in ("RegionLocationMinX0", "RegionLocationMinY0",
                                               "RegionLocationMaxX1", "RegionLocationMaxY1")]
        except (TypeError, ValueError):
            continue
        dx, dy = _number(item, "PhysicalDeltaX"), _number(item, "PhysicalDeltaY")
        if units != (US_UNIT_CM, US_UNIT_CM) or not dx or not dy:
            continue  # Doppler (cm/s, s) or unknown units: not a distance
        spacing = Spacing(abs(dy) * MM_PER_CM, abs(dx) * MM_PER_CM, "region", "SequenceOfUltrasoundRegions")
        found.append(Region(box[0], box[1], box[2], box[3], spacing))
    return tuple(found)


def modality_units(ds: Dataset, frame_index: int) -> str:
    """The unit of the values after the Modality LUT: Rescale Type (or
    Modality LUT Type); a PET's Units (0054,1001: BQML, CNTS, GML...); HU
    for a CT Image that gives none; '' when unknown ("US" is DICOM's
    "unspecified"). A secondary capture with Modality CT has grey levels, not HU."""
    transformation = functional_group(ds, frame_index, "PixelValueTransformationSequence")
    lut = (ds.get("ModalityLUTSequence") or [None])[0]
    unspecified = False
    for holder, keyword in ((transformation, "RescaleType"), (ds, "RescaleType"), (lut, "ModalityLUTType")):
        text = str(holder.get(keyword) or "").strip() if holder is not None else ""
        if text.upper() == "US":
            unspecified = True  # said to be unspecified: not HU, whatever the modality
            break
        if text:
            return text
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality == "PT":
        # PS3.3 C.8.9.1.1.3: the rescaled values of a PET image are in its Units.
        units = str(ds.get("Units") or "").strip()
        if units:
            return units
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    ct_image = sop_class == CT_IMAGE or sop_class.startswith(CT_IMAGE + ".")
    return "HU" if modality == "CT" and ct_image and not unspecified else ""


def calibration(ds: Dataset, frame_index: int) -> Calibration:
    """The calibration of frame *frame_index* (0-based) of the object *ds* (its header is enough)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise MeasureError("the object is not an image (no Rows / Columns)", 422) from None
    aspect = _pair(ds, "PixelAspectRatio") or (1.0, 1.0)
    return Calibration(frame_index + 1, rows, columns, frame_spacing(ds, frame_index), ultrasound_regions(ds),
                       aspect, modality_units(ds, frame_index), decoded_photometric(ds))


# -- parameters --------------------------------------------------------------------------
def coordinate(text: str | None, name: str, limit: int, *, below: bool = False) -> float:
    """A coordinate parameter: a decimal number from 0 to *limit* (the
    frame's Columns or Rows; *below*: less than it, a point naming the
    pixel that holds it); MeasureError 400 otherwise."""
    top = f"below {limit}" if below else f"to {limit}"
    if text is None or text == "":
        raise MeasureError(f"{name} is required (a number of pixels from 0 {top})")
    if not _DECIMAL.fullmatch(text.strip()):
        raise MeasureError(f"{name} must be a number, not {text[:40]!r}")
    value = float(text)
    if not (0 <= value < limit if below else 0 <= value <= limit):
        raise MeasureError(f"{name} {value:g} is outside the frame: from 0 {top}")
    return value


# -- statistics --------------------------------------------------------------------------
@dataclass
class _Running:
    """Count, mean, sum of squared deviations, minimum and maximum, combined
    block by block (Chan et al.): exact for a uniform region (SD 0), unlike
    a sum of squares minus the squared sum."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        n = int(values.size)
        if not n:
            return
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def as_json(self) -> dict[str, Any]:
        if not self.count:
            return {"mean": None, "sd": None, "min": None, "max": None}
        return {"mean": self.mean, "sd": math.sqrt(self.m2 / self.count), "min": self.low, "max": self.high}


def _pixel_span(low: float, high: float, size: int) -> range:
    """Indices of the pixels whose centre (index + 0.5) lies in [low, high]."""
    return range(max(0, math.ceil(low - 0.5)), min(size - 1, math.floor(high - 0.5)) + 1)


def _blocks(shape: str, box: tuple[float, float, float, float], rows: int,
            columns: int) -> Iterator[tuple[slice, slice, np.ndarray | None]]:
    """(row slice, column slice, mask or None for all) of the region's
    pixels, a few rows at a time (STATS_BLOCK values at most)."""
    x0, y0, x1, y1 = box
    xs, ys = _pixel_span(x0, x1, columns), _pixel_span(y0, y1, rows)
    if not xs or not ys or (shape == "ellipse" and (x0 == x1 or y0 == y1)):
        return  # nothing inside (a flat ellipse has no inside: 0 / 0 below)
    step = max(1, STATS_BLOCK // len(xs))
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    dx = (np.arange(xs.start, xs.stop) + 0.5 - cx) / rx if shape == "ellipse" else None
    for top in range(ys.start, ys.stop, step):
        bottom = min(ys.stop, top + step)
        mask = None
        if dx is not None:
            dy = (np.arange(top, bottom) + 0.5 - cy) / ry
            mask = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
        yield slice(top, bottom), slice(xs.start, xs.stop), mask


def _channel_names(photometric: str) -> tuple[str, str, str]:
    return ("Y", "Cb", "Cr") if photometric.startswith("YBR") else ("R", "G", "B")


def _area(shape: str, box: tuple[float, float, float, float], spacing: Spacing | None) -> dict[str, Any]:
    """The drawn shape's own area (not its pixel count) in mm² or, uncalibrated, px²."""
    x0, y0, x1, y1 = box
    width, height = abs(x1 - x0), abs(y1 - y0)
    area = width * height * (math.pi / 4 if shape == "ellipse" else 1.0)
    if spacing is None:
        return {"area": area, "area_unit": "px2", "basis": None}
    return {"area": area * spacing.row * spacing.column, "area_unit": "mm2", "basis": spacing.basis}


def roi_statistics(ds: Dataset, pixel: np.ndarray, frame_index: int, shape: str,
                   box: tuple[float, float, float, float]) -> dict[str, Any]:
    """Statistics of the pixels of frame *frame_index* (0-based, *pixel* as
    decoded) whose centres lie in the *shape* ("ellipse" or "rectangle")
    drawn in the box x0, y0, x1, y1 (grid coordinates, already checked)."""
    x0, x1 = sorted(box[0::2])
    y0, y1 = sorted(box[1::2])
    ordered = (x0, y0, x1, y1)
    info = calibration(ds, frame_index)
    photometric = decoded_photometric(ds)
    if photometric == "PALETTE COLOR":
        raise MeasureError("PALETTE COLOR pixel values are indices into a palette, without a unit to measure", 422)
    answer: dict[str, Any] = {"shape": shape, "frame": frame_index + 1, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                              **_area(shape, ordered, info.spacing_for(*ordered))}
    # A generator, used once: each block's mask is made as it is measured,
    # never all of them at once (1 byte per pixel of the whole ROI).
    blocks = _blocks(shape, ordered, pixel.shape[0], pixel.shape[1])
    if pixel.ndim == 3:
        names = _channel_names(photometric)
        channels = [_Running() for _ in names]
        count = 0
        for rows, cols, mask in blocks:
            part = pixel[rows, cols].astype(np.float64)
            picked = part[mask] if mask is not None else part.reshape(-1, part.shape[-1])
            count += int(picked.shape[0])
            for k, running in enumerate(channels):
                running.add(picked[:, k])
        answer.update(pixels=count, padding=0, units="", mean=None, sd=None, min=None, max=None,
                      channels=[{"name": n, **c.as_json()} for n, c in zip(names, channels)])
        return answer
    samples, to_modality = _grey(ds, pixel, frame_index)
    padding = padding_range(ds, samples)
    running = _Running()
    count = padded = 0
    for rows, cols, mask in blocks:
        part = samples[rows, cols]
        picked = part[mask] if mask is not None else part.ravel()
        if padding is not None:
            outside = (picked >= padding[0]) & (picked <= padding[1])
            padded += int(np.count_nonzero(outside))
            picked = picked[~outside]
        count += int(picked.size)
        running.add(to_modality(picked))
    answer.update(pixels=count, padding=padded, units=info.units, channels=None, **running.as_json())
    return answer


def padding_range(ds: Dataset, samples: np.ndarray) -> tuple[int, int] | None:
    """The stored values that are padding, not the patient (PS3.3
    C.7.5.1.1.2): the Pixel Padding Value, to the Pixel Padding Range Limit
    when there is one; None without them. Read as the samples are (Bits
    Stored, sign-extended when signed): a reader that could not resolve the
    US-or-SS VR leaves -2000 as 63536."""
    if samples.dtype.kind not in "iu":
        return None
    value, limit = _number(ds, "PixelPaddingValue"), _number(ds, "PixelPaddingRangeLimit")
    if value is None or not value.is_integer():
        return None
    ends = [value] + ([limit] if limit is not None and limit.is_integer() else [])
    stored = [_stored_value(ds, v, samples.dtype.itemsize) for v in ends]
    return min(stored), max(stored)


def _stored_value(ds: Dataset, value: float, itemsize: int) -> int:
    """*value* (a padding attribute) in the domain of the stored samples."""
    number = int(value)
    bits = int(ds.get("BitsStored") or 0) or 8 * itemsize
    if ds.get("PixelRepresentation", 0) == 1 and 0 < bits <= 64:
        number &= (1 << bits) - 1
        sign = 1 << (bits - 1)
        return (number ^ sign) - sign
    if 0 < bits < 64 and number > (1 << bits) - 1:
        return number & ((1 << bits) - 1)
    return number


def _grey(ds: Dataset, pixel: np.ndarray,
          frame_index: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    if pixel.ndim != 2:
        raise RenderError(f"expected one grayscale frame (rows, columns), got {pixel.shape}")
    return modality_samples(ds, pixel, frame_index)


def probe(ds: Dataset, pixel: np.ndarray, frame_index: int, x: float, y: float) -> dict[str, Any]:
    """The value of the pixel holding the point (x, y): stored and in modality units."""
    column = min(int(x), pixel.shape[1] - 1)
    row = min(int(y), pixel.shape[0] - 1)
    photometric = decoded_photometric(ds)
    answer: dict[str, Any] = {"frame": frame_index + 1, "x": column, "y": row}
    if pixel.ndim == 3:
        names = _channel_names(photometric)
        return {**answer, "units": "", "value": None, "stored": None,
                "channels": [{"name": n, "value": float(pixel[row, column, k])} for k, n in enumerate(names)]}
    if photometric == "PALETTE COLOR":
        raise MeasureError("PALETTE COLOR pixel values are indices into a palette, without a unit to measure", 422)
    samples, to_modality = _grey(ds, pixel, frame_index)
    stored = samples[row:row + 1, column:column + 1]
    value = float(to_modality(stored)[0, 0])
    raw = stored[0, 0]
    padding = padding_range(ds, samples)
    return {**answer, "units": modality_units(ds, frame_index), "value": value if math.isfinite(value) else None,
            "stored": float(raw) if raw.dtype.kind == "f" else int(raw), "channels": None,
            "padding": padding is not None and padding[0] <= int(raw) <= padding[1]}
