"""Server-side rendering of DICOM image frames to JPEG / PNG / GIF.

This is the engine behind the DICOMweb *rendered* and *thumbnail* resources
(PS3.18 section 8.3.5 and chapter 9 (WADO-RS)). It is a plain library with no
HTTP code: the web layer parses the query parameters with :func:`parse_window`,
:func:`parse_viewport` and :func:`parse_quality`, builds a :class:`RenderParams`,
calls :func:`render_frame` or :func:`render_dataset_bytes` and maps a
:class:`RenderError` to its ``http_status``.

Pipeline (PS3.4 Annex N grayscale / color pipelines, in this order):

1. Decode only the requested frame with pydicom 3 (``pixel_array(..., index=i)``).
   YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT arrive as RGB from pydicom.
2. Grayscale (MONOCHROME1/2):

   * Modality LUT: Modality LUT Sequence if present, else Rescale Slope /
     Intercept (a missing one defaults to 1 / 0). For enhanced multi-frame
     objects the per-frame, then shared, Pixel Value Transformation Sequence
     wins over the top level attributes.
   * VOI: ``params.window`` if given; else the object's first Window Center /
     Width pair with its VOI LUT Function (per-frame / shared Frame VOI LUT
     Sequence first for enhanced objects); else the first VOI LUT Sequence
     item; else the minimum / maximum of the frame after the modality LUT.
     Window formulas are PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2
     (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), with y_min = 0, y_max = 255.
     The continuous result is rounded half up (``floor(y + 0.5)``).
     A VOI LUT's output 0..2^n-1 (n = 3rd descriptor value) is scaled to 0..255.
   * Polarity: MONOCHROME1, or Presentation LUT Shape INVERSE, inverts
     (``255 - y``) after the VOI. Both together still invert only once: for DX
     objects PS3.3 requires INVERSE exactly when the image is MONOCHROME1, so
     INVERSE there restates the MONOCHROME1 inversion rather than undoing it.

3. Color: RGB is passed through; more than 8 bits stored is reduced by a
   right shift of (Bits Stored - 8), which is exact for both common 8-to-16 bit
   expansions (``v << 8`` and ``v * 257``). PALETTE COLOR goes through
   pydicom's ``apply_color_lut`` (16-bit palette entries shifted right by 8).
   YBR_PARTIAL_420/422 (only if a decoder hands them over as 3 samples) are
   converted with the BT.601 partial-range matrix. No modality LUT, VOI or
   inversion is applied to color images; an *explicit* ``window`` is applied
   to each RGB channel's stored values (useful for >8-bit color), and is
   ignored for PALETTE COLOR, whose stored values are indices.
4. Viewport (PS3.18 8.3.5.1.3): crop the source region ``sx, sy, |sw|, |sh|``,
   flip if ``sw`` / ``sh`` is negative, then scale, keeping the aspect ratio,
   so that the result is as large as possible inside ``vw x vh``; this may
   upscale, as the standard asks. The output has the scaled size of the region
   (it is not padded to ``vw x vh``). Parts of the region beyond the right or
   bottom image edge render black. Downscaling uses Pillow LANCZOS with
   ``reducing_gap=2`` (box pre-reduction, then Lanczos: close to full Lanczos
   quality at about bilinear cost); upscaling uses BICUBIC (smooth, little
   ringing); a 1:1 integer crop copies pixels exactly.
5. Encode: JPEG ('L' or 'RGB', ``quality``; chroma subsampling 4:4:4 at
   quality >= 90, else 4:2:0), PNG (8-bit, zlib level 1: rendering latency
   matters more than a few percent of size), GIF (grey is exact; RGB is
   quantized to an adaptive 256 color palette).

Not done: overlays, ICC profiles, Presentation States, annotation, Pixel
Padding Value exclusion from the min/max window, multi-frame (animated) output.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import BinaryIO, Final, TypeVar

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    convert_color_space,
    get_decoder,
    pixel_array,
)
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

__all__ = [
    "MAX_VIEWPORT_DIMENSION",
    "SUPPORTED_MEDIA_TYPES",
    "WINDOW_FUNCTIONS",
    "RenderError",
    "RenderParamError",
    "RenderParams",
    "Viewport",
    "decoded_photometric",
    "frame_of",
    "frame_to_display",
    "functional_group",
    "modality_samples",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "render_dataset_bytes",
    "render_frame",
    "with_frame",
]

SUPPORTED_MEDIA_TYPES: Final = ("image/jpeg", "image/png", "image/gif")
#: Canonical PS3.18 ``window`` function keywords.
WINDOW_FUNCTIONS: Final = ("linear", "linear-exact", "sigmoid")
#: Largest accepted ``vw`` / ``vh``; a request for a huge canvas is a cheap
#: way to make the server allocate gigabytes.
MAX_VIEWPORT_DIMENSION: Final = 8192
# The longest side an image is enlarged to (see _apply_viewport).
UPSCALE_LIMIT: Final = 2048
PNG_COMPRESS_LEVEL: Final = 1

_FORMATS: Final = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
_DECIMAL: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


# -- errors --------------------------------------------------------------------------
class RenderError(Exception):
    """A frame could not be rendered.

    ``http_status`` is what the web layer should answer: 400 bad parameter,
    404 frame out of range, 406 unsupported output media type, 415 pixel data
    in a transfer syntax no installed decoder handles, 422 no / undecodable
    pixel data or an unsupported photometric interpretation.
    """

    def __init__(self, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.http_status = http_status


class RenderParamError(RenderError, ValueError):
    """An invalid rendering parameter; a ``ValueError`` with ``http_status`` 400
    (406 for an unsupported media type)."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message, http_status)


