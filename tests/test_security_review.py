"""Security review findings: logins sent at the same time beat the throttle,
DICOM open to the network without a word, and sequences nested hundreds
deep stored by C-STORE that then broke their study's WADO-RS metadata."""

from __future__ import annotations

import json
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import update

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .peers import wait_until

PASSWORD = "right-password-1"


def _engine(server: PacsServer) -> Any:
    from pacs.index import create_index_engine

    return create_index_engine(server.backend.index_url or f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)


def _login(server: PacsServer, client: httpx.Client, password: str) -> httpx.Response:
    return client.post("/api/auth/login", json={"username": "victim", "password": password})


def _audit(server: PacsServer, action: str) -> list[dict[str, Any]]:
    with server.http() as http:
        answer = http.get("/api/audit", params={"limit": "5000", "action": action})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _concurrent_logins(server: PacsServer, passwords: list[str]) -> list[httpx.Response]:
    """One login per password, all sent at once (each thread waits for the
    others at a barrier, then posts on its own connection)."""
    start = threading.Barrier(len(passwords))
    base = f"http://127.0.0.1:{server.http_port}"

    def one(password: str) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=120) as client:
            client.get("/health")  # connected before the barrier: the posts leave together
            start.wait()
            return _login(server, client, password)

    with ThreadPoolExecutor(len(passwords)) as pool:
        return list(pool.map(one, passwords))


# -- 1: the throttle counts an attempt before its password check --------------------------------
@pytest.mark.parametrize("backend", ["sqlite-fs", "pg-fs"], indirect=True)
def test_concurrent_logins_get_no_more_password_checks_than_the_limit(pacs_server: PacsServer) -> None:
    from pacs.auth import USER_FAILURES
    from pacs.index.models import LoginThrottle

    server = pacs_server
    # Argon2's default cost, as a real user has: each check takes long
    # enough for all the guesses to be in flight together.
    server.cli("user", "add", "victim", "--role", "radiologist", "--password", PASSWORD)
    answers = _concurrent_logins(server, [f"guess-{n:02d}" for n in range(30)])
    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {401, 429}, codes
    # Before: 25 or more 401s, each a password checked.
    assert codes[401] < USER_FAILURES, codes
    assert all(int(a.headers["Retry-After"]) > 0 for a in answers if a.status_code == 429)
    # The audit trail tells checked failures ("failure": a 401, or the 429 of
    # the failure that set the lock) from logins refused unchecked ("denied").
    events: list[dict[str, Any]] = []

    def all_audited() -> bool:
        events[:] = [e for e in _audit(server, "login-failed") if e["user"] == "victim"]
        return len(events) == len(answers)

    assert wait_until(all_audited, timeout=30), len(events)
    assert Counter(e["outcome"] for e in events)["failure"] <= USER_FAILURES
    # The limit is reached: the right password, coming late, is not checked.
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client:
        assert _login(server, client, PASSWORD).status_code == 429
        # The lock ends with its window: the user logs in again.
        engine = _engine(server)
        try:
            with engine.begin() as conn:
                conn.execute(update(LoginThrottle.__table__)
                             .values(locked_until=datetime.now(UTC) - timedelta(seconds=1)))
        finally:
            engine.dispose()
        assert _login(server, client, PASSWORD).status_code == 200
        # A login starts the name's count again: the next wrong guess is only a 401.
        assert _login(server, client, "wrong-after-login").status_code == 401


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_right_password_among_concurrent_guesses_is_checked_only_within_the_limit(
        pacs_server: PacsServer) -> None:
    """Four failures already: one check is left, and of many logins at once
    (the right one among them) exactly one is checked."""
    server = pacs_server
    server.cli("user", "add", "victim", "--role", "radiologist", "--password", PASSWORD)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client:
        assert [_login(server, client, f"early-{n}").status_code for n in range(4)] == [401] * 4
    answers = _concurrent_logins(server, [f"late-{n:02d}" for n in range(15)] + [PASSWORD])
    codes = Counter(a.status_code for a in answers)
    # The one checked either logged in (the right password won the slot) or
    # failed and locked the name; every other login was refused unchecked.
    assert codes[401] == 0 and codes[200] <= 1, codes
    if codes[200] == 0:
        assert answers[-1].status_code == 429


