"""Review of the patient share links (pacs.shares, viewer_api.share_page,
pacs share): odd answers and forged cookies from a phone, the CLI's QR code
path, the birth-year lock on a node whose clock is ahead, and a study the
HIS refiles under another patient. Against a real `pacs serve` (SQLite and
files) and, for the clocks, two processes on one PostgreSQL index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import image_dataset
from .peers import PACS_COMMANDS, ROOT, plain_http_ssl
from .test_share_links import BIRTH_YEAR, _write_studies

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
OTHER_NAME = "Trần^Văn Cường"


def _refiled_study(folder: Path) -> dict[str, str]:
    """Study C of a patient born in 1975 (the HIS refiles it in a test)."""
    study, series = generate_uid(), generate_uid()
    ds = image_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, PatientName="Hoàng^Thị Lan",
                       PatientID="BN-REVIEW-3", PatientBirthDate="19750607", SpecificCharacterSet="ISO_IR 192",
                       StudyDate="20261202", Rows=16, Columns=16)
    ds.PixelData = np.arange(16 * 16, dtype=np.uint16).tobytes()
    ds.save_as(folder / "c.dcm", enforce_file_format=True)
    return {"c": study, "c_series": series}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("review-share")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    uids = _write_studies(tmp / "in")
    uids.update(_refiled_study(tmp / "in"))
    server.uids = uids  # type: ignore[attr-defined]
    server.cli("import", str(tmp / "in"))
    server.start()
    server.his = server.make_token("his", "his", "HIS")  # type: ignore[attr-defined]
    yield server
    server.stop()


def _uids(server: PacsServer) -> dict[str, str]:
    return server.uids  # type: ignore[no-any-return,attr-defined]


def _link(server: PacsServer, study: str) -> str:
    """A new link's path (/share/TOKEN), made by the HIS."""
    with server.http(token=server.his) as http:  # type: ignore[attr-defined]
        made = http.post(f"/api/studies/{study}/shares", json={"days": 3})
    assert made.status_code == 201, made.text
    return httpx.URL(made.json()["url"]).path


def _phone(server: PacsServer) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30, verify=plain_http_ssl())


def test_a_birth_year_in_other_digits_is_a_400(archive: PacsServer) -> None:
    """"１９７５" (full-width) or "١٩٧٥" (Arabic-Indic) passed the check for
    4 digits (``\\d`` is any Unicode digit) and reached hmac.compare_digest,
    which refuses non-ASCII text: a 500. Now a 400 like any other answer
    that is not a year, and not counted as a wrong one."""
    base = _link(archive, _uids(archive)["a"])
    with _phone(archive) as phone:
        for year in ("１９７５", "١٩٧٥", "1９75"):
            answer = phone.post(f"{base}/birth-year", json={"birth_year": year})
            assert answer.status_code == 400, (year, answer.text)
        assert phone.post(f"{base}/birth-year", json={"birth_year": "1976"}).json()["tries_left"] == 4


def test_a_forged_cookie_is_refused_not_a_500(archive: PacsServer) -> None:
    """The birth-year cookie comes from the client: an expiry of 5000 digits
    (int() refuses it), a superscript digit ("²" is isdigit()), a
    signature with a non-ASCII letter (compare_digest refuses it) each made
    every route of the link a 500. Now such a cookie is simply not one:
    403, answer the birth year."""
    base = _link(archive, _uids(archive)["a"])
    link_id = 0
    with archive.http(token=archive.his) as http:  # type: ignore[attr-defined]
        items = http.get(f"/api/studies/{_uids(archive)['a']}/shares").json()["items"]
        link_id = items[0]["id"]
    forged = [f"{link_id}.{'9' * 5000}.ab", f"{link_id}.\xb2.ab", f"{link_id}.99999999999.\xe9\xe9",
              f"{link_id}.1\xb2.{'a' * 64}"]
    with _phone(archive) as phone:
        for value in forged:
            answer = phone.get(f"{base}/study", headers={"Cookie": f"pacs_share={value}".encode("latin-1")})
            assert answer.status_code == 403 and answer.json()["birth_year_required"], (value[:40], answer.text)
            thumb = phone.get(f"{base}/series/{_uids(archive)['ct']}/thumbnail",
                              headers={"Cookie": f"pacs_share={value}".encode("latin-1")})
            assert thumb.status_code == 403, (value[:40], thumb.text)


def _links_of(server: PacsServer, study: str) -> list[dict[str, Any]]:
    return json.loads(server.cli("share", "list", "--study", study, "--json").stdout)  # type: ignore[no-any-return]