# -- parameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class Viewport:
    """A PS3.18 viewport: render region (sx, sy, sw, sh) scaled into vw x vh.

    ``sw`` / ``sh`` of ``None`` reach the right / bottom image edge; a negative
    value flips the image horizontally / vertically (the region is always
    ``[sx, sx + |sw|)``). ``sx`` / ``sy`` are used as absolute values, as the
    standard words it.
    """

    vw: int
    vh: int
    sx: float = 0.0
    sy: float = 0.0
    sw: float | None = None
    sh: float | None = None

    def __post_init__(self) -> None:
        for name in ("vw", "vh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise RenderParamError(f"viewport {name} must be an integer, got {v!r}")
            if not 1 <= v <= MAX_VIEWPORT_DIMENSION:
                raise RenderParamError(
                    f"viewport {name} must be between 1 and {MAX_VIEWPORT_DIMENSION}, got {v}"
                )
        for name in ("sx", "sy", "sw", "sh"):
            v = getattr(self, name)
            if v is None and name in ("sw", "sh"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
                raise RenderParamError(f"viewport {name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise RenderParamError(f"viewport {name} must be finite, got {v!r}")
            if name in ("sw", "sh") and v == 0:
                raise RenderParamError(f"viewport {name} must not be 0")

    @property
    def has_region(self) -> bool:
        """True if anything beyond ``vw, vh`` was given (not allowed for thumbnails)."""
        return (self.sx, self.sy, self.sw, self.sh) != (0.0, 0.0, None, None)


@dataclass(frozen=True)
class RenderParams:
    """What to render and how.

    ``window`` is ``(center, width, function)`` with ``function`` one of
    :data:`WINDOW_FUNCTIONS` (case-insensitive; DICOM spellings such as
    ``LINEAR_EXACT`` are accepted too and normalised to the PS3.18 keyword).
    ``viewport`` is ``(vw, vh)`` or a :class:`Viewport`. Invalid values raise
    :class:`RenderParamError` at construction.
    """

    media_type: str = "image/jpeg"
    quality: int = 90
    window: tuple[float, float, str] | None = None
    viewport: tuple[int, int] | Viewport | None = None

    def __post_init__(self) -> None:
        if self.media_type not in _FORMATS:
            raise RenderParamError(
                f"unsupported media type {self.media_type!r}; supported: "
                + ", ".join(SUPPORTED_MEDIA_TYPES),
                http_status=406,
            )
        q = self.quality
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 100:
            raise RenderParamError(f"quality must be an integer from 1 to 100, got {q!r}")
        if self.window is not None:
            if not isinstance(self.window, (tuple, list)) or len(self.window) != 3:
                raise RenderParamError("window must be (center, width, function)")
            c, w, fn = self.window
            object.__setattr__(self, "window", _checked_window(c, w, fn))
        if self.viewport is not None and not isinstance(self.viewport, Viewport):
            vp = self.viewport
            if not isinstance(vp, (tuple, list)) or len(vp) != 2:
                raise RenderParamError("viewport must be (vw, vh) or a Viewport")
            Viewport(vp[0], vp[1])  # validates


def _canonical_function(fn: object) -> str:
    if not isinstance(fn, str):
        raise RenderParamError(f"window function must be a string, got {fn!r}")
    key = fn.strip().lower().replace("_", "-")
    if key not in WINDOW_FUNCTIONS:
        raise RenderParamError(
            f"window function must be one of {', '.join(WINDOW_FUNCTIONS)}; got {fn!r}"
        )
    return key


def _checked_window(center: object, width: object, fn: object) -> tuple[float, float, str]:
    try:
        c = float(center)  # type: ignore[arg-type]
        w = float(width)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RenderParamError(
            f"window center and width must be numbers, got {center!r}, {width!r}"
        ) from None
    if not (math.isfinite(c) and math.isfinite(w)):
        raise RenderParamError("window center and width must be finite numbers")
    function = _canonical_function(fn)
    # PS3.3 C.11.2.1.2.1: LINEAR needs width >= 1; the other two divide by width.
    if function == "linear" and w < 1:
        raise RenderParamError(f"window width must be >= 1 for linear, got {w:g}")
    if function != "linear" and w <= 0:
        raise RenderParamError(f"window width must be > 0 for {function}, got {w:g}")
    return c, w, function


def _parse_decimal(text: str, what: str) -> float:
    # A regex rather than bare float(): float() also takes "nan", "inf" and "1_000".
    if not _DECIMAL.fullmatch(text):
        raise RenderParamError(f"{what} is not a decimal number: {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise RenderParamError(f"{what} is out of range: {text!r}")
    return value


def _is_uint(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit() alone accepts e.g. "²"


def parse_window(value: str) -> tuple[float, float, str]:
    """Parse a PS3.18 ``window`` query value ``center,width,function``.

    All three parts are required (PS3.18 8.3.5.1.4). Returns
    ``(center, width, function)`` with the function as a canonical lower-case
    keyword. Raises :class:`RenderParamError` (a ``ValueError``) otherwise.
    """
    if not isinstance(value, str):
        raise RenderParamError("window must be a string 'center,width,function'")
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(parts):
        raise RenderParamError(
            f"window must be 'center,width,function' (e.g. '40,400,linear'), got {value!r}"
        )
    c = _parse_decimal(parts[0], "window center")
    w = _parse_decimal(parts[1], "window width")
    return _checked_window(c, w, parts[2])


def parse_viewport(value: str, *, allow_region: bool = True) -> Viewport:
    """Parse a PS3.18 ``viewport`` query value.

    Accepts ``vw,vh`` and ``vw,vh,[sx],[sy],[sw],[sh]`` where trailing values
    may be omitted and inner ones left empty (``512,512,,,256,256``).
    ``vw`` / ``vh`` must be integers in 1..:data:`MAX_VIEWPORT_DIMENSION`;
    ``sw`` / ``sh`` must not be 0. With ``allow_region=False`` (thumbnails,
    presentation states) only ``vw,vh`` is accepted. Raises
    :class:`RenderParamError` (a ``ValueError``) on anything else.
    """
    if not isinstance(value, str):
        raise RenderParamError("viewport must be a string 'vw,vh[,sx,sy,sw,sh]'")
    parts = [p.strip() for p in value.split(",")]
    if not 2 <= len(parts) <= 6:
        raise RenderParamError(f"viewport must be 'vw,vh' or 'vw,vh,sx,sy,sw,sh', got {value!r}")
    if len(parts) > 2 and not allow_region:
        raise RenderParamError(f"only 'vw,vh' is allowed for this resource, got {value!r}")
    if parts[-1] == "" and len(parts) > 2:
        raise RenderParamError(f"viewport must not end with a comma, got {value!r}")
    dims: list[int] = []
    for name, text in zip(("vw", "vh"), parts[:2]):
        if not _is_uint(text):
            raise RenderParamError(f"viewport {name} must be a positive integer, got {text!r}")
        dims.append(int(text))
    region: dict[str, float] = {}
    for name, text in zip(("sx", "sy", "sw", "sh"), parts[2:]):
        if text:
            region[name] = _parse_decimal(text, f"viewport {name}")
    sx = abs(region.get("sx", 0.0))
    sy = abs(region.get("sy", 0.0))
    return Viewport(dims[0], dims[1], sx, sy, region.get("sw"), region.get("sh"))


def parse_quality(value: str) -> int:
    """Parse a PS3.18 ``quality`` query value: an integer 1..100."""
    text = value.strip() if isinstance(value, str) else ""
    if not _is_uint(text) or not 1 <= int(text) <= 100:
        raise RenderParamError(f"quality must be an integer from 1 to 100, got {value!r}")
    return int(text)


# -- attribute helpers -----------------------------------------------------------------
def _floats(value: object) -> list[float]:
    """All numeric values of a (possibly multi-valued, possibly empty)
    DS/IS/FD; none when any of them is not a finite number."""
    values = _each_float(value)
    return [] if None in values else values  # type: ignore[return-value]


def _each_float(value: object) -> list[float | None]:
    """Each value of a (possibly multi-valued) DS/IS/FD as a number, None
    where it is empty or not a finite number: modalities write "40\\" (an
    empty second value), which must not cost the values beside it."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    out: list[float | None] = []
    for item in items:
        try:
            f = float(item)  # type: ignore[arg-type]  # DSfloat / IS / str / number
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(f if math.isfinite(f) else None)
    return out


def _first_float(value: object) -> float | None:
    """The first value that is a number ("-1024\\" is -1024, not absent)."""
    return next((f for f in _each_float(value) if f is not None), None)


def functional_group(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """The functional group macro item *keyword* (a sequence's keyword) for
    frame *frame_index* (0-based) of an enhanced multi-frame object: per-frame
    first, then shared; None when neither has it."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        seq = per_frame[frame_index].get(keyword)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]
    return None


def _is_little_endian(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        try:
            return bool(UID(tsyntax).is_little_endian)
        except ValueError:
            pass
    little = ds.original_encoding[1]
    return True if little is None else bool(little)


@dataclass(frozen=True)
class _Lut:
    """A Modality or VOI LUT: output = data[clip(x - first, 0, len - 1)]."""

    first: int
    data: np.ndarray  # float64, so that lookups feed the float pipeline directly
    bits: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        idx = np.rint(x) - self.first if x.dtype.kind == "f" else x.astype(np.int64) - self.first
        np.clip(idx, 0, len(self.data) - 1, out=idx)
        return self.data[idx.astype(np.intp)]


def _read_lut(item: Dataset, ds: Dataset, *, signed_input: bool | None = None) -> _Lut | None:
    """Decode a LUT Descriptor / LUT Data pair; None if absent or malformed.
    *signed_input*: whether the values the LUT maps can be negative (default:
    stored pixel values, signed by Pixel Representation)."""
    desc = item.get("LUTDescriptor")
    if desc is None or "LUTData" not in item:
        return None
    desc = list(desc) if isinstance(desc, (list, tuple, MultiValue)) else [desc]
    if len(desc) != 3:
        return None
    try:
        n, first, bits = (int(v) for v in desc)
    except (TypeError, ValueError):
        return None
    n = n or 65536  # PS3.3: 0 means 2^16 entries
    # The first mapped value is US or SS as the LUT's input is (PS3.3
    # C.11.1.1, C.11.2.1.1); a reader that could not resolve the ambiguous VR
    # (Implicit VR, or written as US) leaves it unsigned.
    if signed_input is None:
        signed_input = ds.get("PixelRepresentation", 0) == 1
    if signed_input and first >= 32768:
        first -= 65536
    raw = item.LUTData
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) % 2 and not (bits == 8 and len(raw) == n):
            raw = raw[:-1]  # an odd length cannot be 16-bit entries; drop the stray byte
        if bits == 8 and len(raw) == n:  # 8-bit entries packed one per byte
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.frombuffer(raw, dtype="<u2" if _is_little_endian(ds) else ">u2")
    else:
        values = raw if isinstance(raw, (list, tuple, MultiValue)) else [raw]
        data = np.asarray(values, dtype=np.int64)
    data = data[:n].astype(np.float64)
    if data.size == 0:
        return None
    top = int(data.max())
    if not 1 <= bits <= 16 or top > (1 << bits) - 1:
        # Descriptor and data disagree; trust the data rather than wrap values.
        bits = max(top.bit_length(), 1)
    return _Lut(first, data, bits)


@dataclass(frozen=True)
class _GreyAttrs:
    slope: float
    intercept: float
    modality_lut: _Lut | None
    window: tuple[float, float, str] | None
    voi_lut: _Lut | None
    invert: bool


def _object_window(src: Dataset) -> tuple[float, float, str] | None:
    """The first usable Window Center/Width pair of src with its VOI LUT Function.

    The pairs go together by position (PS3.3 C.11.2.1.2); one with an empty
    or unusable value ("40\\" / "400\\": a trailing backslash) is passed
    over for the next, and without any the object falls back to its next VOI
    option. Dropping all of them for one empty value rendered a CT with its
    whole range (min/max) instead of its soft tissue window."""
    fn = str(src.get("VOILUTFunction") or "LINEAR")
    # An unknown function is treated as LINEAR (its PS3.3 default).
    known = fn.strip().upper().replace("-", "_") in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
    for c, w in zip(_each_float(src.get("WindowCenter")), _each_float(src.get("WindowWidth"))):
        if c is None or w is None:
            continue
        try:
            return _checked_window(c, w, fn if known else "linear")
        except RenderParamError:
            continue  # an unusable width (LINEAR < 1, others <= 0)
    return None


def _grey_attrs(ds: Dataset, frame_index: int, photometric: str) -> _GreyAttrs:
    pvt = functional_group(ds, frame_index, "PixelValueTransformationSequence")
    src = pvt if pvt is not None else ds
    slope = _first_float(src.get("RescaleSlope"))
    intercept = _first_float(src.get("RescaleIntercept"))
    modality_lut = None
    if pvt is None and ds.get("ModalityLUTSequence"):
        modality_lut = _read_lut(ds.ModalityLUTSequence[0], ds)

    voi_item = functional_group(ds, frame_index, "FrameVOILUTSequence")
    window = _object_window(voi_item) if voi_item is not None else None
    if window is None:
        window = _object_window(ds)
    voi_lut = None
    # The VOI LUT maps the modality transformation's output: negative when
    # the samples are signed or the rescale shifts them below 0 (CT's -1024).
    voi_signed = modality_lut is None and (
        ds.get("PixelRepresentation", 0) == 1 or (intercept or 0.0) < 0 or (slope or 1.0) < 0)
    for holder in (voi_item, ds):
        if holder is not None and holder.get("VOILUTSequence"):
            voi_lut = _read_lut(holder.VOILUTSequence[0], ds, signed_input=voi_signed)
            if voi_lut is not None:
                break

    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return _GreyAttrs(
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        modality_lut=modality_lut,
        window=window,
        voi_lut=voi_lut,
        invert=photometric == "MONOCHROME1" or shape == "INVERSE",
    )


# -- grayscale pipeline ------------------------------------------------------------------
def _window_function(c: float, w: float, fn: str) -> Callable[[np.ndarray], np.ndarray]:
    """PS3.3 C.11.2.1.2.1 / C.11.2.1.3 with y_min = 0, y_max = 255 (unclipped)."""
    if fn == "sigmoid":

        def sigmoid(x: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))

        return sigmoid
    if fn == "linear" and w <= 1:
        # Width 1 is the PS3.3 threshold: x <= c - 0.5 is y_min, the rest y_max.
        return lambda x: np.where(x <= c - 0.5, 0.0, 255.0)
    a, b = _window_affine(c, w, fn)
    return lambda x: x * a + b


def _window_affine(c: float, w: float, fn: str) -> tuple[float, float]:
    """(a, b) with y = a*x + b for LINEAR (w > 1) and LINEAR_EXACT, before clipping.

    LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255; clipping to 0..255 is then
    exactly the PS3.3 piecewise definition because the line meets 0 and 255 at
    the two breakpoints. LINEAR_EXACT: ((x - c) / w + 0.5) * 255.
    """
    if fn == "linear":
        k = 255.0 / (w - 1.0)
        return k, 127.5 - (c - 0.5) * k
    k = 255.0 / w
    return k, 127.5 - c * k


def _to_uint8(y: np.ndarray) -> np.ndarray:
    """Round the continuous output half up, clipped to 0..255."""
    y = y + 0.5
    np.clip(y, 0.0, 255.0, out=y)
    return y.astype(np.uint8)


def _domain(dtype: np.dtype) -> tuple[np.ndarray, np.dtype]:
    """Every value a <= 16-bit integer dtype can hold, ordered so that
    ``arr.view(index_dtype)`` indexes it (signed values wrap to the top half)."""
    index_dtype = np.dtype(np.uint8 if dtype.itemsize == 1 else np.uint16)
    domain = np.arange(1 << (8 * dtype.itemsize), dtype=index_dtype).view(dtype)
    return domain.astype(np.float64), index_dtype


def _modality_extremes(arr: np.ndarray, attrs: _GreyAttrs) -> tuple[float, float]:
    """Minimum and maximum of the frame after the modality transformation."""
    if attrs.modality_lut is not None:
        if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
            # Exact for any (even non-monotonic) LUT: look only at values present.
            domain, index_dtype = _domain(arr.dtype)
            present = np.bincount(arr.view(index_dtype).ravel(), minlength=domain.size) > 0
            values = attrs.modality_lut(domain[present])
        else:
            values = attrs.modality_lut(arr.astype(np.float64))
        return float(values.min()), float(values.max())
    if arr.dtype.kind == "f":
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            return 0.0, 0.0
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = float(arr.min()), float(arr.max())
    ends = (lo * attrs.slope + attrs.intercept, hi * attrs.slope + attrs.intercept)
    return min(ends), max(ends)


def _grey_to_uint8(
    arr: np.ndarray, attrs: _GreyAttrs, window: tuple[float, float, str] | None
) -> np.ndarray:
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    window = window or attrs.window
    voi_lut = None if window else attrs.voi_lut
    if window is None and voi_lut is None:
        lo, hi = _modality_extremes(arr, attrs)
        # PS3.3 C.11.2.1.2.1 note 4: c = (x1 + x2 + 1) / 2, w = x2 - x1 + 1 selects
        # exactly [x1, x2]; for LINEAR this maps x1 -> 0 and x2 -> 255 linearly,
        # and a uniform frame (w = 1) thresholds to black.
        window = ((lo + hi + 1.0) / 2.0, hi - lo + 1.0, "linear")

    # Fast path for the common case (rescale + linear window): one fused affine
    # transform in float32 beats a 64K-entry table lookup on large frames.
    affine = (
        attrs.modality_lut is None
        and window is not None
        and (window[2] == "linear-exact" or (window[2] == "linear" and window[1] > 1))
    )
    if affine and arr.dtype.kind in "iu" and arr.dtype.itemsize == 2:
        assert window is not None
        a, b = _window_affine(*window)
        scale, offset = a * attrs.slope, a * attrs.intercept + b
        if attrs.invert:
            scale, offset = -scale, 255.0 - offset
        y = np.multiply(arr, np.float32(scale), dtype=np.float32)
        y += np.float32(offset + 0.5)
        np.clip(y, 0.0, 255.0, out=y)
        return y.astype(np.uint8)

    def chain(x: np.ndarray) -> np.ndarray:
        if attrs.modality_lut is not None:
            m = attrs.modality_lut(x)
        elif attrs.slope != 1.0 or attrs.intercept != 0.0:
            m = x * attrs.slope + attrs.intercept
        else:
            m = x
        if voi_lut is not None:
            y = voi_lut(m) * (255.0 / ((1 << voi_lut.bits) - 1))
        else:
            assert window is not None
            y = _window_function(*window)(m)
        y = np.clip(y, 0.0, 255.0)
        return 255.0 - y if attrs.invert else y

    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        # Evaluate the whole chain once per possible stored value, then look up.
        domain, index_dtype = _domain(arr.dtype)
        table = _to_uint8(chain(domain))
        return np.take(table, arr.view(index_dtype))
    # 32-bit integers and float pixel data: evaluate directly in float64.
    x = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        np.nan_to_num(x, copy=False)
    return _to_uint8(chain(x))


# -- color pipeline ------------------------------------------------------------------------
def _apply_window_per_channel(arr: np.ndarray, window: tuple[float, float, str]) -> np.ndarray:
    fn = _window_function(*window)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        domain, index_dtype = _domain(arr.dtype)
        return np.take(_to_uint8(fn(domain)), arr.view(index_dtype))
    return _to_uint8(fn(arr.astype(np.float64)))


def _reduce_depth(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return _to_uint8(arr.astype(np.float64))
    shift = max(bits_stored - 8, 0)
    out = arr.astype(np.int64) >> shift if arr.dtype.kind == "i" else arr >> shift
    return np.clip(out, 0, 255).astype(np.uint8)


def _ybr_partial_to_rgb(arr: np.ndarray) -> np.ndarray:
    """BT.601 partial (studio) range YCbCr to RGB, 8-bit."""
    ybr = arr.astype(np.float32)
    y = (ybr[..., 0] - 16.0) * 1.164383
    cb = ybr[..., 1] - 128.0
    cr = ybr[..., 2] - 128.0
    rgb = np.stack(
        (y + 1.596027 * cr, y - 0.391762 * cb - 0.812968 * cr, y + 2.017232 * cb), axis=-1
    )
    return _to_uint8(rgb)


def _palette_to_rgb(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        raise RenderError(f"PALETTE COLOR pixel data of type {arr.dtype} is not supported")
    # Expand the palette once over every possible index, then one gather per pixel.
    index_dtype = np.dtype(np.uint8 if arr.dtype.itemsize == 1 else np.uint16)
    domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=index_dtype).view(arr.dtype)
    try:
        table = apply_color_lut(domain, ds)[..., :3]
    except Exception as exc:  # missing / malformed palette descriptors or data
        raise RenderError(f"cannot apply the color palette: {exc}") from exc
    if table.dtype != np.uint8:
        # 16-bit entries: >> 8 is exact for both v << 8 and v * 257 encodings.
        table = (table.astype(np.uint32) >> 8).astype(np.uint8)
    return np.take(table, arr.view(index_dtype), axis=0)


# -- decoding ------------------------------------------------------------------------------
def _number_of_frames(ds: Dataset) -> int:
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def _decoded_photometric(ds: Dataset) -> str:
    """The photometric interpretation of pydicom's default (``raw=False``) output.

    With 3 samples pydicom converts YBR_FULL(_422) to RGB and the JPEG 2000
    decoders undo YBR_ICT / YBR_RCT; only the partial-range forms stay YBR.
    """
    pi = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 3 and pi not in ("YBR_PARTIAL_420", "YBR_PARTIAL_422"):
        return "RGB"
    if samples == 1 and pi not in ("MONOCHROME1", "PALETTE COLOR"):
        return "MONOCHROME2"
    return pi


def _check_frame(ds: Dataset, frame_index: int) -> None:
    if "Rows" not in ds or "Columns" not in ds:
        raise RenderError("the object is not an image (no Rows / Columns)")
    n = _number_of_frames(ds)
    if isinstance(frame_index, bool) or not isinstance(frame_index, (int, np.integer)):
        raise RenderError(f"frame index must be an integer, got {frame_index!r}", 400)
    if not 0 <= frame_index < n:
        raise RenderError(
            f"frame index {frame_index} is out of range: the object has {n} frame(s) "
            f"(0-based indices 0..{n - 1})",
            404,
        )


def _check_decoder(tsyntax: object) -> None:
    if not tsyntax:
        raise RenderError("the object has no Transfer Syntax UID; cannot decode its pixel data")
    uid = UID(str(tsyntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise RenderError(
            f"pixel data in transfer syntax {uid.name} ({uid}) cannot be decoded", 415
        ) from None
    if not decoder.is_available:
        raise RenderError(
            f"no decoder plugin is installed for transfer syntax {uid.name} ({uid})", 415
        )


def _decode(src: Dataset | BinaryIO, header: Dataset, frame_index: int) -> np.ndarray:
    """One frame of *src* (*header*: its attributes)."""
    if int(header.get("BitsAllocated") or 0) == 1 and frame_index > 0:
        # pydicom cannot index 1-bit frames that do not start on a byte
        # (rows x columns not a multiple of 8: SEG of odd sizes); such pixel
        # data is small, read whole.
        ds = src if isinstance(src, Dataset) else pydicom.dcmread(src, force=True)
        return _one_bit_frame(ds, frame_index)
    return _decode_frame(src, frame_index)


def _one_bit_frame(ds: Dataset, frame_index: int) -> np.ndarray:
    """Frame *frame_index* of 1-bit native pixel data, frames packed end to
    end, least significant bit first (PS3.5 8.1.1)."""
    try:
        raw = ds.PixelData
        rows, columns = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise RenderError(f"cannot decode frame {frame_index}: {exc}") from exc
    # Imported here: this module is a plain library, and pacs.frames brings
    # in the whole core (the server has it loaded anyway).
    from pacs.frames import one_bit_pixels

    bits = rows * columns
    frame = one_bit_pixels(raw, frame_index * bits, bits)
    if frame.size < bits:
        raise RenderError(f"cannot decode frame {frame_index}: the pixel data ends before it")
    return frame.reshape(rows, columns)


def _decode_frame(src: Dataset | BinaryIO, frame_index: int) -> np.ndarray:
    try:
        return pixel_array(src, index=frame_index)
    except MemoryError:
        raise
    except Exception as exc:  # corrupt / truncated / inconsistent pixel data
        raise RenderError(f"cannot decode frame {frame_index}: {exc}") from exc


def _stored_bits(pixel: np.ndarray, ds: Dataset) -> np.ndarray:
    """Grey samples as Bits Stored says (PS3.3 C.7.6.3.1): a decoder may hand
    out what lies above them. JPEG-LS from DCMTK declares 16-bit precision for
    12-bit data, and pydicom then leaves signed samples unextended (-1000 HU
    read as 3096: air rendered white) and unsigned ones unmasked. Masked, and
    sign-extended when Pixel Representation is 1; a no-op (one min/max pass)
    for samples already in range."""
    if pixel.dtype.kind not in "iu":
        return pixel
    stored = int(ds.get("BitsStored") or 0)
    if not 0 < stored < 8 * pixel.dtype.itemsize:
        return pixel
    signed = ds.get("PixelRepresentation", 0) == 1
    low, high = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    if pixel.size == 0 or (low <= int(pixel.min()) and int(pixel.max()) <= high):
        return pixel
    wide = pixel.astype(np.int64) & ((1 << stored) - 1)
    if signed:
        sign = 1 << (stored - 1)
        wide = (wide ^ sign) - sign
    return wide.astype(np.dtype(f"i{pixel.dtype.itemsize}") if signed else pixel.dtype)


def decoded_photometric(ds: Dataset) -> str:
    """The photometric interpretation of a frame as :func:`frame_of` decodes
    it (RGB for 3-sample YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT)."""
    return _decoded_photometric(ds)


def modality_samples(
    ds: Dataset, pixel: np.ndarray, frame_index: int
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A decoded grey frame's stored values (Bits Stored applied, as they are
    rendered) and the Modality LUT stage of frame *frame_index* (PS3.4
    C.11.1: Modality LUT Sequence, else Rescale Slope / Intercept, the
    enhanced objects' Pixel Value Transformation first): the function mapping
    stored values to modality units (HU for CT) as float64, what the VOI
    window of the rendering is applied to."""
    attrs = _grey_attrs(ds, frame_index, "MONOCHROME2")
    if pixel.dtype == np.bool_:
        pixel = pixel.view(np.uint8)

    def to_modality(values: np.ndarray) -> np.ndarray:
        if attrs.modality_lut is not None:
            return attrs.modality_lut(values)
        return values.astype(np.float64) * attrs.slope + attrs.intercept

    return _stored_bits(pixel, ds), to_modality


# -- rendering -----------------------------------------------------------------------------
def _display_array(
    ds: Dataset,
    pixel: np.ndarray,
    params: RenderParams,
    frame_index: int,
    photometric: str | None,
) -> np.ndarray:
    pi = (photometric or _decoded_photometric(ds)).strip().upper()
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if pixel.ndim != 2:
            raise RenderError(f"expected one grayscale frame (rows, columns), got {pixel.shape}")
        return _grey_to_uint8(_stored_bits(pixel, ds), _grey_attrs(ds, frame_index, pi), params.window)
    if pi == "PALETTE COLOR":
        if pixel.ndim != 2:
            raise RenderError(f"expected one palette frame (rows, columns), got {pixel.shape}")
        return _palette_to_rgb(ds, pixel)
    if pixel.ndim != 3 or pixel.shape[2] != 3:
        raise RenderError(f"expected one color frame (rows, columns, 3), got {pixel.shape}")
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        # Only when the caller says pixel really is YCbCr (e.g. raw=True output).
        pixel = convert_color_space(_reduce_depth(pixel, int(ds.get("BitsStored") or 8)), pi, "RGB")
        pi = "RGB"
    if pi in ("RGB", "YBR_ICT", "YBR_RCT"):
        # No decoder hands out ICT / RCT coefficients: JPEG 2000 decoding
        # always reverses the component transform, so these are RGB.
        if params.window is not None:
            return _apply_window_per_channel(pixel, params.window)
        return _reduce_depth(pixel, int(ds.get("BitsStored") or 8))
    if pi in ("YBR_PARTIAL_420", "YBR_PARTIAL_422"):
        return _ybr_partial_to_rgb(_reduce_depth(pixel, int(ds.get("BitsStored") or 8)))
    raise RenderError(f"photometric interpretation {pi!r} is not supported")


def _resolve_viewport(vp: tuple[int, int] | Viewport) -> Viewport:
    return vp if isinstance(vp, Viewport) else Viewport(int(vp[0]), int(vp[1]))


def _apply_viewport(img: Image.Image, vp: Viewport) -> Image.Image:
    cols, rows = img.size
    x0, y0 = abs(vp.sx), abs(vp.sy)
    rw = abs(vp.sw) if vp.sw is not None else cols - x0
    rh = abs(vp.sh) if vp.sh is not None else rows - y0
    if x0 >= cols or y0 >= rows or rw <= 0 or rh <= 0:
        raise RenderParamError(
            f"viewport region ({x0:g}, {y0:g}, {rw:g}, {rh:g}) lies outside the {cols}x{rows} image"
        )
    # PS3.18 8.3.5.1.3 leaves the scale to the server: the region fits the
    # viewport, but is enlarged at most to UPSCALE_LIMIT pixels on its longer
    # side (640x480 asked as 8192x8192 was 200 MB per request; a client
    # wanting more enlarges its display), and no region, even one
    # overhanging the image, makes more pixels than the image or that limit.
    scale = min(vp.vw / rw, vp.vh / rh, max(1.0, UPSCALE_LIMIT / max(rw, rh)))
    budget = max(cols * rows, UPSCALE_LIMIT * UPSCALE_LIMIT)
    if rw * rh * scale * scale > budget:
        scale *= math.sqrt(budget / (rw * rh * scale * scale))
    out_w = min(vp.vw, max(1, round(rw * scale)))
    out_h = min(vp.vh, max(1, round(rh * scale)))
    # Only the right / bottom edges can overhang (sx, sy >= 0); that part stays black.
    ix1, iy1 = min(x0 + rw, cols), min(y0 + rh, rows)
    in_w = out_w if ix1 == x0 + rw else max(1, min(out_w, round((ix1 - x0) * scale)))
    in_h = out_h if iy1 == y0 + rh else max(1, min(out_h, round((iy1 - y0) * scale)))
    box = (x0, y0, ix1, iy1)
    if scale == 1.0 and all(float(v).is_integer() for v in box):
        part = img.crop(tuple(int(v) for v in box))  # type: ignore[arg-type]
    elif scale < 1.0:
        part = img.resize((in_w, in_h), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    else:
        part = img.resize((in_w, in_h), Image.Resampling.BICUBIC, box=box)
    if part.size != (out_w, out_h):
        canvas = Image.new(img.mode, (out_w, out_h), 0)
        canvas.paste(part, (0, 0))
        part = canvas
    if vp.sw is not None and vp.sw < 0:
        part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if vp.sh is not None and vp.sh < 0:
        part = part.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return part


def _display_image(
    ds: Dataset,
    pixel: np.ndarray,
    params: RenderParams,
    frame_index: int,
    photometric: str | None,
) -> Image.Image:
    arr = _display_array(ds, pixel, params, frame_index, photometric)
    return _shown(Image.fromarray(np.ascontiguousarray(arr)), ds, frame_index, params)


def _shown(img: Image.Image, ds: Dataset, frame_index: int, params: RenderParams) -> Image.Image:
    """Square display pixels, then the viewport (its source region is in the
    object's own pixel grid)."""
    fx, fy = _square_pixel_factors(ds, frame_index)
    vp = _resolve_viewport(params.viewport) if params.viewport is not None else None
    if (fx, fy) != (1.0, 1.0):
        cols, rows = img.size
        img = img.resize((max(1, round(cols * fx)), max(1, round(rows * fy))), Image.Resampling.BICUBIC)
        if vp is not None:
            vp = replace(vp, sx=vp.sx * fx, sy=vp.sy * fy, sw=None if vp.sw is None else vp.sw * fx,
                         sh=None if vp.sh is None else vp.sh * fy)
    return img if vp is None else _apply_viewport(img, vp)


def _square_pixel_factors(ds: Dataset, frame_index: int) -> tuple[float, float]:
    """How much to stretch columns and rows so that pixels that are not
    square (Pixel Spacing 1.0\\0.5, Pixel Aspect Ratio 2\\1: ultrasound, some
    CR) are shown in their true proportions, as PS3.18 rendering and every
    viewer do; the smaller side is stretched, never shrunk. (1, 1) for square
    pixels or values that cannot be right (a ratio beyond 4)."""
    measures = functional_group(ds, frame_index, "PixelMeasuresSequence")
    for holder, keyword in ((measures, "PixelSpacing"), (ds, "PixelSpacing"), (ds, "ImagerPixelSpacing"),
                            (ds, "PixelAspectRatio")):
        values = _floats(holder.get(keyword)) if holder is not None else []
        if len(values) == 2:
            break
    else:
        return 1.0, 1.0
    vertical, horizontal = values
    if not (vertical > 0 and horizontal > 0):
        return 1.0, 1.0
    ratio = vertical / horizontal
    if abs(ratio - 1.0) < 1e-3 or not 0.25 <= ratio <= 4.0:
        return 1.0, 1.0
    return (1.0, ratio) if ratio > 1 else (1.0 / ratio, 1.0)


def _encode(img: Image.Image, params: RenderParams) -> bytes:
    out = io.BytesIO()
    fmt = _FORMATS[params.media_type]
    if fmt == "JPEG":
        options: dict[str, object] = {"quality": int(params.quality)}
        if img.mode == "RGB":
            # 4:4:4 keeps colored annotations / overlays crisp at high quality.
            options["subsampling"] = 0 if params.quality >= 90 else 2
        img.save(out, "JPEG", **options)
    elif fmt == "PNG":
        img.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        if img.mode == "RGB":
            img = img.quantize(256)
        img.save(out, "GIF")
    return out.getvalue()


def frame_to_display(
    ds: Dataset,
    pixel: np.ndarray,
    params: RenderParams,
    *,
    frame_index: int = 0,
    photometric: str | None = None,
) -> np.ndarray:
    """Turn one decoded frame into display pixels, viewport applied.

    ``pixel`` is one frame as pydicom 3 returns it by default
    (``pydicom.pixels.pixel_array(ds, index=i)``): (rows, columns) or
    (rows, columns, 3), color already converted to RGB where pydicom does so.
    ``photometric`` is the photometric interpretation of ``pixel`` itself
    (default: what pydicom's default decoding leaves for ``ds``: RGB for
    3-sample YBR_FULL / YBR_FULL_422 / YBR_ICT / YBR_RCT objects); pass
    ``"YBR_FULL"`` or ``"YBR_FULL_422"`` for ``raw=True`` output to have it
    converted;
    ``frame_index`` selects per-frame functional groups of enhanced objects.

    Returns a C-contiguous ``uint8`` array, (H, W) for grayscale or
    (H, W, 3) RGB. Raises :class:`RenderError`.
    """
    arr = _display_array(ds, pixel, params, frame_index, photometric)
    if params.viewport is None and _square_pixel_factors(ds, frame_index) == (1.0, 1.0):
        return np.ascontiguousarray(arr)
    return np.array(_shown(Image.fromarray(np.ascontiguousarray(arr)), ds, frame_index, params))


def render_frame(ds: Dataset, frame_index: int, params: RenderParams) -> bytes:
    """Render frame ``frame_index`` (0-based) of ``ds`` as encoded image bytes.

    Only that frame is decoded. If ``ds`` was read from a file with its pixel
    data deferred (``dcmread(path, defer_size=...)``), only that frame's bytes
    are read from the file too; otherwise the in-memory pixel data is used.
    Raises :class:`RenderError` with ``http_status`` 404 for a frame out of
    range, 415 / 422 for pixel data that cannot be decoded or rendered.
    """
    pixel = frame_of(ds, frame_index)
    return _encode(_display_image(ds, pixel, params, frame_index, None), params)


def frame_of(ds: Dataset, frame_index: int) -> np.ndarray:
    """Frame ``frame_index`` (0-based) of ``ds`` decoded, as :func:`render_frame`
    reads it (a deferred pixel data value: that frame's bytes only). Raises
    :class:`RenderError` (404 out of range, 415 no decoder, 422 undecodable)."""
    _check_frame(ds, frame_index)
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    _check_decoder(tsyntax)
    path = _deferred_pixel_path(ds, tsyntax)
    if path is not None:
        with open(path, "rb") as f:
            return _decode(f, ds, frame_index)
    return _decode(ds, ds, frame_index)


def _deferred_pixel_path(ds: Dataset, tsyntax: object) -> str | os.PathLike[str] | None:
    """The file to stream one frame from, if ds left its pixel data unread there.

    Touching a deferred element through the public API loads the whole value
    (gigabytes for a large multi-frame), so peek at the raw element instead;
    if pydicom's internals ever change this just falls back to that load.
    """
    filename = getattr(ds, "filename", None)
    if not isinstance(filename, (str, os.PathLike)) or not tsyntax:
        return None
    if UID(str(tsyntax)) == DeflatedExplicitVRLittleEndian:
        return None
    raw_elements = getattr(ds, "_dict", {})
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        elem = raw_elements.get(tag)
        if elem is not None:
            deferred = isinstance(elem, RawDataElement) and elem.value is None
            return filename if deferred and os.path.isfile(filename) else None
    return None


# Around the work of one render, given the decoded frame's bytes (what the
# caller counts in its memory budget; pacs.pixel_memory for the server).
Hold = Callable[[int], AbstractContextManager[object]]


def _frame_bytes(header: Dataset) -> int:
    """Bytes of one decoded frame as *header* describes it (0 when it does not)."""
    try:
        rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
        samples, bits = int(header.get("SamplesPerPixel") or 1), int(header.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        return 0
    return (rows * columns * samples * bits + 7) // 8


def render_dataset_bytes(
    data: bytes | bytearray | memoryview | BinaryIO, frame_index: int, params: RenderParams,
    hold: Hold | None = None,
) -> bytes:
    """Parse a DICOM Part 10 file (bytes or a binary file object) and render a frame.

    A seekable file object must hold the Part 10 file starting at offset 0
    (e.g. an open file; its position is restored); a non-seekable stream is
    read into memory first. Only the header and the requested frame's
    bytes are read and decoded, so rendering one frame of a very large
    multi-frame object neither reads nor decodes the others. Deflated and
    headerless objects are read whole as a fallback. *hold*, when given, is
    entered with the decoded frame's size (from the header) around the
    decode and everything after it.
    """
    def encoded(ds: Dataset, pixel: np.ndarray) -> bytes:
        return _encode(_display_image(ds, pixel, params, frame_index, None), params)

    return with_frame(data, frame_index, encoded, hold)


T = TypeVar("T")


def with_frame(
    data: bytes | bytearray | memoryview | BinaryIO, frame_index: int, use: Callable[[Dataset, np.ndarray], T],
    hold: Hold | None = None,
) -> T:
    """``use(dataset, pixel)`` of frame *frame_index* (0-based) of a Part 10
    object, read and decoded as :func:`render_dataset_bytes` does (only the
    header and that frame's bytes; *hold* entered with the decoded frame's
    size around the decode and *use*). *dataset* holds the object's
    attributes (its pixel data may be left unread), *pixel* the frame as
    pydicom decodes it. Raises :class:`RenderError`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        f: BinaryIO = io.BytesIO(data)  # shares an immutable bytes buffer, no copy
    else:
        f = data
        if not getattr(f, "seekable", lambda: True)():
            f = io.BytesIO(f.read())  # headers and frames are found by seeking
    start = f.tell()
    try:
        f.seek(0)
        try:
            header = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise RenderError(f"not a readable DICOM Part 10 object: {exc}") from exc
        if hold is None:
            return use(*_read_frame(f, header, frame_index))
        with hold(_frame_bytes(header)):
            return use(*_read_frame(f, header, frame_index))
    finally:
        f.seek(start)


def _read_frame(f: BinaryIO, header: Dataset, frame_index: int) -> tuple[Dataset, np.ndarray]:
    """The attributes and the decoded frame of :func:`with_frame` once *header* is read from *f*."""
    tsyntax = header.file_meta.get("TransferSyntaxUID") if header.file_meta else None
    if not tsyntax or UID(str(tsyntax)) == DeflatedExplicitVRLittleEndian:
        # pixel_array() cannot stream these; read the whole object instead.
        return _read_whole(f, frame_index)
    _check_frame(header, frame_index)
    _check_decoder(tsyntax)
    f.seek(0)
    try:
        return header, _decode(f, header, frame_index)
    except RenderError:
        if not _implicit_under_explicit(f, header, UID(str(tsyntax))):
            raise
        # dcmread reads such a data set as it is written; pixel_array()
        # streaming from the file parses it as the syntax says and fails
        # on pixels the frames resource serves (a 422 "unexpected tag
        # (0000,0000)"). Only such objects are read whole: were every
        # undecodable one, a corrupt 1 GB object would be loaded for its 422.
        return _read_whole(f, frame_index)


def _read_whole(f: BinaryIO, frame_index: int) -> tuple[Dataset, np.ndarray]:
    f.seek(0)
    try:
        ds = pydicom.dcmread(f, force=True)
    except Exception as exc:
        raise RenderError(f"not a readable DICOM Part 10 object: {exc}") from exc
    return ds, frame_of(ds, frame_index)


def _implicit_under_explicit(f: BinaryIO, header: Dataset, tsyntax: UID) -> bool:
    """Whether the data set of *f* is written in Implicit VR under an
    explicit VR syntax's name (pydicom's SC_rgb_jpeg.dcm)."""
    length = header.file_meta.get("FileMetaInformationGroupLength") if header.file_meta else None
    if tsyntax.is_implicit_VR or not isinstance(length, int):
        return False
    f.seek(128)
    preamble = 132 if f.read(4) == b"DICM" else 0
    f.seek(preamble + 12 + length)  # past the group length element (12 bytes) and the group
    head = f.read(6)
    # The test dcmread makes: an explicit VR is two upper-case letters after the tag.
    return len(head) == 6 and not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
