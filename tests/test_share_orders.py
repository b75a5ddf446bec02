"""Share links made for an order before its images (pacs.share_orders,
pacs.shares.create_for_order, POST /api/orders/{accession}/shares,
`pacs share create --accession`).

In Vietnamese hospitals the receipt with the QR code is printed when the
patient registers and pays, before the scan: the HIS knows the order
(its accession), not a Study Instance UID. The link's page says the images
are not ready yet, then shows the study reconciliation links to the order
(DCMTK storescu sends it with the order's accession), every study of the
order when there are several, and never a study of another order or one
that only carries the same accession. Against a real `pacs serve`: the
order comes over MLLP (HL7 ORM^O01), the images over DICOM (DCMTK), the
patient's page in headless Chromium; SQLite + filesystem and PostgreSQL +
SeaweedFS (S3).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer, shared_backend
from .dicomfiles import image_dataset
from .test_share_links import (
    FINDINGS,
    IMPRESSION,
    _wait_for_images,
    answer_birth_year,
    decode_svg,
    jpeg_size,
    path_of,
    patient,
    phone_page,
    second_frame,
    trail,
)
from .test_worklist_ris import msa, send

NAME = "Nguyễn^Thị Thu Hà"
SHOWN_NAME = "Nguyễn Thị Thu Hà"
BIRTH_DATE = "19820314"
BIRTH_YEAR = "1982"
REFERRING = "Đỗ^Thanh Tùng"
OTHER_REFERRING = "Phạm^Minh Châu"
PROCEDURE = "CT ngực không cản quang"
NOT_READY_VI = "Hình ảnh của bạn chưa sẵn sàng"
NOT_READY_EN = "Your images are not ready yet"


# -- the archive ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A running archive (no study yet) and a token per role."""
    tmp = tmp_path_factory.mktemp(f"share-orders-{request.param}")
    with shared_backend(request.param, request, "share-orders") as backend:
        server = PacsServer(tmp / "data", backend)
        server.start()
        server.work = tmp  # type: ignore[attr-defined]
        server.tokens = {  # type: ignore[attr-defined]
            "radiologist": server.make_token("bs.an", "radiologist", "BS. Trần Văn An"),
            "his": server.make_token("his", "his", "HIS"),
            "referring": server.make_token("bs.tung", "referring", REFERRING),
            "other-referring": server.make_token("bs.chau", "referring", OTHER_REFERRING),
            "emr": server.make_token("emr", "emr", "EMR"),
            "modality": server.make_token("ct1", "modality", "CT1"),
        }
        yield server
        server.stop()


def token_of(server: PacsServer, role: str) -> str:
    return server.tokens[role]  # type: ignore[no-any-return,attr-defined]


def new_accession(prefix: str) -> str:
    """A fresh accession number (16 characters at most: SH)."""
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


def new_patient_id() -> str:
    return f"0790{uuid.uuid4().int % 10**8:08d}"


def place_order(server: PacsServer, accession: str, patient_id: str, *, name: str = NAME,
                birth_date: str = BIRTH_DATE, referring: str = REFERRING, control: str = "NW") -> None:
    """The HIS places an order over MLLP (ORM^O01 NW; *control* CA cancels
    it): the patient's citizen ID (CCCD), the referring physician in PV1-8,
    a CT scheduled for 21/11/2024 09:00."""
    family, given = referring.split("^")
    message_id = f"{control}{accession}"
    message = "\n".join([
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ORM^O01|{message_id}|P|2.5|||||VN|UNICODE UTF-8",
        f"PID|1||{patient_id}^^^CCCD^NI||{name}||{birth_date}|F",
        f"PV1|1|O||||||BS001^{family}^{given}",
        f"ORC|{control}|P{accession}|F{accession}||{'SC' if control == 'NW' else control}",
        f"OBR|1|P{accession}|F{accession}|CT-NGUC^{PROCEDURE}^L|||20241121090000|||||||||||{accession}|"
        f"RP{accession}|SPS{accession}||||CT|||^^^20241121090000^^R",
    ])
    assert msa(send(server, message)) == ("AA", message_id)


def cancel_order(server: PacsServer, accession: str, patient_id: str) -> None:
    """The HIS cancels the order over MLLP: ORM^O01 CA."""
    place_order(server, accession, patient_id, control="CA")


