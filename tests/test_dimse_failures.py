"""Issue 2 acceptance 3-6: failures answered with the right status, duplicates,
bad input, AE checks and character sets -- the server keeps serving."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .conftest import (
    S3_ACCESS,
    S3_SECRET,
    Backend,
    PacsServer,
    S3Server,
    dataset_bytes,
    free_port,
    run_dcmtk,
)
from .dicomfiles import make_ct
from .peers import PG_ADMIN, create_database, drop_database, start_s3, wait_until


def scu_store_file(server: PacsServer, path: Path, calling: str = "PYSCU") -> int:
    """Send a Part 10 file's dataset bytes exactly as they are (no
    re-encoding; the File Meta alone is read, so a cut object goes as cut)."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status is not None and "Status" in status, "no C-STORE response"
    return int(status.Status)


def assert_still_serving(server: PacsServer, tmp_path: Path) -> None:
    assert server.alive(), server.log_text()[-3000:]
    good = make_ct(tmp_path / f"good-{uuid.uuid4().hex}.dcm")
    assert server.storescu(str(good)).returncode == 0


@pytest.fixture(scope="module", params=["sqlite-fs", "pg-s3"])
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per backend for the tests that send objects and look at what
    became of them (by UID, or as a difference): starting one per test was a
    tenth of this file's time."""
    tmp = tmp_path_factory.mktemp(f"failures-{request.param}")
    pg = create_database() if request.param == "pg-s3" else None
    env: dict[str, str] = {}
    storage = None
    if request.param == "pg-s3":
        s3 = request.getfixturevalue("s3_server")
        storage = s3.url(f"failures-{uuid.uuid4().hex[:12]}")
        env = {"PACS_S3_ACCESS_KEY": s3.access_key, "PACS_S3_SECRET_KEY": s3.secret_key}
    server = PacsServer(tmp / "data", Backend(request.param, pg, storage, env)).start()
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def stored_keys(server: PacsServer) -> set[str]:
    core = server.core()
    try:
        return {info.key for info in core.store.list()}
    finally:
        core.close()


# -- bad input -----------------------------------------------------------------------
def test_bad_objects_get_clear_failure_status(shared_server: PacsServer, tmp_path: Path) -> None:
    pacs_server = shared_server
    before = pacs_server.stats()
    keys_before = stored_keys(pacs_server)

    # Not DICOM at all: valid file meta, garbage where the dataset should be.
    ok = make_ct(tmp_path / "ok.dcm")
    garbage = tmp_path / "garbage.dcm"
    raw = ok.read_bytes()
    meta_end = raw.index(b"\x08\x00\x16\x00")  # (0008,0016), first dataset element
    garbage.write_bytes(raw[:meta_end] + b"\xde\xad\xbe\xef" * 64)
    assert scu_store_file(pacs_server, garbage) & 0xF000 == 0xC000

    # Truncated: the pixel data is cut short.
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(make_ct(tmp_path / "t.dcm").read_bytes()[:-100])
    assert scu_store_file(pacs_server, truncated) == 0xC000

    # Missing and invalid UIDs.
    assert scu_store_file(pacs_server, make_ct(tmp_path / "nostudy.dcm", StudyInstanceUID=None)) == 0xA900
    assert scu_store_file(pacs_server, make_ct(tmp_path / "noseries.dcm", SeriesInstanceUID=None)) == 0xA900
    assert scu_store_file(pacs_server, make_ct(tmp_path / "baduid.dcm", SeriesInstanceUID="1.2.abc.04")) == 0xA900
    # Dataset's SOP Instance UID differs from the command's (taken from the meta).
    mismatch = make_ct(tmp_path / "mismatch.dcm", SOPInstanceUID="1.2.826.0.1.3680043.2.1143.71")
    raw = mismatch.read_bytes()
    head = raw[:400].replace(b"1.2.826.0.1.3680043.2.1143.71", b"1.2.826.0.1.3680043.2.1143.72", 1)
    mismatch.write_bytes(head + raw[400:])
    assert scu_store_file(pacs_server, mismatch) == 0xA900

    assert pacs_server.stats() == before, "a refused object was indexed"
    assert stored_keys(pacs_server) == keys_before, "a refused object was left in storage"
    assert_still_serving(pacs_server, tmp_path)
    assert "refused" in pacs_server.log_text()


