"""Saved measurements (đo đạc): a radiologist's measurements drawn in the
viewer are kept as a Grayscale Softcopy Presentation State in the study
(GET/PUT /api/studies/{uid}/annotations, pacs.annotations), which DCMTK
finds (findscu), retrieves (getscu) and checks (dcmpschk) as any PR
series; a new save replaces the previous one through the audited deletion
path; a GSPS another system sent (storescu) is shown too, its DISPLAY units
placed in pixels; the viewer draws them again when the study is reopened.

A real `pacs serve` (SQLite + files, PostgreSQL + SeaweedFS S3), studies
sent with DCMTK storescu, the viewer in headless Chromium.
"""

from __future__ import annotations

import re
import socket
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pacs.routing import VIEWER_SAVE_HOLD_SECONDS

from .conftest import PacsServer, shared_backend
from .dicomfiles import image_dataset
from .peers import ROOT, Backend, run_dcmtk
from .test_web_viewer import Steps, browsing, sign_in

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
CSPS = "1.2.840.10008.5.1.4.1.1.11.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
PATIENT = "Trần^Thị Lan"
REFERRER = "Lê^Văn Hùng"
RADIOLOGIST = ("bs.an", "BS. Trần Văn An")
COLLEAGUE = ("bs.binh", "BS. Phạm Thanh Bình")
SHOTS = ROOT / "test-artifacts" / "annotations"


@dataclass
class Sent:
    """A study sent with storescu: its CT slices (3, 64 x 64, 0.5 mm pixels) and ultrasound clip (3 frames, 48 x 32)."""

    uid: str
    ct_series: str
    slices: list[str]
    us_series: str
    clip: str


def send_study(server: PacsServer, folder: Path, *, patient_id: str = "BN-PR-1", referrer: str = REFERRER) -> Sent:
    folder.mkdir(parents=True, exist_ok=True)
    study, ct, us = generate_uid(), generate_uid(), generate_uid()
    common = {"SpecificCharacterSet": "ISO_IR 192", "StudyInstanceUID": study, "PatientName": PATIENT,
              "PatientID": patient_id, "PatientBirthDate": "19790214", "PatientSex": "F", "StudyDate": "20261203",
              "StudyTime": "091500", "AccessionNumber": f"PR{study[-8:]}", "ReferringPhysicianName": referrer,
              "StudyDescription": "CT bụng", "StudyID": "1"}
    files, slices = [], []
    for n in range(1, 4):
        ds = image_dataset(SeriesInstanceUID=ct, SeriesNumber=1, InstanceNumber=n, Rows=64, Columns=64,
                           PixelSpacing=[0.5, 0.5], WindowCenter=40, WindowWidth=400, RescaleIntercept=-1024,
                           RescaleSlope=1, **common)
        yy, xx = np.mgrid[0:64, 0:64]
        ds.PixelData = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 400, 1100, 24).astype(np.uint16).tobytes()
        ds.save_as(folder / f"ct{n}.dcm", enforce_file_format=True)
        files.append(str(folder / f"ct{n}.dcm"))
        slices.append(str(ds.SOPInstanceUID))
    clip = image_dataset(US_MULTIFRAME, SeriesInstanceUID=us, Modality="US", SeriesNumber=2, InstanceNumber=1,
                         Rows=32, Columns=48, NumberOfFrames=3, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                         PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7, **common)
    clip.PixelData = (np.arange(3 * 32 * 48 * 3, dtype=np.uint32) % 251).astype(np.uint8).tobytes()
    clip.save_as(folder / "us.dcm", enforce_file_format=True)
    files.append(str(folder / "us.dcm"))
    sent = server.storescu(*files)
    assert sent.returncode == 0, sent.stderr
    return Sent(study, ct, slices, us, str(clip.SOPInstanceUID))


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive, a token per role; each test sends its own studies."""
    tmp = tmp_path_factory.mktemp(f"gsps-{request.param}")
    with shared_backend(request.param, request, "gsps") as backend:
        server = PacsServer(tmp / "data", backend)
        server.start()
        server.tokens = {  # type: ignore[attr-defined]
            "radiologist": server.make_token(RADIOLOGIST[0], "radiologist", RADIOLOGIST[1]),
            "colleague": server.make_token(COLLEAGUE[0], "radiologist", COLLEAGUE[1]),
            "referring": server.make_token("bs.hung", "referring", REFERRER),
            "emr": server.make_token("emr", "emr", "EMR"),
            "his": server.make_token("his", "his", "HIS"),
        }
        yield server
        server.stop()


def put(server: PacsServer, study: str, measurements: list[dict[str, Any]],
        role: str = "radiologist") -> httpx.Response:
    with server.http(server.tokens[role]) as http:  # type: ignore[attr-defined]
        return http.put(f"/api/studies/{study}/annotations", json={"measurements": measurements})


def get(server: PacsServer, study: str, role: str = "radiologist") -> httpx.Response:
    with server.http(server.tokens[role]) as http:  # type: ignore[attr-defined]
        return http.get(f"/api/studies/{study}/annotations")


def pr_instances(server: PacsServer, study: str) -> list[str]:
    """The study's presentation states, by QIDO-RS."""
    with server.http() as http:
        found = []
        for sop_class in (GSPS, CSPS):
            answer = http.get(f"/dicom-web/studies/{study}/instances", params={"SOPClassUID": sop_class})
            assert answer.status_code in (200, 204), answer.text
            found += [i["00080018"]["Value"][0] for i in (answer.json() if answer.status_code == 200 else [])]
    return sorted(found)


