"""Review of the saved measurements (GSPS): what another system makes of the
presentation states this archive writes, and what a hostile one sent to it
does. A real `pacs serve` (SQLite + files), studies sent with DCMTK
storescu, the presentation states retrieved with getscu and applied to
their images by DCMTK's dcmp2pgm (its rendering pipeline: PS3.4 N.2).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import PacsServer, shared_backend
from .dicomfiles import image_dataset
from .peers import run_dcmtk
from .test_annotations import COLLEAGUE, RADIOLOGIST, REFERRER, Sent, dcmpschk_clean, get, put, send_study

CSPS = "1.2.840.10008.5.1.4.1.1.11.2"


@pytest.fixture(scope="module")
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive (SQLite + files), a token per role; each test sends its own studies."""
    tmp = tmp_path_factory.mktemp("review-gsps")
    with shared_backend("sqlite-fs", request, "rgsps") as backend:
        server = PacsServer(tmp / "data", backend)
        server.start()
        server.tokens = {  # type: ignore[attr-defined]
            "radiologist": server.make_token(RADIOLOGIST[0], "radiologist", RADIOLOGIST[1]),
            "colleague": server.make_token(COLLEAGUE[0], "radiologist", COLLEAGUE[1]),
            "referring": server.make_token("bs.hung", "referring", REFERRER),
        }
        yield server
        server.stop()


def retrieve(server: PacsServer, study: str, series: str, out: Path) -> list[Dataset]:
    """The series' objects retrieved with DCMTK getscu (files written to *out*)."""
    out.mkdir(parents=True, exist_ok=True)
    done = run_dcmtk("getscu", "-S", "-aet", "RVGET", "-aec", server.ae_title, "-od", str(out),
                     "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
                     "-k", f"SeriesInstanceUID={series}", "127.0.0.1", str(server.dicom_port))
    assert done.returncode == 0, done.stderr
    return [dcmread(p) for p in sorted(out.iterdir())]


def pgm(path: Path) -> tuple[int, int, bytes]:
    """(width, height, grey bytes) of a binary PGM dcmp2pgm wrote."""
    data = path.read_bytes()
    head = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert head, data[:40]
    return int(head.group(1)), int(head.group(2)), data[head.end():]


