"""Review of the key images (pacs.key_images, pacs.key_objects, the viewer's
keyimages.js, the share page, the signed report's PDF) as a PACS engineer
would use them.

A real `pacs serve` (SQLite + files), studies sent with DCMTK storescu, the
HIS over MLLP, the KOS retrieved with getscu and read with dsrdump, the
viewer in headless Chromium (Debian's, through Playwright):

- the viewer's K pressed before the radiologist's saved selection is read
  (a slow link, or its GET failed) saved that one image as the whole
  selection: the images marked the day before were deleted;
- a save that failed (the network down) left the star shown as saved;
- K held down toggled on every key repeat;
- a report signed while the key image just marked was being saved printed
  the selection without it;
- an image rejected (IOCM rejection note, "Rejected for Quality Reasons")
  that someone had marked was still shown to the patient as a key image and
  printed in the signed report;
- a manifest ("Complete Study Content") counted as a key image selection:
  the whole study shown as key images;
- the KOS of a study ordered by the HIS named no Referenced Request
  (PS3.3 C.17.6.2: Type 1C, required when the document pertains to a
  Requested Procedure): another PACS could not tie it to the order;
- a KOS replaced before a routing rule sent it left a dead routing job.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pacs.routing import VIEWER_SAVE_HOLD_SECONDS

from .peers import Backend, PacsServer, wait_until
from .test_hl7_review import CR, FS, VT, orm, read_frame
from .test_key_images import (
    BIRTH, COLLEAGUE, FINDINGS, IMPRESSION, KOS, PATIENT, RADIOLOGIST, US_MULTIFRAME, dsrdump_clean, getscu_series,
    pdf_images, send_study, share_link,
)
from .test_web_viewer import browsing, sign_in

PASSWORD = "test-password-123"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"  # PacsServer.make_token's


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive for the module, a token per role; each test sends its own studies."""
    server = PacsServer(tmp_path_factory.mktemp("review-keyimages") / "data", Backend("sqlite-fs", None, None, {}))
    server.start()
    server.tokens = {  # type: ignore[attr-defined]
        "radiologist": server.make_token(RADIOLOGIST[0], "radiologist", RADIOLOGIST[1]),
        "colleague": server.make_token(COLLEAGUE[0], "radiologist", COLLEAGUE[1]),
        "his": server.make_token("his", "his", "HIS"),
    }
    yield server
    server.stop()


def token(server: PacsServer, role: str) -> str:
    return server.tokens[role]  # type: ignore[no-any-return,attr-defined]