def test_a_qr_code_that_cannot_be_written_makes_no_link(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs share create --qr` into a folder that does not exist (or onto a
    folder) made the link, audited it as made, then failed writing the
    QR code with a bare FileNotFoundError: the URL, shown only once, was
    never printed, and an active link nobody could hand out stayed behind.
    Now the path is checked first: exit 2 saying why, no link made."""
    study = _uids(archive)["b"]
    env = {**archive.env, "PACS_PUBLIC_URL": "https://pacs.benhvien.vn"}
    (tmp_path / "folder.png").mkdir()
    before = len(_links_of(archive, study))
    for qr in (tmp_path / "no-such-folder" / "receipt.png", tmp_path / "folder.png"):
        result = PACS_COMMANDS.run(["share", "create", study, "--qr", str(qr), *archive.common_args()], env,
                                   timeout=120)
        assert result.returncode == 2, (qr, result.stdout, result.stderr)
        assert "--qr" in result.stderr and "Error" not in result.stderr, result.stderr
        assert "/share/" not in result.stdout
    assert len(_links_of(archive, study)) == before
    # A folder that exists: the link and its QR code.
    qr = tmp_path / "receipt.svg"
    made = PACS_COMMANDS.run(["share", "create", study, "--qr", str(qr), *archive.common_args()], env, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "<svg" in qr.read_text() and len(_links_of(archive, study)) == before + 1


def test_a_study_refiled_under_another_patient_asks_the_birth_year_again(archive: PacsServer) -> None:
    """The birth-year cookie was signed over the link and its expiry only:
    when the HIS refiled the study under another patient (a study made on
    the wrong patient, matched by hand to the right order), the browser
    that had answered the first patient's year went on reading the other
    patient's name, images and report for the rest of the hour. Now the
    cookie is bound to the patient (and birth year) it was answered for:
    after the refile, the year asked is the new patient's."""
    u = _uids(archive)
    base = _link(archive, u["c"])
    with _phone(archive) as phone:
        assert phone.post(f"{base}/birth-year", json={"birth_year": BIRTH_YEAR}).status_code == 204
        assert phone.get(f"{base}/study").json()["patient_name"] == "Hoàng^Thị Lan"

        order = {"patient": {"id": "BN-REVIEW-4", "name": OTHER_NAME, "birth_date": "19880101"},
                 "accession_number": "RV-SHARE-1", "modality": "CT"}
        with archive.http(token=archive.his) as his:  # type: ignore[attr-defined]
            assert his.post("/api/orders", json=order).status_code == 201
        with archive.http() as admin:
            matched = admin.post(f"/api/studies/{u['c']}/match", json={"accession_number": "RV-SHARE-1"})
            assert matched.status_code == 200, matched.text

        refiled = phone.get(f"{base}/study")
        assert refiled.status_code == 403 and refiled.json()["birth_year_required"], refiled.text
        assert OTHER_NAME not in refiled.text
        assert phone.get(f"{base}/series/{u['c_series']}/thumbnail").status_code == 403
        assert phone.post(f"{base}/birth-year", json={"birth_year": BIRTH_YEAR}).status_code == 403
        assert phone.post(f"{base}/birth-year", json={"birth_year": "1988"}).status_code == 204
        assert phone.get(f"{base}/study").json()["patient_name"] == OTHER_NAME


def test_a_lock_into_tomorrow_tells_the_day(archive: PacsServer) -> None:
    """The page said when a locked link opens again as a time of day alone
    ("Vui lòng thử lại sau 14:30"): after the later locks (up to a day)
    that time is tomorrow's, and read as today's the patient tried again at
    once and was refused again. Now the date is shown when it is not today."""
    from datetime import UTC, datetime, timedelta
    from zoneinfo import ZoneInfo

    from sqlalchemy import update

    from pacs.index.models import ShareLink
    from pacs.shares import token_hash

    from playwright.sync_api import expect

    from .test_web_viewer import watched_page

    base = _link(archive, _uids(archive)["a"])
    until = datetime.now(UTC) + timedelta(days=1)
    core = archive.core()
    try:
        table = ShareLink.__table__
        with core.engine.begin() as conn:  # the fifth run of wrong years: locked for a day
            conn.execute(update(table).where(table.c.token_hash == token_hash(base.rsplit("/", 1)[1]))
                         .values(locked_until=until, lockouts=5))
    finally:
        core.close()
    day = until.astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).strftime("%d/%m/%Y")
    with watched_page(timezone_id="Asia/Ho_Chi_Minh") as (page, _problems):
        page.goto(f"http://127.0.0.1:{archive.http_port}{base}")
        message = page.locator("#birth-message")
        expect(message).to_contain_text("Nhập sai quá nhiều lần", timeout=20_000)
        assert day in message.inner_text(), (message.inner_text(), day)


# -- two nodes, one PostgreSQL index, clocks apart ----------------------------------------------
_NODE_B = """
import json, sys
from datetime import UTC, datetime
from sqlalchemy import text
from pacs import shares
from pacs.index.db import create_index_engine
args = json.loads(sys.argv[1])
engine = create_index_engine(args["url"], pool_size=0)
with engine.connect() as conn:
    skew = (datetime.now(UTC) - conn.execute(text("SELECT now()")).scalar_one()).total_seconds()
found = shares.open_link(engine, args["token"])
answer = shares.answer_birth_year(engine, found, args["year"])
print(json.dumps({"skew": skew, "right": answer.right, "locked": answer.locked_until is not None}))
"""


def test_the_lock_holds_on_a_node_whose_clock_is_ahead(tmp_path: Path, pg_url: str) -> None:
    """The lock after five wrong birth years was set and judged by each
    node's own clock: a node 20 minutes ahead (an old server without NTP)
    saw the 15-minute lock another node had just set as over, and judged
    the next answers (the finder of a lost receipt goes on guessing there).
    Now the lock is set and judged by the database's clock, as the
    project's other shared deadlines are (pacs.index.db.db_now)."""
    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is not installed ({FAKETIME_LIB}): apt-get install -y libfaketime")
    from pacs import shares

    from .fuzzing import core_on

    uids = _write_studies(tmp_path / "in")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    env["PACS_ENV_FILE"] = ""
    imported = PACS_COMMANDS.run(["import", str(tmp_path / "in"), "--data-dir", str(tmp_path / "a"),
                                  "--index-url", pg_url], env, timeout=300)
    assert imported.returncode == 0, imported.stderr
    with core_on(tmp_path / "a", pg_url) as node_a:
        new = shares.create(node_a.engine, uids["a"], "test", days=3)
        found = shares.open_link(node_a.engine, new.token)
        answers = [shares.answer_birth_year(node_a.engine, found, str(1960 + n)) for n in range(5)]
        assert answers[-1].new_lock and answers[-1].locked_until is not None

    node_env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+20m",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _NODE_B, json.dumps({"url": pg_url, "token": new.token,
                                                                      "year": BIRTH_YEAR})],
                          capture_output=True, text=True, env=node_env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    node_b = json.loads(done.stdout.strip().splitlines()[-1])
    assert node_b["skew"] > 900, f"node B's clock is not ahead: {node_b}"
    assert (node_b["right"], node_b["locked"]) == (False, True), node_b


def test_a_pasted_uid_with_spaces_and_absurd_limits(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs share create` took a UID pasted with a newline for another study
    ("no study"); share_days_max = 100000 was accepted and every new link of
    that length overflowed the date (a 500)."""
    import pydantic

    from pacs.settings import Settings

    u = _uids(archive)
    made = archive.cli("share", "create", f" {u['c']}\n", "--json")
    assert json.loads(made.stdout)["study_uid"] == u["c"]
    for bad in ({"share_days_max": 100000}, {"share_days": 5000, "share_days_max": 5000}):
        try:
            Settings(data_dir=tmp_path / "d", **bad)
        except pydantic.ValidationError as exc:
            assert "3650" in str(exc), exc
        else:
            raise AssertionError(f"{bad} accepted")


def test_a_signed_pdf_naming_the_former_patient_is_not_handed_out(archive: PacsServer, tmp_path: Path) -> None:
    """The signed report's PDF is stored at the signature and never rewritten:
    after the HIS refiled the study under another patient (matched by hand to
    that patient's order), the new patient's link gave out a PDF with the
    first patient's name, ID and birth date. The link now offers the report's
    text and no PDF until the report is amended; staff still read the signed PDF."""
    folder = tmp_path / "in"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    ds = image_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, PatientName="Lê^Thị Mai",
                       PatientID="BN-REVIEW-5", PatientBirthDate="19750607", SpecificCharacterSet="ISO_IR 192",
                       StudyDate="20261203", Rows=16, Columns=16)
    ds.PixelData = np.arange(16 * 16, dtype=np.uint16).tobytes()
    ds.save_as(folder / "d.dcm", enforce_file_format=True)
    archive.cli("import", str(folder))
    radiologist = archive.make_token("bs.review5", "radiologist", "BS. Review")
    with archive.http(token=radiologist) as rad:
        assert rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.", "impression": "Bình thường."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200
    base = _link(archive, study)
    with _phone(archive) as phone:
        assert phone.post(f"{base}/birth-year", json={"birth_year": "1975"}).status_code == 204
        assert phone.get(f"{base}/study").json()["report"]["pdf"] is True
        assert phone.get(f"{base}/report.pdf").status_code == 200

        order = {"patient": {"id": "BN-REVIEW-6", "name": "Phan^Văn Tâm", "birth_date": "19880101"},
                 "accession_number": "RV-SHARE-PDF", "modality": "CT"}
        with archive.http(token=archive.his) as his:  # type: ignore[attr-defined]
            assert his.post("/api/orders", json=order).status_code == 201
        with archive.http() as admin:
            assert admin.post(f"/api/studies/{study}/match", json={"accession_number": "RV-SHARE-PDF"}
                              ).status_code == 200
        assert phone.post(f"{base}/birth-year", json={"birth_year": "1988"}).status_code == 204
        shown = phone.get(f"{base}/study").json()
        assert shown["report"]["status"] == "signed" and shown["report"]["pdf"] is False
        refused = phone.get(f"{base}/report.pdf")
        assert refused.status_code == 409 and b"%PDF" not in refused.content
    with archive.http(token=radiologist) as rad:
        assert rad.get(f"/api/studies/{study}/report/pdf").content.startswith(b"%PDF")