def test_another_viewer_applying_the_state_shows_the_ct_in_its_window(archive: PacsServer, tmp_path: Path) -> None:
    """A CT measured in the viewer (window C 40 / W 400 in HU, Rescale Intercept
    -1024): DCMTK's dcmp2pgm, applying the presentation state as PS3.4 N.2
    says (its Modality LUT and Softcopy VOI LUT replace the image's), must
    show the disc (stored 1100: 76 HU) mid-grey and the air (-1000 HU) black.
    Without them it rendered the disc at 4 of 255: a black image."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-VOI")
    answer = put(archive, sent.uid, [{"sop_uid": sent.slices[0], "frame": 1, "kind": "length",
                                      "points": [[16, 32], [48, 32]], "label": "16.0 mm"}])
    assert answer.status_code == 200, answer.text
    [state] = answer.json()["states"]
    [pr] = retrieve(archive, sent.uid, state["series_uid"], tmp_path / "pr")
    pr.save_as(tmp_path / "pr.dcm")
    shown = run_dcmtk("dcmp2pgm", "-p", str(tmp_path / "pr.dcm"), str(tmp_path / "in" / "ct1.dcm"),
                      str(tmp_path / "shown.pgm"))
    assert shown.returncode == 0, shown.stderr
    width, _, grey = pgm(tmp_path / "shown.pgm")
    # (76 - 40) / 400 + 0.5 = 0.59 of the grey scale: 150 of 255.
    assert 140 <= grey[32 * width + 32] <= 160, grey[32 * width + 32]
    assert grey[0] == 0


def test_non_square_pixels_keep_their_aspect_ratio_in_the_displayed_area(archive: PacsServer, tmp_path: Path) -> None:
    """A CR whose pixels are 0.5 mm high and 0.25 mm wide, measured: the
    state's Presentation Pixel Aspect Ratio (PS3.3 C.10.4) must be 2\\1, as the
    viewer shows it, not 1\\1 (another viewer showed the chest squashed)."""
    study, series = generate_uid(), generate_uid()
    image = image_dataset("1.2.840.10008.5.1.4.1.1.1", StudyInstanceUID=study, SeriesInstanceUID=series,
                          PatientID="RV-ASPECT", Modality="CR", Rows=32, Columns=64, PixelSpacing=[0.5, 0.25],
                          SpecificCharacterSet="ISO_IR 192", PatientName="Lê^Thị Hoa")
    image.PixelData = bytes(32 * 64 * 2)
    image.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    assert archive.storescu(str(tmp_path / "cr.dcm")).returncode == 0
    answer = put(archive, study, [{"sop_uid": str(image.SOPInstanceUID), "frame": 1, "kind": "length",
                                   "points": [[8, 8], [56, 24]], "label": "13.4 mm"}])
    assert answer.status_code == 200, answer.text
    [state] = answer.json()["states"]
    [pr] = retrieve(archive, study, state["series_uid"], tmp_path / "pr")
    [area] = pr.DisplayedAreaSelectionSequence
    assert [int(v) for v in area.PresentationPixelAspectRatio] == [2, 1]


def test_a_colour_image_gets_a_color_softcopy_presentation_state(archive: PacsServer, tmp_path: Path) -> None:
    """An ultrasound RGB clip measured: PS3.3 A.33.1 restricts a Grayscale
    Softcopy Presentation State to grayscale images; a colour one's is a
    Color Softcopy Presentation State (A.33.2: with its ICC Profile, no
    grayscale pipeline). Read back as the radiologist's own, and replaced."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-COLOUR")
    clip = {"sop_uid": sent.clip, "frame": 2, "kind": "length", "points": [[4, 4], [44, 28]], "label": "46.6 px"}
    answer = put(archive, sent.uid, [clip])
    assert answer.status_code == 200, answer.text
    [state] = answer.json()["states"]
    [pr] = retrieve(archive, sent.uid, state["series_uid"], tmp_path / "pr")
    assert pr.SOPClassUID == CSPS and pr.file_meta.MediaStorageSOPClassUID == CSPS
    assert len(pr.ICCProfile) > 128 and "PresentationLUTShape" not in pr and "SoftcopyVOILUTSequence" not in pr
    assert pr.GraphicAnnotationSequence[0].ReferencedImageSequence[0].ReferencedFrameNumber == 2
    seen = get(archive, sent.uid).json()
    assert [(m["sop_uid"], m["frame"], m["label"]) for m in seen["mine"]] == [(sent.clip, 2, "46.6 px")]
    assert [s["own"] for s in seen["states"]] == [True]
    # The same saved again writes nothing; another replaces it; none removes it.
    assert put(archive, sent.uid, [clip]).json()["stored"] is False
    again = put(archive, sent.uid, [{**clip, "label": "46.7 px"}]).json()
    assert again["removed"] == [pr.SOPInstanceUID]
    assert put(archive, sent.uid, []).json()["removed"] == again["states_saved"]


def flood(sent: Sent, patient_id: str) -> Dataset:
    """A hostile GSPS: one annotation naming no image, so on each of the 1000 "frames" of slice 1 its
    Referenced Series Sequence names, of 10 polylines of 300 points (3 million points once expanded)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TRAN^THI LAN", patient_id, "PR"
    ds.SeriesNumber, ds.InstanceNumber, ds.ContentLabel, ds.ContentCreatorName = 8, 1, "FLOOD", "EVIL^ONE"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sent.slices[0]
    ref.ReferencedFrameNumber = list(range(1, 1001))
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedImageSequence = sent.ct_series, Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    lines = []
    for n in range(10):
        line = Dataset()
        line.GraphicAnnotationUnits, line.GraphicDimensions, line.NumberOfGraphicPoints = "PIXEL", 2, 300
        line.GraphicData, line.GraphicType = [float((n + i) % 64) for i in range(600)], "POLYLINE"
        lines.append(line)
    annotation = Dataset()
    annotation.GraphicLayer, annotation.GraphicObjectSequence = "FLOOD", Sequence(lines)
    ds.GraphicAnnotationSequence = Sequence([annotation])
    layer = Dataset()
    layer.GraphicLayer, layer.GraphicLayerOrder = "FLOOD", 1
    ds.GraphicLayerSequence = Sequence([layer])
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def test_a_hostile_presentation_state_is_bounded(archive: PacsServer, tmp_path: Path) -> None:
    """A GSPS another system sent whose one annotation names no image (so
    applies to every image it references) on 1000 "frames" of a slice, with
    10 polylines of 300 points: expanded per frame, the GET built 3 million
    points (hundreds of megabytes). What is drawn of one state is bounded;
    the rest is counted as skipped; the radiologist's own still saves."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-HOSTILE")
    ds = flood(sent, "RV-HOSTILE")
    ds.save_as(tmp_path / "flood.dcm", implicit_vr=False, little_endian=True)
    assert archive.storescu(str(tmp_path / "flood.dcm")).returncode == 0
    seen = get(archive, sent.uid)
    assert seen.status_code == 200, seen.text[:300]
    body = seen.json()
    points = sum(len(g["points"]) for i in body["images"] for g in i["graphics"])
    assert 0 < points <= 100_000, points
    [flooded] = [s for s in body["states"] if s["sop_uid"] == ds.SOPInstanceUID]
    assert flooded["skipped"] > 0
    saved = put(archive, sent.uid, [{"sop_uid": sent.slices[1], "frame": 1, "kind": "length",
                                     "points": [[1, 1], [9, 9]], "label": "5.7 mm"}])
    assert saved.status_code == 200 and len(saved.json()["mine"]) == 1, saved.text[:300]


