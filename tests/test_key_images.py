"""Key images (ảnh chính): a radiologist marks images while reading
(GET/PUT /api/studies/{uid}/key-images, pacs.key_images); they are kept as
a Key Object Selection document in the study, which DCMTK reads (dsrdump)
and retrieves (findscu, getscu) as any KO series; a new selection replaces
the previous one through the audited deletion path; the patient's share
page shows them first and the signed report's PDF prints them.

A real `pacs serve` (SQLite + files, PostgreSQL + SeaweedFS S3), studies
sent with DCMTK storescu, the viewer and the share page in headless Chromium.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import PacsServer, shared_backend
from .dicomfiles import image_dataset
from .peers import ROOT, Backend, run_dcmtk
from .test_web_viewer import (
    Steps, assert_no_horizontal_scroll, browsing, sign_in,
)

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
PATIENT = "Trần^Thị Lan"
BIRTH = "19790214"
REFERRER = "Lê^Văn Hùng"
RADIOLOGIST = ("bs.an", "BS. Trần Văn An")
COLLEAGUE = ("bs.binh", "BS. Phạm Thanh Bình")
NOTE = "Khối giảm âm thùy phải gan, đường kính 23 mm; so sánh với phim cũ."
FINDINGS = "Khối giảm âm ở thùy phải gan, bờ đều, kích thước 23 × 14 mm."
IMPRESSION = "Theo dõi u máu gan; đề nghị siêu âm lại sau 3 tháng."


# -- the archive ----------------------------------------------------------------------------
@dataclass
class Sent:
    """A study sent with storescu: its CT slices (3) and ultrasound clip (3 frames)."""

    uid: str
    ct_series: str
    slices: list[str]
    us_series: str
    clip: str


def send_study(server: PacsServer, folder: Path, *, patient: str = PATIENT, patient_id: str = "BN-KEY-1",
               referrer: str = REFERRER) -> Sent:
    """A new study of *patient*, referred by *referrer*, sent with DCMTK storescu."""
    folder.mkdir(parents=True, exist_ok=True)
    study, ct, us = generate_uid(), generate_uid(), generate_uid()
    common = {"SpecificCharacterSet": "ISO_IR 192", "StudyInstanceUID": study, "PatientName": patient,
              "PatientID": patient_id, "PatientBirthDate": BIRTH, "PatientSex": "F", "StudyDate": "20261203",
              "StudyTime": "091500", "AccessionNumber": f"KI{study[-8:]}", "ReferringPhysicianName": referrer,
              "StudyDescription": "CT bụng có tiêm thuốc", "StudyID": "1"}
    files, slices = [], []
    for n in range(1, 4):
        ds = image_dataset(SeriesInstanceUID=ct, SeriesNumber=1, InstanceNumber=n, SeriesDescription="Trục ngang",
                           Rows=64, Columns=64, WindowCenter=40, WindowWidth=400, RescaleIntercept=-1024,
                           RescaleSlope=1, **common)
        yy, xx = np.mgrid[0:64, 0:64]
        disc = (yy - 32) ** 2 + (xx - 32) ** 2 < (8 + 5 * n) ** 2
        ds.PixelData = np.where(disc, 1100, 24).astype(np.uint16).tobytes()
        path = folder / f"ct{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
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
    tmp = tmp_path_factory.mktemp(f"keyimg-{request.param}")
    with shared_backend(request.param, request, "keyimg") as backend:
        server = PacsServer(tmp / "data", backend)
        server.start()
        server.tokens = {  # type: ignore[attr-defined]
            "radiologist": server.make_token(*RADIOLOGIST[:1], "radiologist", RADIOLOGIST[1]),
            "colleague": server.make_token(COLLEAGUE[0], "radiologist", COLLEAGUE[1]),
            "referring": server.make_token("bs.hung", "referring", REFERRER),
            "emr": server.make_token("emr", "emr", "EMR"),
            "his": server.make_token("his", "his", "HIS"),
        }
        yield server
        server.stop()


def token(server: PacsServer, role: str) -> str:
    return server.tokens[role]  # type: ignore[no-any-return,attr-defined]


def put(server: PacsServer, study: str, images: list[dict[str, Any]], role: str = "radiologist",
        **fields: Any) -> httpx.Response:
    with server.http(token(server, role)) as http:
        return http.put(f"/api/studies/{study}/key-images", json={"images": images, **fields})


def get(server: PacsServer, study: str, role: str = "radiologist") -> httpx.Response:
    with server.http(token(server, role)) as http:
        return http.get(f"/api/studies/{study}/key-images")


def ko_instances(server: PacsServer, study: str) -> list[str]:
    """The study's Key Object Selection instances, by QIDO-RS."""
    with server.http() as http:
        answer = http.get(f"/dicom-web/studies/{study}/instances", params={"SOPClassUID": KOS})
    assert answer.status_code in (200, 204), answer.text
    return [i["00080018"]["Value"][0] for i in (answer.json() if answer.status_code == 200 else [])]


