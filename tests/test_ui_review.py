"""Web viewer review findings, against a running `pacs serve` and, for the
screens, a real browser (Debian's Chromium through Playwright): the priors
panel lists the study's patient's studies only (not another issuer's patient
with the same Patient ID) and keeps the referring physician's access rule;
roles that read signed reports only see "signed" while an amendment is in
progress; switching series blanks the previous series' image (slow or failed
render); a fast scroll cancels the slices it passed; an EMR link by an
accession number holding "/" opens its study; a document's PDF link takes a
mouse click; logout forgets the worklist search and the place in each study."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from viewer_api.multipart import build_multipart_related

from .dicomfiles import image_dataset
from .peers import PacsServer, wait_until
from .test_web_viewer import _log_in, page, radiologist_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
REFERRING = "Lê^Thị Lan"
SHARED_ID = "001079918801"


def _instance(study: str, series: str, number: int, *,
              patient: tuple[str, str, str] = ("Nguyễn^Văn An", SHARED_ID, "BV_CHO_RAY"), series_number: int = 1, date: str = "20240301", accession: str = "", referring: str = "") -> Dataset:
    """A small CT slice (32x32) of *series* in *study*."""
    name, patient_id, issuer = patient
    return image_dataset(CT, SpecificCharacterSet="ISO_IR 192", StudyInstanceUID=study, SeriesInstanceUID=series,
                         PatientName=name, PatientID=patient_id, IssuerOfPatientID=issuer, StudyDate=date,
                         StudyTime="080000", SeriesNumber=series_number, InstanceNumber=number,
                         SeriesDescription=f"Series {series_number}", AccessionNumber=accession,
                         ReferringPhysicianName=referring, Rows=32, Columns=32, BitsStored=12, HighBit=11,
                         RescaleSlope=1, RescaleIntercept=-1024,
                         PixelData=np.full((32, 32), 1024 + 10 * number, np.uint16).tobytes())


def _pdf(study: str) -> Dataset:
    ds = _instance(study, generate_uid(), 1, patient=("Tài^Liệu", "DOC-1", ""))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ENCAPSULATED_PDF
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PixelData"):
        delattr(ds, keyword)
    ds.Modality, ds.BurnedInAnnotation, ds.DocumentTitle = "DOC", "NO", "Phiếu chỉ định"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    return ds


def _stow(server: PacsServer, datasets: list[Dataset]) -> None:
    parts = []
    for ds in datasets:
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        parts.append(("application/dicom", out.getvalue()))
    body, content_type = build_multipart_related(parts)
    with server.http() as http:
        response = http.post("/dicom-web/studies", content=body,
                             headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server for the module (the `page` fixture asks for this name): no
    sample studies, each test stows its own."""
    with radiologist_server(tmp_path_factory.mktemp("ui-review")) as server:
        yield server


def _shown(page: Any, sop: str = "") -> None:
    page.wait_for_function(
        "sop => { const i = document.querySelector('#viewer-image');"
        " return i && !i.hidden && i.complete && i.naturalWidth > 0 && i.src.includes(sop); }", arg=sop)


def _events(page: Any) -> bool:
    """Let Playwright deliver the page's events (routes, failed requests): a
    sync client hears them only inside its own calls."""
    page.evaluate("0")
    return True


