"""Review of the viewer's measurements: the numbers a radiologist reads.

A real `pacs serve` holding synthetic objects of known values (`pacs import`),
measured over HTTP and in Debian's Chromium (the fixtures of
tests/test_web_viewer.py):

- a CT whose outside of the scan field is the Pixel Padding Value (-2000
  stored, -3024 HU), also written as an unsigned 63536 with a Pixel Padding
  Range Limit: padding is not the patient and must not be averaged;
- a secondary capture with Modality CT (a screen capture): grey levels, not HU;
- a PET image: its values are in Units (BQML), not unitless;
- a CR with a Pixel Spacing but no Imager Pixel Spacing: perhaps at the
  detector, which the label must not hide;
- a CT series whose second slice renders slowly: a measurement drawn while
  the first slice is still on screen must not be filed under the second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from . import test_web_viewer
from .dicomfiles import image_dataset
from .peers import Backend, PacsServer
from .test_web_viewer import PASSWORD, USERNAME, _log_in

page = test_web_viewer.page  # the fixture: a Chromium page on this module's viewer_server
SIZE = 64
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
TISSUE = 1064  # stored: 40 HU with the intercept -1024


@dataclass
class Obj:
    """One stored object: its UIDs, for the API's paths."""

    study: str
    series: str
    sop: str

    def frame(self, number: int = 1) -> str:
        return f"/api/studies/{self.study}/series/{self.series}/instances/{self.sop}/frames/{number}"


def _obj(ds: Dataset) -> Obj:
    return Obj(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _padded_ct(out: Path, name: str, unsigned_attributes: bool) -> Dataset:
    """Signed CT: columns 0..31 outside the scan field (padding), 32..63 tissue at 40 HU.

    *unsigned_attributes*: the padding attributes written with VR US (63536 for
    -2000), as readers that could not resolve US-or-SS leave them, with a
    Pixel Padding Range Limit of -1500 (padding -2000 and -1800 both)."""
    pixels = np.full((SIZE, SIZE), TISSUE, dtype=np.int16)
    pixels[:, :32] = -2000
    pixels[::2, :32] = -1800 if unsigned_attributes else -2000
    ds = image_dataset(PatientName="NGUYEN^PADDING", PatientID=f"REV-{name}", Rows=SIZE, Columns=SIZE,
                       PixelRepresentation=1, BitsStored=16, HighBit=15, PixelSpacing=[0.7, 0.7],
                       RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40, WindowWidth=400,
                       PixelData=pixels.tobytes())
    if unsigned_attributes:
        ds.add_new(0x00280120, "US", 63536)
        ds.add_new(0x00280121, "US", 64036)  # -1500
    else:
        ds.add_new(0x00280120, "SS", -2000)
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    return ds


def _screen_capture(out: Path) -> Dataset:
    """A secondary capture of a CT workstation's screen: Modality CT, 8-bit grey levels."""
    ds = image_dataset(SC_IMAGE, Modality="CT", PatientName="TRAN^SC", PatientID="REV-SC", Rows=SIZE, Columns=SIZE,
                       BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=bytes([128]) * SIZE * SIZE)
    ds.save_as(out / "sc-ct.dcm", enforce_file_format=True)
    return ds


def _pet(out: Path) -> Dataset:
    """A PET image of stored 100 and Rescale Slope 2.5: 250 Bq/ml."""
    ds = image_dataset(PET_IMAGE, Modality="PT", PatientName="LE^PET", PatientID="REV-PT", Rows=SIZE, Columns=SIZE,
                       Units="BQML", RescaleSlope=2.5, RescaleIntercept=0, PixelSpacing=[4.0, 4.0],
                       PixelData=np.full((SIZE, SIZE), 100, dtype=np.uint16).tobytes())
    ds.save_as(out / "pet.dcm", enforce_file_format=True)
    return ds


def _cr(out: Path, name: str, **extra: object) -> Dataset:
    """A CR of 0.2 mm pixels given as Pixel Spacing only (no Imager Pixel Spacing)."""
    ds = image_dataset(CR_IMAGE, Modality="CR", PatientName="PHAM^CR", PatientID="REV-CR", Rows=SIZE, Columns=SIZE,
                       PixelSpacing=[0.2, 0.2], WindowCenter=2000, WindowWidth=4000,
                       PixelData=np.full((SIZE, SIZE), 1000, dtype=np.uint16).tobytes(), **extra)
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    return ds


def _dx(out: Path, name: str, **extra: object) -> Dataset:
    """A DX of 0.2 mm detector elements (Imager Pixel Spacing) with *extra*."""
    ds = image_dataset(DX_IMAGE, Modality="DX", PatientName="VU^DX", PatientID="REV-DX", Rows=SIZE, Columns=SIZE,
                       ImagerPixelSpacing=[0.2, 0.2], WindowCenter=2000, WindowWidth=4000,
                       PixelData=np.full((SIZE, SIZE), 1000, dtype=np.uint16).tobytes(), **extra)
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    return ds


def _two_slices(out: Path) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    slices = []
    for number, stored in ((1, TISSUE), (2, 2024)):
        ds = image_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=number, SeriesNumber=1,
                           PatientName="HOANG^SLOW", PatientID="REV-SLOW", Rows=SIZE, Columns=SIZE,
                           PixelSpacing=[0.5, 0.5], RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40,
                           WindowWidth=400, PixelData=np.full((SIZE, SIZE), stored, dtype=np.uint16).tobytes())
        ds.save_as(out / f"slow-{number}.dcm", enforce_file_format=True)
        slices.append(ds)
    return slices