def put(server: PacsServer, study: str, images: list[dict[str, Any]], role: str = "radiologist",
        **fields: Any) -> dict[str, Any]:
    with server.http(token(server, role)) as http:
        answer = http.put(f"/api/studies/{study}/key-images", json={"images": images, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def mine(server: PacsServer, study: str) -> list[tuple[str, int | None]]:
    """The radiologist's saved selection, as the server holds it."""
    with server.http(token(server, "radiologist")) as http:
        answer = http.get(f"/api/studies/{study}/key-images")
    assert answer.status_code == 200, answer.text
    return [(m["sop_uid"], m["frame"]) for m in answer.json()["mine"]]


# -- 1. the viewer: K before the selection is read, a failed save, K held down ------------------
@pytest.fixture
def viewer_page(archive: PacsServer) -> Iterator[Any]:
    """The radiologist logged in to the viewer (Chromium)."""
    from playwright.sync_api import expect

    with browsing(archive) as (page, errors):
        sign_in(page, RADIOLOGIST[0], PASSWORD)
        expect(page.locator("#current-user")).to_have_text(RADIOLOGIST[1])
        yield page
        assert not errors, errors


def _open_second_slice(page: Any, study: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"/#/study/{study}")
    label = page.locator("#slice-label")
    expect(label).to_have_text("Lát cắt 1 / 3")
    page.locator("#viewport").focus()
    page.keyboard.press("ArrowDown")
    expect(label).to_have_text("Lát cắt 2 / 3")


def test_k_before_the_saved_selection_is_read_keeps_it(archive: PacsServer, viewer_page: Any, tmp_path: Path) -> None:
    """Yesterday's selection (slices 1 and 3); today the GET of it fails (a
    satellite hospital's link drops): K on slice 2 saved [slice 2] alone,
    deleting the other two. Now nothing is saved until the selection is
    read; once it is, K adds to it."""
    from playwright.sync_api import expect

    page = viewer_page
    sent = send_study(archive, tmp_path / "in")
    put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": sent.slices[2]}])
    puts: list[str] = []
    page.on("request", lambda r: puts.append(r.url) if r.method == "PUT" and "key-images" in r.url else None)
    failing = f"**/api/studies/{sent.uid}/key-images"
    page.route(failing, lambda route: route.abort() if route.request.method == "GET" else route.continue_())
    _open_second_slice(page, sent.uid)
    state = page.locator("#key-image-state")
    page.keyboard.press("k")
    expect(state).to_have_class("key-state error")
    expect(page.locator("#key-image-toggle")).to_have_attribute("aria-pressed", "false")
    page.locator("#key-image-toggle").click()
    expect(state).to_have_class("key-state error")
    assert puts == [], "a selection was saved before the saved one was read"
    assert mine(archive, sent.uid) == [(sent.slices[0], None), (sent.slices[2], None)]

    # The link is back: the next K reads the selection (the stars show), the one after adds slice 2 to it.
    page.unroute(failing)
    page.locator("#viewport").focus()
    page.keyboard.press("k")
    ct_thumb = page.locator(f'[data-testid="series-thumb"][data-series-uid="{sent.ct_series}"]')
    expect(ct_thumb.locator(".thumb-key")).to_have_text(" ★ 2")
    page.keyboard.press("k")
    expect(state).to_have_attribute("data-saved", "3")
    assert sorted(mine(archive, sent.uid)) == sorted((uid, None) for uid in sent.slices)


def test_a_failed_save_does_not_show_the_image_as_key(archive: PacsServer, viewer_page: Any,
                                                      tmp_path: Path) -> None:
    """The network goes down as the radiologist marks slice 2: the PUT and
    the reload after it fail. The star stayed on (toggle pressed, marker
    shown) beside "not saved", and the report was signed thinking it kept."""
    from playwright.sync_api import expect

    page = viewer_page
    sent = send_study(archive, tmp_path / "in")
    put(archive, sent.uid, [{"sop_uid": sent.slices[0]}])
    _open_second_slice(page, sent.uid)
    ct_thumb = page.locator(f'[data-testid="series-thumb"][data-series-uid="{sent.ct_series}"]')
    expect(ct_thumb.locator(".thumb-key")).to_have_text(" ★ 1")  # the saved selection is read
    page.route(f"**/api/studies/{sent.uid}/key-images", lambda route: route.abort())
    page.keyboard.press("k")
    state = page.locator("#key-image-state")
    expect(state).to_have_class("key-state error")
    expect(state).to_contain_text("Chưa lưu được ảnh chính")
    expect(page.locator("#key-image-toggle")).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#key-image-marker")).to_be_hidden()
    expect(ct_thumb.locator(".thumb-key")).to_have_text(" ★ 1")
    assert mine(archive, sent.uid) == [(sent.slices[0], None)]


def test_k_held_down_toggles_once(archive: PacsServer, viewer_page: Any, tmp_path: Path) -> None:
    """A key held down repeats: the second keydown (repeat) unmarked the image just marked."""
    from playwright.sync_api import expect

    page = viewer_page
    sent = send_study(archive, tmp_path / "in")
    _open_second_slice(page, sent.uid)
    expect(page.locator("#key-image-toggle")).to_have_attribute("data-loaded", "true")
    page.keyboard.down("k")
    page.keyboard.down("k")  # auto-repeat: event.repeat
    page.keyboard.down("k")
    page.keyboard.down("k")
    page.keyboard.up("k")
    expect(page.locator("#key-image-state")).to_have_attribute("data-saved", "1")
    expect(page.locator("#key-image-toggle")).to_have_attribute("aria-pressed", "true")
    assert mine(archive, sent.uid) == [(sent.slices[1], None)]


def test_a_report_signed_as_a_key_image_is_saved_prints_it(archive: PacsServer, viewer_page: Any,
                                                           tmp_path: Path) -> None:
    """The radiologist marks slice 2 (K) and signs at once, the key images'
    PUT still on its way (a slow link): the signature went first and the
    signed PDF, which is never rewritten, lacked the image just marked."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    page = viewer_page
    sent = send_study(archive, tmp_path / "in")
    _open_second_slice(page, sent.uid)
    expect(page.locator("#key-image-toggle")).to_have_attribute("data-loaded", "true")
    page.fill("#findings", FINDINGS)
    page.fill("#impression", IMPRESSION)
    held: list[Any] = []
    page.route(f"**/api/studies/{sent.uid}/key-images",
               lambda route: held.append(route) if route.request.method == "PUT" else route.continue_())
    page.locator("#viewport").focus()
    page.keyboard.press("k")
    page.wait_for_function("() => document.querySelector('#key-image-state').textContent !== ''")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#sign-report")
    try:  # the signature, had it not waited for the key images (it must not come)
        page.wait_for_event("requestfinished", lambda r: r.url.endswith("/report/sign"), timeout=3000)
    except PlaywrightTimeout:
        pass
    assert len(held) == 1
    held[0].continue_()
    expect(page.locator("#key-image-state")).to_have_attribute("data-saved", "1")
    expect(page.locator("#amend-report")).to_be_visible()  # signed
    with archive.http(token(archive, "radiologist")) as http:
        pdf = http.get(f"/api/studies/{sent.uid}/report/pdf").content
    assert len(pdf_images(pdf)) == 1


# -- 2. a rejected image is no key image for the patient or the report --------------------------
def modality_note(tmp_path: Path, study: str, refs: list[tuple[str, str]], title: tuple[str, str]) -> Path:
    """Another system's KOS (an IHE IOCM rejection note, a manifest) of
    *study* naming the instances *refs* (SOP class, SOP instance)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = PATIENT, "BN-KEY-1", "KO", 98, 1
    ds.ContentDate, ds.ContentTime = "20261203", "094500"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = title[0], "DCM"
    concept.CodeMeaning = title[1]
    ds.ConceptNameCodeSequence = Sequence([concept])
    images = []
    for sop_class, sop_uid in refs:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        image = Dataset()
        image.RelationshipType, image.ValueType, image.ReferencedSOPSequence = "CONTAINS", "IMAGE", Sequence([ref])
        images.append(image)
    ds.ContentSequence = Sequence(images)
    path = tmp_path / f"note-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def test_a_rejected_image_is_not_shown_to_the_patient_nor_printed(archive: PacsServer, tmp_path: Path) -> None:
    """The radiologist marked slices 1 and 2 and the clip's frame 2; a
    colleague then flagged slice 2 "Rejected for Quality Reasons" and the
    modality sent an IOCM note: the clip was of another patient's worklist
    entry. The patient's page still showed all three as key images, and the
    signed report printed them."""
    sent = send_study(archive, tmp_path / "in")
    put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": sent.slices[1]},
                            {"sop_uid": sent.clip, "frame": 2}])
    put(archive, sent.uid, [{"sop_uid": sent.slices[1]}], "colleague", title="Rejected for Quality Reasons")
    note = modality_note(tmp_path, sent.uid, [(US_MULTIFRAME, sent.clip)],
                         ("113038", "Incorrect Modality Worklist Entry"))
    assert archive.storescu(str(note)).returncode == 0
    # The staff still see what each document says.
    with archive.http(token(archive, "radiologist")) as http:
        listed = http.get(f"/api/studies/{sent.uid}/key-images").json()
    assert sorted((i["sop_uid"], i["key"]) for i in listed["images"]) == sorted([
        (sent.slices[0], True), (sent.slices[1], True), (sent.clip, True), (sent.slices[1], False),
        (sent.clip, False)])

    base = share_link(archive, sent.uid)
    with httpx.Client(base_url=f"http://127.0.0.1:{archive.http_port}", timeout=30) as phone:
        assert phone.post(f"{base}/birth-year", json={"birth_year": BIRTH[:4]}).status_code == 204
        shown = phone.get(f"{base}/study").json()
    assert [(k["sop_uid"], k["frame"]) for k in shown["key_images"]] == [(sent.slices[0], 1)]

    with archive.http(token(archive, "radiologist")) as rad:
        assert rad.put(f"/api/studies/{sent.uid}/report",
                       json={"findings": FINDINGS, "impression": IMPRESSION}).status_code == 200
        assert rad.post(f"/api/studies/{sent.uid}/report/sign").status_code == 200
        pdf = rad.get(f"/api/studies/{sent.uid}/report/pdf").content
    assert len(pdf_images(pdf)) == 1