def test_own_measurements_are_found_among_hundreds_of_other_states(archive: PacsServer, tmp_path: Path) -> None:
    """A study a workstation sent one GSPS per image for (200 of them, before
    the radiologist's): only the 200 oldest states were read, so the
    radiologist's own was never found: not shown again, never replaced (each
    save one more PR object)."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-MANY")
    files = []
    for n in range(200):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "TRAN^THI LAN", "RV-MANY", "PR"
        ds.SeriesNumber, ds.InstanceNumber, ds.ContentLabel = 9, n + 1, "WORKSTATION"
        ds.PresentationLUTShape = "IDENTITY"
        ds.save_as(tmp_path / f"ws{n}.dcm", implicit_vr=False, little_endian=True)
        files.append(str(tmp_path / f"ws{n}.dcm"))
    assert archive.storescu(*files).returncode == 0
    first = put(archive, sent.uid, [{"sop_uid": sent.slices[0], "frame": 1, "kind": "length",
                                     "points": [[1, 1], [9, 9]], "label": "5.7 mm"}]).json()
    assert len(first["states_saved"]) == 1 and len(first["mine"]) == 1, first["states_saved"]
    assert len(get(archive, sent.uid).json()["mine"]) == 1
    second = put(archive, sent.uid, [{"sop_uid": sent.slices[0], "frame": 1, "kind": "length",
                                      "points": [[1, 1], [9, 19]], "label": "9.1 mm"}]).json()
    assert second["removed"] == first["states_saved"]


def test_a_state_another_site_sent_with_the_same_login_is_not_ones_own(archive: PacsServer, tmp_path: Path) -> None:
    """Another hospital's filmless-pacs routes a study here with its own
    radiologist's measurements, whose login is the same as one of ours
    ("bs.an", "admin"): it is theirs, read-only; our radiologist's save must
    not delete it (it did: own was told by the login alone)."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-SITE")
    theirs = put(archive, sent.uid, [{"sop_uid": sent.slices[0], "frame": 1, "kind": "length",
                                      "points": [[2, 2], [30, 2]], "label": "14.0 mm"}]).json()
    [pr] = retrieve(archive, sent.uid, theirs["states"][0]["series_uid"], tmp_path / "pr")
    assert put(archive, sent.uid, []).json()["removed"] == theirs["states_saved"]
    # The same object as the other site made it: its own UIDs, received over DICOM.
    pr.SOPInstanceUID = pr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pr.SeriesInstanceUID = generate_uid()
    pr.save_as(tmp_path / "other-site.dcm")
    assert archive.storescu(str(tmp_path / "other-site.dcm")).returncode == 0
    seen = get(archive, sent.uid).json()
    assert [(s["sop_uid"], s["own"]) for s in seen["states"]] == [(pr.SOPInstanceUID, False)]
    assert seen["mine"] == [] and [i["own"] for i in seen["images"]] == [False]
    mine = put(archive, sent.uid, [{"sop_uid": sent.slices[1], "frame": 1, "kind": "length",
                                    "points": [[2, 2], [30, 2]], "label": "14.0 mm"}]).json()
    assert mine["removed"] == [] and pr.SOPInstanceUID in {s["sop_uid"] for s in mine["states"]}


