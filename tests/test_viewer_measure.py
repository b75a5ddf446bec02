"""The viewer's measurement tools: length, angle and ROI statistics.

A real `pacs serve` holding synthetic objects of known geometry and values
(sent with DCMTK's storescu, one of them JPEG-LS compressed by DCMTK's
dcmcjpls, the rest with `pacs import`), measured in Debian's Chromium
through Playwright (the fixtures of tests/test_web_viewer.py) and over HTTP:

- a CT of 0.5 x 0.5 mm pixels with a square of stored value 1000 and a
  Rescale Intercept of -1024 (-24 HU) on an air background (-1000 HU);
- a DX with Imager Pixel Spacing only (a distance at the detector), one
  with an Estimated Radiographic Magnification Factor, one calibrated;
- a secondary capture without any spacing (pixels);
- an ultrasound image calibrated by a region (Physical Delta X / Y in cm);
- a grid of pixels twice as tall as wide (Pixel Spacing 1.0 \\ 0.5);
- an Enhanced CT whose frames have their own spacing and rescale;
- an H.264 clip (nothing here decodes it).

Screenshots of the walk-through go to test-artifacts/viewer-measure/.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .dicomfiles import as_h264_clip, image_dataset
from .peers import ROOT, Backend, PacsServer, run_dcmtk
from . import test_web_viewer
from .test_web_viewer import PASSWORD, USERNAME, Steps, _log_in

page = test_web_viewer.page  # the fixture: a Chromium page on this module's viewer_server
ARTIFACTS = ROOT / "test-artifacts" / "viewer-measure"
SIZE = 128  # rows and columns of the CT
SQUARE = slice(32, 96)  # rows and columns of the CT's square of -24 HU
REFERRING = "LE^VAN BINH"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Obj:
    """One stored object: its UIDs, for the API's paths."""

    study: str
    series: str
    sop: str

    def frame(self, number: int = 1) -> str:
        return f"/api/studies/{self.study}/series/{self.series}/instances/{self.sop}/frames/{number}"


@dataclass
class Corpus:
    ct: list[Obj] = field(default_factory=list)  # three slices of one series
    ct_jpegls: Obj | None = None
    dx: Obj | None = None
    dx_ermf: Obj | None = None
    dx_calibrated: Obj | None = None
    sc: Obj | None = None
    us: Obj | None = None
    tall: Obj | None = None
    enhanced: Obj | None = None
    clip: Obj | None = None