# -- 1. priors: the study's patient, with the list's access rule ------------------------------------
def test_priors_are_the_patients_own_studies(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    own, prior, later = generate_uid(), generate_uid(), generate_uid()
    other = generate_uid()  # another hospital's patient with the same Patient ID
    _stow(viewer_server, [
        _instance(own, generate_uid(), 1, date="20240301", referring=REFERRING),
        _instance(prior, generate_uid(), 1, date="20230301", referring="Khác^Bác Sĩ"),
        _instance(later, generate_uid(), 1, date="20240401", referring=REFERRING),
        _instance(other, generate_uid(), 1, patient=("Phan^Văn Khác", SHARED_ID, "BV_TINH_KHAC"), date="20240201",
                  referring=REFERRING),
    ])
    with viewer_server.http() as http:
        same_id = http.get("/api/worklist", params={"patient_id": SHARED_ID}).json()["items"]
        assert {i["study_uid"] for i in same_id} >= {own, prior, later, other}  # one Patient ID, two persons
        found = http.get(f"/api/studies/{own}/priors")
        assert found.status_code == 200, found.text
        assert [i["study_uid"] for i in found.json()["items"]] == [later, prior]
        assert http.get(f"/api/studies/{generate_uid()}/priors").status_code == 404

    # A referring physician: only the studies they referred, and none of a study not theirs.
    ref = viewer_server.make_token("ref.lan", "referring", REFERRING)
    with viewer_server.http(token=ref) as http:
        assert [i["study_uid"] for i in http.get(f"/api/studies/{own}/priors").json()["items"]] == [later]
        assert http.get(f"/api/studies/{prior}/priors").status_code == 403

    page.goto(f"/#/study/{own}")
    _log_in(page)
    expect(page.locator("#patient-name")).to_have_text("Nguyễn Văn An")
    links = page.locator('[data-testid="prior-study"]')
    expect(links).to_have_count(2)
    hrefs = {links.nth(i).get_attribute("href") for i in range(2)}
    assert hrefs == {f"#/study/{later}", f"#/study/{prior}"}, hrefs
    assert not page.errors, page.errors


# -- 2. signed-only roles during an amendment ----------------------------------------------------------
def test_signed_only_roles_see_signed_while_an_amendment_is_drafted(viewer_server: PacsServer) -> None:
    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Bệnh^Nhân 47", "BN-47", ""))])
    rad = viewer_server.make_token("bs.ky", "radiologist", "BS. Ký")
    with viewer_server.http(token=rad) as http:
        base = f"/api/studies/{study}/report"
        assert http.put(base, json={"findings": "Bình thường.", "impression": "Bình thường."}).status_code == 200
        assert http.post(f"{base}/sign").status_code == 200
        assert http.post(f"{base}/amend").status_code in (200, 201)
        mine = http.get("/api/worklist", params={"patient_id": "BN-47"}).json()["items"]
        assert [i["report_status"] for i in mine] == ["draft"]  # the radiologist sees the amendment

    emr = viewer_server.make_token("emr", "emr", "EMR")
    with viewer_server.http(token=emr) as http:
        assert http.get(f"/api/studies/{study}/report").json()["status"] == "signed"
        listed = http.get("/api/worklist", params={"patient_id": "BN-47"}).json()["items"]
        assert [i["report_status"] for i in listed] == ["signed"]
        signed = http.get("/api/worklist", params={"patient_id": "BN-47", "status": "signed"}).json()["items"]
        assert [i["study_uid"] for i in signed] == [study]
        assert http.get("/api/worklist", params={"patient_id": "BN-47", "status": "draft"}).json()["items"] == []


# -- 3. switching series: no previous image under the new label ------------------------------------------
def test_switching_series_blanks_the_previous_image(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    study, first, second = generate_uid(), generate_uid(), generate_uid()
    patient = ("Đổi^Loạt Ảnh", "SWITCH-1", "")
    one, two = (_instance(study, uid, 1, patient=patient, series_number=n) for n, uid in ((1, first), (2, second)))
    one.WindowCenter, one.WindowWidth = 40, 400
    two.WindowCenter, two.WindowWidth = 300, 1500
    _stow(viewer_server, [one, two])
    held: list[Any] = []
    # The browser's network: series 2's renders wait (a slow link) until answered below.
    renders = re.compile(rf".*/series/{re.escape(second)}/instances/.*/rendered.*")
    page.route(renders, lambda route: held.append(route))
    page.goto(f"/#/study/{study}")
    _log_in(page)
    _shown(page, first)
    expect(page.locator("#wl-label")).to_have_text(re.compile(r"^C 40 / W 400 "))
    page.locator(f'[data-testid="series-thumb"][data-series-uid="{second}"]').click()
    expect(page.locator("#viewer-overlay")).to_contain_text("#2")
    assert wait_until(lambda: _events(page) and bool(held), timeout=20), "series 2's render was not asked for"
    expect(page.locator("#viewer-image")).to_be_hidden()  # not series 1's image under "#2"
    expect(page.locator("#wl-label")).not_to_contain_text("C 40 / W 400")  # series 1's window

    # The render fails: the message alone, not over the previous image.
    for route in held:
        route.fulfill(status=406, body='{"error": "cannot render"}', content_type="application/json")
    expect(page.locator("#viewer-error")).to_have_text("Không tải được ảnh")
    expect(page.locator("#viewer-image")).to_be_hidden()
    page.unroute(renders)
    page.locator(f'[data-testid="series-thumb"][data-series-uid="{first}"]').click()
    _shown(page, first)
    expect(page.locator("#viewer-error")).to_be_hidden()


# -- 6. a fast scroll cancels the renders of the slices it passed ---------------------------------------
def test_fast_scroll_cancels_the_slices_passed(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    study, series = generate_uid(), generate_uid()
    slices = [_instance(study, series, n, patient=("Cuộn^Nhanh", "SCROLL-1", ""), series_number=3) for n in range(1, 31)]
    _stow(viewer_server, slices)
    sops = [ds.SOPInstanceUID for ds in slices]
    held: list[Any] = []

    def hold(route: Any) -> None:
        # The first slice (and its preloads) arrive; then the link is "slow": nothing answers.
        if not any(s in route.request.url for s in sops[:5]):
            held.append(route)
        else:
            route.continue_()

    asked: list[str] = []
    failed: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.route(re.compile(r".*/rendered.*"), hold)
    page.goto(f"/#/study/{study}")
    _log_in(page)
    _shown(page, sops[0])
    page.hover("#viewport")
    for _ in range(29):
        page.mouse.wheel(0, 100)
    expect(page.locator("#slice-label")).to_have_attribute("data-index", "30")
    # Slices 10-27: neither the one stopped on, nor in its preload window (28, 29), nor
    # preloaded at a low priority around slices 1-5 on the way (those stay asked for).
    passed = sops[9:27]
    def pending() -> list[str]:
        # Asked for and neither answered (held) nor cancelled by the page.
        return [s for s in passed if any(s in url for url in asked) and not any(s in url for url in failed)]

    assert any(s in url for s in passed for url in asked), "the scroll asked for no slice it passed"
    assert wait_until(lambda: _events(page) and not pending(), timeout=20), \
        f"slices {[sops.index(s) + 1 for s in pending()]} scrolled past still asked for"
    for route in held:
        try:
            route.continue_()
        except Exception:  # noqa: BLE001 - cancelled by the page meanwhile
            pass
    page.unroute(re.compile(r".*/rendered.*"))
    _shown(page, sops[29])


# -- 4. an accession number with "/" ---------------------------------------------------------------------
def test_accession_link_with_a_slash_opens_its_study(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    study = generate_uid()
    twins = [generate_uid(), generate_uid()]
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Số^Phiếu", "ACC-1", ""), accession="CT/24/0001"),
                          *(_instance(uid, generate_uid(), 1, patient=("Hai^Ca", "ACC-2", ""), accession="CT/24/0002",
                                      date="20240115") for uid in twins)])
    with viewer_server.http() as http:
        link = http.get("/viewer/accession/CT%2F24%2F0001", follow_redirects=False)
        assert link.status_code == 302, link.text
        assert link.headers["location"] == "/#/accession/CT%2F24%2F0001"
    page.goto("/viewer/accession/CT%2F24%2F0001")
    _log_in(page)
    expect(page).to_have_url(re.compile(rf"#/study/{re.escape(study)}$"))
    expect(page.locator("#patient-name")).to_have_text("Số Phiếu")

    # Two studies under one accession: the choices show their dates as dates.
    page.goto("/viewer/accession/CT%2F24%2F0002")
    choices = page.locator("#accession-choices li")
    expect(choices).to_have_count(2)
    assert all("15/01/2024" in text and "20240115" not in text for text in choices.all_inner_texts()), \
        choices.all_inner_texts()
    assert not page.errors, page.errors


# -- 5. a document's link takes a mouse click -------------------------------------------------------------
def test_document_link_opens_with_a_mouse_click(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    ds = _pdf(generate_uid())
    _stow(viewer_server, [ds])
    page.goto(f"/#/study/{ds.StudyInstanceUID}")
    _log_in(page)
    link = page.locator(".document-link")
    expect(link).to_be_visible()
    box = link.bounding_box()
    # A real mouse click at the link's centre (not a synthetic click on the element).
    with page.context.expect_page(timeout=10_000) as opened:
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    document = opened.value
    assert ds.SOPInstanceUID in document.url and "contentType=application/pdf" in document.url, document.url
    document.close()


# -- logout forgets this tab's searches ------------------------------------------------------------------
def test_logout_forgets_the_search_and_the_places_in_studies(page: Any, viewer_server: PacsServer) -> None:
    from playwright.sync_api import expect

    study = generate_uid()
    _stow(viewer_server, [_instance(study, generate_uid(), 1, patient=("Hồ^Thị Cẩm", "LOGOUT-1", ""))])
    page.goto("/")
    _log_in(page)
    page.fill("#search-name", "Hồ Thị Cẩm")
    page.click("#search-button")
    row = page.locator(f'[data-testid="study-row"][data-study-uid="{study}"]')
    expect(row).to_be_visible()
    row.click()
    _shown(page)
    keys = page.evaluate("Object.keys(sessionStorage)")
    assert "pacs.worklist" in keys and f"pacs.view.{study}" in keys, keys  # what the fix must forget
    page.click("#logout-button")
    expect(page).to_have_url(re.compile(r"#/login$"))
    keys = page.evaluate("Object.keys(sessionStorage)")
    assert not [k for k in keys if k == "pacs.worklist" or k.startswith("pacs.view.")], keys
    _log_in(page)
    expect(page.locator("#search-name")).to_have_value("")
