"""Review of the Structured Report display and the radiation dose summary
with what real modalities send: a CT scanner that sends an updated dose
report repeating the events of the first (or resends one under a new SOP
Instance UID) next to a second report for a second exam part; a study
whose many measurement SRs came before its dose report; projection dose
reports of two devices writing the Dose Area Product in different units
(Gy.m2 and dGy.cm2); and the viewer's image tools while an SR document is
shown.

A real `pacs serve` (SQLite, file store), objects built with pydicom and
sent with DCMTK's storescu, the viewer in headless Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs.ingest import object_key
from storage.filesystem import FileStore

from .peers import Backend, PacsServer
from .test_sr_view import (
    COMPREHENSIVE_SR, XRAY_DOSE_SR, Study, _header, _new_study, _sr_document, _write, browser_page, code, coded,
    container, content, ct_slices, num,
)
from .test_web_viewer import USERNAME

XSS = '<img src=x onerror="window.__srXss=1"><script>window.__srXss=2</script>'


def ct_event(uid: str, protocol: str, ctdivol: str, dlp: str) -> Dataset:
    """A CT irradiation event (TID 10013) as scanners write it: CTDIvol and DLP in a CT Dose container."""
    return container("CONTAINS", code("113819", "DCM", "CT Acquisition"), [
        content("CONTAINS", "TEXT", code("125203", "DCM", "Acquisition Protocol"), TextValue=protocol),
        coded("CONTAINS", code("123014", "DCM", "Target Region"), code("818981001", "SCT", "Abdomen")),
        content("CONTAINS", "UIDREF", code("113769", "DCM", "Irradiation Event UID"), UID=uid),
        container("CONTAINS", code("113829", "DCM", "CT Dose"), [
            num("CONTAINS", code("113830", "DCM", "Mean CTDIvol"), ctdivol, "mGy", "mGy"),
            num("CONTAINS", code("113838", "DCM", "DLP"), dlp, "mGy.cm", "mGy.cm"),
        ]),
    ])


def ct_rdsr(study: Study, out: Path, name: str, events: list[Dataset], total: str, time: str,
             series_number: int = 99) -> Path:
    """A CT Radiation Dose SR (TID 10011) of *events* with the accumulated DLP *total*."""
    ds = Dataset()
    _header(ds, study, XRAY_DOSE_SR, "SR", generate_uid(), series_number)
    ds.SeriesDescription = "Dose Report"
    ds.ContentTime = time
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    _sr_document(ds, code("113701", "DCM", "X-Ray Radiation Dose Report"), [
        coded("HAS CONCEPT MOD", code("121058", "DCM", "Procedure reported"),
              code("77477000", "SCT", "Computed Tomography X-Ray")),
        container("CONTAINS", code("113811", "DCM", "CT Accumulated Dose Data"), [
            num("CONTAINS", code("113812", "DCM", "Total Number of Irradiation Events"), str(len(events)),
                "{events}", "events"),
            num("CONTAINS", code("113813", "DCM", "CT Dose Length Product Total"), total, "mGy.cm", "mGy.cm"),
        ]),
        *events,
    ], "10011")
    return _write(ds, out / f"{name}.dcm")


def projection_rdsr(study: Study, out: Path, name: str, dap_total: str, unit: str, series_number: int) -> Path:
    """A projection X-ray dose report (TID 10001) of one event, its DAP in *unit*."""
    ds = Dataset()
    _header(ds, study, XRAY_DOSE_SR, "SR", generate_uid(), series_number)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    event = container("CONTAINS", code("113706", "DCM", "Irradiation Event X-Ray Data"), [
        content("CONTAINS", "UIDREF", code("113769", "DCM", "Irradiation Event UID"), UID=generate_uid()),
        coded("CONTAINS", code("113721", "DCM", "Irradiation Event Type"), code("P5-06000", "SRT", "Fluoroscopy")),
        num("CONTAINS", code("122130", "DCM", "Dose Area Product"), dap_total, unit, unit),
    ])
    _sr_document(ds, code("113701", "DCM", "X-Ray Radiation Dose Report"), [
        coded("HAS CONCEPT MOD", code("121058", "DCM", "Procedure reported"),
              code("113704", "DCM", "Projection X-Ray")),
        container("CONTAINS", code("113702", "DCM", "Accumulated X-Ray Dose Data"), [
            coded("CONTAINS", code("113764", "DCM", "Acquisition Plane"), code("113622", "DCM", "Single Plane")),
            num("CONTAINS", code("113722", "DCM", "Dose Area Product Total"), dap_total, unit, unit),
        ]),
        event,
    ], "10001")
    return _write(ds, out / f"{name}.dcm")


def measurement_sr(study: Study, out: Path, number: int, text: str = "") -> Path:
    """A small Comprehensive SR that is no dose report (an ultrasound or CAD measurement report)."""
    ds = Dataset()
    _header(ds, study, COMPREHENSIVE_SR, "SR", generate_uid(), number)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    _sr_document(ds, code("126000", "DCM", "Imaging Measurement Report"), [
        content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue=text or f"đo lần {number}"),
        num("CONTAINS", code("103339001", "SCT", "Long Axis"), str(number), "mm", "millimeter"),
    ], "1500")
    return _write(ds, out / f"measurement-{number}.dcm")


@dataclass
class Archive:
    server: PacsServer
    resent: Study  # a dose report and its resend under a new SOP Instance UID
    updated: Study  # a dose report and an updated one holding its events and one more; CT slices; an SR
    parts: Study  # two dose reports of two exam parts
    many: Study  # 25 measurement SRs, then the dose report
    projection: Study  # two devices' projection dose reports, DAP in Gy.m2 and dGy.cm2
    lost: Study  # two dose reports of two exam parts, the stored object of one lost
    sops: dict[str, str]
    series: dict[str, str]


def _uids(path: Path) -> tuple[str, str]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("review-sr")
    out = tmp / "objects"
    resent, updated, parts, many, projection, lost = (_new_study() for _ in range(6))
    e1, e2, e3, e4, e5 = (generate_uid() for _ in range(5))
    chest, abdomen = ct_event(e1, "Ngực", "8.5", "297.5"), ct_event(e2, "Bụng", "7.5", "314.8")
    files: dict[str, Path] = {
        "resent_first": ct_rdsr(resent, out / "resent", "first", [chest, abdomen], "612.3", "094512"),
        "resent_again": ct_rdsr(resent, out / "resent", "again", [chest, abdomen], "612.3", "094800"),
        "updated_first": ct_rdsr(updated, out / "updated", "first", [chest, abdomen], "612.3", "094512"),
        "updated_last": ct_rdsr(updated, out / "updated", "last",
                                [chest, abdomen, ct_event(e3, "Chậu", "6.0", "200.0")], "812.3", "101000"),
        "updated_sr": measurement_sr(updated, out / "updated", 50, f"Kết luận {XSS}"),
        "parts_head": ct_rdsr(parts, out / "parts", "head", [chest, abdomen], "612.3", "094512"),
        "parts_neck": ct_rdsr(parts, out / "parts", "neck",
                              [ct_event(e4, "Cổ", "9.0", "150.0"), ct_event(e5, "Cổ muộn", "3.0", "50.0")],
                              "200.0", "100000", series_number=98),
        "xa_gy": projection_rdsr(projection, out / "projection", "gy", "0.00355", "Gy.m2", 97),
        "xa_dgy": projection_rdsr(projection, out / "projection", "dgy", "25", "dGy.cm2", 96),
        "lost_head": ct_rdsr(lost, out / "lost", "head", [chest, abdomen], "612.3", "094512"),
        "lost_neck": ct_rdsr(lost, out / "lost", "neck", [ct_event(e4, "Cổ", "9.0", "150.0")], "150.0", "100000",
                             series_number=98),
    }
    for n, path in enumerate(ct_slices(updated, out / "updated-ct"), start=1):
        files[f"ct{n}"] = path
    many_files = [measurement_sr(many, out / "many", n) for n in range(1, 26)]
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.start()
    try:
        # The measurement reports first: their series come before the dose report's in the index.
        for batch in (many_files, [ct_rdsr(many, out / "many", "rdsr", [chest, abdomen], "612.3", "120000")]):
            sent = server.storescu(*(str(p) for p in batch))
            assert sent.returncode == 0, sent.stdout + sent.stderr
        files["many_rdsr"] = out / "many" / "rdsr.dcm"
        for name in ("resent_first", "resent_again", "updated_first", "updated_last"):
            # One at a time, in this order: the index's order is the order received.
            sent = server.storescu(str(files[name]))
            assert sent.returncode == 0, sent.stdout + sent.stderr
        rest = [p for name, p in files.items() if not name.startswith(("resent", "updated_first", "updated_last",
                                                                         "many"))]
        sent = server.storescu(*(str(p) for p in rest))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        server.make_token(USERNAME, "radiologist", "BS. Trần Văn An")
        sops, series = {}, {}
        for name, path in files.items():
            sops[name], series[name] = _uids(path)
        # The stored object of one dose report is gone (a disk restored from an older backup).
        FileStore(server.data_dir / "objects").path_for(
            object_key(lost.uid, series["lost_neck"], sops["lost_neck"])).unlink()
        yield Archive(server, resent, updated, parts, many, projection, lost, sops, series)
    finally:
        server.stop()


def _dose(archive: Archive, study: Study) -> dict[str, Any]:
    with archive.server.http() as http:
        answer = http.get(f"/api/studies/{study.uid}/dose")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _by_sop(dose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["sop_uid"]: r for r in dose["reports"]}


# -- 1. one study, several dose reports: the study total counts each irradiation once -----------------
def test_an_updated_dose_report_is_not_added_to_the_one_it_replaces(archive: Archive) -> None:
    """The scanner sent a dose report at the end of the exam, then, after one
    more scan, an updated report holding all three events: the study's DLP is
    the updated report's 812.3 mGy.cm, not 1424.6 (the first two events
    counted twice); the first report says which report replaced it."""
    dose = _dose(archive, archive.updated)
    assert dose["ct_dlp_total"] == {"value": 812.3, "unit": "mGy.cm"}
    reports = _by_sop(dose)
    assert reports[archive.sops["updated_first"]]["superseded_by"] == archive.sops["updated_last"]
    assert reports[archive.sops["updated_last"]]["superseded_by"] is None


def test_a_resent_dose_report_counts_once(archive: Archive) -> None:
    """The same events resent under a new SOP Instance UID: counted once, the later report kept."""
    dose = _dose(archive, archive.resent)
    assert dose["ct_dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}
    reports = _by_sop(dose)
    assert reports[archive.sops["resent_first"]]["superseded_by"] == archive.sops["resent_again"]
    assert reports[archive.sops["resent_again"]]["superseded_by"] is None


def test_two_exam_parts_are_added(archive: Archive) -> None:
    """Two dose reports of different irradiations (a second exam part): both count."""
    dose = _dose(archive, archive.parts)
    assert dose["ct_dlp_total"] == {"value": 812.3, "unit": "mGy.cm"}
    assert all(r["superseded_by"] is None for r in dose["reports"])


# -- 2. a study of many SR objects ---------------------------------------------------------------------
def test_the_dose_report_is_found_behind_many_measurement_reports(archive: Archive) -> None:
    """25 measurement SRs came first: the dose report is still read (dose
    report classes before the Enhanced / Comprehensive SRs that may hold
    one), the SRs not read are counted in the answer, and a second load
    does not read the same objects again."""
    dose = _dose(archive, archive.many)
    assert [r["sop_uid"] for r in dose["reports"]] == [archive.sops["many_rdsr"]]
    assert dose["ct_dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}
    assert dose["unread"] == 25 - 19  # the dose report and 19 of the measurement SRs read
    again = _dose(archive, archive.many)
    assert again["unread"] == 0 and again["ct_dlp_total"] == dose["ct_dlp_total"]


# -- 3. units of the Dose Area Product --------------------------------------------------------------
def test_projection_dap_of_two_devices_in_different_units(archive: Archive) -> None:
    """One device writes the DAP in Gy.m2 (0.00355), the other in dGy.cm2
    (25 dGy.cm2 = 0.00025 Gy.m2): the study's DAP is 0.0038 Gy.m2, each
    report keeping its own unit."""
    dose = _dose(archive, archive.projection)
    reports = _by_sop(dose)
    assert reports[archive.sops["xa_gy"]]["dap_total"] == {"value": 0.00355, "unit": "Gy.m2"}
    assert reports[archive.sops["xa_dgy"]]["dap_total"] == {"value": 25.0, "unit": "dGy.cm2"}
    assert dose["dap_total"]["unit"] == "Gy.m2"
    assert dose["dap_total"]["value"] == pytest.approx(0.0038)


def test_a_dose_report_lost_from_the_store_is_named_and_the_rest_shown(archive: Archive) -> None:
    """The stored object of one of two dose reports is missing: the study's
    dose answers (not a 500 that hid the dose box), the lost report named
    with its error, the other one's figures shown."""
    dose = _dose(archive, archive.lost)
    reports = _by_sop(dose)
    assert "missing from the archive's store (pacs verify)" in reports[archive.sops["lost_neck"]]["error"]
    assert reports[archive.sops["lost_head"]]["dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}
    assert dose["ct_dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}


# -- 4. the viewer ------------------------------------------------------------------------------------
def _log_in(page: Any, study_uid: str) -> None:
    page.goto(f"/#/study/{study_uid}")
    page.fill("#username", USERNAME)
    page.fill("#password", "test-password-123")
    page.press("#password", "Enter")


def test_study_dose_line_counts_each_irradiation_once(archive: Archive) -> None:
    """The study's dose line: an updated dose report's total and three
    irradiation events, not the first report's added to it; the replaced
    report is marked; a projection study shows the DAP of both devices."""
    from playwright.sync_api import expect

    with browser_page(archive) as (page, problems):  # type: ignore[arg-type]
        _log_in(page, archive.updated.uid)
        expect(page.locator("#dose-total-dlp")).to_have_text("812.3 mGy·cm")
        expect(page.locator("#dose-event-count")).to_have_text("3 lần chiếu xạ")
        replaced = page.locator(f'.dose-report[data-sop-uid="{archive.sops["updated_first"]}"]')
        expect(replaced).to_have_class(re.compile(r"\bdose-superseded\b"))
        page.goto(f"/#/study/{archive.projection.uid}")
        expect(page.locator("#dose-total-dap")).to_have_text("0.0038 Gy·m²")
        assert not problems, problems


def test_image_tools_are_hidden_while_a_report_is_shown(archive: Archive) -> None:
    """While an SR document is shown the window presets and the measuring
    tools (which do nothing there) are hidden and their keys (L, A, R, the
    preset digits) do nothing; a text with markup stays text; back on the
    images the tools are there again, the pointer still chosen."""
    from playwright.sync_api import expect

    study = archive.updated
    with browser_page(archive) as (page, problems):  # type: ignore[arg-type]
        _log_in(page, study.uid)
        image = page.locator("#viewer-image")
        expect(image).to_have_attribute("src", re.compile(re.escape(study.ct_sops[0]) + r"/rendered"))
        expect(page.locator("#tool-length")).to_be_visible()
        expect(page.locator(".presets")).to_be_visible()

        page.click(f'[data-testid="series-thumb"][data-series-uid="{archive.series["updated_sr"]}"]')
        document = page.locator("#sr-documents")
        expect(document).to_contain_text(f"Kết luận {XSS}")
        assert document.locator("img, script").count() == 0
        assert page.evaluate("window.__srXss") is None
        for hidden in (".presets", "#wl-label", "#tool-length", "#tool-roi", "#measure-clear"):
            expect(page.locator(hidden)).to_be_hidden()
        document.click()
        for key in ("l", "a", "r", "2"):
            page.keyboard.press(key)
        expect(page.locator("#tool-pointer")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#wl-label")).to_have_attribute("data-preset", "default")

        page.click(f'[data-testid="series-thumb"][data-series-uid="{study.ct_series}"]')
        expect(page.locator("#tool-length")).to_be_visible()
        expect(page.locator(".presets")).to_be_visible()
        expect(page.locator("#tool-pointer")).to_have_attribute("aria-pressed", "true")
        assert not problems, problems
