"""The rendering engine behind the DICOMweb rendered / thumbnail resources.

Expected pixels come from an independent reference written here straight
from the PS3.3 pseudo-code (C.11.2.1.2.1 LINEAR, C.11.2.1.3.2 LINEAR_EXACT,
C.11.2.1.3.1 SIGMOID) in float64 on ``ds.pixel_array``, with pydicom's own
``apply_modality_lut`` / ``apply_voi`` / ``apply_color_lut`` /
``convert_color_space`` for the LUT and colour steps. No server is needed.
"""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    convert_color_space,
    pixel_array,
)
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from viewer_api.render import (
    RenderError,
    RenderParamError,
    RenderParams,
    Viewport,
    frame_to_display,
    parse_quality,
    parse_viewport,
    parse_window,
    render_dataset_bytes,
    render_frame,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- helpers -------------------------------------------------------------------------------
def path_of(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not available offline (pydicom / pydicom-data)"
    return str(path)


def read(name: str) -> Dataset:
    return pydicom.dcmread(path_of(name))


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def png(ds: Dataset, frame: int = 0, **kw: Any) -> np.ndarray:
    return np.asarray(decode(render_frame(ds, frame, RenderParams(media_type="image/png", **kw))))


def frame_of(ds: Dataset, frame: int = 0) -> np.ndarray:
    arr = ds.pixel_array
    return arr[frame] if int(ds.get("NumberOfFrames") or 1) > 1 else arr


def ref_window(x: np.ndarray, c: float, w: float, fn: str) -> np.ndarray:
    """PS3.3 pseudo-code, y_min 0, y_max 255, float, not yet rounded."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if fn == "linear":
            lower, upper = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            inner = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 if w > 1 else np.zeros_like(x)
            return np.where(x <= lower, 0.0, np.where(x > upper, 255.0, inner))
        if fn == "linear-exact":
            inner = ((x - c) / w + 0.5) * 255
            return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, inner))
        assert fn == "sigmoid"
        return 255.0 / (1 + np.exp(-4 * (x - c) / w))


def to8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def ref_grey(
    ds: Dataset, frame: int = 0, window: tuple[float, float, str] | None = None
) -> np.ndarray:
    """Independent grayscale reference: modality -> VOI -> polarity."""
    stored = frame_of(ds, frame)
    m = apply_modality_lut(stored, ds).astype(np.float64)
    if window is None and "WindowCenter" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        fn = str(ds.get("VOILUTFunction") or "LINEAR").lower().replace("_", "-")
        window = (wc, ww, fn)
    if window is not None:
        y = ref_window(m, *window)
    elif "VOILUTSequence" in ds:
        bits = ds.VOILUTSequence[0].LUTDescriptor[2]
        y = apply_voi(m.astype(np.int64), ds).astype(np.float64) * 255 / (2**bits - 1)
    else:
        lo, hi = m.min(), m.max()
        y = (m - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(m)
    out = to8(y)
    inverse = (
        ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE"
    )
    return 255 - out if inverse else out


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: int = 1) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = np.abs(actual.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= tol, (
        f"max difference {diff.max()} > {tol} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )


def strip_voi(ds: Dataset) -> Dataset:
    for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
        if kw in ds:
            delattr(ds, kw)
    return ds


def explicit_window(ds: Dataset, fn: str) -> tuple[float, float, str]:
    """A window that exercises both clipped ends and the ramp of the frame."""
    m = apply_modality_lut(frame_of(ds), ds).astype(np.float64)
    lo, hi = np.percentile(m, [10, 90])
    return (float(lo + hi) / 2, max(float(hi - lo), 2.0), fn)


MONO = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",
    "RG1_UNCI.dcm",
    "RG1_UNCR.dcm",
    "emri_small.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "rtdose.dcm",
    "image_dfl.dcm",
    "693_J2KI.dcm",
    "693_UNCI.dcm",
    "JPGExtended.dcm",
    "JPEG-LL.dcm",
    "mlut_18.dcm",
    "vlut_04.dcm",
]
COLOR = [
    "SC_rgb.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_ybr_color.dcm",
    "examples_palette.dcm",
    "OBXXXX1A.dcm",
    "US1_J2KR.dcm",
]


def ref_color(ds: Dataset, frame: int = 0) -> np.ndarray:
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(frame_of(ds, frame), ds)[..., :3]
        return (rgb >> 8).astype(np.uint8) if rgb.dtype == np.uint16 else rgb
    raw = pixel_array(ds, index=frame, raw=True)
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        return convert_color_space(raw, pi, "RGB")
    if pi == "YBR_RCT":  # the JPEG 2000 decoder reverses the RCT itself
        return raw
    assert pi == "RGB"
    return raw


# -- every file: size, media types, pixel values ------------------------------------
@pytest.mark.parametrize("name", MONO + COLOR)
def test_jpeg_and_png_have_the_image_size(name: str) -> None:
    ds = read(name)
    color = ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
    expected = ref_color(ds) if color else ref_grey(ds)
    for media_type in ("image/jpeg", "image/png", "image/gif"):
        img = decode(render_frame(ds, 0, RenderParams(media_type=media_type)))
        assert img.format == media_type.split("/")[1].upper()
        assert img.size == (ds.Columns, ds.Rows)
        if media_type == "image/jpeg":
            assert img.mode == ("RGB" if color else "L")
            # Lossy, but the same picture: small mean error against the reference.
            err = np.abs(np.asarray(img).astype(np.int32) - expected.astype(np.int32)).mean()
            assert err < 4, f"JPEG mean error {err:.2f}"
        if media_type == "image/gif" and not color:
            assert_close(np.asarray(img.convert("L")), expected, tol=1)


@pytest.mark.parametrize("name", MONO)
def test_grey_png_matches_reference_with_object_voi(name: str) -> None:
    ds = read(name)
    assert_close(png(ds), ref_grey(ds))


@pytest.mark.parametrize("name", MONO)
@pytest.mark.parametrize("fn", ["linear", "linear-exact", "sigmoid"])
def test_grey_png_matches_reference_with_explicit_window(name: str, fn: str) -> None:
    ds = read(name)
    window = explicit_window(ds, fn)
    assert_close(png(ds, window=window), ref_grey(ds, window=window))


@pytest.mark.parametrize("name", MONO)
def test_grey_png_matches_reference_without_any_window(name: str) -> None:
    ds = strip_voi(read(name))
    out = png(ds)
    assert_close(out, ref_grey(ds))
    if ds.PhotometricInterpretation == "MONOCHROME2" and "ModalityLUTSequence" not in ds:
        stored = frame_of(ds)
        if stored.max() > stored.min():
            assert out.min() == 0 and out.max() == 255


def test_monochrome1_minimum_renders_white() -> None:
    ds = strip_voi(read("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array
    out = png(ds)
    assert out[np.unravel_index(stored.argmin(), stored.shape)] == 255
    assert out[np.unravel_index(stored.argmax(), stored.shape)] == 0
    # With its own window too: the darkest stored value is the brightest rendered.
    ds = read("RG1_UNCI.dcm")
    out = png(ds)
    assert_close(out, ref_grey(ds))
    assert out[np.unravel_index(stored.argmin(), stored.shape)] == out.max()


def test_monochrome1_compressed_equals_uncompressed() -> None:
    assert np.array_equal(png(read("RG1_J2KR.dcm")), png(read("RG1_UNCR.dcm")))


def test_presentation_lut_shape_inverse_inverts_monochrome2() -> None:
    ds = read("MR_small.dcm")
    normal = png(ds)
    ds.PresentationLUTShape = "INVERSE"
    assert_close(png(ds), 255 - normal)
    ds.PresentationLUTShape = "IDENTITY"
    assert np.array_equal(png(ds), normal)


def test_presentation_lut_inverse_does_not_double_invert_monochrome1() -> None:
    ds = read("RG1_UNCI.dcm")
    plain = png(ds)
    ds.PresentationLUTShape = "INVERSE"
    assert np.array_equal(png(ds), plain)


def test_voi_lut_function_from_object() -> None:
    ds = read("CT_small.dcm")
    m = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter = float(np.median(m))
    ds.WindowWidth = float(np.ptp(m) / 3)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        ds.VOILUTFunction = function
        assert_close(png(ds), ref_grey(ds))


def test_multi_valued_window_uses_first_pair() -> None:
    ds = read("MR_small.dcm")
    ds.WindowCenter = [300, 900]
    ds.WindowWidth = [400, 100]
    assert_close(png(ds), ref_grey(ds, window=(300.0, 400.0, "linear")))


def test_explicit_window_overrides_object_window_and_voi_lut() -> None:
    ds = read("vlut_04.dcm")
    window = (100.0, 50.0, "linear")
    assert_close(png(ds, window=window), ref_grey(ds, window=window))


def test_voi_lut_sequence_output_is_scaled_exactly() -> None:
    ds = read("vlut_04.dcm")
    bits = ds.VOILUTSequence[0].LUTDescriptor[2]
    lut_out = apply_voi(ds.pixel_array, ds).astype(np.float64)
    assert np.array_equal(png(ds), to8(lut_out * 255 / (2**bits - 1)))


def test_window_width_one_is_a_threshold() -> None:
    ds = read("MR_small.dcm")
    out = png(ds, window=(400.0, 1.0, "linear"))
    stored = ds.pixel_array
    assert np.array_equal(out, np.where(stored <= 399.5, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # c = 100, w = 4. LINEAR: x <= 98 -> 0, x > 101 -> 255, 99 -> 85, 100 -> 170.
        ("linear", [0, 0, 0, 0, 85, 170, 255, 255, 255]),
        # LINEAR_EXACT: x <= 98 -> 0, x > 102 -> 255; 63.75, 127.5, 191.25 rounded half up.
        ("linear-exact", [0, 0, 0, 0, 64, 128, 191, 255, 255]),
    ],
)
def test_window_golden_values(dtype: type, function: str, expected: list[int]) -> None:
    """Exact PS3.3 values where an off-by-0.5 in center or width would show."""
    values: np.ndarray = np.arange(95, 104, dtype=dtype).reshape(1, 9)
    ds = synthetic(
        values,
        "MONOCHROME2",
        8 * np.dtype(dtype).itemsize,
        WindowCenter=100,
        WindowWidth=4,
        VOILUTFunction=function.upper().replace("-", "_"),
    )
    assert png(ds).tolist() == [expected]
    # The same through a rescale: stored 45..49 * 2 + 5 = 95, 97, .., 103.
    if dtype != np.uint8:
        stored: np.ndarray = np.arange(45, 50, dtype=dtype).reshape(1, 5)
        ds = synthetic(stored, "MONOCHROME2", 16, RescaleSlope=2, RescaleIntercept=5)
        want = dict(zip(range(95, 104), expected))
        assert png(ds, window=(100.0, 4.0, function)).tolist() == [
            [want[v] for v in (95, 97, 99, 101, 103)]
        ]


def test_signed_data_with_rescale() -> None:
    ds = read("CT_small.dcm")
    assert ds.PixelRepresentation == 1 and ds.RescaleIntercept == -1024
    window = (40.0, 400.0, "linear")
    assert_close(png(ds, window=window), ref_grey(ds, window=window))
    ds.RescaleSlope = 0.5
    ds.RescaleIntercept = 100
    assert_close(png(ds, window=window), ref_grey(ds, window=window))


def test_modality_lut_sequence_is_used() -> None:
    ds = read("mlut_18.dcm")
    assert "ModalityLUTSequence" in ds and "RescaleSlope" not in ds
    window = (float(2**15), float(2**14), "linear")
    assert_close(png(ds, window=window), ref_grey(ds, window=window))


# -- color -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COLOR)
def test_color_png_matches_rgb_reference(name: str) -> None:
    ds = read(name)
    assert np.array_equal(png(ds), ref_color(ds))


@pytest.mark.parametrize(
    ("name", "original", "tolerance"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 8),  # YBR_FULL JPEG baseline (lossy)
        ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb.dcm", 8),  # subsampled chroma
        ("US1_J2KR.dcm", "US1_UNCR.dcm", 0),  # YBR_RCT JPEG 2000 lossless
        ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", 0),  # palette, RLE
    ],
)
def test_color_render_equals_the_uncompressed_original(
    name: str, original: str, tolerance: int
) -> None:
    assert_close(png(read(name)), png(read(original)), tol=tolerance)


def test_color_images_are_not_windowed_unless_asked() -> None:
    ds = read("SC_rgb.dcm")
    ds.WindowCenter, ds.WindowWidth = 10, 5  # must be ignored for RGB
    assert np.array_equal(png(ds), ds.pixel_array)
    window = (128.0, 64.0, "linear")
    assert_close(
        png(ds, window=window), to8(ref_window(ds.pixel_array.astype(np.float64), *window))
    )


def test_palette_ignores_explicit_window() -> None:
    ds = read("OBXXXX1A.dcm")
    assert np.array_equal(png(ds, window=(10.0, 5.0, "linear")), ref_color(ds))


def synthetic(
    arr: np.ndarray,
    photometric: str,
    bits_stored: int,
    *,
    signed: bool = False,
    frames: int = 1,
    **extra: object,
) -> Dataset:
    """A minimal uncompressed image object around arr (frames first if frames > 1)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(arr, photometric, bits_stored)
    if signed:
        assert ds.PixelRepresentation == 1
    if frames > 1:
        assert ds.NumberOfFrames == frames
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("bits_stored", [16, 12])
def test_16_bit_color_is_scaled_to_8_bit(bits_stored: int) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 2**bits_stored, (40, 30, 3), dtype=np.uint16)
    ds = synthetic(arr, "RGB", bits_stored)
    assert np.array_equal(png(ds), (arr >> (bits_stored - 8)).astype(np.uint8))


def test_planar_configuration_1() -> None:
    ds = read("SC_rgb.dcm")
    rgb = ds.pixel_array
    planar = Dataset()
    planar.file_meta = ds.file_meta
    for kw in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(planar, kw, ds[kw].value)
    planar.PlanarConfiguration = 1
    planar.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    assert np.array_equal(png(planar), rgb)


# -- multi-frame -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"]
)
def test_multi_frame_grey(name: str) -> None:
    ds = read(name)
    last = int(ds.NumberOfFrames) - 1
    first_png, last_png = png(ds, 0), png(ds, last)
    assert not np.array_equal(first_png, last_png)
    assert_close(first_png, ref_grey(ds, 0))
    assert_close(last_png, ref_grey(ds, last))
    data = Path(path_of(name)).read_bytes()
    via_bytes = decode(render_dataset_bytes(data, last, RenderParams(media_type="image/png")))
    assert np.array_equal(np.asarray(via_bytes), last_png)