def test_the_window_the_radiologist_measured_in_is_the_states(archive: PacsServer, tmp_path: Path) -> None:
    """A nodule measured in the lung window (C -600 / W 1500): the state's
    Softcopy VOI LUT is that window (the viewer sends the one it showed), not
    the image's soft-tissue one; read back with the measurement, and a
    change of window alone is saved again."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-LUNG")
    length = {"sop_uid": sent.slices[0], "frame": 1, "kind": "length", "points": [[16, 32], [48, 32]],
              "label": "16.0 mm", "window": [-600, 1500]}
    answer = put(archive, sent.uid, [length])
    assert answer.status_code == 200, answer.text
    [state] = answer.json()["states"]
    assert [m["window"] for m in answer.json()["mine"]] == [[-600, 1500]]
    [pr] = retrieve(archive, sent.uid, state["series_uid"], tmp_path / "pr")
    pr.save_as(tmp_path / "pr.dcm")
    shown = run_dcmtk("dcmp2pgm", "-p", str(tmp_path / "pr.dcm"), str(tmp_path / "in" / "ct1.dcm"),
                      str(tmp_path / "shown.pgm"))
    assert shown.returncode == 0, shown.stderr
    width, _, grey = pgm(tmp_path / "shown.pgm")
    # 76 HU: (76 + 600) / 1500 + 0.5 = 0.95 (242 of 255); air: 0.23 (59).
    assert 232 <= grey[32 * width + 32] <= 252 and 49 <= grey[0] <= 69, (grey[32 * width + 32], grey[0])
    assert put(archive, sent.uid, [length]).json()["stored"] is False
    assert put(archive, sent.uid, [{**length, "window": [40, 400]}]).json()["stored"] is True
    # None sent: the image's own window.
    assert [m["window"] for m in put(archive, sent.uid, [{**length, "window": None}]).json()["mine"]] == [[40, 400]]


def test_the_viewer_saves_the_window_it_measured_in(archive: PacsServer, tmp_path: Path) -> None:
    """In the browser: the lung preset (3), a length drawn: the saved state's
    window is the lung one; reopened, the measurement keeps it."""
    from playwright.sync_api import expect

    from .test_annotations import PASSWORD, _draw_length, _open
    from .test_web_viewer import browsing, sign_in

    sent = send_study(archive, tmp_path / "in", patient_id="RV-VIEWER")

    def saved_window(folder: str) -> tuple[float, float]:
        """The window of bs.lung's saved state, as retrieved (C-GET)."""
        with archive.http() as admin:
            saved = admin.get(f"/api/studies/{sent.uid}/annotations").json()
        [mine] = [s for s in saved["states"] if s["login"] == "bs.lung"]
        [pr] = retrieve(archive, sent.uid, mine["series_uid"], tmp_path / folder)
        [voi] = pr.SoftcopyVOILUTSequence
        return float(voi.WindowCenter), float(voi.WindowWidth)
    archive.cli("user", "add", "bs.lung", "--role", "radiologist", "--password", PASSWORD,
                "--display-name", "BS. Phổi")
    with browsing(archive) as (page, errors):
        sign_in(page, "bs.lung", PASSWORD)
        expect(page.locator("#current-user")).to_have_text("BS. Phổi")
        _open(page, sent.uid)
        state = page.locator("#measure-state")
        expect(state).to_have_attribute("data-loaded", "true")
        page.locator("#viewport").focus()
        page.keyboard.press("3")  # the lung preset: C -600 / W 1500
        page.wait_for_function("() => { const i = document.querySelector('#viewer-image');"
                               " return i && !i.hidden && i.complete && i.naturalWidth > 0"
                               " && i.src.includes('window='); }")
        _draw_length(page, (16, 32), (48, 32))
        expect(state).to_have_attribute("data-saved", "1")
        assert saved_window("pr") == (-600.0, 1500.0)
        # Reopened and another length added: the first keeps its window.
        page.reload()
        _open(page, sent.uid)
        expect(state).to_have_attribute("data-loaded", "true")
        page.locator("#viewport").focus()
        _draw_length(page, (16, 40), (40, 40))
        expect(state).to_have_attribute("data-saved", "2")
        assert saved_window("pr2") == (-600.0, 1500.0)
    assert not errors, errors