def _obj(ds: Dataset) -> Obj:
    return Obj(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _grey(rows: int, columns: int, background: int, bits: int = 16) -> np.ndarray:
    return np.full((rows, columns), background, dtype=np.uint16 if bits == 16 else np.uint8)


def _ct_slices(out: Path) -> list[Dataset]:
    """Three CT slices of one series: air (stored 24: -1000 HU) around a square of stored 1000 (-24 HU)."""
    pixels = _grey(SIZE, SIZE, 24)
    pixels[SQUARE, SQUARE] = 1000
    study, series = generate_uid(), generate_uid()
    slices = []
    for number in (1, 2, 3):
        ds = image_dataset(
            StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=number, SeriesNumber=1,
            PatientName="NGUYEN^VAN DO", PatientID="MEAS-CT", AccessionNumber="MEAS-CT-1", StudyDate="20240901",
            ReferringPhysicianName=REFERRING, Rows=SIZE, Columns=SIZE, BitsStored=12, HighBit=11,
            PixelSpacing=[0.5, 0.5], RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU",
            WindowCenter=40, WindowWidth=400, SeriesDescription="Measure CT", PixelData=pixels.tobytes(),
        )
        ds.save_as(out / f"ct-{number}.dcm", enforce_file_format=True)
        slices.append(ds)
    return slices


def _projection(out: Path, name: str, **extra: object) -> Dataset:
    """A DX of 0.2 mm detector pixels: a bright square on a dark field."""
    pixels = _grey(SIZE, SIZE, 100)
    pixels[SQUARE, SQUARE] = 3000
    ds = image_dataset(DX_IMAGE, Modality="DX", PatientName="TRAN^THI DX", PatientID="MEAS-DX", Rows=SIZE,
                       Columns=SIZE, BitsStored=12, HighBit=11, ImagerPixelSpacing=[0.2, 0.2],
                       PhotometricInterpretation="MONOCHROME2", WindowCenter=1500, WindowWidth=3000,
                       PixelData=pixels.tobytes(), **extra)
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    return ds


def _secondary_capture(out: Path) -> Dataset:
    pixels = _grey(SIZE, SIZE, 20, bits=8)
    pixels[SQUARE, SQUARE] = 200
    ds = image_dataset(SC_IMAGE, Modality="OT", PatientName="PHAM^SC", PatientID="MEAS-SC", Rows=SIZE, Columns=SIZE,
                       BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=pixels.tobytes())
    ds.save_as(out / "sc.dcm", enforce_file_format=True)
    return ds


def _ultrasound(out: Path) -> Dataset:
    """An RGB ultrasound image whose region x 8..119, y 8..119 is calibrated at
    0.02 cm a pixel both ways; inside it, a square of colour (200, 100, 50)."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[SQUARE, SQUARE] = (200, 100, 50)
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 8
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 119, 119
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3
    region.PhysicalDeltaX, region.PhysicalDeltaY = 0.02, 0.02
    doppler = Dataset()  # a spectral strip in cm/s and s: never a distance
    doppler.RegionSpatialFormat, doppler.RegionDataType, doppler.RegionFlags = 3, 3, 0
    doppler.RegionLocationMinX0, doppler.RegionLocationMinY0 = 0, 120
    doppler.RegionLocationMaxX1, doppler.RegionLocationMaxY1 = 127, 127
    doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = 4, 7
    doppler.PhysicalDeltaX, doppler.PhysicalDeltaY = 0.01, 0.5
    ds = image_dataset(US_IMAGE, Modality="US", PatientName="LY^THI US", PatientID="MEAS-US", Rows=SIZE,
                       Columns=SIZE, BitsAllocated=8, BitsStored=8, HighBit=7, SamplesPerPixel=3,
                       PhotometricInterpretation="RGB", PlanarConfiguration=0, PixelData=pixels.tobytes(),
                       SequenceOfUltrasoundRegions=Sequence([region, doppler]))
    ds.save_as(out / "us.dcm", enforce_file_format=True)
    return ds


def _tall_pixels(out: Path) -> Dataset:
    """64 rows of 1.0 mm by 128 columns of 0.5 mm: shown square, 64 x 64 mm."""
    pixels = _grey(64, SIZE, 500)
    ds = image_dataset(Modality="MR", PatientName="DO^MR", PatientID="MEAS-MR", Rows=64, Columns=SIZE,
                       PixelSpacing=[1.0, 0.5], PixelData=pixels.tobytes(), WindowCenter=500, WindowWidth=1000)
    ds.save_as(out / "tall.dcm", enforce_file_format=True)
    return ds


def _enhanced_ct(out: Path) -> Dataset:
    """Two frames, each with its own Pixel Measures and Pixel Value
    Transformation (the functional groups; nothing at the top level)."""
    frames = [np.full((32, 32), 1000, dtype=np.uint16), np.full((32, 32), 2000, dtype=np.uint16)]
    per_frame = []
    for spacing, intercept in ((0.5, -1024), (0.8, -2000)):
        item = Dataset()
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 1.0
        transformation = Dataset()
        transformation.RescaleIntercept, transformation.RescaleSlope, transformation.RescaleType = intercept, 1, "HU"
        item.PixelMeasuresSequence = Sequence([measures])
        item.PixelValueTransformationSequence = Sequence([transformation])
        per_frame.append(item)
    ds = image_dataset(ENHANCED_CT, PatientName="HOANG^ENHANCED", PatientID="MEAS-ECT", Rows=32, Columns=32,
                       NumberOfFrames=2, PixelData=b"".join(f.tobytes() for f in frames),
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame),
                       SharedFunctionalGroupsSequence=Sequence([Dataset()]))
    ds.save_as(out / "enhanced.dcm", enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Corpus]:
    """The objects: *imported* for `pacs import`, *sent* for storescu."""
    imported = tmp_path_factory.mktemp("measure-import")
    sent = tmp_path_factory.mktemp("measure-send")
    corpus = Corpus()
    slices = _ct_slices(sent)
    corpus.ct = [_obj(ds) for ds in slices]
    # The same slice in a second series, JPEG-LS lossless compressed by DCMTK.
    copy = slices[0].copy()
    copy.SeriesInstanceUID, copy.SOPInstanceUID = generate_uid(), generate_uid()
    copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    copy.SeriesNumber, copy.SeriesDescription = 2, "Measure CT JPEG-LS"
    copy.save_as(sent / "plain.dcm", enforce_file_format=True)
    compressed = sent / "ct-jpegls.dcm"
    result = run_dcmtk("dcmcjpls", "--encode-lossless", str(sent / "plain.dcm"), str(compressed))
    assert result.returncode == 0, result.stderr
    (sent / "plain.dcm").unlink()
    corpus.ct_jpegls = _obj(copy)
    corpus.dx = _obj(_projection(imported, "dx"))
    corpus.dx_ermf = _obj(_projection(imported, "dx-ermf", EstimatedRadiographicMagnificationFactor=1.25))
    corpus.dx_calibrated = _obj(_projection(imported, "dx-calibrated", PixelSpacing=[0.16, 0.16],
                                            PixelSpacingCalibrationType="FIDUCIAL"))
    corpus.sc = _obj(_secondary_capture(imported))
    corpus.us = _obj(_ultrasound(imported))
    corpus.tall = _obj(_tall_pixels(imported))
    corpus.enhanced = _obj(_enhanced_ct(imported))
    clip = as_h264_clip(image_dataset(Modality="ES", PatientID="MEAS-ES"), 2000)
    clip.save_as(imported / "clip.dcm", enforce_file_format=True)
    corpus.clip = _obj(clip)
    return imported, sent, corpus


@pytest.fixture(scope="module")
def measured(corpus_dir: tuple[Path, Path, Corpus],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, Corpus]]:
    imported, sent, corpus = corpus_dir
    server = PacsServer(tmp_path_factory.mktemp("measure-server") / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(imported))
    server.cli("user", "add", USERNAME, "--role", "radiologist", "--password", PASSWORD,
               "--display-name", "BS. Trần Văn An")
    server.start()
    try:
        for path in sorted(sent.glob("ct-*.dcm")):
            flag = "-xt" if "jpegls" in path.name else "-xe"
            result = server.storescu(flag, str(path))
            assert result.returncode == 0, result.stdout + result.stderr
        yield server, corpus
    finally:
        server.stop()


@pytest.fixture
def viewer_server(measured: tuple[PacsServer, Corpus]) -> PacsServer:
    """The server the `page` fixture of tests/test_web_viewer.py opens."""
    return measured[0]


# -- HTTP ---------------------------------------------------------------------------------------
def test_roi_statistics_are_of_the_stored_values_in_modality_units(measured: tuple[PacsServer, Corpus]) -> None:
    server, corpus = measured
    ct = corpus.ct[0]
    with server.http() as http:
        # Inside the square: -24 HU everywhere (stored 1000, intercept -1024), not the 8-bit rendering.
        roi = http.get(f"{ct.frame()}/roi", params={"shape": "ellipse", "x0": 40, "y0": 40, "x1": 88, "y1": 88})
        assert roi.status_code == 200, roi.text
        body = roi.json()
        assert (body["mean"], body["sd"], body["min"], body["max"], body["units"]) == (-24, 0, -24, -24, "HU")
        assert body["area_unit"] == "mm2" and body["basis"] == "patient"
        assert math.isclose(body["area"], math.pi * 24 * 24 * 0.25)  # 48 x 48 pixels of 0.5 mm
        assert 1790 <= body["pixels"] <= 1830  # the pixels whose centres are in the ellipse
        # A rectangle over the whole image: a quarter at -24 HU, the rest air.
        whole = http.get(f"{ct.frame()}/roi", params={"shape": "rectangle", "x0": 0, "y0": 0,
                                                       "x1": SIZE, "y1": SIZE}).json()
        assert whole["pixels"] == SIZE * SIZE
        assert (whole["min"], whole["max"]) == (-1000, -24)
        assert math.isclose(whole["mean"], (-24 * 64 * 64 + -1000 * (SIZE * SIZE - 64 * 64)) / (SIZE * SIZE))
        hu = np.full((SIZE, SIZE), -1000.0)
        hu[SQUARE, SQUARE] = -24.0
        assert math.isclose(whole["sd"], float(hu.std()), rel_tol=1e-9)  # population SD
        # The point probe: stored and modality value of the pixel holding the point.
        probe = http.get(f"{ct.frame()}/pixel", params={"x": "32.5", "y": "95.9"}).json()
        assert (probe["x"], probe["y"], probe["stored"], probe["value"], probe["units"]) == (32, 95, 1000, -24, "HU")
        air = http.get(f"{ct.frame()}/pixel", params={"x": 0, "y": 0}).json()
        assert (air["stored"], air["value"]) == (24, -1000)

        # The JPEG-LS copy (compressed by DCMTK, stored compressed) decodes to the same values.
        jls = corpus.ct_jpegls
        stored = [i for s in http.get(f"/api/studies/{jls.study}").json()["series"] for i in s["instances"]]
        assert {i["sop_uid"]: i["transfer_syntax_uid"] for i in stored}[jls.sop] == "1.2.840.10008.1.2.4.80"
        same = http.get(f"{jls.frame()}/roi", params={"x0": 40, "y0": 40, "x1": 88, "y1": 88}).json()
        assert (same["mean"], same["sd"], same["pixels"]) == (-24, 0, body["pixels"])

        # Colour: statistics per channel of the decoded samples, no unit.
        us = http.get(f"{corpus.us.frame()}/roi", params={"shape": "rectangle", "x0": 40, "y0": 40,
                                                           "x1": 60, "y1": 60}).json()
        assert us["mean"] is None and us["units"] == ""
        assert [(c["name"], c["mean"], c["sd"]) for c in us["channels"]] == [("R", 200, 0), ("G", 100, 0), ("B", 50, 0)]
        assert us["area_unit"] == "mm2" and math.isclose(us["area"], 20 * 20 * 0.2 * 0.2) and us["basis"] == "region"
        rgb = http.get(f"{corpus.us.frame()}/pixel", params={"x": 33, "y": 33}).json()
        assert [c["value"] for c in rgb["channels"]] == [200, 100, 50]

        # Without any spacing the area is in pixels.
        sc = http.get(f"{corpus.sc.frame()}/roi", params={"shape": "rectangle", "x0": 32, "y0": 32,
                                                           "x1": 96, "y1": 96}).json()
        assert (sc["mean"], sc["pixels"], sc["area"], sc["area_unit"], sc["units"]) == (200, 64 * 64, 4096, "px2", "")

        # An Enhanced CT: each frame with its own rescale (functional groups).
        enhanced = corpus.enhanced
        first = http.get(f"{enhanced.frame(1)}/pixel", params={"x": 1, "y": 1}).json()
        second = http.get(f"{enhanced.frame(2)}/pixel", params={"x": 1, "y": 1}).json()
        assert (first["value"], second["value"]) == (1000 - 1024, 0)


def test_bad_measurement_requests_say_what_is_wrong(measured: tuple[PacsServer, Corpus]) -> None:
    server, corpus = measured
    ct = corpus.ct[0]
    box = {"x0": "10", "y0": "10", "x1": "20", "y1": "20"}
    with server.http() as http:
        cases = [
            ({**box, "x0": "abc"}, "x0 must be a number"),
            ({**box, "y1": "nan"}, "y1 must be a number"),
            ({**box, "x1": "-1"}, "x1 -1 is outside the frame"),
            ({**box, "x1": str(SIZE + 0.5)}, "outside the frame"),
            ({k: v for k, v in box.items() if k != "y0"}, "y0 is required"),
            ({**box, "shape": "triangle"}, "shape must be one of ellipse, rectangle"),
        ]
        for params, message in cases:
            answer = http.get(f"{ct.frame()}/roi", params=params)
            assert answer.status_code == 400, (params, answer.text)
            assert message in answer.json()["error"], (params, answer.text)
        point = http.get(f"{ct.frame()}/pixel", params={"x": str(SIZE), "y": "1"})
        assert point.status_code == 400 and "from 0 below 128" in point.json()["error"], point.text
        assert http.get(f"{ct.frame()}/pixel", params={"x": "1e400", "y": "1"}).status_code == 400
        assert http.get(ct.frame().replace("/frames/1", "/frames/x") + "/roi", params=box).status_code == 400
        # Unknown instance, frame past the last one: 404.
        unknown = generate_uid()
        for path in (ct.frame(2), ct.frame().replace(ct.sop, unknown), ct.frame().replace(ct.study, unknown),
                     ct.frame(0)):
            answer = http.get(f"{path}/roi", params=box)
            assert answer.status_code == 404, (path, answer.text)
        assert http.get(f"{corpus.enhanced.frame(3)}/calibration").status_code == 404
        # A client that takes no JSON: 406; pixel data nothing here decodes (H.264): 415.
        refused = http.get(f"{ct.frame()}/roi", params=box, headers={"Accept": "image/png"})
        assert refused.status_code == 406, refused.text
        clip = http.get(f"{corpus.clip.frame()}/roi", params=box)
        assert clip.status_code == 415, clip.text


def test_calibration_follows_the_object(measured: tuple[PacsServer, Corpus]) -> None:
    """Pixel Spacing, Imager Pixel Spacing at the detector (PS3.3 10.7.1.1), corrected by the
    Estimated Radiographic Magnification Factor or calibrated, ultrasound regions, per-frame
    spacing of an enhanced object, and nothing at all."""
    server, corpus = measured
    with server.http() as http:
        def spacing(obj: Obj, frame: int = 1) -> Any:
            answer = http.get(f"{obj.frame(frame)}/calibration")
            assert answer.status_code == 200, answer.text
            return answer.json()

        ct = spacing(corpus.ct[0])
        assert ct["spacing"] == {"row": 0.5, "column": 0.5, "basis": "patient", "source": "PixelSpacing"}
        assert (ct["rows"], ct["columns"], ct["units"]) == (SIZE, SIZE, "HU")
        assert spacing(corpus.dx)["spacing"]["basis"] == "detector"
        ermf = spacing(corpus.dx_ermf)["spacing"]
        assert ermf["basis"] == "magnification" and math.isclose(ermf["row"], 0.2 / 1.25)
        calibrated = spacing(corpus.dx_calibrated)["spacing"]
        assert (calibrated["basis"], calibrated["row"], calibrated["source"]) == (
            "calibrated", 0.16, "PixelSpacing (FIDUCIAL)")
        assert spacing(corpus.sc)["spacing"] is None
        us = spacing(corpus.us)
        assert us["spacing"] is None
        assert [(r["x0"], r["y1"], r["row"], r["column"], r["basis"]) for r in us["regions"]] == [
            (8, 119, 0.2, 0.2, "region")]  # the Doppler strip (cm/s, s) is not a distance
        tall = spacing(corpus.tall)
        assert (tall["spacing"]["row"], tall["spacing"]["column"], tall["rows"]) == (1.0, 0.5, 64)
        assert [spacing(corpus.enhanced, n)["spacing"]["row"] for n in (1, 2)] == [0.5, 0.8]


def test_measuring_follows_the_image_access_rules(measured: tuple[PacsServer, Corpus]) -> None:
    """As the rendered images: readers only, a referring physician their own
    patients' studies; every request in the audit trail with its study."""
    server, corpus = measured
    ct, dx = corpus.ct[0], corpus.dx
    box = {"x0": "40", "y0": "40", "x1": "88", "y1": "88"}
    referring = server.make_token("bs.binh", "referring", REFERRING)
    monitor = server.make_token("zabbix", "monitor")
    with server.http(token=referring) as http:
        assert http.get(f"{ct.frame()}/roi", params=box).status_code == 200
        assert http.get(f"{dx.frame()}/roi", params=box).status_code == 403
        assert http.get(f"{dx.frame()}/calibration").status_code == 403
    with server.http(token=monitor) as http:
        assert http.get(f"{ct.frame()}/pixel", params={"x": 1, "y": 1}).status_code == 403
    with server.http() as http:
        http.headers.pop("Authorization")
        assert http.get(f"{ct.frame()}/roi", params=box).status_code == 401
    with server.http() as admin:
        events = admin.get("/api/audit", params={"user": "bs.binh"}).json()
    seen = {(e["action"], e["study_uid"], e["outcome"], "/roi?" in e["detail"]) for e in events}
    assert ("retrieve", ct.study, "success", True) in seen, events
    assert ("retrieve", dx.study, "denied", True) in seen, events


# -- the browser -----------------------------------------------------------------------------
def _open(page: Any, obj: Obj) -> None:
    """Open the study of *obj* and wait until its first image is on screen."""
    page.goto(f"/#/study/{obj.study}")
    page.wait_for_function("() => { const i = document.querySelector('#viewer-image');"
                           " return i && !i.hidden && i.complete && i.naturalWidth > 0; }")


def _screen(page: Any, x: float, y: float, columns: int = SIZE, rows: int = SIZE) -> tuple[float, float]:
    """Where the grid point (x, y) of the image shown is on the page."""
    box = page.locator("#viewer-image").bounding_box()
    return box["x"] + x / columns * box["width"], box["y"] + y / rows * box["height"]


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float], **grid: int) -> None:
    page.mouse.move(*_screen(page, *start, **grid))
    page.mouse.down()
    page.mouse.move(*_screen(page, *end, **grid), steps=5)
    page.mouse.up()