@dataclass
class Corpus:
    padded: Obj
    padded_unsigned: Obj
    sc: Obj
    pet: Obj
    cr: Obj
    cr_geometry: Obj
    dx_ermf_written: Obj
    dx_geometry: Obj
    dx_fiducial: Obj
    slow: list[Obj]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, Corpus]]:
    objects = tmp_path_factory.mktemp("review-measure-objects")
    corpus = Corpus(
        padded=_obj(_padded_ct(objects, "padded", False)),
        padded_unsigned=_obj(_padded_ct(objects, "padded-us", True)),
        sc=_obj(_screen_capture(objects)),
        pet=_obj(_pet(objects)),
        cr=_obj(_cr(objects, "cr")),
        cr_geometry=_obj(_cr(objects, "cr-geometry", PixelSpacingCalibrationType="GEOMETRY")),
        dx_ermf_written=_obj(_dx(objects, "dx-ermf", PixelSpacing=[0.16, 0.16],
                                 EstimatedRadiographicMagnificationFactor=1.25)),
        dx_geometry=_obj(_dx(objects, "dx-geometry", PixelSpacing=[0.18, 0.18],
                             PixelSpacingCalibrationType="GEOMETRY")),
        dx_fiducial=_obj(_dx(objects, "dx-fiducial", PixelSpacing=[0.16, 0.16], PixelSpacingCalibrationType="FIDUCIAL",
                             EstimatedRadiographicMagnificationFactor=1.25)),
        slow=[_obj(ds) for ds in _two_slices(objects)],
    )
    server = PacsServer(tmp_path_factory.mktemp("review-measure-server") / "data",
                        Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(objects))
    server.cli("user", "add", USERNAME, "--role", "radiologist", "--password", PASSWORD,
               "--display-name", "BS. Trần Văn An")
    server.start()
    try:
        yield server, corpus
    finally:
        server.stop()


@pytest.fixture
def viewer_server(measured: tuple[PacsServer, Corpus]) -> PacsServer:
    """The server the `page` fixture of tests/test_web_viewer.py opens."""
    return measured[0]


WHOLE = {"shape": "rectangle", "x0": "0", "y0": "0", "x1": str(SIZE), "y1": str(SIZE)}


def test_padding_outside_the_scan_field_is_not_averaged(measured: tuple[PacsServer, Corpus]) -> None:
    """A CT's Pixel Padding Value (-3024 HU outside the scan field) is not the
    patient: an ROI touching it gave a mean of -1492 HU for tissue at 40 HU."""
    server, corpus = measured
    with server.http() as http:
        for obj in (corpus.padded, corpus.padded_unsigned):
            roi = http.get(f"{obj.frame()}/roi", params=WHOLE)
            assert roi.status_code == 200, roi.text
            body = roi.json()
            assert (body["mean"], body["sd"], body["min"], body["max"]) == (40, 0, 40, 40), body
            assert (body["pixels"], body["padding"], body["units"]) == (SIZE * 32, SIZE * 32, "HU"), body
            # The drawn shape's area is still the whole box.
            assert math.isclose(body["area"], SIZE * SIZE * 0.49)
            outside = http.get(f"{obj.frame()}/pixel", params={"x": "3", "y": "3"}).json()
            inside = http.get(f"{obj.frame()}/pixel", params={"x": "40", "y": "3"}).json()
            assert (outside["padding"], inside["padding"], inside["value"]) == (True, False, 40), (outside, inside)
        # Only padding in the box: nothing to average, and said so.
        empty = http.get(f"{corpus.padded.frame()}/roi", params={**WHOLE, "x1": "16"}).json()
        assert (empty["pixels"], empty["padding"], empty["mean"]) == (0, SIZE * 16, None), empty