# -- 3. the KOS of an ordered study names its Requested Procedure -------------------------------------
def his_order(server: PacsServer, accession: str, study: str, patient_id: str) -> None:
    """The HIS's order (ORM^O01 over MLLP) for *study*, placed after its images came: reconciled with it
    (the HIS's birth date and sex become the patient's)."""
    message = orm(f"KI{accession}", accession, pid=patient_id, name=PATIENT, study_uid=study)
    with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=15) as sock:
        sock.sendall(VT + message.encode() + FS + CR)
        assert "MSA|AA|" in read_frame(sock)


def test_the_kos_of_an_ordered_study_names_its_requested_procedure(archive: PacsServer, tmp_path: Path) -> None:
    """PS3.3 C.17.6.2: Referenced Request Sequence, Type 1C, "required if
    this Document pertains to at least one Requested Procedure". The KOS of
    a study the HIS ordered had none: a receiving PACS or RIS (IHE KIN, an
    XDS-I manifest) could not tie the key images to the order."""
    sent = send_study(archive, tmp_path / "in", patient_id="BN-KEY-ORDER")
    accession = f"KI{sent.uid[-8:]}"
    his_order(archive, accession, sent.uid, "BN-KEY-ORDER")
    with archive.http() as http:
        assert http.get(f"/api/studies/{sent.uid}").json()["patient_id"] == "BN-KEY-ORDER"
    saved = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}])
    ko_series = next(d["series_uid"] for d in saved["documents"] if d["sop_uid"] == saved["document"])
    [got] = getscu_series(archive, sent.uid, ko_series, tmp_path / "got")
    dsrdump_clean(got)
    [request] = dcmread(got).ReferencedRequestSequence
    assert (request.StudyInstanceUID, request.AccessionNumber) == (sent.uid, accession)
    assert (request.PlacerOrderNumberImagingServiceRequest, request.FillerOrderNumberImagingServiceRequest) == (
        f"P{accession}", f"F{accession}")
    assert request.RequestedProcedureID and request.RequestedProcedureDescription == "CT ngực không cản quang"
    [code] = request.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("CT-NGUC", "L")
    assert "ReferencedStudySequence" in request

    # A study the HIS never ordered, with the modality's accession: the request is that accession alone.
    walk_in = send_study(archive, tmp_path / "walk-in", patient_id="BN-KEY-5")
    saved = put(archive, walk_in.uid, [{"sop_uid": walk_in.slices[1]}])
    ko_series = next(d["series_uid"] for d in saved["documents"] if d["sop_uid"] == saved["document"])
    [got] = getscu_series(archive, walk_in.uid, ko_series, tmp_path / "got-walk-in")
    dsrdump_clean(got)
    [request] = dcmread(got).ReferencedRequestSequence
    assert (request.StudyInstanceUID, request.AccessionNumber) == (walk_in.uid, f"KI{walk_in.uid[-8:]}")
    assert request.PlacerOrderNumberImagingServiceRequest == "" and request.RequestedProcedureCodeSequence == []