def _clicks(page: Any, *points: tuple[float, float], **grid: int) -> None:
    for point in points:
        page.mouse.click(*_screen(page, *point, **grid))


def _tool(page: Any, key: str, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#viewport").focus()
    page.keyboard.press(key)
    expect(page.locator(f"#tool-{name}")).to_have_attribute("aria-pressed", "true")


def _last(page: Any, kind: str) -> Any:
    return page.locator(f"#measure-layer g.measurement.{kind}:not(.drawing)").last


def test_measurements_in_the_browser(page: Any, measured: tuple[PacsServer, Corpus]) -> None:
    from playwright.sync_api import expect

    server, corpus = measured
    steps = Steps(page, ARTIFACTS)
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(f"/#/study/{corpus.ct[0].study}")
    _log_in(page)
    _open(page, corpus.ct[0])
    layer = page.locator("#measure-layer")

    # Length: 64 pixels of 0.5 mm across the square.
    _tool(page, "l", "length")
    _drag(page, (32, 64), (96, 64))
    length = _last(page, "length")
    expect(length).to_have_attribute("data-unit", "mm")
    expect(length.locator("text")).to_have_text("32.0 mm")
    steps.shot("ct-length")

    # The line stays on its pixels through zoom, pan and a window change.
    before = length.locator("line").get_attribute("x1")
    page.keyboard.press("+")
    page.keyboard.press("+")
    centre = _screen(page, 64, 64)
    page.mouse.move(*centre)
    page.mouse.down(button="middle")
    page.mouse.move(centre[0] - 80, centre[1] + 40, steps=4)
    page.mouse.up(button="middle")
    page.wait_for_function(ON_ITS_PIXELS, arg=[SIZE, SIZE, 32, 64])
    assert length.locator("line").get_attribute("x1") != before
    page.click('[data-preset="lung"]')
    expect(page.locator("#viewer-image")).to_have_attribute("src", re.compile(r"window=-600,1500"))
    page.wait_for_function(ON_ITS_PIXELS, arg=[SIZE, SIZE, 32, 64])
    expect(length.locator("text")).to_have_text("32.0 mm")
    steps.shot("ct-length-zoomed-panned-lung")
    page.locator("#viewport").focus()
    page.keyboard.press("0")
    page.click('[data-preset="default"]')
    page.wait_for_function(ON_ITS_PIXELS, arg=[SIZE, SIZE, 32, 64])

    # Each slice keeps its own measurements.
    label = page.locator("#slice-label")
    page.keyboard.press("ArrowDown")
    expect(label).to_have_attribute("data-index", "2")
    expect(layer.locator("g.measurement")).to_have_count(0)
    page.keyboard.press("ArrowUp")
    expect(label).to_have_attribute("data-index", "1")
    expect(layer.locator("g.measurement.length")).to_have_count(1)

    # Angle: three clicks, the second the vertex.
    _tool(page, "a", "angle")
    _clicks(page, (40, 40), (40, 80), (80, 80))
    angle = _last(page, "angle")
    expect(angle.locator("text")).to_have_text("90.0°")

    # ROI inside the square: -24 HU, SD 0, from the stored values (the server's).
    _tool(page, "r", "roi")
    _drag(page, (44, 44), (84, 84))
    roi = _last(page, "roi")
    expect(roi).to_have_attribute("data-mean", "-24")
    expect(roi).to_have_attribute("data-sd", "0")
    expect(roi.locator("text")).to_contain_text("TB -24 HU ĐLC 0")
    expect(roi.locator("text")).to_contain_text("Nhỏ nhất -24 Lớn nhất -24")
    expect(roi.locator("text")).to_contain_text(re.compile(r"Diện tích 3\d\d\.\d mm²"))
    steps.shot("ct-length-angle-roi")

    # Escape cancels the measurement being drawn, and only that: the study stays open.
    _tool(page, "l", "length")
    page.mouse.move(*_screen(page, 20, 20))
    page.mouse.down()
    page.mouse.move(*_screen(page, 60, 110), steps=3)
    expect(layer.locator("g.measurement.drawing")).to_have_count(1)
    page.keyboard.press("Escape")
    expect(layer.locator("g.measurement.drawing")).to_have_count(0)
    page.mouse.up()
    expect(layer.locator("g.measurement")).to_have_count(3)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(corpus.ct[0].study)}$"))
    # Delete takes the last one away, Clear (or C) the rest of this image's.
    page.keyboard.press("Delete")
    expect(layer.locator("g.measurement")).to_have_count(2)
    expect(layer.locator("g.measurement.roi")).to_have_count(0)
    page.click("#measure-clear")
    expect(layer.locator("g.measurement")).to_have_count(0)

    # A radiograph: Imager Pixel Spacing is a distance at the detector, and says so.
    _open(page, corpus.dx)
    _tool(page, "l", "length")
    _drag(page, (32, 64), (96, 64))
    expect(_last(page, "length").locator("text")).to_have_text("12.8 mm (tại đầu thu)")
    page.click("#lang-toggle")
    expect(_last(page, "length").locator("text")).to_have_text("12.8 mm (at detector)")
    expect(page.locator("#tool-length")).to_have_text("Length")
    steps.shot("dx-at-detector-en")
    page.click("#lang-toggle")
    # Corrected by the Estimated Radiographic Magnification Factor: an estimate, said so.
    _open(page, corpus.dx_ermf)
    _tool(page, "l", "length")
    _drag(page, (32, 64), (96, 64))
    expect(_last(page, "length").locator("text")).to_have_text("10.2 mm (ước tính, đã hiệu chỉnh độ phóng đại)")

    # No spacing at all: pixels, said to be uncalibrated.
    _open(page, corpus.sc)
    _tool(page, "l", "length")
    _drag(page, (32, 64), (96, 64))
    expect(_last(page, "length")).to_have_attribute("data-unit", "px")
    expect(_last(page, "length").locator("text")).to_have_text("64.0 px (chưa hiệu chuẩn)")
    steps.shot("sc-pixels")

    # Ultrasound: the region's calibration (0.02 cm a pixel) inside it, pixels across its edge.
    _open(page, corpus.us)
    _tool(page, "l", "length")
    _drag(page, (20, 64), (100, 64))
    expect(_last(page, "length").locator("text")).to_have_text("16.0 mm")
    _drag(page, (20, 40), (124, 40))
    expect(_last(page, "length").locator("text")).to_have_text("104.0 px (chưa hiệu chuẩn)")
    steps.shot("us-region")

    # Pixels twice as tall as wide: the angle is of the true proportions (45°, not 26.6°).
    _open(page, corpus.tall)
    _tool(page, "a", "angle")
    _clicks(page, (104, 48), (64, 48), (104, 28), rows=64)
    expect(_last(page, "angle").locator("text")).to_have_text("45.0°")
    _tool(page, "l", "length")
    _drag(page, (64, 60), (64, 20), rows=64)  # 40 rows of 1.0 mm
    expect(_last(page, "length").locator("text")).to_have_text("40.0 mm")
    steps.shot("non-square-pixels")

    assert not violations, violations
    assert not page.errors, page.errors
    assert len(list(ARTIFACTS.glob("*.png"))) == steps.n


# True when the last length's first end is drawn on the grid point it was put on (1 px).
ON_ITS_PIXELS = """([columns, rows, gx, gy]) => {
  const img = document.querySelector('#viewer-image').getBoundingClientRect();
  const frame = document.querySelector('#viewport').getBoundingClientRect();
  const line = [...document.querySelectorAll('#measure-layer g.measurement.length line')].pop();
  if (!line || !img.width) return false;
  const x = frame.left + Number(line.getAttribute('x1'));
  const y = frame.top + Number(line.getAttribute('y1'));
  return Math.abs(x - (img.left + gx / columns * img.width)) < 1
    && Math.abs(y - (img.top + gy / rows * img.height)) < 1;
}"""