def test_multi_frame_color() -> None:
    ds = read("examples_ybr_color.dcm")
    last = int(ds.NumberOfFrames) - 1
    first_png, last_png = png(ds, 0), png(ds, last)
    assert not np.array_equal(first_png, last_png)
    assert np.array_equal(first_png, ref_color(ds, 0))
    assert np.array_equal(last_png, ref_color(ds, last))


@pytest.mark.parametrize("name", ["emri_small.dcm", "examples_ybr_color.dcm", "CT_small.dcm"])
def test_frame_out_of_range_is_404(name: str) -> None:
    ds = read(name)
    n = int(ds.get("NumberOfFrames") or 1)
    data = Path(path_of(name)).read_bytes()
    for bad in (n, n + 100, -1):
        with pytest.raises(RenderError) as exc:
            render_frame(ds, bad, RenderParams())
        assert exc.value.http_status == 404
        with pytest.raises(RenderError) as exc:
            render_dataset_bytes(data, bad, RenderParams())
        assert exc.value.http_status == 404


def test_enhanced_per_frame_functional_groups() -> None:
    rng = np.random.default_rng(2)
    arr = rng.integers(-1000, 3000, (3, 32, 48), dtype=np.int16)
    ds = synthetic(arr, "MONOCHROME2", 16, signed=True, frames=3)
    shared = Dataset()
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    shared.PixelValueTransformationSequence[0].RescaleType = "HU"
    ds.SharedFunctionalGroupsSequence = [shared]
    windows = [(40.0, 400.0), (-600.0, 1500.0)]
    per_frame = []
    for i in range(3):
        item = Dataset()
        if i < 2:
            voi = Dataset()
            voi.WindowCenter, voi.WindowWidth = windows[i]
            item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    for i in range(3):
        m = arr[i].astype(np.float64) - 1024
        if i < 2:
            expected = to8(ref_window(m, *windows[i], "linear"))
        else:  # no VOI for this frame: min/max
            expected = to8((m - m.min()) / (m.max() - m.min()) * 255)
        assert_close(png(ds, i), expected)