def test_units_are_those_of_the_object(measured: tuple[PacsServer, Corpus]) -> None:
    """A screen capture with Modality CT has grey levels, not HU; a PET's
    values are in its Units (BQML), which the ROI must say."""
    server, corpus = measured
    with server.http() as http:
        sc = http.get(f"{corpus.sc.frame()}/roi", params=WHOLE).json()
        assert (sc["mean"], sc["units"]) == (128, ""), sc
        assert http.get(f"{corpus.sc.frame()}/pixel", params={"x": 1, "y": 1}).json()["units"] == ""
        assert http.get(f"{corpus.sc.frame()}/calibration").json()["units"] == ""
        pet = http.get(f"{corpus.pet.frame()}/roi", params=WHOLE).json()
        assert (pet["mean"], pet["units"]) == (250, "BQML"), pet
        assert http.get(f"{corpus.pet.frame()}/calibration").json()["units"] == "BQML"
        # A CT Image without Rescale Type is still in HU.
        assert http.get(f"{corpus.slow[0].frame()}/calibration").json()["units"] == "HU"


def test_a_radiograph_without_imager_pixel_spacing_says_its_calibration_is_unknown(
        measured: tuple[PacsServer, Corpus]) -> None:
    """A CR's Pixel Spacing without Imager Pixel Spacing is most often the
    plate's (10-20 % larger than the patient): not presented as the patient's."""
    server, corpus = measured
    with server.http() as http:
        cr = http.get(f"{corpus.cr.frame()}/calibration").json()["spacing"]
        assert (cr["row"], cr["basis"]) == (0.2, "unknown"), cr
        geometry = http.get(f"{corpus.cr_geometry.frame()}/calibration").json()["spacing"]
        assert (geometry["basis"], geometry["source"]) == ("magnification", "PixelSpacing (GEOMETRY)"), geometry
        assert http.get(f"{corpus.pet.frame()}/calibration").json()["spacing"]["basis"] == "patient"


def test_a_magnification_estimate_is_not_called_calibrated(measured: tuple[PacsServer, Corpus]) -> None:
    """PS3.3 10.7.1.2: GEOMETRY is a correction for the magnification at an
    assumed depth, and a Pixel Spacing that is the Imager Pixel Spacing over
    the ERMF is that estimate too; only FIDUCIAL is measured against an
    object of known size. Both estimates were labelled '(calibrated)'."""
    server, corpus = measured
    with server.http() as http:
        def basis(obj: Obj) -> tuple[str, float]:
            spacing = http.get(f"{obj.frame()}/calibration").json()["spacing"]
            return spacing["basis"], spacing["row"]

        assert basis(corpus.dx_ermf_written) == ("magnification", 0.16)
        assert basis(corpus.dx_geometry) == ("magnification", 0.18)
        assert basis(corpus.dx_fiducial) == ("calibrated", 0.16)


# -- the browser -----------------------------------------------------------------------------
def _shown(page: Any) -> None:
    page.wait_for_function("() => { const i = document.querySelector('#viewer-image');"
                           " return i && !i.hidden && i.complete && i.naturalWidth > 0; }")


def _screen(page: Any, x: float, y: float) -> tuple[float, float]:
    box = page.locator("#viewer-image").bounding_box()
    return box["x"] + x / SIZE * box["width"], box["y"] + y / SIZE * box["height"]


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*_screen(page, *start))
    page.mouse.down()
    page.mouse.move(*_screen(page, *end), steps=5)
    page.mouse.up()