def events_until(server: PacsServer, wanted: int, **filters: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:  # audit events are written in batches
        with server.http() as http:
            events = list(reversed(http.get("/api/audit", params={"limit": 10000, **filters}).json()))
        if len(events) >= wanted or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def dcmpschk_clean(path: Path, tmp: Path) -> None:
    """DCMTK's presentation state checker passes *path*. DCMTK 3.6.7 checks
    the VRs of text byte by byte, so it calls every UTF-8 (ISO_IR 192) value
    with a diacritic non-conforming: those errors alone are expected, and a
    copy with the text folded to ASCII must pass outright."""
    check = run_dcmtk("dcmpschk", str(path))
    blocks = re.split(r"E: Error: ", check.stdout + check.stderr)[1:]
    for block in blocks:
        assert block.startswith("Attribute value does not conform"), block
        value = re.search(r"Attribute value\s+: \[(.*?)\]", block, re.S)
        assert value and not value.group(1).isascii(), block
    ds = dcmread(path)

    def fold(d: Dataset) -> None:
        for element in d:
            if element.VR == "SQ":
                for item in element.value:
                    fold(item)
            elif element.VR in ("PN", "LO", "ST", "SH", "LT") and element.value:
                text = unicodedata.normalize("NFD", str(element.value)).replace("đ", "d").replace("Đ", "D")
                element.value = text.encode("ascii", "ignore").decode()

    fold(ds)
    ds.save_as(tmp / "ascii.dcm")
    folded = run_dcmtk("dcmpschk", str(tmp / "ascii.dcm"))
    assert folded.returncode == 0 and "Test passed" in folded.stdout + folded.stderr, folded.stdout + folded.stderr


def drawn(sent: Sent) -> list[dict[str, Any]]:
    return [
        {"sop_uid": sent.slices[0], "frame": 1, "kind": "length", "points": [[16, 32], [48, 32]], "label": "16.0 mm"},
        {"sop_uid": sent.slices[0], "frame": 1, "kind": "angle", "points": [[10, 10], [10, 40], [40, 40]],
         "label": "90.0°"},
        {"sop_uid": sent.slices[1], "frame": 1, "kind": "roi", "points": [[40.5, 44], [20.25, 24]],
         "label": "TB 76 HU ĐLC 0\nDiện tích 79.5 mm²"},
        {"sop_uid": sent.clip, "frame": 2, "kind": "length", "points": [[4, 4], [44, 28]], "label": "46.6 px"},
    ]


# -- 1. saved measurements are presentation states DCMTK finds, retrieves and checks --------------------
def test_saved_measurements_are_a_presentation_state_dcmtk_reads(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    answer = put(archive, sent.uid, drawn(sent))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # The CT's and the clip's are two presentation states (one SOP class each) of one PR series.
    assert body["stored"] is True and body["removed"] == [] and len(body["states_saved"]) == 2
    assert pr_instances(archive, sent.uid) == sorted(body["states_saved"])
    states = body["states"]
    assert {(s["author"], s["login"], s["own"], s["label"], s["skipped"]) for s in states} == {
        (RADIOLOGIST[1], RADIOLOGIST[0], True, "MEASUREMENTS", 0)}
    assert len({s["series_uid"] for s in states}) == 1 and all(re.match(r"\d{4}-\d\d-\d\dT", s["created"])
                                                              for s in states)
    # What the viewer sent comes back as its own measurements (an ROI's box from its top left corner).
    mine = sorted((m["sop_uid"], m["frame"], m["kind"], m["points"], m["label"]) for m in body["mine"])
    expected = [(d["sop_uid"], d["frame"], d["kind"], d["points"], d["label"]) for d in drawn(sent)]
    expected[2] = (sent.slices[1], 1, "roi", [[20.25, 24], [40.5, 44]], expected[2][4])
    assert mine == sorted(expected)
    shapes = {(i["sop_uid"], i["frame"]): i for i in body["images"]}
    first = shapes[(sent.slices[0], None)]
    assert [(g["type"], g["points"]) for g in first["graphics"]] == [
        ("POLYLINE", [[16, 32], [48, 32]]), ("POLYLINE", [[10, 10], [10, 40], [40, 40]])]
    assert [t["text"] for t in first["texts"]] == ["16.0 mm", "90.0°"] and first["texts"][0]["anchor"] == [48, 32]
    roi = shapes[(sent.slices[1], None)]["graphics"][0]
    # An ELLIPSE: the major axis' ends, then the minor axis'.
    assert (roi["type"], roi["filled"], roi["points"]) == ("ELLIPSE", False, [
        [20.25, 34], [40.5, 34], [30.375, 24], [30.375, 44]])
    assert shapes[(sent.clip, 2)]["series_uid"] == sent.us_series
    # A colleague and the referring physician read them; they are not theirs.
    for role in ("colleague", "referring", "emr"):
        seen = get(archive, sent.uid, role)
        assert seen.status_code == 200, (role, seen.text)
        assert len(seen.json()["images"]) == 3 and seen.json()["mine"] == []
        assert not any(s["own"] for s in seen.json()["states"])

    # C-FIND finds the PR series with its description; QIDO-RS too.
    find = run_dcmtk("findscu", "-v", "-S", "-aet", "PRFIND", "-aec", archive.ae_title,
                     "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={sent.uid}", "-k", "Modality=PR",
                     "-k", "SeriesInstanceUID", "-k", "SeriesDescription", "-k", "SeriesNumber",
                     "127.0.0.1", str(archive.dicom_port))
    assert find.returncode == 0, find.stderr
    series_uids = re.findall(r"\(0020,000e\) UI \[([\d.]+)[ \x00]?\]", find.stdout + find.stderr)
    assert series_uids == [states[0]["series_uid"]], find.stderr
    assert "Đo đạc / Measurements" in find.stdout + find.stderr
    with archive.http() as http:
        qido = http.get(f"/dicom-web/studies/{sent.uid}/series", params={"Modality": "PR"}).json()
    assert [s["0020000E"]["Value"][0] for s in qido] == series_uids

    # getscu retrieves both; dcmpschk checks them; the attributes are the index's and the radiologist's.
    out = tmp_path / "got"
    out.mkdir()
    done = run_dcmtk("getscu", "-S", "-aet", "PRGET", "-aec", archive.ae_title, "-od", str(out),
                     "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={sent.uid}",
                     "-k", f"SeriesInstanceUID={series_uids[0]}", "127.0.0.1", str(archive.dicom_port))
    assert done.returncode == 0, done.stderr
    got = sorted(out.iterdir())
    assert len(got) == 2
    for path in got:
        dcmpschk_clean(path, tmp_path)
    by_class = {}
    for path in got:
        ds = dcmread(path)
        assert (ds.Modality, ds.SeriesNumber, ds.SeriesDescription) == ("PR", 951, "Đo đạc / Measurements")
        assert (str(ds.PatientName), ds.PatientID, str(ds.ContentCreatorName)) == (PATIENT, "BN-PR-1", RADIOLOGIST[1])
        assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.GraphicLayerSequence[0].GraphicLayer == "MEASUREMENTS"
        assert ds.DisplayedAreaSelectionSequence[0].PresentationSizeMode == "SCALE TO FIT"
        refs = {r.ReferencedSOPClassUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedImageSequence}
        assert len(refs) == 1
        by_class[refs.pop()] = ds
    # The RGB clip's a Color Softcopy Presentation State (PS3.3 A.33.2), the CT's a Grayscale one.
    assert (by_class[US_MULTIFRAME].SOPClassUID, by_class[CT_IMAGE].SOPClassUID) == (CSPS, GSPS)
    clip = by_class[US_MULTIFRAME].GraphicAnnotationSequence[0]
    assert clip.ReferencedImageSequence[0].ReferencedFrameNumber == 2
    assert clip.GraphicObjectSequence[0].GraphicAnnotationUnits == "PIXEL"
    ct = by_class[CT_IMAGE]
    assert [len(a.GraphicObjectSequence) for a in ct.GraphicAnnotationSequence] == [2, 1]
    assert ct.GraphicAnnotationSequence[1].TextObjectSequence[0].UnformattedTextValue == (
        "TB 76 HU ĐLC 0\r\nDiện tích 79.5 mm²")


# -- 2. a new save replaces the previous one; the same one writes nothing; empty removes --------------------
def test_a_new_save_replaces_the_previous_one_through_the_audited_deletion(
        archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    first = put(archive, sent.uid, drawn(sent)[:1]).json()
    colleague = put(archive, sent.uid, drawn(sent)[1:2], "colleague").json()
    again = put(archive, sent.uid, drawn(sent)[:3]).json()
    assert again["stored"] is True and again["removed"] == first["states_saved"]
    assert pr_instances(archive, sent.uid) == sorted(again["states_saved"] + colleague["states_saved"])
    assert len(again["mine"]) == 3
    # Each one's own: the colleague's measurement is theirs, shown to the radiologist as not own.
    assert [(i["author"], i["own"]) for i in again["images"] if not i["own"]] == [(COLLEAGUE[1], False)]
    deletions = events_until(archive, 1, action="delete", user=RADIOLOGIST[0], study=sent.uid)
    assert [e["outcome"] for e in deletions] == ["success"]
    assert first["states_saved"][0] in deletions[0]["detail"] and "replaced by" in deletions[0]["detail"]
    updates = events_until(archive, 3, action="annotations-update", study=sent.uid)
    assert [e["user"] for e in updates] == [RADIOLOGIST[0], COLLEAGUE[0], RADIOLOGIST[0]]

    # The same measurements saved again (in another order) write nothing.
    same = put(archive, sent.uid, list(reversed(drawn(sent)[:3]))).json()
    assert (same["stored"], same["removed"], same["states_saved"]) == (False, [], again["states_saved"])
    # Nothing: removed, the colleague's stays.
    cleared = put(archive, sent.uid, []).json()
    assert (cleared["states_saved"], cleared["removed"], cleared["mine"]) == ([], again["states_saved"], [])
    assert pr_instances(archive, sent.uid) == colleague["states_saved"]
    assert "cleared" in events_until(archive, 2, action="delete", user=RADIOLOGIST[0], study=sent.uid)[-1]["detail"]


# -- 3. another system's presentation state is shown -----------------------------------------------------
def foreign_gsps(sent: Sent, *, area: bool) -> Dataset:
    """A GSPS a modality might send: DISPLAY-unit graphics and text on slice 3, a PIXEL circle."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = GSPS, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "TRAN^THI LAN", "BN-PR-1", "PR"
    ds.SeriesNumber, ds.InstanceNumber = 7, 1
    ds.ContentLabel, ds.ContentDescription, ds.ContentCreatorName = "CT_ARROWS", "Modality marks", "TECH^ONE"
    ds.PresentationCreationDate, ds.PresentationCreationTime = "20261203", "093000"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE, sent.slices[2]
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedImageSequence = sent.ct_series, Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    if area:  # the middle of the image: pixels 17..48 each way
        selection = Dataset()
        selection.DisplayedAreaTopLeftHandCorner, selection.DisplayedAreaBottomRightHandCorner = [17, 17], [48, 48]
        selection.PresentationSizeMode, selection.PresentationPixelAspectRatio = "SCALE TO FIT", [1, 1]
        ds.DisplayedAreaSelectionSequence = Sequence([selection])
    line, circle, text = Dataset(), Dataset(), Dataset()
    line.GraphicAnnotationUnits, line.GraphicDimensions, line.NumberOfGraphicPoints = "DISPLAY", 2, 2
    line.GraphicData, line.GraphicType = [0.0, 0.5, 1.0, 0.5], "POLYLINE"
    circle.GraphicAnnotationUnits, circle.GraphicDimensions, circle.NumberOfGraphicPoints = "PIXEL", 2, 2
    circle.GraphicData, circle.GraphicType, circle.GraphicFilled = [32.0, 32.0, 40.0, 32.0], "CIRCLE", "Y"
    text.UnformattedTextValue, text.AnchorPointAnnotationUnits, text.AnchorPoint = "Khoi u", "DISPLAY", [0.25, 0.75]
    text.AnchorPointVisibility = "Y"
    annotation = Dataset()
    annotation.GraphicLayer, annotation.ReferencedImageSequence = "MARKS", Sequence([ref])
    annotation.GraphicObjectSequence, annotation.TextObjectSequence = Sequence([line, circle]), Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    layer = Dataset()
    layer.GraphicLayer, layer.GraphicLayerOrder = "MARKS", 1
    ds.GraphicLayerSequence = Sequence([layer])
    ds.PresentationLUTShape = "IDENTITY"
    return ds


def test_another_systems_presentation_state_is_shown(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    placed, unplaced = foreign_gsps(sent, area=True), foreign_gsps(sent, area=False)
    for n, ds in enumerate((placed, unplaced)):
        ds.save_as(tmp_path / f"pr{n}.dcm", implicit_vr=False, little_endian=True)
        assert archive.storescu(str(tmp_path / f"pr{n}.dcm")).returncode == 0
    mine = put(archive, sent.uid, drawn(sent)[:1]).json()
    body = get(archive, sent.uid, "referring").json()
    states = {s["sop_uid"]: s for s in body["states"]}
    assert (states[placed.SOPInstanceUID]["author"], states[placed.SOPInstanceUID]["own"],
            states[placed.SOPInstanceUID]["label"], states[placed.SOPInstanceUID]["skipped"]) == (
        "TECH^ONE", False, "CT_ARROWS", 0)
    # Without a displayed area the DISPLAY line and text cannot be placed: skipped and counted.
    assert states[unplaced.SOPInstanceUID]["skipped"] == 2
    drawn_on = {i["state"]: i for i in body["images"] if i["sop_uid"] == sent.slices[2]}
    shown = drawn_on[placed.SOPInstanceUID]
    # DISPLAY fractions of pixels 17..48 (0-based 16..48): the line across its middle, the text's anchor.
    assert [(g["type"], g["points"], g["filled"]) for g in shown["graphics"]] == [
        ("POLYLINE", [[16, 32], [48, 32]], False), ("CIRCLE", [[32, 32], [40, 32]], True)]
    assert shown["texts"] == [{"text": "Khoi u", "anchor": [24, 40], "box": None}]
    assert [g["type"] for g in drawn_on[unplaced.SOPInstanceUID]["graphics"]] == ["CIRCLE"]
    assert (shown["frame"], shown["layer"], shown["own"]) == (None, "MARKS", False)
    # The radiologist's own save leaves the modality's alone, and removing theirs too.
    assert put(archive, sent.uid, []).json()["removed"] == mine["states_saved"]
    assert pr_instances(archive, sent.uid) == sorted([placed.SOPInstanceUID, unplaced.SOPInstanceUID])


# -- 4. what is refused ------------------------------------------------------------------------------
def test_bad_measurements_and_other_roles_are_refused(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "a")
    other = send_study(archive, tmp_path / "b", patient_id="BN-PR-2")
    saved = put(archive, sent.uid, drawn(sent)[:1]).json()
    good = drawn(sent)[0]
    cases = {
        "an instance of another study": {**good, "sop_uid": other.slices[0]},
        "a presentation state is no image": {**good, "sop_uid": saved["states_saved"][0]},
        "no such frame": {**good, "sop_uid": sent.clip, "frame": 4},
        "a frame of a single-frame image": {**good, "frame": 2},
        "frame 0": {**good, "frame": 0},
        "outside the image": {**good, "points": [[16, 32], [64.5, 32]]},
        "negative": {**good, "points": [[-1, 32], [48, 32]]},
        "an angle of two points": {**good, "kind": "angle"},
        "a length of three points": {**good, "points": [[1, 1], [2, 2], [3, 3]]},
        "a flat ROI": {**good, "kind": "roi", "points": [[1, 5], [30, 5]]},
        "an unknown kind": {**good, "kind": "arrow"},
        "not a UID": {**good, "sop_uid": "1.2.abc"},
        "a NUL in the label": {**good, "label": "a\x00b"},
        "a point of three numbers": {**good, "points": [[1, 2, 3], [4, 5, 6]]},
    }
    for case, measurement in cases.items():
        answer = put(archive, sent.uid, [measurement])
        assert answer.status_code == 400, (case, answer.text)
        assert answer.json()["error"], case
    many = put(archive, sent.uid, [good] * 501)
    assert many.status_code == 400, many.text
    assert put(archive, "1.2.3.404", [good]).status_code == 404
    assert get(archive, "1.2.3.404").status_code == 404
    # Nothing refused changed what is saved.
    assert pr_instances(archive, sent.uid) == saved["states_saved"]
    # A referring physician, the EMR and the HIS never save; the referring physician reads only their studies.
    for role in ("referring", "emr", "his"):
        assert put(archive, sent.uid, [good], role).status_code == 403, role
    assert get(archive, sent.uid, "his").status_code == 403
    unreferred = send_study(archive, tmp_path / "c", patient_id="BN-PR-3", referrer="Phạm^Văn Tâm")
    assert get(archive, unreferred.uid, "referring").status_code == 403
    assert get(archive, sent.uid, "referring").status_code == 200
    updates = events_until(archive, 4, action="annotations-update", study=sent.uid)
    assert {e["user"] for e in updates if e["outcome"] == "denied"} >= {"bs.hung", "emr", "his"}
    views = events_until(archive, 1, action="view", study=sent.uid, user="bs.hung")
    assert any("/annotations" in e["detail"] for e in views), views


# -- 5. in the browser: drawn, saved, seen again after a reload; a colleague's read-only -------------------
PASSWORD = "Secret-123"


@pytest.fixture
def browser_archive(tmp_path: Path) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("user", "add", RADIOLOGIST[0], "--role", "radiologist", "--password", PASSWORD,
               "--display-name", RADIOLOGIST[1])
    server.start()
    server.tokens = {"colleague": server.make_token(COLLEAGUE[0], "radiologist", COLLEAGUE[1])}  # type: ignore
    yield server
    server.stop()


def _screen(page: Any, x: float, y: float, size: int = 64) -> tuple[float, float]:
    box = page.locator("#viewer-image").bounding_box()
    return box["x"] + x / size * box["width"], box["y"] + y / size * box["height"]


def _draw_length(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A length drawn with the L tool from *start* to *end* (pixels of the 64 x 64 test image)."""
    page.keyboard.press("l")
    page.mouse.move(*_screen(page, *start))
    page.mouse.down()
    page.mouse.move(*_screen(page, *end), steps=5)
    page.mouse.up()


def _open(page: Any, study: str) -> None:
    page.goto(f"/#/study/{study}")
    page.wait_for_function("() => { const i = document.querySelector('#viewer-image');"
                           " return i && !i.hidden && i.complete && i.naturalWidth > 0; }")


def test_measurements_are_saved_and_shown_again_in_the_viewer(browser_archive: PacsServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server = browser_archive
    sent = send_study(server, tmp_path / "in")
    # A colleague measured the first slice before.
    assert put(server, sent.uid, [{"sop_uid": sent.slices[0], "frame": 1, "kind": "length",
                                   "points": [[8, 8], [8, 56]], "label": "24.0 mm"}], "colleague").status_code == 200
    with browsing(server) as (page, errors):
        steps = Steps(page, SHOTS)
        sign_in(page, RADIOLOGIST[0], PASSWORD)
        expect(page.locator("#current-user")).to_have_text(RADIOLOGIST[1])
        _open(page, sent.uid)
        layer = page.locator("#measure-layer")
        state = page.locator("#measure-state")
        expect(state).to_have_attribute("data-loaded", "true")
        # The colleague's: drawn read-only, their name on it.
        theirs = layer.locator("g.measurement.foreign")
        expect(theirs).to_have_count(1)
        expect(theirs.locator("title")).to_have_text(re.compile(COLLEAGUE[1]))
        expect(theirs.locator("text")).to_have_text("24.0 mm")

        # A length across the disc: 32 pixels of 0.5 mm, saved a moment later.
        page.locator("#viewport").focus()
        _draw_length(page, (16, 32), (48, 32))
        own = layer.locator("g.measurement.length:not(.foreign)")
        expect(own.locator("text")).to_have_text("16.0 mm")
        expect(state).to_have_attribute("data-saved", "1")
        expect(state).to_have_text("Đã lưu 1 phép đo")
        steps.shot("saved")
        with server.http() as admin:
            saved = admin.get(f"/api/studies/{sent.uid}/annotations").json()
        [m] = [m for m in saved["images"] if m["author"] == RADIOLOGIST[1]]
        assert m["texts"][0]["text"] == "16.0 mm"
        assert [[round(v) for v in p] for p in m["graphics"][0]["points"]] == [[16, 32], [48, 32]]

        # Reopened: the own length again (editable: Delete removes it), the colleague's too.
        page.reload()
        _open(page, sent.uid)
        expect(state).to_have_attribute("data-loaded", "true")
        expect(own).to_have_count(1)
        expect(own.locator("text")).to_have_text("16.0 mm")
        expect(theirs).to_have_count(1)
        steps.shot("reopened")
        page.locator("#viewport").focus()
        page.keyboard.press("Delete")
        expect(own).to_have_count(0)
        expect(theirs).to_have_count(1)  # not the user's to delete
        expect(state).to_have_attribute("data-saved", "0")
        with server.http() as admin:
            left = admin.get(f"/api/studies/{sent.uid}/annotations").json()
        assert [s["author"] for s in left["states"]] == [COLLEAGUE[1]]
        # The PR series is no image series of the list.
        expect(page.locator('[data-testid="series-thumb"][data-modality="PR"] img')).to_have_count(0)
    assert not errors, errors  # script errors and Content Security Policy refusals


# -- routing: the radiologist's last save is sent, not one object per change -------------------------------
def route_jobs(server: PacsServer, sop_uid: str) -> list[dict[str, Any]]:
    """The routing jobs of *sop_uid*, read in the index."""
    from pacs import routing
    from pacs.index import create_index_engine

    engine = create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite",
                                 pool_size=0)
    try:
        return [job for job in routing.list_jobs(engine, limit=10_000) if job["sop_uid"] == sop_uid]
    finally:
        engine.dispose()


def test_a_rule_forwards_the_last_save_not_every_change(archive: PacsServer, tmp_path: Path) -> None:
    """The viewer saves a second after each change: a rule forwarding PR
    objects holds each save VIEWER_SAVE_HOLD_SECONDS, and the save a later
    one replaced is cancelled in the deletion's transaction, never sent
    (the backup archive would keep every intermediate state)."""
    down = socket.socket()
    down.bind(("127.0.0.1", 0))  # bound, never listening: refused
    try:
        archive.cli("ae", "add", "PRBACKUP", "--host", "127.0.0.1", "--port", str(down.getsockname()[1]))
        archive.cli("route", "add", "pr-backup", "--if", "Modality=PR", "--if", "PatientID=BN-PR-ROUTE",
                    "--to-ae", "PRBACKUP")
        sent = send_study(archive, tmp_path / "in", patient_id="BN-PR-ROUTE")
        saves = [put(archive, sent.uid, drawn(sent)[:n]).json()["states_saved"] for n in (1, 2, 3)]
        jobs = {sop: route_jobs(archive, sop) for save in saves for sop in save}
        assert [j["state"] for save in saves[:2] for sop in save for j in jobs[sop]] == ["cancelled"] * 2
        (last,) = [j for sop in saves[2] for j in jobs[sop]]
        assert last["state"] == "pending" and not last["attempts"]
        assert (last["next_attempt_at"] - last["created_at"]).total_seconds() > VIEWER_SAVE_HOLD_SECONDS / 2
    finally:
        archive.cli("route", "remove", "pr-backup", "--force", check=False)
        down.close()
