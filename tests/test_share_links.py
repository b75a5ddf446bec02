"""Patient share links (pacs.shares, viewer_api.share_api, share_page,
pacs share): a link made by the HIS over the API or by an operator with the
CLI opens one study's images and signed report without an account, behind
the patient's birth year; everything it reads is that study's and is
audited as share:<id>. Against a real `pacs serve` on SQLite + filesystem
and PostgreSQL + SeaweedFS (S3), and headless Chromium for the page.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from .conftest import PacsServer, shared_backend
from .dicomfiles import image_dataset
from .peers import PACS_COMMANDS, plain_http_ssl
from .test_web_viewer import watched_page

NAME = "Nguyễn^Thị Hằng"
SHOWN_NAME = "Nguyễn Thị Hằng"
BIRTH_YEAR = "1975"
REFERRING = "Đỗ^Thanh Tùng"
FINDINGS = "Nhu mô phổi hai bên sáng đều, không thấy nốt mờ.\nKhông tràn dịch màng phổi."
IMPRESSION = "Chưa phát hiện bất thường trên phim CT ngực."
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


# -- the archive ------------------------------------------------------------------------
def _write_studies(folder: Path) -> dict[str, Any]:
    """Study A (a Vietnamese patient with a birth date, referred by
    REFERRING): a CT series of 3 slices and an ultrasound clip of 3 frames;
    study B (another patient, no birth date): one CT slice."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = generate_uid(), generate_uid()
    ct, us, other = generate_uid(), generate_uid(), generate_uid()
    common = {"SpecificCharacterSet": "ISO_IR 192", "StudyDate": "20261201", "StudyTime": "083000"}
    slices = []
    for n in range(1, 4):
        ds = image_dataset(StudyInstanceUID=a, SeriesInstanceUID=ct, PatientName=NAME, PatientID="BN-SHARE-1",
                           PatientBirthDate="19750312", ReferringPhysicianName=REFERRING,
                           StudyDescription="CT ngực không tiêm thuốc", SeriesDescription="Trục ngang",
                           SeriesNumber=1, InstanceNumber=n, Rows=64, Columns=64, **common)
        ds.PixelData = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * n).tobytes()
        ds.save_as(folder / f"a-ct-{n}.dcm", enforce_file_format=True)
        slices.append(str(ds.SOPInstanceUID))
    clip = image_dataset(US_MULTIFRAME, StudyInstanceUID=a, SeriesInstanceUID=us, PatientName=NAME,
                         PatientID="BN-SHARE-1", PatientBirthDate="19750312", ReferringPhysicianName=REFERRING,
                         Modality="US", SeriesNumber=2, InstanceNumber=1, Rows=32, Columns=48, NumberOfFrames=3,
                         SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                         BitsAllocated=8, BitsStored=8, HighBit=7, **common)
    clip.PixelData = (np.arange(3 * 32 * 48 * 3, dtype=np.uint32) % 251).astype(np.uint8).tobytes()
    clip.save_as(folder / "a-us.dcm", enforce_file_format=True)
    ds = image_dataset(StudyInstanceUID=b, SeriesInstanceUID=other, PatientName="Lê^Văn Bình", PatientID="BN-SHARE-2",
                       PatientBirthDate=None, ReferringPhysicianName="Phạm^Minh Châu", **common)
    ds.save_as(folder / "b.dcm", enforce_file_format=True)
    return {"a": a, "b": b, "ct": ct, "us": us, "clip": str(clip.SOPInstanceUID), "slices": slices,
            "b_series": other, "b_sop": str(ds.SOPInstanceUID)}


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One archive with studies A and B, and a token per role."""
    tmp = tmp_path_factory.mktemp(f"share-{request.param}")
    with shared_backend(request.param, request, "share") as backend:
        server = PacsServer(tmp / "data", backend)
        server.uids = _write_studies(tmp / "in")  # type: ignore[attr-defined]
        server.cli("import", str(tmp / "in"))
        server.start()
        server.tokens = {  # type: ignore[attr-defined]
            "radiologist": server.make_token("bs.an", "radiologist", "BS. Trần Văn An"),
            "his": server.make_token("his", "his", "HIS"),
            "referring": server.make_token("bs.tung", "referring", REFERRING),
            "emr": server.make_token("emr", "emr", "EMR"),
            "modality": server.make_token("ct1", "modality", "CT1"),
        }
        yield server
        server.stop()


def uids(server: PacsServer) -> dict[str, Any]:
    return server.uids  # type: ignore[no-any-return,attr-defined]


def token_of(server: PacsServer, role: str) -> str:
    return server.tokens[role]  # type: ignore[no-any-return,attr-defined]


def patient(server: PacsServer) -> httpx.Client:
    """The patient's phone: no credentials of the API, a cookie jar."""
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30, verify=plain_http_ssl())