def test_only_the_requested_frame_is_decoded() -> None:
    """A 64 MB multi-frame renders one frame with a few MB of extra memory."""
    frames, rows, cols = 128, 512, 512
    rng = np.random.default_rng(3)
    one = rng.integers(0, 4096, (rows, cols), dtype=np.uint16)
    arr = np.broadcast_to(one, (frames, rows, cols)).copy()
    arr[77] = 4095 - one  # a distinct frame to find
    ds = synthetic(arr, "MONOCHROME2", 12, frames=frames)
    data = part10(ds)
    del arr
    params = RenderParams(media_type="image/png")
    expected = to8((4095 - one - (4095 - one).min()) / np.ptp(4095 - one) * 255)
    for source in (
        lambda: render_dataset_bytes(data, 77, params),
        lambda: render_frame(ds, 77, params),
    ):
        tracemalloc.start()
        out = source()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 2**20, (
            f"peak {peak / 2**20:.1f} MiB for a {len(data) / 2**20:.0f} MiB object"
        )
        assert_close(np.asarray(decode(out)), expected)


def test_deferred_pixel_data_streams_one_frame_from_the_file(tmp_path: Path) -> None:
    frames = 128
    one = np.random.default_rng(7).integers(0, 4096, (512, 512), dtype=np.uint16)
    arr = np.broadcast_to(one, (frames, 512, 512)).copy()
    arr[100] = one // 2
    path = tmp_path / "big.dcm"
    path.write_bytes(part10(synthetic(arr, "MONOCHROME2", 12, frames=frames)))
    del arr
    ds = pydicom.dcmread(path, defer_size=1024)
    tracemalloc.start()
    out = render_frame(ds, 100, RenderParams(media_type="image/png"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    m = (one // 2).astype(np.float64)
    assert_close(np.asarray(decode(out)), to8((m - m.min()) / np.ptp(m) * 255))


def test_encapsulated_multi_frame_streams_one_frame() -> None:
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 1000, (12, 40, 50), dtype=np.uint16)
    ds = synthetic(arr, "MONOCHROME2", 16, frames=12)
    ds.compress(RLELossless)
    data = part10(ds)
    f = io.BytesIO(data)
    f.seek(5)
    out = render_dataset_bytes(f, 7, RenderParams(media_type="image/png"))
    assert f.tell() == 5  # the caller's position is restored
    m = arr[7].astype(np.float64)
    assert_close(np.asarray(decode(out)), to8((m - m.min()) / np.ptp(m) * 255))


def test_float_pixel_data() -> None:
    rng = np.random.default_rng(5)
    arr = rng.normal(0, 1, (20, 30)).astype(np.float32)
    ds = synthetic(np.zeros((20, 30), np.uint8), "MONOCHROME2", 8)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = arr.tobytes()
    m = arr.astype(np.float64)
    assert_close(png(ds), to8((m - m.min()) / np.ptp(m) * 255))


# -- viewport ------------------------------------------------------------------------------
def test_viewport_fits_inside_keeping_aspect() -> None:
    ds = read("RG1_UNCI.dcm")  # 1841 x 1955
    img = decode(render_frame(ds, 0, RenderParams(viewport=(256, 256))))
    assert img.size == (round(1841 * 256 / 1955), 256)
    img = decode(render_frame(ds, 0, RenderParams(media_type="image/png", viewport=(300, 1000))))
    assert img.size == (300, round(1955 * 300 / 1841))
    # Scaled content still looks like the full-size render.
    small = np.asarray(img).astype(np.float64)
    full = np.asarray(Image.fromarray(png(ds)).resize(img.size, Image.Resampling.BOX)).astype(
        np.float64
    )
    assert np.abs(small - full).mean() < 2


def test_viewport_upscales_to_fill() -> None:
    ds = read("MR_small.dcm")  # 64 x 64
    img = decode(render_frame(ds, 0, RenderParams(viewport=(128, 100))))
    assert img.size == (100, 100)


def test_viewport_crop_and_flip_are_exact_at_scale_one() -> None:
    ds = read("MR_small.dcm")
    ref = ref_grey(ds)
    crop = png(ds, viewport=parse_viewport("32,32,16,8,32,32"))
    assert_close(crop, ref[8:40, 16:48])
    assert_close(png(ds, viewport=parse_viewport("32,32,16,8,-32,32")), ref[8:40, 16:48][:, ::-1])
    assert_close(png(ds, viewport=parse_viewport("32,32,16,8,32,-32")), ref[8:40, 16:48][::-1, :])
    # sw/sh elided: to the right / bottom edge.
    assert_close(png(ds, viewport=parse_viewport("48,56,16,8")), ref[8:, 16:])
    display = frame_to_display(
        ds, ds.pixel_array, RenderParams(viewport=parse_viewport("32,32,16,8,32,32"))
    )
    assert display.dtype == np.uint8
    assert_close(display, ref[8:40, 16:48])


def test_viewport_region_overhanging_the_image_is_black() -> None:
    ds = read("MR_small.dcm")
    out = png(ds, viewport=parse_viewport("64,64,32,32,64,64"))
    assert out.shape == (64, 64)
    assert_close(out[:32, :32], ref_grey(ds)[32:, 32:])
    assert not out[32:, :].any() and not out[:, 32:].any()


def test_viewport_region_outside_the_image_is_400() -> None:
    with pytest.raises(RenderError) as exc:
        render_frame(
            read("MR_small.dcm"), 0, RenderParams(viewport=parse_viewport("10,10,100,100"))
        )
    assert exc.value.http_status == 400


def test_color_viewport() -> None:
    ds = read("US1_J2KR.dcm")  # 640 x 480
    img = decode(render_frame(ds, 0, RenderParams(viewport=(128, 128))))
    assert img.size == (128, 96) and img.mode == "RGB"
    out = frame_to_display(ds, pixel_array(ds, index=0), RenderParams(viewport=(64, 64)))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8


# -- frame_to_display ------------------------------------------------------------------------
def test_frame_to_display_shapes_and_types() -> None:
    ds = read("CT_small.dcm")
    grey = frame_to_display(ds, ds.pixel_array, RenderParams())
    assert grey.dtype == np.uint8 and grey.shape == (128, 128)
    assert_close(grey, ref_grey(ds))
    ds = read("SC_rgb_jpeg_dcmtk.dcm")
    rgb = frame_to_display(ds, ds.pixel_array, RenderParams())
    assert rgb.dtype == np.uint8 and rgb.shape == (100, 100, 3)
    ds = read("examples_palette.dcm")
    assert frame_to_display(ds, ds.pixel_array, RenderParams()).shape == (350, 800, 3)


def test_frame_to_display_converts_raw_ybr_when_told() -> None:
    ds = read("SC_ybr_full_422_uncompressed.dcm")
    raw = pixel_array(ds, index=0, raw=True)
    converted = frame_to_display(ds, raw, RenderParams(), photometric="YBR_FULL_422")
    assert np.array_equal(converted, frame_to_display(ds, ds.pixel_array, RenderParams()))


class _NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        chunk = self._inner.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_stream() -> None:
    data = Path(path_of("emri_small_RLE.dcm")).read_bytes()
    stream = cast(BinaryIO, _NonSeekable(data))
    out = render_dataset_bytes(stream, 3, RenderParams(media_type="image/png"))
    assert np.array_equal(np.asarray(decode(out)), png(read("emri_small_RLE.dcm"), 3))


# -- errors ------------------------------------------------------------------------------------
def test_no_pixel_data_is_422() -> None:
    ds = read("CT_small.dcm")
    del ds.PixelData
    with pytest.raises(RenderError) as exc:
        render_frame(ds, 0, RenderParams())
    assert exc.value.http_status == 422


def test_not_an_image_is_422() -> None:
    ds = read("CT_small.dcm")
    del ds.Rows
    with pytest.raises(RenderError) as exc:
        render_frame(ds, 0, RenderParams())
    assert exc.value.http_status == 422


def test_truncated_pixel_data_is_422() -> None:
    ds = read("CT_small.dcm")
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(RenderError) as exc:
        render_frame(ds, 0, RenderParams())
    assert exc.value.http_status == 422


def test_transfer_syntax_without_decoder_is_415() -> None:
    ds = read("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(RenderError) as exc:
        render_frame(ds, 0, RenderParams())
    assert exc.value.http_status == 415


def test_garbage_bytes_are_422() -> None:
    with pytest.raises(RenderError) as exc:
        render_dataset_bytes(b"not dicom at all" * 10, 0, RenderParams())
    assert exc.value.http_status == 422


def test_deflated_and_binary_file_object() -> None:
    ds = read("image_dfl.dcm")
    with open(path_of("image_dfl.dcm"), "rb") as f:
        out = render_dataset_bytes(f, 0, RenderParams(media_type="image/png"))
    assert np.array_equal(np.asarray(decode(out)), png(ds))


# -- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("40,400,linear", (40.0, 400.0, "linear")),
        ("-600.5,1500,linear-exact", (-600.5, 1500.0, "linear-exact")),
        ("40,0.5,sigmoid", (40.0, 0.5, "sigmoid")),
        ("1e3,2E3,LINEAR", (1000.0, 2000.0, "linear")),
        (" 40 , 1 , linear ", (40.0, 1.0, "linear")),
    ],
)
def test_parse_window_good(value: str, expected: tuple[float, float, str]) -> None:
    assert parse_window(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "40",
        "40,400",
        "40,400,",
        ",400,linear",
        "40,abc,linear",
        "40,400,cubic",
        "40,400,linear,1",
        "1_0,400,linear",
        "40,0x10,linear",
        "40,0,linear",
        "40,0.5,linear",
        "40,-3,sigmoid",
        "40,0,linear-exact",
        "nan,400,linear",
        "40,inf,linear",
    ],
)
def test_parse_window_bad(value: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_window(value)
    assert isinstance(exc.value, RenderParamError) and exc.value.http_status == 400
    assert str(exc.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512,512", Viewport(512, 512)),
        ("8192,8192", Viewport(8192, 8192)),
        ("256,128,,,100,50", Viewport(256, 128, 0.0, 0.0, 100.0, 50.0)),
        ("256,128,10.5,20,-100,50", Viewport(256, 128, 10.5, 20.0, -100.0, 50.0)),
        ("256,128,10,20", Viewport(256, 128, 10.0, 20.0)),
        ("256,128,-10,20", Viewport(256, 128, 10.0, 20.0)),  # |sx| per PS3.18
        ("64,64,,,,-64", Viewport(64, 64, 0.0, 0.0, None, -64.0)),
    ],
)
def test_parse_viewport_good(value: str, expected: Viewport) -> None:
    assert parse_viewport(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "512",
        "512,",
        "512,abc",
        "0,512",
        "-5,5",
        "512.5,512",
        "512,512,",
        "512,512,,,0,10",
        "512,512,1,2,3,4,5",
        "99999,1",
        "8193,1",
        "²,5",
        "512,512,x,0",
        "512,512,0,0,nan,10",
    ],
)
def test_parse_viewport_bad(value: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_viewport(value)
    assert isinstance(exc.value, RenderError) and exc.value.http_status == 400


def test_parse_viewport_thumbnail_form_only() -> None:
    assert parse_viewport("128,128", allow_region=False) == Viewport(128, 128)
    with pytest.raises(ValueError):
        parse_viewport("128,128,0,0,10,10", allow_region=False)


def test_parse_quality() -> None:
    assert parse_quality("1") == 1 and parse_quality("100") == 100
    for bad in ("0", "101", "", "50.5", "-1", "abc"):
        with pytest.raises(ValueError):
            parse_quality(bad)


def test_render_params_validation() -> None:
    assert RenderParams(window=(40, 400, "LINEAR_EXACT")).window == (40.0, 400.0, "linear-exact")
    for kwargs, status in [
        ({"quality": 0}, 400),
        ({"quality": 101}, 400),
        ({"media_type": "image/webp"}, 406),
        ({"window": (40, 0, "linear")}, 400),
        ({"window": (40, 400)}, 400),
        ({"viewport": (0, 10)}, 400),
        ({"viewport": (10,)}, 400),
    ]:
        with pytest.raises(RenderError) as exc:
            RenderParams(**kwargs)  # type: ignore[arg-type]
        assert exc.value.http_status == status, kwargs


def test_jpeg_quality_changes_size() -> None:
    ds = read("693_UNCI.dcm")
    low = render_frame(ds, 0, RenderParams(quality=20))
    high = render_frame(ds, 0, RenderParams(quality=95))
    assert len(low) < len(high)


# -- timing (printed, not asserted) -----------------------------------------------------------
def _best_ms(fn: object, repeat: int = 20) -> tuple[float, float]:
    """(best, median) wall time in milliseconds over repeat runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return min(times), float(np.median(times))


def test_timing_report() -> None:
    ct = read("693_UNCI.dcm")  # 512 x 512 signed 16-bit CT with rescale and window
    ct_bytes = Path(path_of("693_UNCI.dcm")).read_bytes()
    ct_j2k = read("693_J2KI.dcm")
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:2048, 0:2048]
    dx_arr = (
        8000 + 4000 * np.sin(xx / 150.0) * np.cos(yy / 170.0) + rng.normal(0, 200, (2048, 2048))
    )
    dx = synthetic(
        dx_arr.clip(0, 16383).astype(np.uint16),
        "MONOCHROME1",
        14,
        WindowCenter=8000,
        WindowWidth=6000,
    )
    dx_minmax = synthetic(dx_arr.clip(0, 16383).astype(np.uint16), "MONOCHROME2", 14)
    jpeg, png_ = RenderParams(), RenderParams(media_type="image/png")
    rows = [
        ("CT 512x512 render_frame JPEG q90", _best_ms(lambda: render_frame(ct, 0, jpeg))),
        ("CT 512x512 render_frame PNG", _best_ms(lambda: render_frame(ct, 0, png_))),
        (
            "CT 512x512 render_dataset_bytes JPEG",
            _best_ms(lambda: render_dataset_bytes(ct_bytes, 0, jpeg)),
        ),
        (
            "CT 512x512 pixels only (frame_to_display)",
            _best_ms(lambda: frame_to_display(ct, ct.pixel_array, jpeg)),
        ),
        (
            "CT 512x512 sigmoid window JPEG",
            _best_ms(lambda: render_frame(ct, 0, RenderParams(window=(40, 400, "sigmoid")))),
        ),
        (
            "CT 512x512 JPEG 2000 lossy source JPEG",
            _best_ms(lambda: render_frame(ct_j2k, 0, jpeg), 5),
        ),
        ("DX 2048x2048 16-bit JPEG q90", _best_ms(lambda: render_frame(dx, 0, jpeg), 10)),
        ("DX 2048x2048 16-bit PNG", _best_ms(lambda: render_frame(dx, 0, png_), 5)),
        (
            "DX 2048x2048 min/max window JPEG",
            _best_ms(lambda: render_frame(dx_minmax, 0, jpeg), 10),
        ),
        (
            "DX 2048x2048 thumbnail 256x256 JPEG",
            _best_ms(lambda: render_frame(dx, 0, RenderParams(viewport=(256, 256))), 10),
        ),
    ]
    print()
    print(f"  {'':<45s} {'best':>8s}    {'median':>8s}")
    for label, (best, median) in rows:
        print(f"  {label:<45s} {best:8.2f} ms {median:8.2f} ms")


# -- found by comparing with DCMTK's dcm2pnm / dcml2pnm ----------------------------------------
def _grey_image(rows: int, columns: int, pixels: np.ndarray, **attrs: Any) -> Dataset:
    """A CT-like grey object holding *pixels* as 16-bit native data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2" if ds.PixelRepresentation == 0 else "<i2").tobytes()
    return ds


def test_signed_12_bit_jpeg_ls_from_dcmtk_renders_like_its_original(tmp_path: Path) -> None:
    """dcmcjpls declares 16-bit precision for signed 12-bit data; the decoder
    then hands out -1000 HU as 3096 (air rendered white, every negative
    sample wrong). Rendered after masking and sign extension from Bits Stored."""
    import subprocess

    yy, xx = np.mgrid[0:64, 0:64]
    hu = np.where((xx - 32) ** 2 + (yy - 32) ** 2 < 25**2, 40, -1000).astype(np.int16)
    ds = _grey_image(64, 64, hu & 0x0FFF, BitsStored=12, HighBit=11, WindowCenter=40, WindowWidth=400)
    ds.PixelRepresentation = 1
    original, compressed = tmp_path / "ct.dcm", tmp_path / "ct-jls.dcm"
    ds.save_as(original, enforce_file_format=True)
    subprocess.run(["dcmcjpls", str(original), str(compressed)], check=True, capture_output=True)
    params = RenderParams(media_type="image/png")
    with open(original, "rb") as a, open(compressed, "rb") as b:
        expected = np.asarray(decode(render_dataset_bytes(a, 0, params)))
        actual = np.asarray(decode(render_dataset_bytes(b, 0, params)))
    assert expected[0, 0] == 0 and expected[32, 32] == 128  # air black, soft tissue mid-grey
    assert np.array_equal(actual, expected)


def test_a_voi_lut_starting_below_zero_read_as_unsigned(tmp_path: Path) -> None:
    """Unsigned CT with Rescale Intercept -1024 and a VOI LUT whose first
    mapped value is -1024, read back from Implicit VR as 64512: the VOI LUT's
    input is the rescaled value, so that is -1024 (the image was all black)."""
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    ds = _grey_image(16, 16, stored, BitsStored=12, HighBit=11, RescaleIntercept=-1024, RescaleSlope=1)
    item = Dataset()
    lut = np.clip(np.arange(4096) // 16, 0, 255).astype("<u2")
    item.LUTDescriptor = [4096, 64512, 8]
    item.LUTData = lut.tobytes()
    ds.VOILUTSequence = [item]
    path = tmp_path / "implicit.dcm"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.save_as(path, enforce_file_format=True)
    read_back = pydicom.dcmread(path)
    assert int(read_back.VOILUTSequence[0].LUTDescriptor[1]) == 64512
    expected = lut[stored.astype(np.int64)].astype(np.float64)  # HU + 1024 indexes the LUT
    assert_close(png(read_back), to8(expected * 255 / 255))


@pytest.mark.parametrize(("attrs", "size"), [
    ({"PixelSpacing": [1.0, 0.5]}, (256, 400)),  # rows 1 mm apart, columns 0.5 mm: twice as tall
    ({"PixelAspectRatio": [2, 1]}, (256, 400)),
    ({"PixelSpacing": [0.5, 1.0]}, (512, 200)),
    ({"PixelSpacing": [0.7, 0.7]}, (256, 200)),
    ({"PixelSpacing": [0.0, 0.0]}, (256, 200)),  # meaningless: left as it is
])
def test_pixels_that_are_not_square_are_shown_in_proportion(attrs: dict[str, Any], size: tuple[int, int]) -> None:
    """PS3.3 C.7.6.3.1.7 / 10.7.1.3: a 256 x 200 image of pixels twice as tall
    as wide is 256 x 400 on screen (as dcm2pnm and viewers show it); it was
    squashed to half its height."""
    stripes = np.repeat((np.arange(200) // 50 % 2 * 1000)[:, None], 256, axis=1)
    ds = _grey_image(200, 256, stripes, **attrs)
    assert decode(render_frame(ds, 0, RenderParams(media_type="image/png"))).size == size
    fitted = decode(render_frame(ds, 0, RenderParams(media_type="image/png", viewport=(256, 256))))
    assert fitted.size == tuple(round(v * min(256 / size[0], 256 / size[1])) for v in size)
    # A source region is in the object's own grid: its top half is the first two stripes.
    shown = (size[0], size[1] // 2)
    top = np.asarray(decode(render_frame(ds, 0, RenderParams(
        media_type="image/png", viewport=Viewport(*shown, 0, 0, 256, 100)))))
    assert top.shape == (shown[1], shown[0])
    assert top[: shown[1] // 2 - 3].max() == 0 and top[shown[1] // 2 + 3 : -3].min() == 255


def test_one_bit_frames_that_do_not_start_on_a_byte() -> None:
    """Three 7 x 9 frames of 1-bit data (63 bits each, packed end to end):
    frames 2 and 3 were 422 (pydicom cannot index them)."""
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 2, size=(3, 7, 9), dtype=np.uint8)
    ds = _grey_image(7, 9, np.zeros(1), BitsAllocated=1, BitsStored=1, HighBit=0, NumberOfFrames=3)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.PixelData = np.packbits(frames.ravel(), bitorder="little").tobytes()
    for n in range(3):
        assert np.array_equal(png(ds, n), frames[n] * 255), n
        with io.BytesIO() as f:
            ds.save_as(f, enforce_file_format=True)
            streamed = decode(render_dataset_bytes(f.getvalue(), n, RenderParams(media_type="image/png")))
        assert np.array_equal(np.asarray(streamed), frames[n] * 255), n


def test_render_cache_counts_what_each_entry_costs() -> None:
    """10,000 tiny images (1x1 GIFs of 43 bytes, soak tester) were counted as
    430 KB against a 64 MB bound while taking ~14 MB: each entry now counts
    its overhead too, so the bound holds for many small images."""
    from viewer_api.rendering import ENTRY_OVERHEAD, RenderCache

    cache = RenderCache(64 * 1024)
    for n in range(10_000):
        cache.put(("1.2.3", n, (40, 400)), b"G" * 43)
    assert len(cache._items) <= 64 * 1024 // (43 + ENTRY_OVERHEAD)
    assert cache.get(("1.2.3", 9_999, (40, 400))) == b"G" * 43