# -- 2: DICOM open to the network is said at start -------------------------------------------
DICOM_OPEN = "DICOM is reachable from the network and answers any calling AE title"


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_dicom_on_the_network_without_allowlist_warns_at_start(tmp_path: Path, backend: Backend) -> None:
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_HOST": "0.0.0.0"}).start()
    try:
        assert wait_until(lambda: "HTTP listening" in server.log_text(), timeout=30)
        log = server.log_text()
        assert DICOM_OPEN in log and "PACS_AE_ALLOWLIST=true" in log and "ae_check_host" in log
    finally:
        server.stop()
    # With the allowlist on (the Docker image's setting) the warning is about
    # the empty registry instead: every association refused until `pacs ae add`.
    server.extra_env["PACS_AE_ALLOWLIST"] = "true"
    server.start()
    try:
        assert wait_until(lambda: server.log_text().count("HTTP listening") == 2, timeout=30)
        second_start = server.log_text().rsplit("no AE is registered", 1)
        assert len(second_start) == 2 and DICOM_OPEN not in second_start[1]
        assert server.log_text().count(DICOM_OPEN) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_dicom_on_loopback_does_not_warn(pacs_server: PacsServer) -> None:
    assert wait_until(lambda: "HTTP listening" in pacs_server.log_text(), timeout=30)
    assert DICOM_OPEN not in pacs_server.log_text()


# -- 3: sequences nested too deep ----------------------------------------------------------------
_SQ = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)  # Referenced Image Sequence
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _nested(path: Path, depth: int, study_uid: str, sop_uid: str | None = None) -> Path:
    """A CT whose header holds *depth* sequences one inside another (undefined
    lengths, written byte by byte: pydicom's writer would recurse)."""
    make_ct(path, StudyInstanceUID=study_uid, PatientID="DEEP1")
    if sop_uid is not None:
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    pos = 132 + 12 + struct.unpack("<I", raw[140:144])[0]  # after the File Meta group
    while struct.unpack("<HH", raw[pos:pos + 4]) <= (0x0008, 0x1140):  # short-VR elements only in make_ct's
        pos += 8 + struct.unpack("<H", raw[pos + 6:pos + 8])[0]
    payload = _SQ + (_ITEM + _SQ) * (depth - 1) + _ITEM + _ITEM_END + (_SEQ_END + _ITEM_END) * (depth - 1) + _SEQ_END
    path.write_bytes(raw[:pos] + payload + raw[pos:])
    return path


def _metadata(server: PacsServer, study_uid: str) -> list[dict[str, Any]]:
    with server.http() as http:
        answer = http.get(f"/dicom-web/studies/{study_uid}/metadata")
    assert answer.status_code == 200, answer.text[:500]
    return json.loads(answer.content)


def _store(server: PacsServer, path: Path) -> str:
    """DCMTK storescu's verdict on one file (it re-encodes the sequences with
    defined lengths, which pydicom reads lazily: what passed before)."""
    result = server.storescu("-v", str(path))
    return next(line for line in (result.stdout + result.stderr).splitlines() if "Received Store Response" in line)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_deeply_nested_sequences_are_refused_by_c_store(pacs_server: PacsServer, tmp_path: Path) -> None:
    server = pacs_server
    study = generate_uid()
    normal = make_ct(tmp_path / "normal.dcm", StudyInstanceUID=study, PatientID="DEEP1")
    assert "Success" in _store(server, normal)
    for depth in (20, 500):  # 40 and 1000 levels of sequences and items
        answer = _store(server, _nested(tmp_path / f"deep{depth}.dcm", depth, study))
        assert "CannotUnderstand" in answer, (depth, answer)
    assert "sequences nested more than 32 levels deep" in server.log_text()
    # Real nesting (an SR's content tree, a few levels) is still taken.
    assert "Success" in _store(server, _nested(tmp_path / "deep8.dcm", 8, study))
    sops = {m["00080018"]["Value"][0] for m in _metadata(server, study)}
    assert sops == {dcmread(normal).SOPInstanceUID, dcmread(tmp_path / "deep8.dcm").SOPInstanceUID}


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_study_metadata_survives_an_unreadable_stored_instance(pacs_server: PacsServer, tmp_path: Path) -> None:
    """An object stored before C-STORE refused such nesting: its stored
    header is swapped on disk for a 500-deep one (same UIDs). The study's
    metadata leaves it out (logged) instead of failing with a 500 or a body
    broken off; the instance's own metadata is a 422."""
    server = pacs_server
    study = generate_uid()
    paths = [make_ct(tmp_path / f"ok{n}.dcm", StudyInstanceUID=study, PatientID="DEEP1") for n in range(2)]
    for path in paths:
        assert "Success" in _store(server, path)
    bad = dcmread(paths[0])
    stored = next((server.data_dir / "objects").rglob(f"{bad.SOPInstanceUID}*.dcm"))
    stored.write_bytes(_nested(tmp_path / "swapped.dcm", 500, study, bad.SOPInstanceUID).read_bytes())
    sops = [m["00080018"]["Value"][0] for m in _metadata(server, study)]
    assert sops == [dcmread(paths[1]).SOPInstanceUID]
    assert f"instance {bad.SOPInstanceUID} left out" in server.log_text()
    with server.http() as http:
        one = http.get(f"/dicom-web/studies/{study}/series/{bad.SeriesInstanceUID}/instances/"
                       f"{bad.SOPInstanceUID}/metadata")
    assert one.status_code == 422, one.text[:300]