def test_a_manifest_of_the_whole_study_is_no_key_image_selection(archive: PacsServer, tmp_path: Path) -> None:
    """A KOS titled "Complete Study Content" (CID 7010, an XDS-I source's
    manifest, come with the study from another archive) lists every image:
    the patient's page showed the whole study as key images and the signed
    report printed its first four, not the one the radiologist chose."""
    sent = send_study(archive, tmp_path / "in")
    everything = [(CT_IMAGE, uid) for uid in sent.slices] + [(US_MULTIFRAME, sent.clip)]
    manifest = modality_note(tmp_path, sent.uid, everything, ("113032", "Complete Study Content"))
    assert archive.storescu(str(manifest)).returncode == 0
    put(archive, sent.uid, [{"sop_uid": sent.slices[2]}])
    with archive.http(token(archive, "radiologist")) as http:
        listed = http.get(f"/api/studies/{sent.uid}/key-images").json()
    assert sorted((d["title"]["value"], d["key"]) for d in listed["documents"]) == [
        ("113000", True), ("113032", False)]

    base = share_link(archive, sent.uid)
    with httpx.Client(base_url=f"http://127.0.0.1:{archive.http_port}", timeout=30) as phone:
        assert phone.post(f"{base}/birth-year", json={"birth_year": BIRTH[:4]}).status_code == 204
        shown = phone.get(f"{base}/study").json()
    assert [(k["sop_uid"], k["frame"]) for k in shown["key_images"]] == [(sent.slices[2], 1)]

    with archive.http(token(archive, "colleague")) as rad:
        assert rad.put(f"/api/studies/{sent.uid}/report",
                       json={"findings": FINDINGS, "impression": IMPRESSION}).status_code == 200
        assert rad.post(f"/api/studies/{sent.uid}/report/sign").status_code == 200
        pdf = rad.get(f"/api/studies/{sent.uid}/report/pdf").content
    assert len(pdf_images(pdf)) == 1