def make_link(server: PacsServer, study: str, role: str = "his", days: int | None = 7) -> dict[str, Any]:
    with server.http(token=token_of(server, role)) as http:
        answer = http.post(f"/api/studies/{study}/shares", json={"days": days} if days else None)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def path_of(link: dict[str, Any]) -> str:
    return httpx.URL(link["url"]).path


def trail(server: PacsServer, **filters: str) -> list[dict[str, Any]]:
    """Audit events, oldest first (the server's buffer written first)."""
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": 10000, **filters})
    assert answer.status_code == 200, answer.text
    return list(reversed(answer.json()))


def answer_birth_year(phone: httpx.Client, base: str, year: str) -> httpx.Response:
    return phone.post(f"{base}/birth-year", json={"birth_year": year})


def sign_report(server: PacsServer, study: str) -> None:
    with server.http(token=token_of(server, "radiologist")) as rad:
        saved = rad.put(f"/api/studies/{study}/report", json={"findings": FINDINGS, "impression": IMPRESSION})
        assert saved.status_code == 200, saved.text
        signed = rad.post(f"/api/studies/{study}/report/sign")
        assert signed.status_code == 200, signed.text


def jpeg_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.size


# -- the QR code ------------------------------------------------------------------------
def svg_modules(svg: str) -> np.ndarray:
    """The dark modules segno's SVG path draws (a horizontal line per run
    of dark modules, ``M``/``m`` moves and ``h`` runs), as a 0/1 matrix."""
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    path = root.find("{http://www.w3.org/2000/svg}path")
    assert path is not None, svg[:200]
    x = y = 0.0
    runs: list[tuple[int, int, int]] = []
    for command, args in re.findall(r"([MmHh])([^MmHh]*)", path.attrib["d"]):
        numbers = [float(n) for n in args.replace(",", " ").split()]
        if command == "M":
            x, y = numbers
        elif command == "m":
            x, y = x + numbers[0], y + numbers[1]
        else:
            end = numbers[0] if command == "H" else x + numbers[0]
            runs.append((int(y), int(x), int(end)))
            x = end
    size = int(root.attrib["width"]) // 4  # scale(4)
    matrix = np.zeros((size, size), dtype=np.uint8)
    for row, start, end in runs:
        matrix[row, start:end] = 1
    return matrix


def decode_qr(image: Image.Image) -> list[str]:
    import zxingcpp

    return [result.text for result in zxingcpp.read_barcodes(image.convert("L"))]