def _tool(page: Any, key: str, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#viewport").focus()
    page.keyboard.press(key)
    expect(page.locator(f"#tool-{name}")).to_have_attribute("aria-pressed", "true")


def test_a_measurement_is_of_the_slice_on_screen(page: Any, measured: tuple[PacsServer, Corpus]) -> None:
    """Scrolled to a slice whose image is still on its way (a slow link), the
    previous slice stays on screen: an ROI drawn on it was filed under, and
    its statistics taken from, the slice not yet shown."""
    from playwright.sync_api import expect

    server, corpus = measured
    first, second = corpus.slow
    held: list[Any] = []
    page.route(f"**/instances/{second.sop}/rendered*", lambda route: held.append(route))
    page.goto(f"/#/study/{first.study}")
    _log_in(page)
    _shown(page)
    layer = page.locator("#measure-layer")
    label = page.locator("#slice-label")
    _tool(page, "r", "roi")
    page.keyboard.press("ArrowDown")
    expect(label).to_have_attribute("data-index", "2")
    assert first.sop in (page.locator("#viewport").get_attribute("data-shown-url") or "")
    _drag(page, (10, 10), (50, 50))  # on the first slice's image, still shown
    expect(layer.locator("g.measurement")).to_have_count(0)
    page.wait_for_timeout(300)  # a statistics request, were one sent, would be on its way
    for route in held:
        route.continue_()
    page.unroute(f"**/instances/{second.sop}/rendered*")
    expect(page.locator("#viewport")).to_have_attribute("data-shown-url", re.compile(re.escape(second.sop)))
    expect(layer.locator("g.measurement")).to_have_count(0)
    # Once shown, the second slice is measured as usual: 1000 HU.
    _drag(page, (10, 10), (50, 50))
    roi = layer.locator("g.measurement.roi:not(.drawing)").last
    expect(roi).to_have_attribute("data-mean", "1000")
    page.keyboard.press("ArrowUp")
    expect(label).to_have_attribute("data-index", "1")
    expect(layer.locator("g.measurement")).to_have_count(0)
    assert not page.errors, page.errors


def test_the_roi_label_says_padding_was_left_out(page: Any, measured: tuple[PacsServer, Corpus]) -> None:
    from playwright.sync_api import expect

    server, corpus = measured
    page.goto(f"/#/study/{corpus.padded.study}")
    _log_in(page)
    _shown(page)
    _tool(page, "r", "roi")
    _drag(page, (2, 2), (62, 62))
    roi = page.locator("#measure-layer g.measurement.roi:not(.drawing)").last
    expect(roi).to_have_attribute("data-mean", "40")
    expect(roi.locator("text")).to_contain_text("TB 40 HU ĐLC 0")
    expect(roi.locator("text")).to_contain_text("điểm ảnh đệm (ngoài trường quét)")
    padding = int(roi.get_attribute("data-padding") or 0)
    assert 1000 < padding < 1600, padding
    assert not page.errors, page.errors


def test_the_length_label_says_the_calibration_is_unknown(page: Any, measured: tuple[PacsServer, Corpus]) -> None:
    from playwright.sync_api import expect

    server, corpus = measured
    page.goto(f"/#/study/{corpus.cr.study}")
    _log_in(page)
    _shown(page)
    _tool(page, "l", "length")
    _drag(page, (0, 32), (50, 32))
    length = page.locator("#measure-layer g.measurement.length:not(.drawing)").last
    expect(length.locator("text")).to_have_text("10.0 mm (chưa rõ hiệu chuẩn: có thể đo tại đầu thu)")
    assert not page.errors, page.errors


def test_a_huge_roi_is_measured_in_bounded_memory() -> None:
    """The statistics are taken a block of rows at a time (STATS_BLOCK values)
    beside the frame, whatever the ROI's size: the masks of all the blocks of
    an ellipse were made at once first, 1 byte per pixel of the whole ROI
    (a 6000 x 6000 radiograph: 36 MB more than a small one's)."""
    import tracemalloc

    from viewer_api import measure

    def peak(size: int) -> int:
        ds = image_dataset(Rows=size, Columns=size, RescaleIntercept=-1024, RescaleSlope=1)
        pixel = np.full((size, size), TISSUE, dtype=np.uint16)
        tracemalloc.start()
        try:
            answer = measure.roi_statistics(ds, pixel, 0, "ellipse", (0, 0, size, size))
            assert answer["mean"] == 40
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2000), peak(6000)
    assert large - small < 8_000_000, (small, large)
