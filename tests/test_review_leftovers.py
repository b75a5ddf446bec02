"""Defects earlier reviews noticed and left alone, each against real peers
(a real `pacs serve`, DCMTK / pynetdicom, PostgreSQL, SeaweedFS S3):

1. overwrite policy: a resend replaced the stored object under its key
   before the index commit; when that commit failed (the sender was told
   0xA703) the row still described the old bytes (size, sha256, frames)
   while the store held the new ones, and the acknowledged copy was gone.
   The replacement is now written under a key of its own and the row
   switched to it in the commit; the old object goes only after. A resend
   a crash left before its commit is not adopted by `pacs verify --repair`
   in place of the acknowledged copy.
2. prefetch: a job the server died running (killed, crashed) was given back
   at the next start with its try not counted, and ran again at once: a job
   that kills the server each run kept it restarting forever. Its tries now
   count (dead after prefetch_max_attempts), on this node or another;
   a source taken out of prefetch_sources was still asked, by the jobs
   queued before, for the priors it had found: now dropped, with a note.
5. share links of an order: an accession number holding "/" could not be
   reached (the order API and its share routes took one path segment); an
   order the HIS withdrew after its images hid them (410 "cancelled"): the
   images acquired stay shown, "cancelled" only when none came.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from .conftest import Backend, PacsServer, make_backend
from .dicomfiles import make_ct
from .test_dimse_failures import scu_store_file
from .peers import free_port, index_writes_fail
from .test_prefetch import HOSPITAL_ID, P_CT_RECENT, _held, _order, _prefetch_cli, _settled, old_pacs
from .test_review_prefetch import _frozen_old_pacs
from .test_review_prefetch import _server as _prefetch_server
from .test_share_links import path_of, patient
from .test_share_orders import (
    cancel_order,
    make_order_link,
    new_accession,
    new_patient_id,
    opened,
    order_of,
    place_order,
    send_study,
    token_of,
)

INDEX_FAILED = 0xA703
PREFETCH_ROOT = "1.2.826.0.1.3680043.8.498.7739."


# -- 1: overwrite policy, a resend whose index commit fails ---------------------------
@pytest.fixture(params=["sqlite-fs", "pg-s3"])
def overwriting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    """An archive under the overwrite policy (one test's)."""
    backend: Backend = make_backend(request.param, request)
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    yield server
    server.stop()


def _stored(server: PacsServer, sop_uid: str) -> tuple[Any, bytes, list[str]]:
    """(the instance's row, the bytes under its key, every key the store holds)."""
    from pacs.index.models import Instance

    core = server.core()
    try:
        with core.engine.connect() as conn:
            row = conn.execute(select(Instance.storage_key, Instance.sha256, Instance.size_bytes)
                               .where(Instance.sop_uid == sop_uid)).one()
        return row, core.store.read_bytes(row.storage_key), sorted(info.key for info in core.store.list())
    finally:
        core.close()


def _verify_clean(server: PacsServer) -> None:
    result = server.cli("verify", "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], report


def test_overwrite_resend_failing_its_index_commit_keeps_the_acknowledged_copy(
        overwriting: PacsServer, tmp_path: Path) -> None:
    first = make_ct(tmp_path / "first.dcm", PatientName="FIRST^VERSION", PatientID="OVR1")
    assert scu_store_file(overwriting, first) == 0
    second = dcmread(first)
    second.PatientName = "SECOND^VERSION^LONGER"
    second.save_as(tmp_path / "second.dcm")
    sop = str(second.SOPInstanceUID)

    index_writes_fail(overwriting, "UPDATE", True)
    try:
        assert scu_store_file(overwriting, tmp_path / "second.dcm") == INDEX_FAILED
    finally:
        index_writes_fail(overwriting, "UPDATE", False)
    row, data, keys = _stored(overwriting, sop)
    # The acknowledged copy is still stored, as its row describes it.
    assert b"FIRST^VERSION" in data and b"SECOND^VERSION" not in data
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (row.sha256, row.size_bytes)
    assert keys == [row.storage_key]  # the refused copy is not left behind
    _verify_clean(overwriting)

    # The modality's retry replaces it: the row describes the new object; the
    # one it replaced stays for its readers' grace (test_review_resend).
    first_key = row.storage_key
    assert scu_store_file(overwriting, tmp_path / "second.dcm") == 0
    row, data, keys = _stored(overwriting, sop)
    assert b"SECOND^VERSION" in data
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (row.sha256, row.size_bytes)
    assert keys == sorted([row.storage_key, first_key])
    # And again (the key it was replaced under is taken now).
    assert scu_store_file(overwriting, first) == 0
    row, data, keys = _stored(overwriting, sop)
    assert b"FIRST^VERSION" in data and row.storage_key in keys and len(keys) == 2
    assert hashlib.sha256(data).hexdigest() == row.sha256
    _verify_clean(overwriting)


# -- 2: prefetch, a job that kills the server each time it runs -----------------------
def test_a_prefetch_job_the_server_dies_running_is_dead_after_its_tries(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The server died while a job ran (the OOM killer during a prior's
    retrieve, a crash in a codec): at the next start the job was given back
    with its try not counted, as for a clean stop, and ran again at once; a
    job that kills the server each time it runs kept it restarting forever.
    The try now counts: dead after prefetch_max_attempts, as any failing job."""
    server = _prefetch_server(tmp_path, request, PACS_PREFETCH_MAX_ATTEMPTS="2").start()
    try:
        with _frozen_old_pacs(HOSPITAL_ID, f"{PREFETCH_ROOT}1") as (port, moving):
            server.cli("ae", "add", "LEGACY", "--host", "127.0.0.1", "--port", str(port))
            _order(server, "LOK1", "LOKACC1")
            for _ in range(2):
                assert moving.wait(120), server.log_text()[-3000:]
                moving.clear()
                server.stop(signal.SIGKILL)  # dies while the job runs
                server.start()
            job = _settled(server, "LOKACC1", "dead", timeout=60)
            assert job["attempts"] == 2 and "stopped while" in job["last_error"], job
            # Dead: not run again by the restart.
            assert not moving.is_set()
            code, listed = _prefetch_cli(server, "list", "--state", "dead")
            assert code == 0 and [j["accession"] for j in listed["jobs"]] == ["LOKACC1"], listed
    finally:
        server.stop()


@contextmanager
def _refusing_old_pacs(study_uid: str, day: str) -> Iterator[tuple[int, list[str]]]:
    """An old PACS being retired (pynetdicom, real associations): it finds
    one study of the patient (four instances) but lists none of its
    instances (its disks are gone): it cannot send it. Yields its port and
    the query levels it was asked."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    asked: list[str] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        asked.append(query.QueryRetrieveLevel)
        if query.QueryRetrieveLevel == "STUDY" and query.get("PatientID") == HOSPITAL_ID:
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.PatientID, answer.StudyInstanceUID = HOSPITAL_ID, study_uid
            answer.StudyDate, answer.StudyTime, answer.NumberOfStudyRelatedInstances = day, "101500", "4"
            yield 0xFF00, answer
        yield 0x0000, None

    ae = AE(ae_title="RETIRED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port, asked
    finally:
        scp.shutdown()


def test_a_source_taken_out_of_prefetch_sources_is_not_used_by_queued_jobs(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The old PACS that found a prior cannot send it; the hospital then
    retired it (taken out of prefetch_sources, the new one in) and the job
    still asked the retired one for that prior on every try, the new one
    never asked for it (a study is taken from the source that found it
    first): the prior never came, the job died. Priors the retired source
    found and that are not here are now dropped, with a note, and looked
    for again at the sources configured."""
    day = (date.today() - timedelta(days=P_CT_RECENT.days_ago)).strftime("%Y%m%d")
    server = _prefetch_server(tmp_path, request, PACS_PREFETCH_SOURCES="RETIRED").start()
    try:
        with _refusing_old_pacs(P_CT_RECENT.uid, day) as (port, asked):
            server.cli("ae", "add", "RETIRED", "--host", "127.0.0.1", "--port", str(port))
            _order(server, "LOS1", "LOSACC1")
            job = _settled(server, "LOSACC1", "pending", attempts=1)
            assert [s["source"] for s in job["studies"]] == ["RETIRED"] and job["missing"] == 1, job
            assert "SERIES" in asked or "IMAGE" in asked  # asked for the prior's instances
            server.stop()
            server.extra_env["PACS_PREFETCH_SOURCES"] = "LEGACY"
            server.start()
            with old_pacs(tmp_path, server):
                asked.clear()
                code, _ = _prefetch_cli(server, "retry", "--id", str(job["id"]))
                assert code == 0
                job = _settled(server, "LOSACC1", "done", attempts=2)
            assert asked == []  # the retired source is not asked again
            assert P_CT_RECENT.uid in [s["study_uid"] for s in job["studies"]]
            assert {s["source"] for s in job["studies"]} == {"LEGACY"}, job
            assert _held(server)[P_CT_RECENT.uid] == P_CT_RECENT.instances
            assert any("RETIRED" in note and "no longer" in note for note in job["notes"]), job
    finally:
        server.stop()


# -- 5: share links of an order: an accession with "/", an order withdrawn after its images -----
@pytest.fixture(scope="module")
def share_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A running archive with the tokens tests/test_share_orders.py's helpers use."""
    tmp = tmp_path_factory.mktemp("leftovers-share")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {})).start()
    server.work = tmp  # type: ignore[attr-defined]
    server.tokens = {"his": server.make_token("his", "his", "HIS")}  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_an_order_link_for_an_accession_with_a_slash(share_archive: PacsServer) -> None:
    """Many HIS number exams "CT/2024/0153" (legal in SH). The order API and
    the order's share links took the accession as one path segment: its
    "/" (sent as %2F, decoded before routing) made every such URL a 404, no
    link could be made for the receipt."""
    acc, pid = f"CT/{uuid.uuid4().hex[:6].upper()}/01", new_patient_id()
    place_order(share_archive, acc, pid)
    quoted = quote(acc, safe="")
    with share_archive.http(token=token_of(share_archive, "his")) as his:
        got = his.get(f"/api/orders/{quoted}")
        assert got.status_code == 200 and got.json()["accession_number"] == acc, got.text
        made = his.post(f"/api/orders/{quoted}/shares", json={"days": 7})
        assert made.status_code == 201, made.text
        listed = his.get(f"/api/orders/{quoted}/shares")
        assert listed.status_code == 200 and [i["accession"] for i in listed.json()["items"]] == [acc], listed.text
    study = send_study(share_archive, accession=acc, patient_id=pid)
    with patient(share_archive) as phone:
        shown = opened(phone, path_of(made.json()))
    assert shown["ready"] and [s["study_uid"] for s in shown["studies"]] == [study["study"]], shown
    with share_archive.http(token=token_of(share_archive, "his")) as his:
        cancelled = his.delete(f"/api/orders/{quoted}")
        assert cancelled.status_code == 200, cancelled.text


def test_an_order_withdrawn_after_its_images_still_shows_them(share_archive: PacsServer) -> None:
    """The HIS discontinued the order after the scan (the patient left before
    the contrast series; billing changed the procedure): the patient's link
    answered "the examination was cancelled" (410) and hid the images taken
    under it. An order withdrawn with images shows them; one withdrawn
    before any image still says it was cancelled."""
    acc, pid = new_accession("LW"), new_patient_id()
    place_order(share_archive, acc, pid)
    link = make_order_link(share_archive, acc)
    study = send_study(share_archive, accession=acc, patient_id=pid)
    cancel_order(share_archive, acc, pid)
    assert order_of(share_archive, acc)["status"] == "CANCELLED"
    base = path_of(link)
    with patient(share_archive) as phone:
        assert phone.get(base).status_code == 200
        shown = opened(phone, base)
        assert shown["ready"] and [s["study_uid"] for s in shown["studies"]] == [study["study"]], shown
        assert shown["order"]["status"] == "CANCELLED"
    # Nothing acquired: cancelled, as before.
    empty, other = new_accession("LE"), new_patient_id()
    place_order(share_archive, empty, other)
    nothing = make_order_link(share_archive, empty)
    cancel_order(share_archive, empty, other)
    with patient(share_archive) as phone:
        page = phone.get(path_of(nothing))
        assert page.status_code == 410 and "The examination was cancelled" in page.text


def test_verify_repair_does_not_put_a_refused_resend_in_place_of_the_acknowledged_copy(tmp_path: Path) -> None:
    """The server died between writing a resend (overwrite policy, under a key
    of its own) and its index commit: the modality got no success. `pacs
    verify --repair` adopted that orphan through the overwriting ingest, and
    it replaced the acknowledged copy. It is now reported as a duplicate of
    the indexed instance and left alone, as under keep-first."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}).start()
    try:
        first = make_ct(tmp_path / "first.dcm", PatientName="FIRST^VERSION", PatientID="OVR2")
        assert scu_store_file(server, first) == 0
    finally:
        server.stop()
    second = dcmread(first)
    second.PatientName = "SECOND^VERSION"
    sop = str(second.SOPInstanceUID)
    row, data, _ = _stored(server, sop)
    orphan = row.storage_key.replace(".dcm", ".resent.dcm")
    core = server.core()
    try:
        buffer = io.BytesIO()
        second.save_as(buffer, enforce_file_format=True)
        core.store.put(orphan, io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))  # what the crash left
    finally:
        core.close()
    repaired = json.loads(server.cli("verify", "--repair", "--json", check=False).stdout)
    assert repaired["adopted"]["count"] == 0, repaired
    assert [o["key"] for o in repaired["duplicate_orphans"]["items"]] == [orphan], repaired
    after, kept, _ = _stored(server, sop)
    assert (after.storage_key, after.sha256, kept) == (row.storage_key, row.sha256, data)