def decode_svg(svg: str) -> list[str]:
    """Read the QR code of an SVG the way a phone would read the printed one."""
    modules = svg_modules(svg)
    pixels = np.where(modules == 1, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize((modules.shape[1] * 6, modules.shape[0] * 6), Image.Resampling.NEAREST)
    return decode_qr(image)


# -- the tests --------------------------------------------------------------------------
def test_a_link_opens_its_study_and_nothing_else(archive: PacsServer) -> None:
    u = uids(archive)
    link = make_link(archive, u["a"], "his", days=7)
    assert set(link) == {"id", "study_uid", "url", "expires_at", "qr_svg"}
    base = path_of(link)
    token = base.rsplit("/", 1)[1]
    # public_url is not set: the request's own base URL, a 192-bit URL-safe token.
    assert link["url"] == f"http://127.0.0.1:{archive.http_port}/share/{token}"
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)
    created = datetime.fromisoformat(link["expires_at"]) - timedelta(days=7)
    assert abs((created - datetime.now(UTC)).total_seconds()) < 3600  # made now, for 7 days
    assert decode_svg(link["qr_svg"]) == [link["url"]]

    with patient(archive) as phone:
        page = phone.get(base)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "img-src 'self'" in page.headers["content-security-policy"]
        assert (page.headers["cache-control"], page.headers["x-frame-options"]) == ("no-store", "DENY")
        assert page.headers["referrer-policy"] == "no-referrer"  # the token is in the URL
        assert '<script type="module" src="/static/share.js">' in page.text

        # The birth year first: nothing of the study before it.
        asked = phone.get(f"{base}/study")
        assert asked.status_code == 403 and asked.json()["birth_year_required"] is True
        assert NAME not in asked.text
        assert phone.get(f"{base}/series/{u['ct']}/thumbnail").status_code == 403
        assert phone.get(f"{base}/report.pdf").status_code == 403
        assert answer_birth_year(phone, base, "1976").json()["tries_left"] == 4
        assert answer_birth_year(phone, base, "19x5").status_code == 400  # not a year: not counted
        right = answer_birth_year(phone, base, BIRTH_YEAR)
        assert right.status_code == 204
        cookie = right.headers["set-cookie"]
        assert cookie.startswith("pacs_share=")
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", f"path={base}".lower()} <= attributes
        assert "secure" not in attributes  # plain HTTP here; Secure over HTTPS

        shown = phone.get(f"{base}/study")
        assert shown.status_code == 200, shown.text
        study = shown.json()
        assert study["patient_name"] == NAME
        assert (study["study_date"], study["description"], study["modalities"]) == (
            "20261201", "CT ngực không tiêm thuốc", "CT/US")
        assert study["report"] == {"status": "none"}
        series = {s["series_uid"]: s for s in study["series"]}
        assert set(series) == {u["ct"], u["us"]}
        assert [i["sop_uid"] for i in series[u["ct"]]["images"]] == u["slices"]
        assert series[u["us"]]["images"] == [{"sop_uid": u["clip"], "frames": 3, "rows": 32, "columns": 48}]
        # Nothing that names the patient beyond what the page shows.
        assert "BN-SHARE-1" not in shown.text and "19750312" not in shown.text

        # Its images, as JPEG: thumbnails, every slice, every frame of the clip.
        assert jpeg_size(phone.get(f"{base}/series/{u['ct']}/thumbnail").content)
        for sop in u["slices"]:
            assert jpeg_size(phone.get(f"{base}/series/{u['ct']}/instances/{sop}/frames/1").content) == (64, 64)
        for n in (1, 2, 3):
            frame = phone.get(f"{base}/series/{u['us']}/instances/{u['clip']}/frames/{n}")
            assert frame.headers["content-type"] == "image/jpeg" and jpeg_size(frame.content) == (48, 32)
        assert phone.get(f"{base}/series/{u['us']}/instances/{u['clip']}/frames/4").status_code == 404

        # Another study's series or instance through this token: 404, as if it did not exist.
        for other in (f"{base}/series/{u['b_series']}/thumbnail",
                      f"{base}/series/{u['b_series']}/instances/{u['b_sop']}/frames/1",
                      f"{base}/series/{u['ct']}/instances/{u['b_sop']}/frames/1",
                      f"{base}/series/{u['us']}/instances/{u['slices'][0]}/frames/1"):
            assert phone.get(other).status_code == 404, other
        assert phone.get(f"{base}/series/not-a-uid/thumbnail").status_code == 400
        # No DICOM, no other API, through a link.
        for other in (f"{base}/series/{u['ct']}/instances/{u['slices'][0]}",
                      f"{base}/dicom-web/studies/{u['a']}", f"/dicom-web/studies/{u['a']}",
                      f"/api/studies/{u['a']}"):
            assert phone.get(other).status_code in (401, 404, 405), other
        assert phone.get(f"{base}/report.pdf").status_code == 404  # no signed report yet

        # Signed: its text and PDF; the report's own PDF object is no series to show.
        sign_report(archive, u["a"])
        study = phone.get(f"{base}/study").json()
        assert study["report"]["status"] == "signed"
        assert (study["report"]["findings"], study["report"]["impression"]) == (FINDINGS, IMPRESSION)
        assert study["report"]["signed_by"] == "BS. Trần Văn An"
        assert {s["series_uid"] for s in study["series"]} == {u["ct"], u["us"]}
        pdf = phone.get(f"{base}/report.pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        assert pdf.content.startswith(b"%PDF")

        # The cookie answers for its own link only, not another link to the same study.
        second = path_of(make_link(archive, u["a"]))
        jar = phone.cookies.jar
        value = next(c.value for c in jar if c.name == "pacs_share")
        stolen = phone.get(f"{second}/study", headers={"Cookie": f"pacs_share={value}"})
        assert stolen.status_code == 403

    # A patient without a birth date: the link alone opens it.
    with patient(archive) as phone:
        other = path_of(make_link(archive, u["b"]))
        assert phone.get(f"{other}/study").json()["patient_name"] == "Lê^Văn Bình"
        assert answer_birth_year(phone, other, "1980").status_code == 400

    # Opened once (the study read): counted on the link.
    with archive.http(token=token_of(archive, "his")) as http:
        listed = {item["id"]: item for item in http.get(f"/api/studies/{u['a']}/shares").json()["items"]}
    assert listed[link["id"]]["uses"] == 2 and listed[link["id"]]["last_used_at"]
    assert listed[link["id"]]["state"] == "active"
    assert all("token" not in key for key in listed[link["id"]])

    # Every access is audited as share:<id>, with the client's address, study and patient.
    events = trail(archive, user=f"share:{link['id']}")
    actions = [(e["action"], e["outcome"]) for e in events]
    assert ("view", "success") in actions and ("view", "denied") in actions
    assert ("share-verify", "denied") in actions and ("share-verify", "success") in actions
    assert ("retrieve", "success") in actions and ("retrieve", "failure") in actions
    assert ("download", "success") in actions and ("download", "denied") in actions
    assert all(e["role"] == "share" and e["client"] == "127.0.0.1" and e["protocol"] == "http" for e in events)
    assert all(e["study_uid"] == u["a"] and e["patient_id"] == "BN-SHARE-1" for e in events)
    frames_read = [e for e in events if e["action"] == "retrieve" and e["outcome"] == "success"]
    assert any(u["clip"] in e["detail"] for e in frames_read)
    made = [e for e in trail(archive, action="share-create") if e["detail"].startswith(f"share link {link['id']} ")]
    assert [(e["user"], e["role"], e["study_uid"]) for e in made] == [("his", "his", u["a"])]


def test_tokens_are_kept_as_their_hash_only(archive: PacsServer) -> None:
    u = uids(archive)
    link = make_link(archive, u["a"])
    token = path_of(link).rsplit("/", 1)[1]
    with patient(archive) as phone:
        assert answer_birth_year(phone, path_of(link), BIRTH_YEAR).status_code == 204
        assert phone.get(f"{path_of(link)}/study").status_code == 200
    core = archive.core()
    try:
        core.audit.flush()
        with core.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT * FROM share_links").mappings().all()
            audit_rows = conn.exec_driver_sql("SELECT * FROM audit_events").mappings().all()
    finally:
        core.close()
    mine = [r for r in rows if r["pk"] == link["id"]]
    assert len(mine) == 1 and mine[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    for row in (*rows, *audit_rows):
        assert all(token not in str(value) for value in row.values() if value is not None)
    assert token not in archive.log_text()


def test_wrong_birth_years_lock_the_link(archive: PacsServer) -> None:
    u = uids(archive)
    link = make_link(archive, u["a"])
    base = path_of(link)
    with patient(archive) as phone:
        assert [answer_birth_year(phone, base, year).json()["tries_left"] for year in ("1970", "1971", "1972", "1973")
                ] == [4, 3, 2, 1]
        locked = answer_birth_year(phone, base, "1974")
        assert locked.status_code == 429, locked.text
        assert 1 <= int(locked.headers["retry-after"]) <= 15 * 60
        # Locked: even the right year is not judged, on this node...
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 429
        asked = phone.get(f"{base}/study").json()
        assert asked["birth_year_required"] and asked["locked_until"]
    # ...nor on another process: the lock is in the index (the server started anew).
    archive.stop()
    archive.start()
    with patient(archive) as phone:
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 429
        assert phone.get(f"{base}/study").status_code == 403
    listed = json.loads(archive.cli("share", "list", "--study", u["a"], "--json").stdout)
    mine = next(item for item in listed if item["id"] == link["id"])
    assert mine["locked_until"] and mine["failed_answers"] == 0
    lockouts = [e for e in trail(archive, action="share-lockout") if e["user"] == f"share:{link['id']}"]
    assert len(lockouts) == 1 and lockouts[0]["study_uid"] == u["a"] and lockouts[0]["outcome"] == "denied"

    def lock_ends() -> None:  # the lock set back in the index: no test waits for it
        core = archive.core()
        try:
            from sqlalchemy import update

            from pacs.index.models import ShareLink

            with core.engine.begin() as conn:
                conn.execute(update(ShareLink.__table__).where(ShareLink.__table__.c.pk == link["id"])
                             .values(locked_until=datetime.now(UTC) - timedelta(seconds=1)))
        finally:
            core.close()

    # Once the lock is over, five more wrong years lock it twice as long: a flat 15 minutes let all
    # the likely years be tried within a day.
    lock_ends()
    with patient(archive) as phone:
        for year in ("1960", "1961", "1962", "1963"):
            assert answer_birth_year(phone, base, year).status_code == 403
        again = answer_birth_year(phone, base, "1964")
        assert again.status_code == 429 and 15 * 60 < int(again.headers["retry-after"]) <= 30 * 60, again.headers
    # When it is over, the right year opens it (and the next lock would be 15 minutes again).
    lock_ends()
    with patient(archive) as phone:
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 204
        assert phone.get(f"{base}/study").status_code == 200
    from pacs.shares import lock_length

    assert [lock_length(n).total_seconds() / 60 for n in (1, 2, 3)] == [15, 30, 60]
    assert lock_length(40) == timedelta(days=1)


def test_expired_revoked_and_unknown_links(archive: PacsServer) -> None:
    u = uids(archive)
    from pacs import shares

    core = archive.core()
    try:
        expired = shares.create(core.engine, u["b"], "test", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    finally:
        core.close()
    with patient(archive) as phone:
        gone = phone.get(expired.path)
        assert gone.status_code == 410 and gone.headers["content-type"].startswith("text/html")
        assert "Liên kết đã hết hạn" in gone.text and "This link has expired" in gone.text
        assert "default-src 'self'" in gone.headers["content-security-policy"]
        assert phone.get(f"{expired.path}/study").status_code == 410

        link = make_link(archive, u["b"])
        base = path_of(link)
        assert phone.get(f"{base}/study").status_code == 200
        with archive.http(token=token_of(archive, "his")) as http:
            revoked = http.delete(f"/api/shares/{link['id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked_now"] is True
            assert revoked.json()["state"] == "revoked" and revoked.json()["revoked_by"] == "his"
            again = http.delete(f"/api/shares/{link['id']}")
            assert again.status_code == 200 and again.json()["revoked_now"] is False
            assert http.delete("/api/shares/999999999").status_code == 404
            assert http.delete("/api/shares/abc").status_code == 400
        page = phone.get(base)
        assert page.status_code == 410 and "Liên kết đã bị thu hồi" in page.text
        for route in ("/study", f"/series/{u['b_series']}/thumbnail",
                      f"/series/{u['b_series']}/instances/{u['b_sop']}/frames/1", "/report.pdf"):
            assert phone.get(base + route).status_code == 410, route

        anonymous_events = len([e for e in trail(archive) if e["role"] == "share" and not e["user"]])
        unknown = phone.get("/share/" + "A" * 32)
        assert unknown.status_code == 404 and "Liên kết không tồn tại" in unknown.text
        for bad in ("/share/short", "/share/" + "A" * 33, "/share/" + "A" * 31 + "!", "/share/" + "A" * 31 + "%2e"):
            answer = phone.get(bad)
            assert answer.status_code == 404 and "Liên kết không tồn tại" in answer.text, bad
        assert phone.get("/share/short/study").status_code == 404

    events = trail(archive, user=f"share:{link['id']}")
    assert ("view", "failure") in [(e["action"], e["outcome"]) for e in events]  # the 410s, named
    assert any("was revoked" in e["detail"] and e["detail"].endswith("-> 410") for e in events)
    revocations = [e for e in trail(archive, action="share-revoke")
                   if e["detail"].startswith(f"share link {link['id']} ")]
    assert [(e["user"], e["study_uid"], e["outcome"]) for e in revocations] == [("his", u["b"], "success")] * 2
    # An unknown token is audited (someone holds a link that is not ours); one
    # of the wrong shape is answered without the index: no event either.
    anonymous = [e for e in trail(archive) if e["role"] == "share" and not e["user"]]
    assert len(anonymous) == anonymous_events + 1
    assert anonymous[-1]["detail"] == "share link: page: unknown token -> 404"


def test_who_may_make_list_and_revoke_links(archive: PacsServer) -> None:
    u = uids(archive)
    with archive.http(token="none") as anonymous:
        anonymous.headers.pop("Authorization", None)
        assert anonymous.post(f"/api/studies/{u['a']}/shares", json={"days": 3}).status_code == 401
    for role in ("emr", "modality"):
        with archive.http(token=token_of(archive, role)) as http:
            assert http.post(f"/api/studies/{u['a']}/shares", json={"days": 3}).status_code == 403, role
            assert http.get(f"/api/studies/{u['a']}/shares").status_code == 403, role
    for role in ("radiologist", "his", "referring"):
        make_link(archive, u["a"], role)
    with archive.http() as admin:  # the test admin
        assert admin.post(f"/api/studies/{u['a']}/shares").status_code == 201  # no body: share_days
        assert admin.post(f"/api/studies/{u['a']}/shares", json={"days": 366}).status_code == 400
        assert admin.post(f"/api/studies/{u['a']}/shares", json={"days": 0}).status_code == 400
        assert admin.post(f"/api/studies/{u['a']}/shares", json={"days": "x"}).status_code == 400
        assert admin.post("/api/studies/1.2.3.404/shares", json={"days": 3}).status_code == 404
        assert admin.post("/api/studies/nope/shares", json={"days": 3}).status_code == 400
        assert admin.get("/api/studies/1.2.3.404/shares").status_code == 404
    # A referring physician: the studies they referred only, making and revoking.
    with archive.http(token=token_of(archive, "referring")) as referring:
        assert referring.post(f"/api/studies/{u['b']}/shares", json={"days": 3}).status_code == 403
    of_b = make_link(archive, u["b"], "his")
    with archive.http(token=token_of(archive, "referring")) as referring:
        assert referring.delete(f"/api/shares/{of_b['id']}").status_code == 403
    with archive.http(token=token_of(archive, "emr")) as emr:
        assert emr.delete(f"/api/shares/{of_b['id']}").status_code == 403
    with patient(archive) as phone:
        assert phone.get(f"{path_of(of_b)}/study").status_code == 200  # still open
    denied = [e for e in trail(archive, action="share-create") if e["outcome"] == "denied"]
    assert {e["user"] for e in denied} >= {"emr", "ct1", "bs.tung"}


def test_the_cli_makes_lists_and_revokes_links(archive: PacsServer, tmp_path: Path) -> None:
    u = uids(archive)
    # Without public_url: the path, and a note saying so; no QR code of a path.
    plain = archive.cli("share", "create", u["a"], "--days", "2")
    path = plain.stdout.splitlines()[0]
    assert re.fullmatch(r"/share/[A-Za-z0-9_-]{32}", path), plain.stdout
    assert "public_url" in plain.stderr
    refused = archive.cli("share", "create", u["a"], "--qr", str(tmp_path / "x.png"), check=False)
    assert refused.returncode == 2 and "public_url" in refused.stderr
    assert archive.cli("share", "create", u["a"], "--days", "999", check=False).returncode == 2
    assert archive.cli("share", "create", "1.2.3.404", check=False).returncode == 1

    # With public_url: the absolute URL, and its QR code as PNG (segno alone) or SVG.
    env = {**archive.env, "PACS_PUBLIC_URL": "https://pacs.benhvien.vn/"}
    made = {}
    for suffix in ("png", "svg"):
        qr = tmp_path / f"receipt.{suffix}"
        result = PACS_COMMANDS.run(["share", "create", u["a"], "--json", "--qr", str(qr), *archive.common_args()],
                                   env, timeout=120)
        assert result.returncode == 0, result.stderr
        made[suffix] = json.loads(result.stdout)
        url = made[suffix]["url"]
        assert re.fullmatch(r"https://pacs\.benhvien\.vn/share/[A-Za-z0-9_-]{32}", url), url
        decoded = decode_qr(Image.open(qr)) if suffix == "png" else decode_svg(qr.read_text())
        assert decoded == [url]
    with patient(archive) as phone:
        base = httpx.URL(made["png"]["url"]).path
        assert phone.get(base).status_code == 200
        assert answer_birth_year(phone, base, BIRTH_YEAR).status_code == 204
        assert phone.get(f"{base}/study").json()["patient_name"] == NAME

    listed = json.loads(archive.cli("share", "list", "--study", u["a"], "--json").stdout)
    mine = next(item for item in listed if item["id"] == made["png"]["id"])
    assert mine["state"] == "active" and mine["uses"] == 1
    assert not any(path.rsplit("/", 1)[1] in json.dumps(item) for item in listed)
    table = archive.cli("share", "list").stdout
    assert "share links" in table

    revoked = archive.cli("share", "revoke", str(made["png"]["id"]))
    assert "revoked" in revoked.stdout
    with patient(archive) as phone:
        assert phone.get(base).status_code == 410
    assert archive.cli("share", "revoke", "999999999", check=False).returncode == 1
    assert archive.cli("share", "revoke", "x", check=False).returncode == 2
    cli_events = [e for e in trail(archive) if e["protocol"] == "cli" and e["action"].startswith("share-")]
    assert {(e["action"], e["outcome"]) for e in cli_events} >= {
        ("share-create", "success"), ("share-create", "failure"), ("share-revoke", "success"),
        ("share-revoke", "failure")}
    assert all(e["study_uid"] == u["a"] for e in cli_events if e["outcome"] == "success")


def test_the_page_on_a_phone(archive: PacsServer) -> None:
    """Headless Chromium at a phone's size, under the app's CSP: the birth
    year, the Vietnamese name, thumbnails and frames rendered, the report,
    the language switch; the QR code the API gave reads back as the URL."""
    from playwright.sync_api import expect

    u = uids(archive)
    link = make_link(archive, u["a"])
    with phone_page() as (page, problems):
        page.goto(link["url"])
        expect(page.locator("#birth-year")).to_be_visible()
        page.fill("#birth-year", "1990")
        page.click("#birth-submit")
        expect(page.locator("#birth-message")).to_have_text("Năm sinh không đúng. Còn 4 lần thử.")
        page.fill("#birth-year", BIRTH_YEAR)
        page.click("#birth-submit")
        expect(page.locator("#patient-name")).to_have_text(SHOWN_NAME)
        expect(page.locator("#study-date")).to_have_text("01/12/2026")
        expect(page.locator("#report-impression")).to_have_text(IMPRESSION)
        expect(page.locator("#report-pdf")).to_have_attribute("href", f"{path_of(link)}/report.pdf")
        thumbs = page.locator("img.share-thumb")
        expect(thumbs).to_have_count(2)
        _wait_for_images(page, "img.share-thumb")
        assert second_frame(page, u["us"], 3) == f"{path_of(link)}/series/{u['us']}/instances/{u['clip']}/frames/2"
        page.click("#viewer-close")
        expect(page.locator("#viewer")).to_have_count(0)
        page.click("#lang-toggle")
        expect(page.locator("#report h2")).to_have_text("Report")
        assert not problems, problems

        # The QR code the API gave, drawn by the browser and read back from the screen.
        page.set_content(f"<body style='margin:0;background:#fff'>{link['qr_svg']}</body>")
        shot = page.locator("svg").screenshot()
        assert decode_qr(Image.open(io.BytesIO(shot))) == [link["url"]]


@contextmanager
def phone_page() -> Iterator[tuple[Any, list[str]]]:
    """A page of headless Chromium at a phone's size (vi-VN), and the list
    its script errors and Content Security Policy refusals are collected in."""
    with watched_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True) as watched:
        yield watched


def second_frame(page: Any, series: str, count: int) -> str:
    """Open *series* (of *count* images) on the share page, step to its
    second image, each loaded; the path that image came from."""
    from playwright.sync_api import expect

    page.locator(f'button[data-series="{series}"]').click()
    expect(page.locator("#frame-counter")).to_have_text(f"1 / {count}")
    _wait_for_images(page, "#frame-image")
    page.click("#frame-next")
    expect(page.locator("#frame-counter")).to_have_text(f"2 / {count}")
    _wait_for_images(page, "#frame-image")
    return str(page.evaluate("new URL(document.querySelector('#frame-image').src).pathname"))


def _wait_for_images(page: Any, selector: str, timeout: float = 20.0) -> None:
    """Until every image *selector* names has loaded with pixels (polled:
    the page's CSP refuses the eval that wait_for_function needs)."""
    script = (f"[...document.querySelectorAll({json.dumps(selector)})]"
              ".every(i => i.complete && i.naturalWidth > 0)")
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"{selector}: not loaded"
        time.sleep(0.1)
