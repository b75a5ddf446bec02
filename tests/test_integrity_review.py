"""Integrity review fixes: what the index says of an object is what is stored,
and what a study is filed as follows every object of it.

- one instance received by two worker processes at once (two AEs, keep-first
  and overwrite): one copy, the row describes the stored bytes;
- a study whose first object had no Patient ID is filed under the patient a
  later object names;
- a deleted or purged study does not come back from a crash's orphan;
- a later series fills the study's empty attributes (accession: the order is
  matched) and its differing name is corrected on retrieval;
- an instance moved to another study (overwrite policy) leaves no empty
  series, study or patient behind;
- the per-host association limit is the pool's, not a worker's share.

Real `pacs serve` processes with `--dicom-workers 2` on the filesystem store
and SQLite (PostgreSQL too for the first), DCMTK storescu, pynetdicom and
HTTP."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from .conftest import PacsServer
from .dicomfiles import make_ct
from .peers import Backend, create_database, drop_database, wait_until
from .test_dicom_workers import _workers
from .test_order_review import ack, nw
from .test_query_retrieve import findscu, study_matches

WORKERS = "2"


def _server(folder: Path, **env: str) -> PacsServer:
    return PacsServer(folder / "data", Backend("sqlite-fs", None, None, {}),
                      extra_env={"PACS_DICOM_WORKERS": WORKERS, **env}).start()


@pytest.fixture(scope="module")
def keep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Two DICOM workers, keep-first policy."""
    server = _server(tmp_path_factory.mktemp("keep"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def overwrite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Two DICOM workers, overwrite policy."""
    server = _server(tmp_path_factory.mktemp("overwrite"), PACS_DUPLICATE_POLICY="overwrite")
    yield server
    server.stop()


@pytest.fixture
def keep_pg(tmp_path: Path, postgres: str) -> Iterator[PacsServer]:
    """Two DICOM workers on a PostgreSQL index and the filesystem store (one test's)."""
    url = create_database(postgres)
    server = PacsServer(tmp_path / "data", Backend("pg-fs", url, None, {}),
                        extra_env={"PACS_DICOM_WORKERS": WORKERS}).start()
    yield server
    server.stop()
    drop_database(url, postgres)


def _series(folder: Path, count: int, **attrs: Any) -> list[Path]:
    """*count* CT objects of one new series, each with pixels of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    attrs.setdefault("StudyInstanceUID", generate_uid())
    attrs.setdefault("SeriesInstanceUID", generate_uid())
    return [make_ct(folder / f"{n:03d}.dcm", InstanceNumber=n + 1, PixelData=bytes([n % 251 + 1]) * (16 * 16 * 2),
                    **attrs) for n in range(count)]


def _verified(server: PacsServer) -> dict[str, Any]:
    checked = json.loads(server.cli("verify", "--json", check=False).stdout)
    assert checked["ok"], checked
    return checked


# -- 1: one instance, two processes at once ------------------------------------------
def _send_from_two_aes(server: PacsServer, folder: Path) -> None:
    results: dict[str, Any] = {}

    def send(calling: str) -> None:
        results[calling] = server.storescu("+sd", str(folder), calling=calling)

    threads = [threading.Thread(target=send, args=(calling,)) for calling in ("CT1", "ROUTER_B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values()), {k: r.stderr[-500:] for k, r in results.items()}


def _rows_not_describing_their_object(server: PacsServer, sop_uids: set[str]) -> list[str]:
    from pacs.index.models import Instance

    core = server.core()
    try:
        with core.engine.connect() as conn:
            rows = conn.execute(select(Instance.sop_uid, Instance.storage_key, Instance.sha256)
                                .where(Instance.sop_uid.in_(sop_uids))).all()
        assert len(rows) == len(sop_uids)
        return [key for _, key, sha256 in rows if core.store.checksum(key) != sha256]
    finally:
        core.close()


def _frames_differing(server: PacsServer, files: list[Path]) -> list[str]:
    wrong = []
    with server.http() as http:
        for path in files:
            ds = dcmread(path)
            answer = http.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                              f"{ds.SOPInstanceUID}/frames/1",
                              headers={"Accept": "multipart/related; type=application/octet-stream"})
            if answer.status_code != 200 or ds.PixelData not in answer.content:
                wrong.append(f"{ds.SOPInstanceUID}: {answer.status_code}")
    return wrong


@pytest.mark.parametrize("serving", ["keep", "overwrite", "keep_pg"])
def test_one_instance_from_two_workers_at_once_is_indexed_as_stored(
        serving: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    server: PacsServer = request.getfixturevalue(serving)
    sent: list[Path] = []
    for round_ in range(3):
        files = _series(tmp_path / f"r{round_}", 30, PatientID=f"DUP{round_}", PatientName="Pham^Van C")
        _send_from_two_aes(server, tmp_path / f"r{round_}")
        sent += files
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    assert _rows_not_describing_their_object(server, uids) == []
    assert _frames_differing(server, sent) == []
    _verified(server)


# -- 5: overwrite policy, an instance resent into another study -----------------------
def test_overwrite_resend_into_another_study_leaves_no_empty_study(overwrite: PacsServer, tmp_path: Path) -> None:
    wrong = _series(tmp_path / "wrong", 3, PatientID="WRONG5", PatientName="Sai^Benh Nhan")
    assert overwrite.storescu(*map(str, wrong)).returncode == 0
    old_study = str(dcmread(wrong[0], stop_before_pixels=True).StudyInstanceUID)
    # The modality corrected the patient: the same SOP Instance UIDs, in a new study.
    new_study, new_series = generate_uid(), generate_uid()
    right = []
    for path in wrong:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = new_study, new_series
        ds.PatientID, ds.PatientName = "RIGHT5", "Dung^Benh Nhan"
        right.append(tmp_path / f"right-{path.name}")
        ds.save_as(right[-1], enforce_file_format=True)
    assert overwrite.storescu(*map(str, right)).returncode == 0
    assert study_matches(overwrite, tmp_path, PatientID="WRONG5") == set()
    assert study_matches(overwrite, tmp_path, PatientID="RIGHT5") == {new_study}
    assert findscu(overwrite, tmp_path, "SERIES", {"StudyInstanceUID": old_study, "SeriesInstanceUID": ""}) == []
    assert findscu(overwrite, tmp_path, "PATIENT", {"PatientID": "WRONG5"}, "-P") == []
    moved = findscu(overwrite, tmp_path, "SERIES", {"StudyInstanceUID": new_study, "SeriesInstanceUID": "",
                                                    "NumberOfSeriesRelatedInstances": ""})
    assert [int(r.NumberOfSeriesRelatedInstances) for r in moved] == [3]
    with overwrite.http() as http:
        assert http.get(f"/dicom-web/studies/{old_study}/metadata").status_code == 404


# -- 3: a deleted study's orphan is deleted with it --------------------------------------
def _orphan_of(server: PacsServer, study: str, series: str, path: Path) -> str:
    """Write an object of *study* into the store without an index row, as a
    crash between the object write and the index commit leaves one."""
    from pacs.ingest import object_key

    ds = dcmread(make_ct(path, StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="ORPHAN3",
                         PatientName="Nham^Benh Nhan", StudyDate="19990101"), stop_before_pixels=True)
    key = object_key(study, series, str(ds.SOPInstanceUID))
    core = server.core()
    try:
        with open(path, "rb") as stream:
            core.store.put(key, stream, path.stat().st_size)
    finally:
        core.close()
    return key


def _stored(server: PacsServer, key: str) -> bool:
    core = server.core()
    try:
        return core.store.exists(key)
    finally:
        core.close()


@pytest.mark.parametrize("how", ["delete", "purge"])
def test_deleted_study_does_not_come_back_from_a_crash_orphan(keep: PacsServer, tmp_path: Path, how: str) -> None:
    files = _series(tmp_path / "study", 2, PatientID="ORPHAN3", PatientName="Nham^Benh Nhan", StudyDate="19990101")
    assert keep.storescu(*map(str, files)).returncode == 0
    first = dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    orphan = _orphan_of(keep, study, series, tmp_path / "orphan.dcm")
    found = json.loads(keep.cli("verify", "--json", check=False).stdout)
    assert [o["key"] for o in found["orphans"]["items"]] == [orphan]
    if how == "delete":
        keep.cli("delete", study, "--reason", "sent to the wrong patient", "--yes")
    else:
        # Only this study (and the delete case's, sent again) is older than 20 years.
        keep.cli("purge", "--older-than", "7300", "--yes")
    assert not _stored(keep, orphan)
    repaired = json.loads(keep.cli("verify", "--repair", "--json").stdout)
    assert repaired["adopted"]["count"] == 0 and repaired["ok"], repaired
    assert findscu(keep, tmp_path, "STUDY", {"StudyInstanceUID": study}) == []
    assert study_matches(keep, tmp_path, PatientID="ORPHAN3") == set()
    if how == "delete":
        # The modality sending it again afterwards is stored as any new object.
        assert keep.storescu(str(tmp_path / "orphan.dcm")).returncode == 0
        assert _stored(keep, orphan) and study_matches(keep, tmp_path, PatientID="ORPHAN3") == {study}


# -- 2: a study begun without a Patient ID ------------------------------------------------
def _metadata_patients(server: PacsServer, study: str) -> set[tuple[str, str, str]]:
    """(Patient ID, name, birth date) of each instance of *study* as WADO-RS gives it."""
    with server.http() as http:
        answer = http.get(f"/dicom-web/studies/{study}/metadata")
    assert answer.status_code == 200, answer.text
    return {(str(i.get("00100020", {}).get("Value", [""])[0]),
             str(i.get("00100010", {}).get("Value", [{}])[0].get("Alphabetic", "")),
             str(i.get("00100030", {}).get("Value", [""])[0])) for i in answer.json()}


def test_a_study_begun_without_patient_id_is_filed_under_the_patient_a_later_series_names(
        keep: PacsServer, tmp_path: Path) -> None:
    study = generate_uid()
    capture = _series(tmp_path / "ot", 1, StudyInstanceUID=study, PatientID="", PatientName="", Modality="OT")
    ct = _series(tmp_path / "ct", 2, StudyInstanceUID=study, PatientID="BN300", PatientName="Lê^Văn Cường",
                 PatientBirthDate="19600101", PatientSex="M", SpecificCharacterSet="ISO_IR 192")
    assert keep.storescu(*map(str, capture)).returncode == 0
    assert keep.storescu(*map(str, ct)).returncode == 0
    assert study_matches(keep, tmp_path, PatientID="BN300") == {study}
    # Every object of the study as its patient's, the capture's included; none blanked.
    assert _metadata_patients(keep, study) == {("BN300", "Lê^Văn Cường", "19600101")}


# -- 4: what a later series brings -------------------------------------------------------------
def test_an_accession_arriving_with_a_later_series_matches_the_study_to_its_order(
        keep: PacsServer, tmp_path: Path) -> None:
    today = datetime.now().strftime("%Y%m%d")
    assert ack(keep, nw("IR4", "IR4001", pid="BN-IR4", name="Nguyễn^Văn An"))[0] == "AA"
    study = generate_uid()
    # The scout, sent before the technologist picked the worklist item.
    scout = _series(tmp_path / "scout", 1, StudyInstanceUID=study, PatientID="BN-IR4", PatientName="NGUYEN VAN AN",
                    StudyDate=today)
    axial = _series(tmp_path / "axial", 3, StudyInstanceUID=study, PatientID="BN-IR4", PatientName="Nguyễn^Văn An",
                    StudyDate=today, AccessionNumber="IR4001", StudyDescription="CT ngực",
                    SpecificCharacterSet="ISO_IR 192")
    assert keep.storescu(*map(str, scout)).returncode == 0
    assert keep.storescu(*map(str, axial)).returncode == 0
    with keep.http() as http:
        assert study not in {s["study_uid"] for s in http.get("/api/studies/unmatched").json()}
        found = http.get("/dicom-web/studies", params={"AccessionNumber": "IR4001"}).json()
        assert [s["0020000D"]["Value"][0] for s in found] == [study]
        assert http.get("/api/orders/IR4001").status_code == 200
    assert study_matches(keep, tmp_path, AccessionNumber="IR4001", StudyDescription="CT ngực") == {study}


def test_a_later_series_with_another_name_is_retrieved_under_the_study_s_patient(
        keep: PacsServer, tmp_path: Path) -> None:
    study = generate_uid()
    first = _series(tmp_path / "a", 2, StudyInstanceUID=study, PatientID="P-IR5", PatientName="Nguyen^Van A",
                    PatientBirthDate="19800101", PatientSex="M")
    later = _series(tmp_path / "b", 2, StudyInstanceUID=study, PatientID="P-IR5", PatientName="Nguyễn^Văn An",
                    PatientBirthDate="19800110", PatientSex="M", SpecificCharacterSet="ISO_IR 192")
    assert keep.storescu(*map(str, first)).returncode == 0
    assert keep.storescu(*map(str, later)).returncode == 0
    assert _metadata_patients(keep, study) == {("P-IR5", "Nguyen^Van A", "19800101")}


# -- 6: the per-host limit of a pool of workers ------------------------------------------------
def test_per_host_limit_holds_for_the_pool_of_workers(keep: PacsServer) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    def associate(held: list[Any], title: str) -> bool:
        ae = AE(ae_title=title)
        ae.add_requested_context(CTImageStorage)
        held.append(ae.associate("127.0.0.1", keep.dicom_port, ae_title=keep.ae_title))
        return bool(held[-1].is_established)

    # max_associations 32 (the default): one address may hold 16, however
    # the kernel spreads them over the workers; here all on one (the other
    # stopped, it accepts nothing), the most uneven spread.
    first, *others = _workers(keep)
    held: list[Any] = []
    os.kill(first, signal.SIGSTOP)
    try:
        for n in range(16):
            associate(held, f"MOD{n}")
    finally:
        os.kill(first, signal.SIGCONT)
    try:
        assert [a.is_established for a in held] == [True] * 16
        # The 17th is over the limit whichever worker takes it.
        extra: list[Any] = []
        assert not associate(extra, "MOD17") and extra[0].is_rejected
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    # Released, they no longer count (once the workers have seen them close).
    again: list[Any] = []
    assert wait_until(lambda: associate(again, "MOD18"), timeout=30, interval=0.2)
    again[-1].release()