def trail(server: PacsServer, **filters: str) -> list[dict[str, Any]]:
    """Audit events, oldest first, once the server's buffer is written."""
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": 10000, **filters})
    assert answer.status_code == 200, answer.text
    return list(reversed(answer.json()))


def events_until(server: PacsServer, wanted: int, **filters: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:  # audit events are written in batches
        events = trail(server, **filters)
        if len(events) >= wanted or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def getscu_series(server: PacsServer, study: str, series: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    done = run_dcmtk("getscu", "-v", "-S", "-aet", "KEYGET", "-aec", server.ae_title, "-od", str(out),
                     "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
                     "-k", f"SeriesInstanceUID={series}", "127.0.0.1", str(server.dicom_port))
    assert done.returncode == 0, done.stderr
    return sorted(out.iterdir())


def dsrdump_clean(path: Path) -> str:
    """dsrdump's rendering of *path*: it exits 0 and reports no error."""
    dump = run_dcmtk("dsrdump", "+Pl", "+Pc", "+Pn", str(path))
    assert dump.returncode == 0, dump.stderr
    errors = [line for line in dump.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert not errors, errors
    return dump.stdout


# -- 1. marking images makes a valid KOS, found and retrieved as any KO series --------------------
def test_marked_images_are_a_key_object_selection_dcmtk_reads(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    answer = put(archive, sent.uid, [{"sop_uid": sent.slices[1]}, {"sop_uid": sent.clip, "frame": 2}],
                 description=NOTE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["stored"] is True and body["removed"] == []
    kos = body["document"]
    assert ko_instances(archive, sent.uid) == [kos]
    [document] = body["documents"]
    assert document["sop_uid"] == kos
    assert document["title"] == {"value": "113000", "scheme": "DCM", "meaning": "Of Interest"}
    assert (document["author"], document["login"], document["own"], document["key"]) == (
        RADIOLOGIST[1], RADIOLOGIST[0], True, True)
    # The Vietnamese description comes back as written.
    assert document["description"] == NOTE
    images = [(i["sop_uid"], i["series_uid"], i["frame"], i["document"], i["title"], i["author"])
              for i in body["images"]]
    assert images == [(sent.slices[1], sent.ct_series, None, kos, "Of Interest", RADIOLOGIST[1]),
                      (sent.clip, sent.us_series, 2, kos, "Of Interest", RADIOLOGIST[1])]
    assert body["mine"] == [{"sop_uid": sent.slices[1], "frame": None}, {"sop_uid": sent.clip, "frame": 2}]
    # A colleague and the referring physician read them; only the author's are "mine".
    for role in ("colleague", "referring", "emr"):
        seen = get(archive, sent.uid, role)
        assert seen.status_code == 200, (role, seen.text)
        assert [i["sop_uid"] for i in seen.json()["images"]] == [sent.slices[1], sent.clip]
        assert seen.json()["mine"] == []

    # C-FIND finds the KO series with its description, QIDO-RS too.
    find = run_dcmtk("findscu", "-v", "-S", "-aet", "KEYFIND", "-aec", archive.ae_title,
                     "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={sent.uid}", "-k", "Modality=KO",
                     "-k", "SeriesInstanceUID", "-k", "SeriesDescription", "-k", "NumberOfSeriesRelatedInstances",
                     "127.0.0.1", str(archive.dicom_port))
    assert find.returncode == 0, find.stderr
    # A UID of odd length is padded with a NUL (PS3.5 6.2), which findscu prints as it is.
    series_uids = re.findall(r"\(0020,000e\) UI \[([\d.]+)[ \x00]?\]", find.stdout + find.stderr)
    assert len(series_uids) == 1, find.stderr
    ko_series = series_uids[0]
    assert "Ảnh chính / Key images" in find.stdout + find.stderr
    with archive.http() as http:
        qido = http.get(f"/dicom-web/studies/{sent.uid}/series", params={"Modality": "KO"}).json()
    assert [s["0020000E"]["Value"][0] for s in qido] == [ko_series]

    # getscu retrieves it; dsrdump reads it without an error: title, observer, description, both images.
    [got] = getscu_series(archive, sent.uid, ko_series, tmp_path / "got")
    dump = dsrdump_clean(got)
    assert "Key Object Selection Document" in dump
    assert '(113000,DCM,"Of Interest")' in dump
    assert f'(121008,DCM,"Person Observer Name")="{RADIOLOGIST[1]}"' in dump
    assert f'(128774,DCM,"Person Observer\'s Login Name")="{RADIOLOGIST[0]}"' in dump
    assert NOTE in dump
    assert dump.count("contains IMAGE") == 2
    ds = dcmread(got)
    assert ds.SOPClassUID == KOS and ds.Modality == "KO" and ds.SOPInstanceUID == kos
    # The patient and study attributes are the index's.
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == (
        PATIENT, "BN-KEY-1", BIRTH, f"KI{sent.uid[-8:]}")
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sent.uid
    assert {s.SeriesInstanceUID: [r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence]
            for s in evidence.ReferencedSeriesSequence} == {sent.ct_series: [sent.slices[1]],
                                                           sent.us_series: [sent.clip]}
    frames = [item.ReferencedSOPSequence[0].get("ReferencedFrameNumber") for item in ds.ContentSequence
              if item.ValueType == "IMAGE"]
    assert frames == [None, 2]

    # WADO-RS retrieves it too, as it was stored.
    with archive.http() as http:
        wado = http.get(f"/dicom-web/studies/{sent.uid}/series/{ko_series}/instances/{kos}",
                        headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert wado.status_code == 200 and NOTE.encode("utf-8") in wado.content


# -- 2. a new selection replaces the previous one ------------------------------------------------
def test_a_new_selection_replaces_the_previous_one_through_the_audited_deletion(
        archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    first = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": sent.slices[2]}]).json()
    colleague = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}], "colleague", title="For Teaching").json()
    assert colleague["documents"][-1]["title"]["value"] == "113004"

    again = put(archive, sent.uid, [{"sop_uid": sent.slices[1]}, {"sop_uid": sent.clip, "frame": 3}],
                title="113002", description="Cho bác sĩ chỉ định")
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["stored"] is True and body["removed"] == [first["document"]]
    # Only one KOS of this radiologist remains; the colleague's is untouched.
    assert sorted(ko_instances(archive, sent.uid)) == sorted([body["document"], colleague["document"]])
    mine = [d for d in body["documents"] if d["own"]]
    assert [(d["sop_uid"], d["title"]["meaning"]) for d in mine] == [(body["document"], "For Referring Provider")]
    assert body["mine"] == [{"sop_uid": sent.slices[1], "frame": None}, {"sop_uid": sent.clip, "frame": 3}]

    # The deletion is audited as the radiologist's, naming the replaced KOS and why.
    deletions = events_until(archive, 1, action="delete", user=RADIOLOGIST[0])
    assert [e["outcome"] for e in deletions] == ["success"], deletions
    assert first["document"] in deletions[0]["detail"] and "replaced by" in deletions[0]["detail"]
    assert deletions[0]["study_uid"] == sent.uid and deletions[0]["patient_id"].startswith("BN-KEY-1")
    updates = events_until(archive, 3, action="key-images-update", study=sent.uid)
    assert [e["user"] for e in updates] == [RADIOLOGIST[0], COLLEAGUE[0], RADIOLOGIST[0]]
    assert first["document"] in updates[-1]["detail"]

    # The same selection saved again writes nothing.
    same = put(archive, sent.uid, [{"sop_uid": sent.slices[1]}, {"sop_uid": sent.clip, "frame": 3}],
               title="For Referring Provider", description="Cho bác sĩ chỉ định").json()
    assert (same["stored"], same["removed"], same["document"]) == (False, [], body["document"])

    # An empty selection removes it (audited too); the KO series goes with it.
    cleared = put(archive, sent.uid, []).json()
    assert (cleared["document"], cleared["removed"], cleared["mine"]) == (None, [body["document"]], [])
    assert ko_instances(archive, sent.uid) == [colleague["document"]]
    with archive.http() as http:
        series = http.get(f"/api/studies/{sent.uid}").json()["series"]
    assert [s["modality"] for s in series].count("KO") == 1
    deletions = events_until(archive, 2, action="delete", user=RADIOLOGIST[0])
    assert "cleared" in deletions[-1]["detail"]


def test_selections_saved_at_once_leave_one(archive: PacsServer, tmp_path: Path) -> None:
    """Several saves of one radiologist at the same moment (two reading
    stations, a double click): exactly one of their KOS remains, the others
    deleted, whichever order the saves finished in."""
    from concurrent.futures import ThreadPoolExecutor

    sent = send_study(archive, tmp_path / "in")
    choices = [[{"sop_uid": sop}] for sop in sent.slices] + [[{"sop_uid": sent.clip, "frame": 2}]]
    with ThreadPoolExecutor(len(choices)) as pool:
        answers = list(pool.map(lambda images: put(archive, sent.uid, images), choices))
    assert [a.status_code for a in answers] == [200] * len(choices), [a.text for a in answers]
    [left] = ko_instances(archive, sent.uid)
    body = get(archive, sent.uid).json()
    assert [d["sop_uid"] for d in body["documents"]] == [left]
    mine = [{"sop_uid": m["sop_uid"], **({"frame": m["frame"]} if m["frame"] else {})} for m in body["mine"]]
    assert mine in choices


# -- 3. what is refused ------------------------------------------------------------------------
def test_only_images_of_the_study_and_only_radiologists(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "a")
    other = send_study(archive, tmp_path / "b", patient="Lê^Văn Bình", patient_id="BN-KEY-2")
    refused = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": other.slices[0]}])
    assert refused.status_code == 400 and other.slices[0] in refused.json()["error"]
    marked = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}]).json()
    cases = {
        "a KOS is no image": [{"sop_uid": marked["document"]}],
        "no such frame": [{"sop_uid": sent.clip, "frame": 4}],
        "a frame of a single-frame image": [{"sop_uid": sent.slices[0], "frame": 2}],
        "not a UID": [{"sop_uid": "1.2.abc"}],
        "frame 0": [{"sop_uid": sent.clip, "frame": 0}],
    }
    for case, images in cases.items():
        answer = put(archive, sent.uid, images)
        assert answer.status_code == 400, (case, answer.text)
    assert put(archive, sent.uid, [{"sop_uid": sent.slices[0]}], title="Nice ones").status_code == 400
    assert put(archive, sent.uid, [{"sop_uid": sent.slices[0]}], description="a\x00b").status_code == 400
    assert put(archive, "1.2.3.404", [{"sop_uid": sent.slices[0]}]).status_code == 404
    # Nothing refused changed the selection.
    assert ko_instances(archive, sent.uid) == [marked["document"]]

    # A referring physician, the EMR and the HIS read (or not) but never mark; an administrator may.
    for role in ("referring", "emr", "his"):
        answer = put(archive, sent.uid, [{"sop_uid": sent.slices[1]}], role)
        assert answer.status_code == 403, (role, answer.text)
    assert get(archive, sent.uid, "his").status_code == 403
    with archive.http() as admin:
        assert admin.put(f"/api/studies/{sent.uid}/key-images",
                         json={"images": [{"sop_uid": sent.slices[2]}]}).status_code == 200
    # A referring physician reads only the studies they referred.
    unreferred = send_study(archive, tmp_path / "c", patient_id="BN-KEY-3", referrer="Phạm^Văn Tâm")
    assert get(archive, unreferred.uid, "referring").status_code == 403
    assert get(archive, sent.uid, "referring").status_code == 200
    denied = events_until(archive, 3, action="key-images-update", study=sent.uid)
    assert {e["user"] for e in denied if e["outcome"] == "denied"} >= {"bs.hung", "emr", "his"}


# -- 4. a modality's KOS is read too ----------------------------------------------------------
def test_a_modalitys_key_object_selection_is_listed(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sent.uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = PATIENT, "BN-KEY-1", "KO", 99, 1
    ds.ContentDate, ds.ContentTime = "20261203", "093000"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "113000", "DCM", "Of Interest"
    ds.ConceptNameCodeSequence = Sequence([title])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sent.slices[2]
    image = Dataset()
    image.RelationshipType, image.ValueType, image.ReferencedSOPSequence = "CONTAINS", "IMAGE", Sequence([ref])
    ds.ContentSequence = Sequence([image])
    path = tmp_path / "modality-ko.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    assert archive.storescu(str(path)).returncode == 0
    body = get(archive, sent.uid).json()
    assert [(i["sop_uid"], i["document"], i["own"]) for i in body["images"]] == [
        (sent.slices[2], ds.SOPInstanceUID, False)]
    assert body["documents"][0]["login"] == "" and body["mine"] == []
    # The radiologist's own selection is another KOS: the modality's stays.
    mine = put(archive, sent.uid, [{"sop_uid": sent.slices[0]}]).json()
    assert sorted(ko_instances(archive, sent.uid)) == sorted([ds.SOPInstanceUID, mine["document"]])
    assert put(archive, sent.uid, []).json()["removed"] == [mine["document"]]
    assert ko_instances(archive, sent.uid) == [ds.SOPInstanceUID]


# -- 5. the patient's share page shows them first ------------------------------------------------
def share_link(server: PacsServer, study: str) -> str:
    with server.http(token(server, "his")) as http:
        made = http.post(f"/api/studies/{study}/shares", json={"days": 7})
    assert made.status_code == 201, made.text
    return httpx.URL(made.json()["url"]).path


def test_the_share_page_lists_key_images_first(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    base = share_link(archive, sent.uid)
    with httpx.Client(base_url=f"http://127.0.0.1:{archive.http_port}", timeout=30) as phone:
        assert phone.post(f"{base}/birth-year", json={"birth_year": BIRTH[:4]}).status_code == 204
        before = phone.get(f"{base}/study").json()
        assert before["key_images"] == []
        put(archive, sent.uid, [{"sop_uid": sent.clip, "frame": 2}, {"sop_uid": sent.slices[1]}])
        # A colleague marked one of them too, and a quality note is no key image.
        put(archive, sent.uid, [{"sop_uid": sent.slices[1]}, {"sop_uid": sent.slices[0]}], "colleague")
        with archive.http() as admin:
            admin.put(f"/api/studies/{sent.uid}/key-images",
                      json={"images": [{"sop_uid": sent.slices[2]}], "title": "Rejected for Quality Reasons"})
        shown = phone.get(f"{base}/study").json()
        keys = [(k["series_uid"], k["sop_uid"], k["frame"]) for k in shown["key_images"]]
        assert sorted(keys, key=str) == sorted([(sent.us_series, sent.clip, 2), (sent.ct_series, sent.slices[1], 1),
                                                (sent.ct_series, sent.slices[0], 1)], key=str)
        assert (sent.ct_series, sent.slices[2], 1) not in keys
        # Each one opens through the link as a JPEG.
        for series, sop, frame in keys:
            image = phone.get(f"{base}/series/{series}/instances/{sop}/frames/{frame}")
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(image.content)).size[0] > 0
        # No author, login or description goes to the patient.
        assert not {"author", "login", "description", "document"} & set(shown["key_images"][0])


# -- 6. the signed report's PDF prints them ----------------------------------------------------
def pdf_images(pdf: bytes) -> list[bytes]:
    """The image XObjects of a PDF fpdf2 wrote (its objects are not in object streams)."""
    found = []
    for obj in re.finditer(rb"\d+ 0 obj\s*<<(.*?)>>\s*stream\r?\n", pdf, re.S):
        if not re.search(rb"/Subtype\s*/Image", obj.group(1)):
            continue
        length = int(re.search(rb"/Length\s+(\d+)", obj.group(1)).group(1))  # type: ignore[union-attr]
        found.append(pdf[obj.end():obj.end() + length])
    return found


def test_the_signed_report_prints_the_key_images(archive: PacsServer, tmp_path: Path) -> None:
    sent = send_study(archive, tmp_path / "in")
    put(archive, sent.uid, [{"sop_uid": sent.slices[0]}, {"sop_uid": sent.clip, "frame": 1}])
    with archive.http(token(archive, "radiologist")) as rad:
        assert rad.put(f"/api/studies/{sent.uid}/report",
                       json={"findings": FINDINGS, "impression": IMPRESSION}).status_code == 200
        signed = rad.post(f"/api/studies/{sent.uid}/report/sign")
        assert signed.status_code == 200, signed.text
        pdf = rad.get(f"/api/studies/{sent.uid}/report/pdf").content
    images = pdf_images(pdf)
    assert len(images) == 2
    # In the order marked, rendered to fit 512 pixels (aspect kept), from the pixels themselves.
    shown = [Image.open(io.BytesIO(data)) for data in images]
    assert [i.format for i in shown] == ["JPEG", "JPEG"]
    assert [i.size for i in shown] == [(512, 512), (512, 341)]
    ct = np.asarray(shown[0].convert("L"))
    assert ct[256, 256] > 120 and ct[5, 5] < 30, "the CT slice's bright disc on a dark ground"
    assert "Ảnh chính / Key images" in "\n".join(page_texts(pdf))
    # Without key images the report has none (a study whose selection was cleared before signing).
    other = send_study(archive, tmp_path / "other", patient_id="BN-KEY-4")
    with archive.http(token(archive, "radiologist")) as rad:
        rad.put(f"/api/studies/{other.uid}/report", json={"findings": FINDINGS, "impression": IMPRESSION})
        assert rad.post(f"/api/studies/{other.uid}/report/sign").status_code == 200
        assert pdf_images(rad.get(f"/api/studies/{other.uid}/report/pdf").content) == []
    # A KOS can be replaced after the signature (the study's signed report does not hold it back).
    replaced = put(archive, sent.uid, [{"sop_uid": sent.slices[2]}])
    assert replaced.status_code == 200 and len(replaced.json()["removed"]) == 1, replaced.text


def page_texts(pdf: bytes) -> list[str]:
    from .pdftext import page_texts as texts

    return texts(pdf)


# -- 7. in the browser: the viewer's toggle and K, the share page ---------------------------------------
PASSWORD = "Secret-123"
SHOTS = ROOT / "test-artifacts" / "key-images"


@pytest.fixture
def browser_archive(tmp_path: Path) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("user", "add", RADIOLOGIST[0], "--role", "radiologist", "--password", PASSWORD,
               "--display-name", RADIOLOGIST[1])
    server.start()
    server.tokens = {"his": server.make_token("his", "his", "HIS")}  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_marking_in_the_viewer_and_the_patients_page(browser_archive: PacsServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server = browser_archive
    sent = send_study(server, tmp_path / "in")
    with browsing(server) as (page, errors):
        steps = Steps(page, SHOTS)
        sign_in(page, RADIOLOGIST[0], PASSWORD)
        expect(page.locator("#current-user")).to_have_text(RADIOLOGIST[1])
        page.goto(f"/#/study/{sent.uid}")
        label, toggle, marker, state = (page.locator(s) for s in (
            "#slice-label", "#key-image-toggle", "#key-image-marker", "#key-image-state"))
        expect(label).to_have_text("Lát cắt 1 / 3")
        expect(toggle).to_have_text("☆ Ảnh chính")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        expect(marker).to_be_hidden()
        # The saved selection is read before K may change it (a K before it is refused, not saved).
        expect(toggle).to_have_attribute("data-loaded", "true")

        # K on the second slice marks it; the state says it is saved, the stars show.
        page.locator("#viewport").focus()
        page.keyboard.press("ArrowDown")
        expect(label).to_have_text("Lát cắt 2 / 3")
        page.keyboard.press("k")
        expect(state).to_have_attribute("data-saved", "1")
        expect(state).to_have_text("Đã lưu 1 ảnh chính")
        expect(marker).to_be_visible()
        expect(toggle).to_have_text("★ Ảnh chính")
        expect(toggle).to_have_attribute("aria-pressed", "true")
        ct_thumb = page.locator(f'[data-testid="series-thumb"][data-series-uid="{sent.ct_series}"]')
        expect(ct_thumb.locator(".thumb-key")).to_have_text(" ★ 1")
        page.keyboard.press("ArrowDown")
        expect(marker).to_be_hidden()  # slice 3 is no key image
        page.keyboard.press("ArrowUp")
        expect(marker).to_be_visible()
        assert_no_horizontal_scroll(page)
        steps.shot("marked")

        # A K typed in the report is text: it marks nothing.
        findings = page.locator("#findings")
        expect(findings).to_be_editable()
        findings.click()
        page.keyboard.type("Khối k")
        expect(findings).to_have_value("Khối k")
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(state).to_have_attribute("data-saved", "1")

        # The clip's third frame, by the toolbar's button; then in English.
        page.locator(f'[data-testid="series-thumb"][data-series-uid="{sent.us_series}"]').click()
        expect(label).to_have_text("Khung hình 1 / 3")
        page.locator("#viewport").focus()
        page.keyboard.press("End")
        expect(label).to_have_text("Khung hình 3 / 3")
        toggle.click()
        expect(state).to_have_attribute("data-saved", "2")
        expect(marker).to_be_visible()
        expect(state).to_have_text("Đã lưu 2 ảnh chính")
        page.click("#lang-toggle")
        expect(toggle).to_have_text("★ Key image")
        expect(state).to_have_text("2 key images saved")
        steps.shot("clip-frame-en")
        page.click("#lang-toggle")
        with server.http() as admin:
            mine = admin.get(f"/api/studies/{sent.uid}/key-images").json()
        assert [(i["sop_uid"], i["frame"], i["login"]) for i in mine["images"]] == [
            (sent.slices[1], None, RADIOLOGIST[0]), (sent.clip, 3, RADIOLOGIST[0])]

        # The patient's page: the key images come first, and open in the viewer.
        base = share_link(server, sent.uid)
        phone = page.context.browser.new_context(viewport={"width": 390, "height": 844}, locale="vi-VN",
                                    base_url=f"http://127.0.0.1:{server.http_port}")
        phone.set_default_timeout(20_000)
        patient = phone.new_page()
        patient.on("pageerror", lambda exc: errors.append(str(exc)))
        patient.goto(base)
        patient.fill("#birth-year", BIRTH[:4])
        patient.click("#birth-submit")
        expect(patient.locator("#key-images")).to_be_visible()
        sections = patient.locator("#share-main > section").evaluate_all("els => els.map(e => e.id)")
        assert sections[1:] == ["key-images", "report", "images"], sections
        keys = patient.locator("#key-images .share-key")
        expect(keys).to_have_count(2)
        assert keys.evaluate_all("els => els.map(e => [e.dataset.sop, e.dataset.frame])") == [
            [sent.slices[1], "1"], [sent.clip, "3"]]
        patient.wait_for_function("() => [...document.querySelectorAll('#key-images img')]"
                                  ".every(i => i.complete && i.naturalWidth > 0)")
        Steps(patient, SHOTS / "share").shot("key-images-first")
        keys.nth(1).click()
        expect(patient.locator("#frame-counter")).to_have_text("2 / 2")
        expect(patient.locator("#frame-image")).to_have_attribute(
            "src", re.compile(rf"/instances/{re.escape(sent.clip)}/frames/3$"))
        phone.close()
    assert not errors, errors