def test_invalid_sop_instance_uid_in_the_command_is_refused_not_aborted(shared_server: PacsServer,
                                                                         tmp_path: Path) -> None:
    """DCMTK's storescu puts the object's SOP Instance UID in the C-STORE
    command: an invalid one ("1.2.3.abc", from a badly configured modality)
    is answered 0xA900 like any invalid UID, and the association goes on to
    store the next object (it was aborted with "invalid PDU")."""
    pacs_server = shared_server
    before = pacs_server.stats()["instances"]
    bad = make_ct(tmp_path / "badsop.dcm")
    ds = dcmread(bad)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.abc"
    ds.save_as(bad, enforce_file_format=True)
    good = make_ct(tmp_path / "after.dcm")
    result = pacs_server.storescu("-v", "--no-halt", str(bad), str(good))
    # DCMTK names 0xA900 "DataSetDoesNotMatchSOPClass".
    assert "DataSetDoesNotMatchSOPClass" in result.stderr, result.stderr[-2000:]
    assert pacs_server.stats()["instances"] == before + 1, result.stderr[-2000:]
    assert "invalid PDU" not in pacs_server.log_text()
    assert_still_serving(pacs_server, tmp_path)


def test_unknown_sop_class_is_rejected_at_negotiation(shared_server: PacsServer) -> None:
    pacs_server = shared_server
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.826.0.1.3680043.2.1143.999.1", ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pacs_server.dicom_port, ae_title="FILMLESS")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    assert "1.2.826.0.1.3680043.2.1143.999.1" in rejected and Verification in accepted
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_wrong_called_ae_title_rejected(shared_server: PacsServer) -> None:
    pacs_server = shared_server
    result = run_dcmtk("echoscu", "-aec", "NOTUS", "127.0.0.1", str(pacs_server.dicom_port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr or "Rejected" in result.stderr


def test_allowlist_rejects_unknown_calling_ae(tmp_path: Path) -> None:
    backend = Backend("sqlite-fs", None, None, {})
    server = PacsServer(tmp_path / "data", backend, extra_env={"PACS_AE_ALLOWLIST": "true"})
    server.cli("ae", "add", "CT_ROOM1", "--host", "127.0.0.1", "--port", "104")
    server.start()
    try:
        refused = run_dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "FILMLESS", "127.0.0.1", str(server.dicom_port))
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr, refused.stderr
        allowed = run_dcmtk("echoscu", "-aet", "CT_ROOM1", "-aec", "FILMLESS", "127.0.0.1", str(server.dicom_port))
        assert allowed.returncode == 0, allowed.stderr
        # Registering an AE takes effect on the running server.
        server.cli("ae", "add", "US_ROOM2", "--host", "127.0.0.1", "--port", "104")
        import time

        time.sleep(2.5)
        late = run_dcmtk("echoscu", "-aet", "US_ROOM2", "-aec", "FILMLESS", "127.0.0.1", str(server.dicom_port))
        assert late.returncode == 0, late.stderr
        assert server.alive()
    finally:
        server.stop()


def test_a_link_silent_halfway_through_a_pdu_frees_its_association(tmp_path: Path) -> None:
    """A satellite link that stalls in the middle of a PDU (no FIN, no RST):
    after the network timeout its association and its slot are free again,
    and the server still stops on SIGTERM (it waited for that thread forever)."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_DICOM_TIMEOUT": "3", "PACS_MAX_ASSOCIATIONS": "1", "PACS_DICOM_WORKERS": "1"}).start()
    try:
        ae = AE(ae_title="STALLED")
        ae.add_requested_context(Verification)
        ae.network_timeout = ae.acse_timeout = 600
        tries: list = []
        # The one slot may still be held for a moment by the start-up check's
        # probe connection on a loaded machine: try again until it is free.
        assert wait_until(lambda: tries.append(ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title))
                          or tries[-1].is_established, timeout=30)
        stalled = tries[-1]
        sock = stalled.dul.socket.socket
        stalled.dul._kill_thread = True  # our side stops reading; the socket stays open
        time.sleep(0.2)
        sock.sendall(bytes([0x04, 0]) + (16384).to_bytes(4, "big") + b"\x00" * 100)  # 100 of 16,384 bytes
        echo = ("echoscu", "-aet", "AFTER", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
        assert wait_until(lambda: run_dcmtk(*echo).returncode == 0, timeout=60), "the stalled association kept its slot"
        sock.close()
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode in (0, -signal.SIGTERM), server.proc.returncode
    # A dropped link is said once, as what it is, not as an ERROR with a traceback.
    log = server.log_text()
    assert "connection from 127.0.0.1 (calling STALLED) lost in the middle of a PDU: TimeoutError" in log, log[-3000:]
    assert "Connection closed before the entire PDU" not in log and "Traceback" not in log



def test_one_host_gets_no_more_associations_than_its_share(tmp_path: Path) -> None:
    """max_associations_per_host held only against silent connections: a
    real client sends its A-ASSOCIATE-RQ at once, and 32 of 32 slots went to
    one address. The one over its share is rejected (transient, local limit
    exceeded) and audited; another host still gets in."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_MAX_ASSOCIATIONS": "8", "PACS_MAX_ASSOCIATIONS_PER_HOST": "2", "PACS_DICOM_WORKERS": "1"}).start()
    held = []
    try:
        ae = AE(ae_title="HOG")
        ae.add_requested_context(Verification)
        for _ in range(2):
            held.append(ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                                     bind_address=("127.0.0.2", 0)))
            assert held[-1].is_established
        third = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, bind_address=("127.0.0.2", 0))
        assert third.is_rejected and not third.is_established
        other = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, bind_address=("127.0.0.3", 0))
        assert other.is_established
        other.release()
    finally:
        for assoc in held:
            assoc.release()
        server.stop()
    assert "connection from 127.0.0.2 closed: it already has 2 open" in server.log_text()
    audit = server.cli("audit", "--format", "json").stdout
    assert "max_associations_per_host" in audit