def order_of(server: PacsServer, accession: str) -> dict[str, Any]:
    with server.http() as http:
        answer = http.get(f"/api/orders/{accession}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def order_patient(server: PacsServer, accession: str) -> str:
    """The order's patient as audit events name it (ID^^^issuer)."""
    order = order_of(server, accession)
    return f"{order['patient_id']}^^^{order['issuer']}" if order["issuer"] else order["patient_id"]


def send_study(server: PacsServer, *, accession: str, patient_id: str, name: str = NAME, slices: int = 2,
               study_date: str = "20241121", description: str = PROCEDURE, study_uid: str = "") -> dict[str, Any]:
    """A CT study of *slices* images sent by DCMTK storescu, as the modality
    does after the exam (under *study_uid*, else a new one); its UIDs."""
    folder = server.work / f"study-{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    folder.mkdir()
    study, series = study_uid or generate_uid(), generate_uid()
    sops = []
    for n in range(1, slices + 1):
        ds = image_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, PatientName=name, PatientID=patient_id,
                           AccessionNumber=accession, SpecificCharacterSet="ISO_IR 192", StudyDate=study_date,
                           StudyTime="091500", StudyDescription=description, SeriesDescription="Trục ngang",
                           SeriesNumber=1, InstanceNumber=n, Rows=48, Columns=40)
        ds.PixelData = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * n).tobytes()
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
    sent = server.storescu("+sd", str(folder), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stderr
    return {"study": study, "series": series, "sops": sops}


def make_order_link(server: PacsServer, accession: str, role: str = "his", days: int | None = 7) -> dict[str, Any]:
    with server.http(token=token_of(server, role)) as http:
        answer = http.post(f"/api/orders/{accession}/shares", json={"days": days} if days else None)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def opened(phone: httpx.Client, base: str) -> dict[str, Any]:
    """The link's page data, the birth year answered."""
    shown = phone.get(f"{base}/study")
    if shown.status_code == 403:
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 204
        shown = phone.get(f"{base}/study")
    assert shown.status_code == 200, shown.text
    return shown.json()  # type: ignore[no-any-return]


def sign_report(server: PacsServer, study: str) -> None:
    with server.http(token=token_of(server, "radiologist")) as rad:
        assert rad.put(f"/api/studies/{study}/report", json={"findings": FINDINGS, "impression": IMPRESSION}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200


def match(server: PacsServer, study: str, accession: str) -> None:
    """An administrator links a study to an order by hand."""
    with server.http() as admin:
        answer = admin.post(f"/api/studies/{study}/match", json={"accession_number": accession})
    assert answer.status_code == 200, answer.text


# -- the tests --------------------------------------------------------------------------
def test_a_link_made_before_the_scan_shows_its_order_studies_and_no_other(archive: PacsServer) -> None:
    acc, pid = new_accession("SO"), new_patient_id()
    place_order(archive, acc, pid)
    order = order_of(archive, acc)
    subject = order_patient(archive, acc)
    link = make_order_link(archive, acc)
    assert set(link) == {"id", "accession", "study_uid", "url", "expires_at", "qr_svg"}
    assert (link["accession"], link["study_uid"]) == (acc, order["study_uid"])
    assert decode_svg(link["qr_svg"]) == [link["url"]]
    base = path_of(link)

    # Another order of another patient, and its study: never reachable through this link.
    other_acc, other_pid = new_accession("SX"), new_patient_id()
    place_order(archive, other_acc, other_pid, name="Lê^Văn Bình", birth_date="19700101")
    other = send_study(archive, accession=other_acc, patient_id=other_pid, name="Lê^Văn Bình")

    with patient(archive) as phone:
        assert phone.get(base).status_code == 200
        # The birth year of the order's patient first.
        asked = phone.get(f"{base}/study")
        assert asked.status_code == 403 and asked.json()["birth_year_required"], asked.text
        assert answer_birth_year(phone, base, "1970").json()["tries_left"] == 4  # the other patient's: wrong
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 204

        # Before the images: not ready, the order's date and procedure, nothing else.
        waiting = opened(phone, base)
        assert waiting["kind"] == "order" and waiting["ready"] is False and waiting["studies"] == []
        assert waiting["patient_name"] == NAME
        assert waiting["order"] == {"accession": acc, "date": "20241121", "time": "090000", "procedure": PROCEDURE,
                                    "modalities": "CT", "status": "SCHEDULED"}
        for route in (f"/series/{other['series']}/thumbnail",
                      f"/series/{other['series']}/instances/{other['sops'][0]}/frames/1", "/report.pdf",
                      f"/studies/{other['study']}/report.pdf"):
            assert phone.get(base + route).status_code == 404, route

        # The modality sends the study with the order's accession (DCMTK): the page shows it.
        mine = send_study(archive, accession=acc, patient_id=pid)
        shown = opened(phone, base)
        assert shown["ready"] is True and len(shown["studies"]) == 1
        study = shown["studies"][0]
        assert (study["study_uid"], study["patient_name"], study["study_date"], study["description"],
                study["modalities"]) == (mine["study"], NAME, "20241121", PROCEDURE, "CT")
        assert [s["series_uid"] for s in study["series"]] == [mine["series"]]
        assert [i["sop_uid"] for i in study["series"][0]["images"]] == mine["sops"]
        assert study["report"] == {"status": "none"}
        assert jpeg_size(phone.get(f"{base}/series/{mine['series']}/thumbnail").content)
        for sop in mine["sops"]:
            frame = phone.get(f"{base}/series/{mine['series']}/instances/{sop}/frames/1")
            assert frame.headers["content-type"] == "image/jpeg" and jpeg_size(frame.content) == (40, 48)
        # The other order's study stays out of reach, also named together with this one's series.
        for route in (f"/series/{other['series']}/thumbnail",
                      f"/series/{other['series']}/instances/{other['sops'][0]}/frames/1",
                      f"/series/{mine['series']}/instances/{other['sops'][0]}/frames/1",
                      f"/studies/{other['study']}/report.pdf"):
            assert phone.get(base + route).status_code == 404, route
        assert phone.get(f"/api/studies/{mine['study']}").status_code == 401

        # Signed: the report, its PDF by the study's route and by the link's own.
        assert phone.get(f"{base}/studies/{mine['study']}/report.pdf").status_code == 404
        sign_report(archive, mine["study"])
        assert opened(phone, base)["studies"][0]["report"]["impression"] == IMPRESSION
        for route in (f"/studies/{mine['study']}/report.pdf", "/report.pdf"):
            pdf = phone.get(base + route)
            assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF"), route

        # A study that only carries the accession (an old PACS's: another patient, years before)
        # is not linked to the order by reconciliation: not shown.
        stray = send_study(archive, accession=acc, patient_id="OLD-PACS-9", name="Trần^Văn Cũ",
                           study_date="20190105")
        assert [s["study_uid"] for s in opened(phone, base)["studies"]] == [mine["study"]]
        assert phone.get(f"{base}/series/{stray['series']}/thumbnail").status_code == 404

        # A second study of the order (matched by hand): both are shown, each with its images and report.
        match(archive, stray["study"], acc)
        both = opened(phone, base)
        assert {s["study_uid"] for s in both["studies"]} == {mine["study"], stray["study"]}
        assert [s["study_uid"] for s in both["studies"]][0] == stray["study"]  # the older exam first
        assert jpeg_size(phone.get(f"{base}/series/{stray['series']}/thumbnail").content)
        assert phone.get(f"{base}/report.pdf").status_code == 404  # which study's? named by the study route
        assert phone.get(f"{base}/studies/{mine['study']}/report.pdf").status_code == 200
        # Matched away to the other order, it leaves this link at once.
        match(archive, stray["study"], other_acc)
        assert [s["study_uid"] for s in opened(phone, base)["studies"]] == [mine["study"]]
        assert phone.get(f"{base}/series/{stray['series']}/thumbnail").status_code == 404

    # Listed with its order, by the order and by the study it shows; never a token.
    with archive.http(token=token_of(archive, "his")) as his:
        of_order = his.get(f"/api/orders/{acc}/shares").json()["items"]
        of_study = his.get(f"/api/studies/{mine['study']}/shares").json()["items"]
        assert his.get(f"/api/studies/{other['study']}/shares").json()["items"] == []
    assert [(i["id"], i["kind"], i["accession"], i["study_uid"], i["order_status"]) for i in of_order] == [
        (link["id"], "order", acc, "", "SCHEDULED")]
    assert link["id"] in [i["id"] for i in of_study]
    assert of_order[0]["uses"] >= 6 and of_order[0]["state"] == "active"

    # Audited as share:<id>: the order's study UID and patient before the images, the study shown after.
    events = trail(archive, user=f"share:{link['id']}")
    assert all(e["role"] == "share" and e["client"] == "127.0.0.1" for e in events)
    assert all(e["patient_id"] == subject for e in events), {e["patient_id"] for e in events}
    views = [e for e in events if e["action"] == "view" and e["outcome"] == "success" and "study" in e["detail"]]
    assert any(e["study_uid"] == order["study_uid"] and "not ready" in e["detail"] for e in views)
    assert {e["study_uid"] for e in views} >= {mine["study"], stray["study"]}
    retrieved = [e for e in events if e["action"] == "retrieve" and e["outcome"] == "success"]
    assert retrieved and {e["study_uid"] for e in retrieved} <= {mine["study"], stray["study"]}
    assert all(e["outcome"] != "success" for e in events if other["series"] in e["detail"])
    made = [e for e in trail(archive, action="share-create") if e["detail"].startswith(f"share link {link['id']} ")]
    assert [(e["user"], e["study_uid"], e["patient_id"]) for e in made] == [("his", order["study_uid"], subject)]


def test_the_page_before_and_after_the_images_on_a_phone(archive: PacsServer) -> None:
    """Headless Chromium at a phone's size: the birth year, "not ready yet"
    in Vietnamese and English with the order's date and procedure; the
    study once sent (thumbnail and frame loaded); two studies of the order."""
    from playwright.sync_api import expect

    acc, pid = new_accession("SP"), new_patient_id()
    place_order(archive, acc, pid)
    link = make_order_link(archive, acc)
    base = path_of(link)
    with phone_page() as (page, problems):
        page.goto(link["url"])
        page.fill("#birth-year", BIRTH_YEAR)
        page.click("#birth-submit")
        expect(page.locator("#not-ready-title")).to_have_text(NOT_READY_VI)
        expect(page.locator("#patient-name")).to_have_text(SHOWN_NAME)
        expect(page.locator("#order-date")).to_have_text("21/11/2024 09:00")
        expect(page.locator("#order-procedure")).to_have_text(PROCEDURE)
        expect(page.locator("img.share-thumb")).to_have_count(0)
        page.click("#lang-toggle")
        expect(page.locator("#not-ready-title")).to_have_text(NOT_READY_EN)
        expect(page.locator("#order-date")).to_have_text("2024-11-21 09:00")
        page.click("#lang-toggle")
        expect(page.locator("#not-ready-title")).to_have_text(NOT_READY_VI)

        mine = send_study(archive, accession=acc, patient_id=pid)
        page.click("#check-again")
        expect(page.locator("#patient-name")).to_have_text(SHOWN_NAME)
        expect(page.locator("#study-date")).to_have_text("21/11/2024")
        expect(page.locator("#not-ready")).to_have_count(0)
        expect(page.locator("#no-report")).to_be_visible()
        expect(page.locator("img.share-thumb")).to_have_count(1)
        _wait_for_images(page, "img.share-thumb")
        assert second_frame(page, mine["series"], 2) == (
            f"{base}/series/{mine['series']}/instances/{mine['sops'][1]}/frames/1")
        page.click("#viewer-close")

        # Signed, then a second study on the order: each in its own section, every thumbnail loaded.
        sign_report(archive, mine["study"])
        page.reload()
        expect(page.locator("#report-pdf")).to_have_attribute(
            "href", f"{base}/studies/{mine['study']}/report.pdf")
        second = send_study(archive, accession="", patient_id=pid, study_date="20241122",
                            description="CT ngực có cản quang")
        match(archive, second["study"], acc)
        page.reload()
        expect(page.locator("section.share-study")).to_have_count(2)
        expect(page.locator("#order-studies")).to_have_text("Chỉ định này có 2 ca chụp, hiển thị bên dưới.")
        expect(page.locator("#study-description-2")).to_have_text("CT ngực có cản quang")
        expect(page.locator("img.share-thumb")).to_have_count(2)
        _wait_for_images(page, "img.share-thumb")
        expect(page.locator("#report-impression-1")).to_have_text(IMPRESSION)
        assert not problems, problems


def test_a_cancelled_order_says_so(archive: PacsServer) -> None:
    acc, pid = new_accession("SC"), new_patient_id()
    place_order(archive, acc, pid)
    link = make_order_link(archive, acc)
    base = path_of(link)
    with patient(archive) as phone:
        assert opened(phone, base)["ready"] is False
        cancel_order(archive, acc, pid)
        assert order_of(archive, acc)["status"] == "CANCELLED"
        page = phone.get(base)
        assert page.status_code == 410 and page.headers["content-type"].startswith("text/html")
        assert "Ca chụp đã bị hủy" in page.text and "The examination was cancelled" in page.text
        data = phone.get(f"{base}/study")
        assert data.status_code == 410 and "cancelled" in data.json()["error"]
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 410
    with archive.http(token=token_of(archive, "his")) as his:
        refused = his.post(f"/api/orders/{acc}/shares", json={"days": 3})
        assert refused.status_code == 409 and "cancelled" in refused.json()["error"], refused.text
        listed = his.get(f"/api/orders/{acc}/shares").json()["items"]
    assert [(i["id"], i["order_status"]) for i in listed] == [(link["id"], "CANCELLED")]
    by_cli = json.loads(archive.cli("share", "list", "--accession", acc, "--json").stdout)
    assert [(i["id"], i["state"], i["order_status"]) for i in by_cli] == [(link["id"], "active", "CANCELLED")]
    gone = [e for e in trail(archive, user=f"share:{link['id']}") if e["outcome"] == "failure"]
    assert gone and all("cancelled" in e["detail"] and e["detail"].endswith("-> 410") for e in gone)


def test_lock_expiry_and_revocation_work_the_same(archive: PacsServer) -> None:
    from pacs import shares

    acc, pid = new_accession("SL"), new_patient_id()
    place_order(archive, acc, pid)
    link = make_order_link(archive, acc)
    base = path_of(link)
    with patient(archive) as phone:
        assert [answer_birth_year(phone, base, y).status_code for y in ("1990", "1991", "1992", "1993")] == [403] * 4
        assert answer_birth_year(phone, base, "1994").status_code == 429
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 429  # locked: not judged
    lockouts = [e for e in trail(archive, action="share-lockout") if e["user"] == f"share:{link['id']}"]
    assert [(e["study_uid"], e["patient_id"]) for e in lockouts] == [
        (order_of(archive, acc)["study_uid"], order_patient(archive, acc))]

    core = archive.core()
    try:
        expired = shares.create_for_order(core.engine, acc, "test", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    finally:
        core.close()
    second = make_order_link(archive, acc)
    with patient(archive) as phone:
        page = phone.get(expired.path)
        assert page.status_code == 410 and "Liên kết đã hết hạn" in page.text
        assert opened(phone, path_of(second))["ready"] is False
        with archive.http(token=token_of(archive, "his")) as his:
            revoked = his.delete(f"/api/shares/{second['id']}")
        assert revoked.status_code == 200 and revoked.json()["kind"] == "order"
        page = phone.get(path_of(second))
        assert page.status_code == 410 and "Liên kết đã bị thu hồi" in page.text
        assert phone.get(f"{path_of(second)}/study").status_code == 410


def test_who_may_make_list_and_revoke_order_links(archive: PacsServer) -> None:
    acc, pid = new_accession("SR"), new_patient_id()
    place_order(archive, acc, pid)  # referred by REFERRING
    assert order_of(archive, acc)["referring_physician"] == REFERRING
    # An order of the JSON API that names no referring physician.
    plain = new_accession("SJ")
    with archive.http(token=token_of(archive, "his")) as his:
        placed = his.post("/api/orders", json={"patient": {"id": new_patient_id(), "issuer": "CCCD", "name": NAME},
                                               "accession_number": plain, "modality": "CT"})
        assert placed.status_code == 201, placed.text

    with archive.http(token="none") as anonymous:
        anonymous.headers.pop("Authorization", None)
        assert anonymous.post(f"/api/orders/{acc}/shares", json={"days": 3}).status_code == 401
        assert anonymous.get(f"/api/orders/{acc}/shares").status_code == 401
    for role in ("emr", "modality"):
        with archive.http(token=token_of(archive, role)) as http:
            assert http.post(f"/api/orders/{acc}/shares", json={"days": 3}).status_code == 403, role
            assert http.get(f"/api/orders/{acc}/shares").status_code == 403, role
    for role in ("radiologist", "his", "referring"):
        make_order_link(archive, acc, role)
    with archive.http() as admin:
        assert admin.post(f"/api/orders/{acc}/shares").status_code == 201  # no body: share_days
        assert admin.post(f"/api/orders/{acc}/shares", json={"days": 366}).status_code == 400
        assert admin.post(f"/api/orders/{acc}/shares", json={"days": 0}).status_code == 400
        missing = admin.post("/api/orders/NO-SUCH-ORDER/shares", json={"days": 3})
        assert missing.status_code == 404 and "no order NO-SUCH-ORDER" in missing.json()["error"]
        assert admin.get("/api/orders/NO-SUCH-ORDER/shares").status_code == 404
    # A referring physician: the orders that name them only; an unknown one is refused alike (403).
    with archive.http(token=token_of(archive, "other-referring")) as other:
        assert other.post(f"/api/orders/{acc}/shares", json={"days": 3}).status_code == 403
        assert other.get(f"/api/orders/{acc}/shares").status_code == 403
        assert other.post("/api/orders/NO-SUCH-ORDER/shares", json={"days": 3}).status_code == 403
    with archive.http(token=token_of(archive, "referring")) as referring:
        assert referring.post(f"/api/orders/{plain}/shares", json={"days": 3}).status_code == 403
        assert len(referring.get(f"/api/orders/{acc}/shares").json()["items"]) == 4
    by_his = make_order_link(archive, acc, "his")
    with archive.http(token=token_of(archive, "other-referring")) as other:
        assert other.delete(f"/api/shares/{by_his['id']}").status_code == 403
    with patient(archive) as phone:
        assert opened(phone, path_of(by_his))["kind"] == "order"  # still open
    with archive.http(token=token_of(archive, "referring")) as referring:
        assert referring.delete(f"/api/shares/{by_his['id']}").status_code == 200
    denied = [e for e in trail(archive, action="share-create") if e["outcome"] == "denied"]
    assert {e["user"] for e in denied} >= {"emr", "ct1", "bs.chau"}
    refused = [e for e in denied if e["user"] == "bs.chau" and acc in e["detail"]]
    assert refused and all("not the referring physician" in e["detail"] for e in refused)
    assert all(e["study_uid"] == order_of(archive, acc)["study_uid"] for e in refused)


def test_one_accession_one_order(archive: PacsServer) -> None:
    """The model names an order by its accession alone, whatever the
    patient's issuer: the HIS cannot place a second order under it. Rows
    that would make it name two orders anyway (an index edited by hand)
    are refused with 409, never guessed at."""
    acc, pid = new_accession("SA"), new_patient_id()
    place_order(archive, acc, pid)
    with archive.http(token=token_of(archive, "his")) as his:
        again = his.post("/api/orders", json={"patient": {"id": pid, "issuer": "BVDK", "name": "Lê^Thị Khác"},
                                              "accession_number": acc, "modality": "CT"})
        assert again.status_code == 409 and "already exists" in again.text
    link = make_order_link(archive, acc)
    other_acc, other_pid = new_accession("SB"), new_patient_id()
    place_order(archive, other_acc, other_pid, name="Lê^Thị Khác", birth_date="19600101")

    # A second order under the accession, of the other patient: a row written straight into the index.
    core = archive.core()
    try:
        from sqlalchemy import select

        from pacs.index.db import write_transaction
        from pacs.index.models import Order

        orders = Order.__table__
        # BEGIN IMMEDIATE on SQLite: a read then a write beside the running server
        # was refused at once ('database is locked') when the server wrote in between.
        with write_transaction(core.engine) as conn:
            row = dict(conn.execute(select(orders).where(orders.c.accession_number == acc)).one()._mapping)
            other = conn.execute(select(orders.c.patient_pk).where(orders.c.accession_number == other_acc)).scalar()
            foreign_uid = generate_uid()
            del row["pk"]
            conn.execute(orders.insert().values(**{**row, "step_id": "OTHER", "study_uid": foreign_uid,
                                                   "requested_procedure_id": "RP-OTHER", "patient_pk": other}))
    finally:
        core.close()
    with archive.http(token=token_of(archive, "his")) as his:
        refused = his.post(f"/api/orders/{acc}/shares", json={"days": 3})
    assert refused.status_code == 409, refused.text
    assert f"accession number {acc} is held by 2 orders" in refused.json()["error"]
    cli = archive.cli("share", "create", "--accession", acc, check=False)
    assert cli.returncode == 1 and "held by 2 orders" in cli.stderr
    # The link made before stays the first order's: its patient's birth year, never the other order's study.
    # Its study comes under the Study Instance UID of that row: reconciliation links it to that row.
    foreign = send_study(archive, accession=acc, patient_id=other_pid, name="Lê^Thị Khác", study_uid=foreign_uid)
    with patient(archive) as phone:
        shown = opened(phone, path_of(link))
        assert (shown["patient_name"], shown["studies"]) == (NAME, [])
        assert phone.get(f"{path_of(link)}/series/{foreign['series']}/thumbnail").status_code == 404


def test_the_cli_makes_lists_and_revokes_order_links(archive: PacsServer) -> None:
    acc, pid = new_accession("SQ"), new_patient_id()
    place_order(archive, acc, pid)
    order = order_of(archive, acc)
    made = json.loads(archive.cli("share", "create", "--accession", acc, "--days", "5", "--json").stdout)
    assert (made["accession"], made["study_uid"], made["absolute"]) == (acc, order["study_uid"], False)
    plain = archive.cli("share", "create", "--accession", f" {acc}\n")  # pasted with spaces
    assert plain.stdout.startswith("/share/") and "public_url" in plain.stderr
    assert archive.cli("share", "create", "--accession", "NO-SUCH-ORDER", check=False).returncode == 1
    assert archive.cli("share", "create", check=False).returncode == 2
    both = archive.cli("share", "create", order["study_uid"], "--accession", acc, check=False)
    assert both.returncode == 2 and "one of them" in both.stderr

    listed = json.loads(archive.cli("share", "list", "--accession", acc, "--json").stdout)
    assert [item["accession"] for item in listed] == [acc, acc]
    assert made["id"] in [item["id"] for item in listed]
    assert acc in [item["accession"] for item in json.loads(archive.cli("share", "list", "--json").stdout)]

    with patient(archive) as phone:
        assert opened(phone, made["path"])["ready"] is False
        mine = send_study(archive, accession=acc, patient_id=pid, slices=1)
        assert [s["study_uid"] for s in opened(phone, made["path"])["studies"]] == [mine["study"]]
        by_study = json.loads(archive.cli("share", "list", "--study", mine["study"], "--json").stdout)
        assert made["id"] in [item["id"] for item in by_study]
        assert "revoked" in archive.cli("share", "revoke", str(made["id"])).stdout
        assert phone.get(made["path"]).status_code == 410

    cli_events = [e for e in trail(archive) if e["protocol"] == "cli" and e["action"].startswith("share-")
                  and (acc in e["detail"] or f"share link {made['id']} " in e["detail"])]
    assert {(e["action"], e["outcome"]) for e in cli_events} >= {("share-create", "success"),
                                                                 ("share-revoke", "success")}
    subject = order_patient(archive, acc)
    assert all(e["study_uid"] == order["study_uid"] and e["patient_id"] == subject
               for e in cli_events if e["outcome"] == "success")


def test_a_link_names_a_study_or_an_order(archive: PacsServer) -> None:
    """A link names a study or an order, never both nor neither (the CHECK of migration 0028)."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import IntegrityError

    from pacs.index.models import Order, ShareLink, Study

    acc, pid = new_accession("SK"), new_patient_id()
    place_order(archive, acc, pid)
    send_study(archive, accession=acc, patient_id=pid, slices=1)
    core = archive.core()
    try:
        table = ShareLink.__table__
        now = datetime.now(UTC)
        with core.engine.connect() as conn:
            study_pk = conn.execute(select(func.max(Study.__table__.c.pk))).scalar()
            order_pk = conn.execute(select(func.max(Order.__table__.c.pk))).scalar()
        for target in ({}, {"study_pk": study_pk, "order_pk": order_pk}):
            with pytest.raises(IntegrityError):
                with core.engine.begin() as conn:
                    conn.execute(table.insert().values(
                        token_hash=uuid.uuid4().hex * 2, created_by="test", created_at=now, expires_at=now,
                        revoked_by="", uses=0, failed_answers=0, lockouts=0, cookie_key="0" * 64, **target))
    finally:
        core.close()