def test_the_measurements_series_is_listed_at_once_and_opens_its_image(archive: PacsServer, tmp_path: Path) -> None:
    """In the browser: after the first save the series list shows the PR
    series at once (it did only after a reload); clicking it opens the image
    its measurements are on (it said "no image"); removed, it goes."""
    from playwright.sync_api import expect

    from .test_annotations import PASSWORD, _draw_length, _open
    from .test_web_viewer import browsing, sign_in

    sent = send_study(archive, tmp_path / "in", patient_id="RV-LIST")
    archive.cli("user", "add", "bs.list", "--role", "radiologist", "--password", PASSWORD,
                "--display-name", "BS. Danh Sách")
    with browsing(archive) as (page, errors):
        sign_in(page, "bs.list", PASSWORD)
        expect(page.locator("#current-user")).to_have_text("BS. Danh Sách")
        _open(page, sent.uid)
        state = page.locator("#measure-state")
        expect(state).to_have_attribute("data-loaded", "true")
        pr_thumbs = page.locator('[data-testid="series-thumb"][data-modality="PR"]')
        expect(pr_thumbs).to_have_count(0)
        # The third slice measured.
        page.locator("#viewport").focus()
        page.keyboard.press("End")
        page.wait_for_function("() => document.querySelector('#viewer-image').src.includes("
                               f"'{sent.slices[2]}')")
        _draw_length(page, (16, 32), (48, 32))
        expect(state).to_have_attribute("data-saved", "1")
        expect(pr_thumbs).to_have_count(1)
        # The ultrasound clip shown, then the PR entry clicked: the measured slice again, no error.
        page.locator(f'[data-testid="series-thumb"][data-series-uid="{sent.us_series}"]').click()
        pr_thumbs.click()
        page.wait_for_function("() => { const i = document.querySelector('#viewer-image');"
                               f" return i && !i.hidden && i.src.includes('{sent.slices[2]}'); }}")
        expect(page.locator("#viewer-error")).to_be_hidden()
        expect(page.locator("g.measurement.length")).to_have_count(1)
        # Removed: the entry goes.
        page.locator("#viewport").focus()
        page.keyboard.press("Delete")
        expect(state).to_have_attribute("data-saved", "0")
        expect(pr_thumbs).to_have_count(0)
    assert not errors, errors


def test_a_frame_number_beyond_any_number_is_no_server_error(archive: PacsServer, tmp_path: Path) -> None:
    """A foreign GSPS whose Referenced Frame Number is "1e400" (IS, as
    written): pydicom's conversion raised OverflowError, which the reading
    did not expect: the study's annotations GET and every radiologist's save
    of it answered 500. It is listed; what it draws elsewhere still shows."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-OVERFLOW")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TRAN^THI LAN", "RV-OVERFLOW", "PR"
    ds.SeriesNumber, ds.InstanceNumber, ds.ContentLabel = 10, 1, "ODD"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sent.slices[0]
    ref.ReferencedFrameNumber = 777777  # written as "1e400 " below
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedImageSequence = sent.ct_series, Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    line = Dataset()
    line.GraphicAnnotationUnits, line.GraphicDimensions, line.NumberOfGraphicPoints = "PIXEL", 2, 2
    line.GraphicData, line.GraphicType = [1.0, 1.0, 9.0, 9.0], "POLYLINE"
    annotation = Dataset()
    annotation.GraphicLayer, annotation.GraphicObjectSequence = "ODD", Sequence([line])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    ds.PresentationLUTShape = "IDENTITY"
    ds.save_as(tmp_path / "odd.dcm", implicit_vr=False, little_endian=True)
    data = (tmp_path / "odd.dcm").read_bytes()
    assert data.count(b"777777") == 1
    (tmp_path / "odd.dcm").write_bytes(data.replace(b"777777", b"1e400 "))
    assert archive.storescu(str(tmp_path / "odd.dcm")).returncode == 0
    seen = get(archive, sent.uid)
    assert seen.status_code == 200, seen.text[:300]
    assert ds.SOPInstanceUID in {s["sop_uid"] for s in seen.json()["states"]}
    saved = put(archive, sent.uid, [{"sop_uid": sent.slices[1], "frame": 1, "kind": "length",
                                     "points": [[1, 1], [9, 9]], "label": "5.7 mm"}])
    assert saved.status_code == 200, saved.text[:300]


def test_a_hostile_state_of_long_texts_is_bounded(archive: PacsServer, tmp_path: Path) -> None:
    """A GSPS whose one text object (60,000 characters: ST holds 1024) is
    on 1000 "frames" of a slice: the GET repeated it per frame, 60 MB of
    JSON. Texts count against the same budget as points, by their length."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-TEXTS")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TRAN^THI LAN", "RV-TEXTS", "PR"
    ds.SeriesNumber, ds.InstanceNumber, ds.ContentLabel = 11, 1, "WORDS"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sent.slices[0]
    ref.ReferencedFrameNumber = list(range(1, 1001))
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedImageSequence = sent.ct_series, Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    text = Dataset()
    text.UnformattedTextValue, text.AnchorPointAnnotationUnits, text.AnchorPoint = "A" * 60_000, "PIXEL", [8.0, 8.0]
    annotation = Dataset()
    annotation.GraphicLayer, annotation.TextObjectSequence = "WORDS", Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    ds.PresentationLUTShape = "IDENTITY"
    ds.save_as(tmp_path / "words.dcm", implicit_vr=False, little_endian=True)
    assert archive.storescu(str(tmp_path / "words.dcm")).returncode == 0
    seen = get(archive, sent.uid)
    assert seen.status_code == 200, seen.text[:300]
    assert 0 < len(seen.content) <= 2_000_000, len(seen.content)
    [words] = [s for s in seen.json()["states"] if s["sop_uid"] == ds.SOPInstanceUID]
    assert words["skipped"] > 0