# -- 5. a replaced selection leaves no dead routing job -----------------------------------------------
def route_jobs(server: PacsServer, sop_uid: str) -> list[dict[str, Any]]:
    """The routing jobs of *sop_uid*, read in the index (`pacs route list` is a process per call)."""
    from pacs import routing
    from pacs.index import create_index_engine

    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    try:
        return [job for job in routing.list_jobs(engine, limit=10_000) if job["sop_uid"] == sop_uid]
    finally:
        engine.dispose()


def test_a_replaced_selection_leaves_no_dead_routing_job(archive: PacsServer, tmp_path: Path) -> None:
    """A rule forwards the key images to the backup archive, which is down
    for a while (or the rule waits for the study to be stable). Each mark
    replaces the radiologist's KOS: the job of the one deleted was parked
    dead once claimed ("rule or instance no longer exists"), an alert
    (pacs_route_jobs dead) for every K pressed. It is cancelled now; the
    current selection's job waits for the backup. A saved selection is held
    VIEWER_SAVE_HOLD_SECONDS before it is sent (the next key pressed replaces
    it); `pacs route retry --job` sends it at once."""
    down = socket.socket()
    down.bind(("127.0.0.1", 0))  # a port nothing listens on (bound, never listening: refused)
    try:
        archive.cli("ae", "add", "KIBACKUP", "--host", "127.0.0.1", "--port", str(down.getsockname()[1]))
        archive.cli("route", "add", "key-images-backup", "--if", "Modality=KO", "--if", "PatientID=BN-KEY-ROUTE",
                    "--to-ae", "KIBACKUP")
        sent = send_study(archive, tmp_path / "in", patient_id="BN-KEY-ROUTE")
        first = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}])["document"]
        (held,) = route_jobs(archive, first)
        assert held["state"] == "pending" and not held["attempts"]
        assert (held["next_attempt_at"] - held["created_at"]).total_seconds() > VIEWER_SAVE_HOLD_SECONDS / 2
        second = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": sent.slices[1]}])
        assert second["removed"] == [first]
        wait_until(lambda: all(j["state"] not in ("pending", "sending") for j in route_jobs(archive, first)),
                   timeout=30)
        assert [j["state"] for j in route_jobs(archive, first)] == ["cancelled"]
        (job,) = route_jobs(archive, second["document"])
        assert job["state"] == "pending" and not job["attempts"]
        archive.cli("route", "retry", "--job", str(job["pk"]))
        assert wait_until(lambda: any(j["attempts"] or j["last_error"]
                                      for j in route_jobs(archive, second["document"])), timeout=30)
        assert "dead" not in json.loads(archive.cli("route", "list", "--json").stdout)["counts"]
    finally:
        archive.cli("route", "remove", "key-images-backup", "--force", check=False)
        down.close()
