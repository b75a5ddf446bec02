"""Comparing with a prior study in the web viewer (viewer_api/static/compare.js).

A real `pacs serve` (SQLite + files) and two CT studies of one patient sent
with DCMTK storescu, each in its own Frame of Reference, their slices at
other positions along the table (Image Position Patient); a third study of
another patient. In headless Debian Chromium: "So sánh" on the prior splits
the screen (current left, prior right, marked "Phim cũ" with its date);
scrolling either side moves the other to the slice nearest in position, a
series without positions follows by the same fraction of its stack, "Liên
kết" off leaves the other side where it is, measurements stay on the
current study, and "Đóng so sánh" gives back the single viewer as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from .dicomfiles import image_dataset
from .peers import ROOT, PacsServer
from .test_key_images import events_until
from .test_web_viewer import (
    HEIGHT, PASSWORD, USERNAME, WIDTH, Steps, assert_no_horizontal_scroll, radiologist_server, watched_page,
)

RADIOLOGIST = (USERNAME, "BS. Trần Văn An")  # the user radiologist_server makes
SHOTS = ROOT / "test-artifacts" / "compare"
AXIAL = [1, 0, 0, 0, 1, 0]
CURRENT_Z = [0, 5, 10, 15, 20, 25]  # the current study's slices (mm along the table)
PRIOR_Z = [-7 + 3 * k for k in range(10)]  # the prior's: -7, -4, ..., 20


@dataclass
class Studies:
    current: str
    current_series: str
    prior: str
    prior_series: str
    unplaced_series: str
    stranger: str


def _series(folder: Path, name: str, common: dict[str, Any], description: str, number: int,
            positions: list[float] | None, count: int) -> tuple[str, list[str]]:
    """A CT series of *count* 64x64 slices at *positions* (z, mm; None: no Image Position / Orientation)."""
    series, frame_of_reference, files = generate_uid(), generate_uid(), []
    for n in range(count):
        placed: dict[str, Any] = {}
        if positions is not None:
            placed = {"ImagePositionPatient": [-100, -100, positions[n]], "ImageOrientationPatient": AXIAL,
                      "FrameOfReferenceUID": frame_of_reference, "PixelSpacing": [0.7, 0.7],
                      "SliceThickness": 3}
        ds = image_dataset(SeriesInstanceUID=series, SeriesNumber=number, InstanceNumber=n + 1,
                           SeriesDescription=description, Rows=64, Columns=64, WindowCenter=40, WindowWidth=400,
                           RescaleIntercept=-1024, RescaleSlope=1, **placed, **common)
        yy, xx = np.mgrid[0:64, 0:64]
        disc = (yy - 32) ** 2 + (xx - 32) ** 2 < (6 + 2 * n) ** 2
        ds.PixelData = np.where(disc, 1100, 24).astype(np.uint16).tobytes()
        path = folder / f"{name}-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    return series, files


def _common(study: str, patient: str, patient_id: str, date: str, description: str) -> dict[str, Any]:
    return {"SpecificCharacterSet": "ISO_IR 192", "StudyInstanceUID": study, "PatientName": patient,
            "PatientID": patient_id, "PatientBirthDate": "19650302", "PatientSex": "M", "StudyDate": date,
            "StudyTime": "081500", "AccessionNumber": f"CMP{study[-8:]}", "StudyDescription": description,
            "StudyID": "1"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacsServer, Studies]]:
    """One server; the patient's current and prior CT, and another patient's CT, sent by storescu."""
    tmp = tmp_path_factory.mktemp("compare")
    with radiologist_server(tmp) as server:
        folder = tmp / "in"
        folder.mkdir()
        current, prior, stranger = generate_uid(), generate_uid(), generate_uid()
        patient = ("Hoàng^Văn Minh", "BN-CMP-1")
        now = _common(current, *patient, "20261205", "CT ngực không tiêm")
        before = _common(prior, *patient, "20250610", "CT ngực lần trước")
        other = _common(stranger, "Đỗ^Thị Hoa", "BN-CMP-2", "20240101", "CT ngực người khác")
        current_series, files = _series(folder, "cur", now, "Trục ngang", 1, CURRENT_Z, len(CURRENT_Z))
        prior_series, more = _series(folder, "pri", before, "Trục ngang", 1, PRIOR_Z, len(PRIOR_Z))
        unplaced, rest = _series(folder, "unp", before, "Không vị trí", 2, None, 3)
        _, foreign = _series(folder, "oth", other, "Trục ngang", 1, CURRENT_Z, 2)
        sent = server.storescu(*files, *more, *rest, *foreign)
        assert sent.returncode == 0, sent.stderr
        yield server, Studies(current, current_series, prior, prior_series, unplaced, stranger)


def _login(page: Any, server: PacsServer) -> None:
    from playwright.sync_api import expect

    page.goto(f"http://127.0.0.1:{server.http_port}/")
    page.fill("#username", RADIOLOGIST[0])
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page.locator("#current-user")).to_have_text(RADIOLOGIST[1])


def _wheel_over(page: Any, selector: str, notches: int) -> None:
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(abs(notches)):
        page.mouse.wheel(0, 100 if notches > 0 else -100)


def test_compare_with_the_prior_side_by_side(archive: tuple[PacsServer, Studies]) -> None:
    from playwright.sync_api import expect

    server, studies = archive
    with watched_page(viewport={"width": WIDTH, "height": HEIGHT}) as (page, problems):
        steps = Steps(page, SHOTS)
        _login(page, server)
        page.goto(f"http://127.0.0.1:{server.http_port}/#/study/{studies.current}")
        expect(page.locator("#slice-label")).to_have_text("Lát cắt 1 / 6")

        # Only the patient's own other study is offered (not the other patient's).
        offers = page.locator('[data-testid="prior-compare"]')
        expect(offers).to_have_count(1)
        expect(offers).to_have_attribute("data-study-uid", studies.prior)
        expect(offers).to_have_text("So sánh")
        assert page.locator(f'[data-study-uid="{studies.stranger}"]').count() == 0

        # Side by side: the current left, the prior right, each said so with its date.
        offers.click()
        compare, current, prior = (page.locator(s) for s in ("#compare", "#compare-current", "#compare-prior"))
        expect(compare).to_be_visible()
        expect(offers).to_have_attribute("aria-pressed", "true")
        expect(current.locator(".compare-label")).to_have_text("Hiện tại")
        expect(current.locator(".compare-date")).to_have_text("05/12/2026")
        expect(prior.locator(".compare-label")).to_have_text("Phim cũ")
        expect(prior.locator(".compare-date")).to_have_text("10/06/2025")
        expect(prior.locator(".compare-description")).to_have_text("CT ngực lần trước")
        expect(prior).to_have_attribute("data-study-uid", studies.prior)
        expect(prior).to_have_attribute("data-series-uid", studies.prior_series)  # the matching series
        expect(page.locator("#compare-series option")).to_have_count(2)
        # Both viewports show an image; the prior's has no measuring tools, the current keeps its own.
        expect(page.locator("#viewer-image")).to_be_visible()
        expect(page.locator("#prior-viewer-image")).to_be_visible()
        expect(prior.locator(".tools")).to_be_hidden()
        expect(current.locator(".tools")).to_be_visible()
        expect(current).to_have_attribute("data-active", "true")

        # Linked by position: the current at z 0 shows the prior's slice at -1 mm (the nearest).
        expect(compare).to_have_attribute("data-link-mode", "position")
        expect(current).to_have_attribute("data-position", "0")
        expect(prior).to_have_attribute("data-position", "-1")
        expect(prior).to_have_attribute("data-frame", "3")
        steps.shot("side-by-side")

        # Scrolling the current moves the prior to the nearest position.
        page.locator("#viewport").focus()
        for _ in range(3):
            page.keyboard.press("ArrowDown")
        expect(current).to_have_attribute("data-frame", "4")
        expect(current).to_have_attribute("data-position", "15")
        expect(prior).to_have_attribute("data-position", "14")
        expect(prior).to_have_attribute("data-frame", "8")
        _wheel_over(page, "#viewport", 1)
        expect(current).to_have_attribute("data-position", "20")
        expect(prior).to_have_attribute("data-position", "20")

        # The wheel over the prior makes it the active one, and the current follows it.
        _wheel_over(page, "#prior-viewport", -1)
        expect(prior).to_have_attribute("data-active", "true")
        expect(current).to_have_attribute("data-active", "false")
        expect(prior).to_have_attribute("data-position", "17")
        expect(current).to_have_attribute("data-position", "15")
        # Keys go to the active viewport: the prior steps, K marks nothing there, L picks no tool.
        page.keyboard.press("ArrowUp")
        expect(prior).to_have_attribute("data-position", "14")
        expect(current).to_have_attribute("data-position", "15")
        page.keyboard.press("l")
        expect(page.locator("#tool-length")).to_have_attribute("aria-pressed", "false")
        assert_no_horizontal_scroll(page)
        steps.shot("prior-active")

        # Windows are linked on demand: a preset (3: lung) and a drag on one side set the other's.
        page.keyboard.press("2")
        expect(page.locator("#prior-wl-label")).to_have_attribute("data-preset", "brain")
        expect(page.locator("#wl-label")).to_have_attribute("data-preset", "default")
        page.click("#compare-window")
        expect(compare).to_have_attribute("data-window-link", "on")
        expect(page.locator("#wl-label")).to_have_attribute("data-preset", "brain")  # the active side's, now
        page.locator("#viewport").focus()  # the focused viewport is the active one
        expect(current).to_have_attribute("data-active", "true")
        page.keyboard.press("3")
        expect(page.locator("#prior-wl-label")).to_have_attribute("data-preset", "lung")
        box = page.locator("#viewport").bounding_box()
        page.mouse.move(box["x"] + 100, box["y"] + 100)
        page.mouse.down(button="right")
        page.mouse.move(box["x"] + 140, box["y"] + 130, steps=4)
        page.mouse.up(button="right")
        expect(page.locator("#prior-wl-label")).to_have_attribute("data-preset", "custom")
        assert page.locator("#prior-wl-label").inner_text() == page.locator("#wl-label").inner_text()
        page.click("#compare-window")
        expect(compare).to_have_attribute("data-window-link", "off")
        page.keyboard.press("1")
        expect(page.locator("#wl-label")).to_have_attribute("data-preset", "default")
        expect(page.locator("#prior-wl-label")).to_have_attribute("data-preset", "custom")

        # Unlinked: the current scrolls alone.
        page.click("#compare-link")
        expect(compare).to_have_attribute("data-link", "off")
        expect(page.locator("#compare-link")).to_have_attribute("aria-pressed", "false")
        _wheel_over(page, "#viewport", 1)
        expect(current).to_have_attribute("data-active", "true")
        expect(current).to_have_attribute("data-position", "20")
        page.keyboard.press("ArrowDown")
        expect(current).to_have_attribute("data-position", "25")
        expect(prior).to_have_attribute("data-position", "14")
        # Linked again: the prior comes to the current's position.
        page.click("#compare-link")
        expect(compare).to_have_attribute("data-link", "on")
        expect(prior).to_have_attribute("data-position", "20")

        # A prior series without positions follows by the same fraction of its stack.
        page.select_option("#compare-series", studies.unplaced_series)
        expect(prior).to_have_attribute("data-series-uid", studies.unplaced_series)
        expect(compare).to_have_attribute("data-link-mode", "relative")
        expect(prior).to_have_attribute("data-frame", "3")  # the last of 3, as the current is at its last
        expect(prior).to_have_attribute("data-position", "")
        page.locator("#viewport").focus()
        page.keyboard.press("Home")
        expect(current).to_have_attribute("data-frame", "1")
        expect(prior).to_have_attribute("data-frame", "1")

        # In English, the labels follow.
        page.click("#lang-toggle")
        expect(prior.locator(".compare-label")).to_have_text("Prior")
        expect(page.locator("#compare-close")).to_have_text("Close compare")
        page.click("#lang-toggle")

        # Closing gives back the single viewer as it was.
        page.keyboard.press("ArrowDown")
        expect(current).to_have_attribute("data-frame", "2")
        page.click("#compare-close")
        expect(compare).to_have_count(0)
        expect(page.locator("#prior-viewport")).to_have_count(0)
        expect(page.locator("#slice-label")).to_have_text("Lát cắt 2 / 6")
        expect(page.locator("#viewer-image")).to_be_visible()
        expect(offers).to_have_attribute("aria-pressed", "false")

        # S opens the comparison with the latest prior, S again closes it.
        page.locator("#viewport").focus()
        page.keyboard.press("s")
        expect(compare).to_be_visible()
        expect(prior).to_have_attribute("data-study-uid", studies.prior)
        expect(prior).to_have_attribute("data-position", "5")  # the current's slice 2 is at 5 mm
        page.keyboard.press("s")
        expect(compare).to_have_count(0)
        expect(page.locator("#slice-label")).to_have_text("Lát cắt 2 / 6")
        steps.shot("closed")
    assert not problems, problems
    # The prior's images and metadata were read through the audited DICOMweb endpoints, as the radiologist.
    read = events_until(server, 1, action="retrieve", study=studies.prior, user=RADIOLOGIST[0])
    assert read and all(e["study_uid"] == studies.prior for e in read), read[:3]