def test_many_hostile_states_are_bounded_together(archive: PacsServer, tmp_path: Path) -> None:
    """Eleven such states in one study: each drew its 100,000 points, 1.1
    million in one answer (and in the server's memory at once; 200 of them:
    gigabytes). The study's states draw a million points at most together."""
    sent = send_study(archive, tmp_path / "in", patient_id="RV-FLOODS")
    files = []
    for n in range(11):
        flood(sent, "RV-FLOODS").save_as(tmp_path / f"flood{n}.dcm", implicit_vr=False, little_endian=True)
        files.append(str(tmp_path / f"flood{n}.dcm"))
    assert archive.storescu(*files).returncode == 0
    seen = get(archive, sent.uid)
    assert seen.status_code == 200, seen.text[:300]
    points = sum(len(g["points"]) for i in seen.json()["images"] for g in i["graphics"])
    assert 900_000 <= points <= 1_000_000, points


def test_an_image_shown_through_its_voi_lut_table_keeps_it_in_the_state(archive: PacsServer, tmp_path: Path) -> None:
    """A CR whose grey levels come from a VOI LUT table (no window: many CR and
    mammography units): measured, the state carries no window, so another
    viewer applying it (dcmp2pgm) showed it without any VOI, inverted here.
    The state's Softcopy VOI LUT is the image's table."""
    study, series = generate_uid(), generate_uid()
    image = image_dataset("1.2.840.10008.5.1.4.1.1.1", StudyInstanceUID=study, SeriesInstanceUID=series,
                          PatientID="RV-VOILUT", Modality="CR", Rows=64, Columns=64, BitsStored=12, HighBit=11)
    image.PixelData = np.hstack([np.zeros((64, 32)), np.full((64, 32), 4095)]).astype(np.uint16).tobytes()
    table = Dataset()
    table.LUTDescriptor = [4096, 0, 8]
    # Black for the brightest: unmistakable.
    table.add_new(0x00283006, "OW", np.array([255 - (i >> 4) for i in range(4096)], dtype=np.uint16).tobytes())
    table.LUTExplanation = "INVERTED"
    image.VOILUTSequence = Sequence([table])
    image.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
    assert archive.storescu(str(tmp_path / "cr.dcm")).returncode == 0
    answer = put(archive, study, [{"sop_uid": str(image.SOPInstanceUID), "frame": 1, "kind": "length",
                                   "points": [[8, 8], [56, 8]], "label": "48 px"}])
    assert answer.status_code == 200, answer.text
    [state] = answer.json()["states"]
    [pr] = retrieve(archive, study, state["series_uid"], tmp_path / "pr")
    pr.save_as(tmp_path / "pr.dcm")
    shown = run_dcmtk("dcmp2pgm", "-p", str(tmp_path / "pr.dcm"), str(tmp_path / "cr.dcm"), str(tmp_path / "cr.pgm"))
    assert shown.returncode == 0, shown.stderr
    width, _, grey = pgm(tmp_path / "cr.pgm")
    assert (grey[32 * width + 4], grey[32 * width + 60]) == (255, 0)
    dcmpschk_clean(tmp_path / "pr.dcm", tmp_path)