def test_silent_connections_of_one_host_do_not_take_every_slot(tmp_path: Path) -> None:
    """Connections that never send an A-ASSOCIATE-RQ (a link frozen after the
    TCP handshake, a scanner, a hostile peer) each held a slot for 30 s: as
    many as max_associations, re-opened, refused every modality for good. One
    address now holds at most half the slots (the rest are closed at once,
    holding none) and gets 10 s to send its request (dicom_timeout if
    shorter: 3 s here)."""
    import socket

    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_MAX_ASSOCIATIONS": "8", "PACS_DICOM_WORKERS": "1", "PACS_DICOM_TIMEOUT": "3"}).start()
    silent: list[socket.socket] = []
    try:
        for _ in range(12):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # another host than the modality below
            sock.connect(("127.0.0.1", server.dicom_port))
            silent.append(sock)
        time.sleep(1)
        echo = ("echoscu", "-aet", "MODALITY", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
        assert run_dcmtk(*echo).returncode == 0, "a modality was refused while one host held silent connections"
        assert "connection from 127.0.0.2 closed: it already has 4 open" in server.log_text()
        for sock in silent:  # every silent connection is closed by the server in the end
            sock.settimeout(60)
            assert sock.recv(1) == b""
        # A request sent a byte at a time (each byte restarted the read's
        # network timeout: it held its slot for good) is cut off too.
        dribbler = socket.socket()
        dribbler.bind(("127.0.0.3", 0))
        dribbler.connect(("127.0.0.1", server.dicom_port))
        silent.append(dribbler)
        dribbler.sendall(bytes([0x01, 0]) + (2006).to_bytes(4, "big"))
        dribbler.settimeout(1)
        closed = False
        for _ in range(60):
            try:
                dribbler.sendall(b"\x00")
                closed = dribbler.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed, "a request dribbled a byte a second kept its connection"
    finally:
        for sock in silent:
            sock.close()
        server.stop()

def test_a_move_longer_than_the_network_timeout_keeps_the_association(tmp_path: Path) -> None:
    """A C-MOVE to a slow satellite takes longer than the network timeout:
    the requester's association stays usable afterwards (it was aborted as
    "idle" while the server was busy serving it)."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_DICOM_TIMEOUT": "2"}).start()
    slow = AE(ae_title="SLOWSAT")
    slow.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)

    def store(event: Any) -> int:
        time.sleep(0.8)  # a slow link: each object takes a while
        return 0x0000

    port = free_port()
    satellite = slow.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        study = generate_uid()
        for i in range(4):
            assert scu_store_file(server, make_ct(tmp_path / f"{i}.dcm", StudyInstanceUID=study)) == 0x0000
        server.cli("ae", "add", "SLOWSAT", "--host", "127.0.0.1", "--port", str(port))
        ae = AE(ae_title="WORKSTATION")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        try:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = study
            final = [s for s, _ in assoc.send_c_move(identifier, "SLOWSAT", StudyRootQueryRetrieveInformationModelMove)
                     if s][-1]
            assert final.Status == 0x0000 and int(final.NumberOfCompletedSuboperations) == 4
            echo = assoc.send_c_echo()
            assert assoc.is_established and echo and echo.Status == 0x0000, "the association was aborted after the move"
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        satellite.shutdown()
        server.stop()


# -- duplicates ----------------------------------------------------------------------
def test_resend_keeps_first_and_creates_no_duplicates(shared_server: PacsServer, tmp_path: Path) -> None:
    pacs_server = shared_server
    before, keys_before = pacs_server.stats(), stored_keys(pacs_server)
    first = make_ct(tmp_path / "first.dcm", PatientName="FIRST^VERSION")
    assert pacs_server.storescu(str(first)).returncode == 0
    assert pacs_server.storescu(str(first)).returncode == 0
    changed = dcmread(first)
    changed.PatientName = "SECOND^VERSION"
    changed.save_as(tmp_path / "second.dcm")
    assert pacs_server.storescu(str(tmp_path / "second.dcm")).returncode == 0
    stats = pacs_server.stats()
    assert stats["instances"] == before["instances"] + 1
    new = stored_keys(pacs_server) - keys_before
    assert len(new) == 1
    core = pacs_server.core()
    try:
        assert b"FIRST^VERSION" in core.store.read_bytes(new.pop())
    finally:
        core.close()


def test_another_object_under_a_kept_uid_is_refused_0111(shared_server: PacsServer, tmp_path: Path) -> None:
    """Not a resend but a different object (another patient and study) under
    a SOP Instance UID already kept: 0111H, never 0000H (the modality would
    delete what this archive does not hold), and no empty study is left."""
    pacs_server = shared_server
    before = pacs_server.stats()
    first = make_ct(tmp_path / "first.dcm", PatientID="DUP-A")
    assert scu_store_file(pacs_server, first) == 0x0000
    other = dcmread(first)
    other.PatientID = "DUP-B"
    other.StudyInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    other.save_as(tmp_path / "other.dcm")
    assert scu_store_file(pacs_server, tmp_path / "other.dcm") == 0x0111
    stats = pacs_server.stats()
    grown = {level: stats[level] - before[level] for level in ("patients", "studies", "series", "instances")}
    assert grown == {"patients": 1, "studies": 1, "series": 1, "instances": 1}, stats
    # A true resend of the first is still a success.
    assert scu_store_file(pacs_server, first) == 0x0000


def test_file_meta_elements_inside_the_data_set_are_dropped(shared_server: PacsServer, tmp_path: Path) -> None:
    """A modality that puts (0002,xxxx) elements into the data set (PS3.10
    7.1: they belong in the File Meta only): stored without them, so they
    never read as a second header (its transfer syntax broke retrieval)."""
    pacs_server = shared_server
    ct = make_ct(tmp_path / "ct.dcm")
    data = ct.read_bytes()
    ds = dcmread(ct)
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.4.50")  # JPEG Baseline, in the data set
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pacs_server.dicom_port, ae_title=pacs_server.ae_title)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    sop = str(dcmread(ct, stop_before_pixels=True).SOPInstanceUID)
    core = pacs_server.core()
    try:
        stored = core.store.read_bytes(core.reader.stored_instance(sop).storage_key)
    finally:
        core.close()
    assert stored.count(b"1.2.840.10008.1.2.4.50") == 0
    assert dataset_bytes(stored) == dataset_bytes(data)  # the rest exactly as received
    assert "File Meta elements (group 0002) inside the data set" in pacs_server.log_text()


def test_overwrite_policy_replaces(tmp_path: Path) -> None:
    server = PacsServer(
        tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env={"PACS_DUPLICATE_POLICY": "overwrite"}
    ).start()
    try:
        first = make_ct(tmp_path / "first.dcm", PatientName="FIRST^VERSION")
        assert server.storescu(str(first)).returncode == 0
        changed = dcmread(first)
        changed.PatientName = "SECOND^VERSION"
        changed.save_as(tmp_path / "second.dcm")
        assert server.storescu(str(tmp_path / "second.dcm")).returncode == 0
        assert server.stats()["instances"] == 1
        core = server.core()
        try:
            # The replaced copy stays for its readers' grace (test_review_resend).
            assert len(list(core.store.list())) == 2
            stored = core.reader.stored_instance(str(changed.SOPInstanceUID))
            assert stored is not None
            data = core.store.read_bytes(stored.storage_key)
            assert b"SECOND^VERSION" in data
            assert stored is not None and stored.size == len(data)
            assert core.store.checksum(stored.storage_key) == stored.sha256
        finally:
            core.close()
    finally:
        server.stop()


# -- storage failures ----------------------------------------------------------------
def test_s3_down_gives_failure_status_and_no_index_row(tmp_path: Path, pg_url: str) -> None:
    s3 = start_s3(tmp_path / "weed")
    env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    server = PacsServer(tmp_path / "data", Backend("pg-s3", pg_url, s3.url("failing"), env)).start()
    try:
        ok = make_ct(tmp_path / "ok.dcm")
        assert server.storescu(str(ok)).returncode == 0
        s3.stop()
        lost = make_ct(tmp_path / "lost.dcm")
        status = scu_store_file(server, lost)
        assert 0xA700 <= status <= 0xA7FF, hex(status)
        # The listener still answers other associations while storage is down.
        assert run_dcmtk("echoscu", "-aec", "FILMLESS", "127.0.0.1", str(server.dicom_port)).returncode == 0
        assert server.stats()["instances"] == 1
        assert server.http().get("/health").status_code == 503
        s3.start()
        assert scu_store_file(server, lost) == 0x0000
        assert server.stats()["instances"] == 2
        assert server.alive()
    finally:
        server.stop()
        s3.kill()  # thrown away: no clean stop to wait for


def allow_connections(pg_url: str, allow: bool) -> None:
    """Let the test database accept connections again, or refuse them and
    drop the ones it has: PostgreSQL down, as the server sees it."""
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (database,))


def test_index_down_gives_failure_status_and_nothing_uploaded(tmp_path: Path, pg_url: str, s3_bucket_url: str) -> None:
    """PostgreSQL unreachable: the C-STORE fails with 0xA703 before anything is
    uploaded, the listener keeps answering, and stores work again once it is back."""
    env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    server = PacsServer(tmp_path / "data", Backend("pg-s3", pg_url, s3_bucket_url, env)).start()
    try:
        assert scu_store_file(server, make_ct(tmp_path / "ok.dcm")) == 0x0000
        allow_connections(pg_url, False)
        try:
            lost = make_ct(tmp_path / "lost.dcm")
            assert scu_store_file(server, lost) == 0xA703
            assert run_dcmtk("echoscu", "-aec", "FILMLESS", "127.0.0.1", str(server.dicom_port)).returncode == 0
        finally:
            allow_connections(pg_url, True)
        core = server.core()
        try:
            assert len(list(core.store.list())) == 1  # the refused object was never uploaded
        finally:
            core.close()
        assert scu_store_file(server, lost) == 0x0000
        assert server.stats()["instances"] == 2
        assert server.alive()
    finally:
        server.stop()


def test_index_down_on_resend_to_filesystem_store_gives_a703(tmp_path: Path, pg_url: str) -> None:
    """A resend finds its object already on disk and asks the index whether it is
    a duplicate or a crash's orphan: with PostgreSQL down that answers 0xA703
    (retry later), not a generic failure, and leaves no staged copy behind."""
    server = PacsServer(tmp_path / "data", Backend("pg-fs", pg_url, None, {})).start()
    try:
        sent = make_ct(tmp_path / "ct.dcm")
        assert scu_store_file(server, sent) == 0x0000
        allow_connections(pg_url, False)
        try:
            assert scu_store_file(server, sent) == 0xA703
        finally:
            allow_connections(pg_url, True)
        staging = server.data_dir / "objects" / ".tmp"
        # Empty files there are the spares the store makes ahead of need.
        assert not [path for path in staging.iterdir() if path.stat().st_size]
        assert scu_store_file(server, sent) == 0x0000
        assert server.stats()["instances"] == 1
        assert server.alive()
    finally:
        server.stop()


@pytest.fixture
def fs_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {})).start()
    yield server
    server.stop()


def test_disk_unwritable_gives_failure_status(fs_server: PacsServer, tmp_path: Path) -> None:
    pacs_server = fs_server  # the filesystem store's own failure mode (S3's is above)
    tmp_dir = pacs_server.data_dir / "objects" / ".tmp"
    os.rename(tmp_dir, tmp_dir.with_name(".tmp-away"))
    tmp_dir.write_bytes(b"not a directory")  # every write now fails with ENOTDIR
    try:
        status = scu_store_file(pacs_server, make_ct(tmp_path / "x.dcm"))
        assert 0xA700 <= status <= 0xA7FF, hex(status)
        assert pacs_server.stats()["instances"] == 0
    finally:
        tmp_dir.unlink()
        os.rename(tmp_dir.with_name(".tmp-away"), tmp_dir)
    assert_still_serving(pacs_server, tmp_path)


def test_low_water_mark_refuses_with_a700(tmp_path: Path) -> None:
    server = PacsServer(
        tmp_path / "data",
        Backend("sqlite-fs", None, None, {}),
        extra_env={"PACS_MIN_FREE_BYTES": str(10**18)},
    ).start()
    try:
        assert scu_store_file(server, make_ct(tmp_path / "x.dcm")) == 0xA700
        assert server.stats()["instances"] == 0
        assert server.alive()
    finally:
        server.stop()


# -- character sets -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("charset", "name", "expected"),
    [
        ("ISO_IR 192", "Nguyễn^Văn An", "Nguyễn^Văn An"),
        ("ISO_IR 192", "Đặng^Quốc Bảo", "Đặng^Quốc Bảo"),
        ("ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen"),
        (None, "SMITH^JOHN", "SMITH^JOHN"),
    ],
)
def test_names_decode_per_character_set(
    shared_server: PacsServer, tmp_path: Path, charset: str | None, name: str, expected: str
) -> None:
    pacs_server = shared_server
    patient_id = f"CS{uuid.uuid4().hex[:10]}"
    overrides: dict[str, object] = {"PatientName": name, "PatientID": patient_id}
    if charset:
        overrides["SpecificCharacterSet"] = charset
    path = make_ct(tmp_path / "named.dcm", **overrides)
    assert pacs_server.storescu(str(path)).returncode == 0
    core = pacs_server.core()
    try:
        from sqlalchemy import select

        from pacs.index.models import Patient
        from pacs.names import fold_name

        with core.engine.connect() as conn:
            row = conn.execute(select(Patient.name, Patient.name_folded).where(Patient.patient_id == patient_id)).one()
        assert row.name == expected
        assert row.name_folded == fold_name(expected)
        sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = core.reader.stored_instance(str(sop))
        assert stored is not None
        # The received bytes are kept: the name is stored in its own encoding.
        encoded = name.encode("utf-8" if charset == "ISO_IR 192" else "latin-1")
        assert encoded in core.store.read_bytes(stored.storage_key)
    finally:
        core.close()


def test_sigterm_stops_cleanly(pacs_server: PacsServer) -> None:
    pacs_server.stop(signal.SIGTERM)
    assert pacs_server.proc is not None and pacs_server.proc.returncode == 0
    assert free_port() > 0


def test_instance_naming_another_patient_is_filed_with_its_study_and_flagged(fs_server: PacsServer,
                                                                            tmp_path: Path) -> None:
    """One study, one patient: an instance whose Patient ID differs from its
    study's is stored (never lost) under the study's patient, the differing
    values are recorded as corrections (retrieval then gives every instance
    the study's patient) and the operator is warned."""
    study, series = generate_uid(), generate_uid()
    first = make_ct(tmp_path / "first.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID="079000111222", PatientName="PHAM^THI MAI")
    stray = make_ct(tmp_path / "stray.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID="ABORT001", PatientName="Other^Person")
    assert scu_store_file(fs_server, first) == 0x0000
    assert scu_store_file(fs_server, stray) == 0x0000
    assert scu_store_file(fs_server, make_ct(tmp_path / "again.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                                             PatientID="ABORT001", PatientName="Other^Person")) == 0x0000
    stats = fs_server.stats()
    assert (stats["patients"], stats["studies"], stats["instances"]) == (1, 1, 3)
    with fs_server.http() as http:
        corrections = http.get(f"/api/studies/{study}/corrections").json()
        metadata = http.get(f"/dicom-web/studies/{study}/metadata").json()
    rows = corrections if isinstance(corrections, list) else corrections["corrections"]
    assert {(c["keyword"], c["received"], c["corrected"]) for c in rows} == {
        ("PatientID", "ABORT001", "079000111222"), ("PatientName", "Other^Person", "PHAM^THI MAI")}
    assert {m["00100020"]["Value"][0] for m in metadata} == {"079000111222"}
    log = fs_server.log_text()
    assert log.count("names another patient than the study's") == 1
    assert "ABORT001" not in log and "Other^Person" not in log  # no patient data in the log



def test_instance_naming_another_study_than_its_series_is_filed_with_its_series(fs_server: PacsServer,
                                                                               tmp_path: Path) -> None:
    """A Series Instance UID is unique: an instance of a known series that
    names another study (a series copied into an edited study, a UID bug) is
    stored with its series, not refused with "index unavailable" (A703, the
    server's cached series key met a study it had never seen: the fuzz run
    caught it) and not filed under a new empty study; retrieval gives it the
    study it is filed in. Both through the receiving server (series key
    cached) and through `pacs import` (not cached)."""
    study, series, other = generate_uid(), generate_uid(), generate_uid()
    first = make_ct(tmp_path / "first.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID="079000111333", PatientName="VO^THI HOA", AccessionNumber="ACC001",
                    StudyDescription="Chest")
    assert scu_store_file(fs_server, first) == 0x0000
    moved = make_ct(tmp_path / "moved.dcm", StudyInstanceUID=other, SeriesInstanceUID=series,
                    PatientID="079000111333", PatientName="VO^THI HOA", AccessionNumber="ACC777",
                    StudyDescription="Abdomen")
    assert scu_store_file(fs_server, moved) == 0x0000
    (tmp_path / "imp").mkdir()
    imported = make_ct(tmp_path / "imp" / "imported.dcm", StudyInstanceUID=generate_uid(),
                       SeriesInstanceUID=series, PatientID="OTHER9", PatientName="KHAC^AI")
    fs_server.cli("import", str(tmp_path / "imp"))
    stats = fs_server.stats()
    assert (stats["patients"], stats["studies"], stats["series"], stats["instances"]) == (1, 1, 1, 3)
    with fs_server.http() as http:
        missed = http.get("/dicom-web/studies", params={"StudyInstanceUID": other})
        assert missed.status_code in (200, 204) and (not missed.content or missed.json() == [])
        metadata = http.get(f"/dicom-web/studies/{study}/metadata").json()
        rows = http.get(f"/api/studies/{study}/corrections").json()
        sop = str(dcmread(imported, stop_before_pixels=True).SOPInstanceUID)
        part = http.get(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert part.status_code == 200
    assert {m["0020000D"]["Value"][0] for m in metadata} == {study}
    # The study's own accession and description, not those of the study the instance named.
    assert {m["00080050"]["Value"][0] for m in metadata} == {"ACC001"}
    assert {m["00081030"]["Value"][0] for m in metadata} == {"Chest"}
    assert {m["00100020"]["Value"][0] for m in metadata} == {"079000111333"}
    assert ("StudyInstanceUID", other, study) in {(c["keyword"], c["received"], c["corrected"]) for c in rows}
    body = part.content
    assert study.encode() in body and b"OTHER9" not in body  # the corrected header is what leaves
    assert "filed with its series" in fs_server.log_text()


class _TcpProxy:
    """A TCP relay to PostgreSQL that can be cut (a database outage) and restored."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self._socket, self._threading, self.target_port = socket, threading, target_port
        self.port = free_port()
        self._conns: list[Any] = []
        self._listener: Any = None
        self.up()

    def up(self) -> None:
        self._listener = self._socket.create_server(("127.0.0.1", self.port))
        self._threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def down(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        try:
            self._listener.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(2)
                conn.close()
            except OSError:
                pass
        self._conns.clear()


def test_a_database_outage_is_answered_a703_with_a_routing_rule_and_ingest_recovers(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL index, filesystem store, one routing rule: the rules are read
    from the index, and their failed read was answered 0xC000 (a modality gives
    up) instead of A703 (try again later)."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = _TcpProxy(url.port or 5432)
    server = PacsServer(tmp_path / "data", Backend("pg", url.set(port=proxy.port).render_as_string(False), None, {}))
    server.start()
    try:
        server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(free_port()))
        server.cli("route", "add", "all-ct", "--if", "Modality=CT", "--to-ae", "READING")
        assert scu_store_file(server, make_ct(tmp_path / "before.dcm")) == 0
        proxy.down()
        time.sleep(2.5)  # past the routing rules' cache (2 s)
        status = scu_store_file(server, make_ct(tmp_path / "during.dcm"))
        assert status == 0xA703, hex(status)
        # A C-FIND is refused "out of resources" (A700: later), not C000 with a traceback logged.
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = [s.Status for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assoc.release()
        assert statuses[-1] == 0xA700, [hex(s) for s in statuses]
        # HTTP readers and senders are told "later" (503), not "broken" (500) or "wrong" (409).
        with server.http() as http:
            assert http.get("/dicom-web/studies").status_code == 503
            part = make_ct(tmp_path / "stow.dcm").read_bytes()
            body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--B--\r\n"
            stow = http.post("/dicom-web/studies", content=body,
                             headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
            assert stow.status_code == 503, stow.text
        proxy.up()
        assert wait_until(lambda: scu_store_file(server, make_ct(tmp_path / f"after{time.monotonic_ns()}.dcm")) == 0,
                          timeout=60)
    finally:
        server.stop()
        proxy.down()
    assert "C-STORE failed unexpectedly" not in server.log_text()


def test_audit_events_recorded_during_a_database_outage_are_written_once_it_is_back(pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    from pacs import audit
    from pacs.index import create_index_engine, upgrade_schema

    url = make_url(pg_url)
    upgrade_schema(create_index_engine(pg_url, pool_size=0))
    proxy = _TcpProxy(url.port or 5432)
    engine = create_index_engine(url.set(port=proxy.port).render_as_string(False))
    trail = audit.AuditTrail(engine)
    try:
        proxy.down()
        trail.record(audit.Event(action="read", user="bs.an", protocol="http", study_uid="1.2.3", detail="outage"))
        trail.flush()
        proxy.up()
        assert wait_until(lambda: audit.query(engine, user="bs.an") != [], timeout=30)
    finally:
        trail.close()
        proxy.down()
        engine.dispose()


def test_health_tells_a_bucket_that_refuses_writes(tmp_path: Path, s3_server: S3Server) -> None:
    """A key that may read but not write (a wrong IAM policy, a full quota):
    every C-STORE is refused A702, and /health must say so (it said "ok", and
    a load balancer kept sending modalities to the node)."""
    from minio import Minio

    from .peers import S3_READONLY

    bucket = f"ro-{uuid.uuid4().hex[:10]}"
    Minio(s3_server.endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False,
          region="us-east-1").make_bucket(bucket)
    env = {"PACS_S3_ACCESS_KEY": S3_READONLY[0], "PACS_S3_SECRET_KEY": S3_READONLY[1]}
    server = PacsServer(tmp_path / "data", Backend("sqlite-s3", None, s3_server.url(bucket), env)).start()
    try:
        assert scu_store_file(server, make_ct(tmp_path / "a.dcm")) == 0xA702
        health = httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=30)
        assert health.status_code == 503, health.text
        assert health.json()["storage"].startswith("error"), health.json()
    finally:
        server.stop()


def test_retrieval_while_s3_is_down_is_503_before_any_byte(tmp_path: Path) -> None:
    """Stored as asked (no conversion) the object was opened only once the 200
    had gone out, and the body broke off; converted, the store's failure was
    reported as 406 (never), where 503 says "later"."""
    s3 = start_s3(tmp_path / "weed")
    env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    server = PacsServer(tmp_path / "data", Backend("sqlite-s3", None, s3.url("down"), env)).start()
    try:
        ct = make_ct(tmp_path / "a.dcm")
        assert scu_store_file(server, ct) == 0
        ds = dcmread(ct, stop_before_pixels=True)
        url = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        s3.kill()  # down for good (never started again): no clean stop to wait for
        with server.http() as http:
            as_stored = http.get(url)
            converted = http.get(url, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'})
            legacy = http.get("/wado", params={"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                                               "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
                                               "contentType": "application/dicom"})
        assert (as_stored.status_code, converted.status_code, legacy.status_code) == (503, 503, 503), (
            as_stored.text[:200], converted.text[:200], legacy.text[:200])
    finally:
        server.stop()
        s3.kill()
