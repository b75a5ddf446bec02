"""Issue 9 (scale-out): two `pacs serve` nodes on one PostgreSQL index and one
S3 (SeaweedFS) bucket behave as one archive.

- any node answers for any study: stored through A, found (C-FIND, QIDO-RS)
  and retrieved (WADO-RS, C-MOVE to DCMTK storescp, C-GET) through B; an HL7
  order sent to B is in A's Modality Worklist; a report written on A is read
  (and its signed PDF retrieved) on B;
- a maintenance job runs on one node at a time (pacs.leases): started on both
  nodes at once, one runs and the other exits 1 naming the holder; a holder
  killed with SIGKILL leaves a lease that expires after PACS_LEASE_TTL and
  the job runs again; ``--wait`` waits for the holder instead;
- routing jobs queued by both nodes are sent exactly once: see
  tests/test_routing.py::test_two_nodes_drain_one_queue_without_sending_twice.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid

from pacs.index import create_index_engine, upgrade_schema
from pacs.leases import LeaseHeld, acquire, current, lease, leases_t

from .conftest import (
    PACS,
    S3_ACCESS,
    S3_SECRET,
    Backend,
    PacsServer,
    dataset_bytes,
    run_dcmtk,
)
from .dicomfiles import make_ct
from .peers import S3Server, create_database, drop_database
from .test_query_retrieve import StoreSCP, findscu
from .test_worklist_ris import WL_KEYS, msa, orm, send, worklist

TTL = 4.0  # seconds: short, so a killed holder's lease expires within the test


class Cluster:
    """Two nodes sharing one PostgreSQL database and one bucket."""

    def __init__(self, tmp: Path, pg: str, s3: S3Server) -> None:
        self.pg = pg
        backend = Backend("pg-s3", pg, s3.url(f"scale-{generate_uid()[-10:].replace('.', '')}"),
                          {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET})
        env = {"PACS_LEASE_TTL": str(TTL)}
        self.a = PacsServer(tmp / "node-a", backend, extra_env={**env, "PACS_NODE_ID": "node-a"})
        self.b = PacsServer(tmp / "node-b", backend, extra_env={**env, "PACS_NODE_ID": "node-b"})
        self.tmp = tmp

    def start(self) -> None:
        # A first: it migrates the schema and creates the admin user; B finds both.
        self.a.start()
        self.b.start()
        # With one index, the test admin token made through A works on B too.
        self.b.token = self.a.token
        self.radiologist = self.a.make_token("bs.scale", "radiologist", "Lê^Văn Bình")

    def stop(self) -> None:
        for node in (self.a, self.b):
            node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Cluster]:
    pg = create_database()
    nodes = Cluster(tmp_path_factory.mktemp("scale-out"), pg, s3_server)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        drop_database(pg)


def _study(folder: Path, count: int, **tags: str) -> tuple[str, list[Path]]:
    """*count* small CT objects of one new study (one series) in *folder*."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = [
        make_ct(folder / f"{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=str(i + 1),
                SpecificCharacterSet="ISO_IR 192", **tags)
        for i in range(count)
    ]
    return study, files


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _qido_study(node: PacsServer, study: str) -> list[dict]:  # type: ignore[type-arg]
    with node.http() as http:
        found = http.get("/dicom-web/studies", params={"StudyInstanceUID": study,
                                                       "includefield": "NumberOfStudyRelatedInstances"})
    assert found.status_code in (200, 204), found.text
    return found.json() if found.status_code == 200 else []


# -- any node answers for any study ----------------------------------------------------
def test_stored_on_a_is_found_and_retrieved_on_b(cluster: Cluster, tmp_path: Path) -> None:
    a, b = cluster.a, cluster.b
    study, files = _study(tmp_path / "study", 3, PatientName="Trần^Thị Bích", PatientID="SCALE001",
                          AccessionNumber="SCALEACC1", StudyDate="20241120", Modality="CT")
    sent = a.storescu("+sd", str(tmp_path / "study"))
    assert sent.returncode == 0, sent.stderr
    sops = {_sop(f): f for f in files}

    # C-FIND through B, the name matched without diacritics.
    rsp = findscu(b, tmp_path, "STUDY", {"PatientName": "TRAN*", "StudyInstanceUID": "",
                                         "NumberOfStudyRelatedInstances": ""})
    assert [(r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in rsp] == [(study, 3)]
    assert str(rsp[0].PatientName) == "Trần^Thị Bích"

    # QIDO-RS through B.
    found = _qido_study(b, study)
    assert len(found) == 1 and found[0]["00201208"]["Value"] == [3]

    # WADO-RS through B: the objects A stored, pixel for pixel.
    client = DICOMwebClient(f"http://127.0.0.1:{b.http_port}/dicom-web", headers=b.auth_headers)
    retrieved = client.retrieve_study(study)
    assert {str(ds.SOPInstanceUID) for ds in retrieved} == set(sops)
    for ds in retrieved:
        assert ds.PixelData == dcmread(sops[str(ds.SOPInstanceUID)]).PixelData

    # C-MOVE through B to a DCMTK storescp registered through A (the AE registry is shared).
    scp = StoreSCP(tmp_path / "moved", accept_all=True)
    try:
        a.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(scp.port))
        moved = run_dcmtk("movescu", "-S", "-v", "-aem", "MOVEDEST", "-aec", b.ae_title,
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                          "127.0.0.1", str(b.dicom_port))
        assert moved.returncode == 0 and "Final Move Response (Success)" in moved.stderr, moved.stderr
    finally:
        scp.stop()
    received = scp.received()
    assert set(received) == set(sops)
    for uid, data in received.items():
        assert dataset_bytes(data) == dataset_bytes(sops[uid].read_bytes()), f"{uid} changed in transit"

    # C-GET through B.
    out = tmp_path / "got"
    out.mkdir()
    got = run_dcmtk("getscu", "-S", "-od", str(out), "-aec", b.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(b.dicom_port))
    assert got.returncode == 0, got.stderr
    assert {_sop(p) for p in out.iterdir()} == set(sops)

    # And the other way round: stored through B, listed by A at once.
    other, _ = _study(tmp_path / "other", 1, PatientID="SCALE002", Modality="CT")
    assert b.storescu("+sd", str(tmp_path / "other")).returncode == 0
    assert len(_qido_study(a, other)) == 1


def test_hl7_order_sent_to_b_is_in_the_worklist_of_a(cluster: Cluster, tmp_path: Path) -> None:
    study = generate_uid()
    code, control = msa(send(cluster.b, orm("SO1", "SCALEORD1", study_uid=study, name="Phạm^Minh Châu",
                                            pid="079185000222")))
    assert (code, control) == ("AA", "SO1")
    items = [i for i in worklist(cluster.a, tmp_path, *WL_KEYS) if i.AccessionNumber == "SCALEORD1"]
    assert len(items) == 1
    assert items[0].StudyInstanceUID == study and str(items[0].PatientName) == "Phạm^Minh Châu"


def test_report_written_on_a_is_read_on_b(cluster: Cluster, tmp_path: Path) -> None:
    a, b = cluster.a, cluster.b
    study, _ = _study(tmp_path / "study", 1, PatientName="Võ^Thị Hoa", PatientID="SCALE003", Modality="CT")
    assert a.storescu("+sd", str(tmp_path / "study")).returncode == 0
    text = {"findings": "Không thấy tổn thương khu trú.", "impression": "Bình thường."}
    with a.http(token=cluster.radiologist) as on_a, b.http(token=cluster.radiologist) as on_b:
        written = on_a.put(f"/api/studies/{study}/report", json=text)
        assert written.status_code == 200, written.text
        draft = on_b.get(f"/api/studies/{study}/report").json()
        assert draft["status"] == "draft"
        assert (draft["current"]["findings"], draft["current"]["impression"]) == (text["findings"],
                                                                                 text["impression"])
        # Signed on A: B serves the signed version and the PDF A stored in the shared bucket.
        assert on_a.post(f"/api/studies/{study}/report/sign").status_code == 200
        assert on_b.get(f"/api/studies/{study}/report").json()["status"] == "signed"
        pdf = on_b.get(f"/api/studies/{study}/report/pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


# -- a maintenance job runs once --------------------------------------------------------
def _plain_pg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _pacs(node: PacsServer, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PACS, *args, *node.common_args()], env=node.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lease_row(pg: str, name: str) -> tuple[str, datetime, datetime] | None:
    with psycopg.connect(_plain_pg(pg)) as conn:
        row = conn.execute("SELECT holder, heartbeat, expires_at FROM job_leases WHERE name = %s", (name,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _words(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns off a terminal


def test_purge_started_on_both_nodes_runs_once_and_a_killed_holder_expires(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    doomed = [_study(tmp_path / f"xa{i}", 2, PatientID=f"PURGE{i}", Modality="XA")[0] for i in range(2)]
    for i in range(2):
        assert a.storescu("+sd", str(tmp_path / f"xa{i}")).returncode == 0
    purge = ("purge", "--modality", "XA", "--yes", "--json")

    # Hold the holder inside its job: the test locks the studies table, which a
    # purge reads right after it took the lease. Whoever wins blocks there,
    # heartbeating, while the other node is turned away.
    blocker = psycopg.connect(_plain_pg(cluster.pg))
    blocker.execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
    procs = {"node-a": _pacs(a, *purge), "node-b": _pacs(b, *purge)}
    winner = ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
            time.sleep(0.1)
        finished = [n for n, p in procs.items() if p.poll() is not None]
        assert len(finished) == 1, "one purge must be turned away while the other holds the lease"
        loser = finished[0]
        winner = "node-b" if loser == "node-a" else "node-a"
        out, err = procs[loser].communicate()
        assert procs[loser].returncode == 1, (out, err)
        assert f"running on node {winner}" in _words(err), err
        refusal = json.loads(out)
        assert (refusal["error"], refusal["job"], refusal["holder"]) == ("lease held", "purge", winner)
        assert procs[winner].poll() is None
        row = _lease_row(cluster.pg, "purge")
        assert row is not None and row[0] == winner
        # The holder heartbeats while its job runs (every TTL/3).
        time.sleep(TTL / 3 + 1)
        later = _lease_row(cluster.pg, "purge")
        assert later is not None and later[1] > row[1] and later[2] > row[2]

        # The holder dies without releasing anything.
        procs[winner].send_signal(signal.SIGKILL)
        procs[winner].wait(10)
        killed_at = time.monotonic()
    finally:
        blocker.rollback()
        blocker.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    engine = create_index_engine(cluster.pg, pool_size=0)
    try:
        info = current(engine, "purge")
        assert info is not None and info.holder == winner, "the killed holder's lease is still there"
        # Seen from another machine, the dead holder holds the job until its
        # lease expires, at most TTL after the last heartbeat ...
        with engine.begin() as conn:
            conn.execute(leases_t.update().where(leases_t.c.name == "purge")
                         .values(token="elsewhere/pid[1]:4242:0000"))
        with pytest.raises(LeaseHeld) as held:
            acquire(engine, "purge", "tester", TTL)
        assert held.value.info.holder == winner
        while current(engine, "purge") is not None:
            assert time.monotonic() - killed_at < TTL + 5, "a dead holder's lease must expire"
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert all(len(_qido_study(a, s)) == 1 for s in doomed), "the killed purge deleted nothing"

    # The job runs again, on the node that was turned away, and does the work once.
    loser_node = b if winner == "node-a" else a
    done = loser_node.cli(*purge)
    report = json.loads(done.stdout)
    assert report["deleted"]["studies"] == 2 and report["deleted"]["objects"] == 4, report
    assert _lease_row(cluster.pg, "purge") is None, "released at the end"
    for node in (a, b):
        assert all(_qido_study(node, s) == [] for s in doomed)


def test_wait_waits_for_the_holder(cluster: Cluster) -> None:
    engine = create_index_engine(cluster.pg, pool_size=0)
    try:
        with lease(engine, "verify-repair", "node-elsewhere", TTL):
            refused = cluster.b.cli("verify", "--repair", "--quick", check=False)
            assert refused.returncode == 1
            assert "running on node node-elsewhere" in _words(refused.stderr), refused.stderr
            waiting = _pacs(cluster.b, "verify", "--repair", "--quick", "--wait", "--json")
            # Once it says it waits (a loaded machine takes seconds to start a
            # command), for longer than a lease without heartbeats would last.
            said = ""
            while "waiting" not in said and waiting.poll() is None:
                said += waiting.stderr.readline()  # type: ignore[union-attr]
            time.sleep(TTL)
            assert waiting.poll() is None, "--wait must wait while the holder heartbeats"
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, (out, err)
        assert "waiting: verify-repair is running on node node-elsewhere" in _words(said + err)
        assert json.loads(out)["problems"] == 0
    finally:
        engine.dispose()


# -- the lease itself, on both databases ---------------------------------------------------
@pytest.mark.parametrize("db", ["sqlite", "pg"])
def test_lease_is_exclusive_heartbeats_and_expires(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if db == "pg" else f"sqlite:///{tmp_path}/index.sqlite"
    engine = create_index_engine(url)
    try:
        upgrade_schema(engine)
        # Eight contenders at the same instant: exactly one wins.
        start = threading.Barrier(8)
        outcome: dict[str, object] = {}

        def contend(node: str) -> None:
            start.wait()
            try:
                outcome[node] = acquire(engine, "compress", node, 2.0)
            except LeaseHeld as exc:
                outcome[node] = exc

        threads = [threading.Thread(target=contend, args=(f"n{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [n for n, o in outcome.items() if not isinstance(o, LeaseHeld)]
        assert len(winners) == 1 and len(outcome) == 8
        assert {o.info.holder for o in outcome.values() if isinstance(o, LeaseHeld)} == set(winners)
        held = outcome[winners[0]]
        # Heartbeats keep it past its TTL.
        time.sleep(3.0)
        info = current(engine, "compress")
        assert info is not None and info.holder == winners[0] and info.expires_at > datetime.now(UTC)
        with pytest.raises(LeaseHeld):
            acquire(engine, "compress", "late", 2.0)
        # Released: free at once.
        held.release()  # type: ignore[union-attr]
        assert current(engine, "compress") is None

        # A holder that stops heartbeating (as if killed) loses it after the TTL.
        stalled = acquire(engine, "migrate", "stalled", 1.0)
        stalled._stop.set()
        stalled._thread.join()
        with pytest.raises(LeaseHeld):
            acquire(engine, "migrate", "next", 1.0)
        time.sleep(1.2)
        taken = acquire(engine, "migrate", "next", 5.0)
        # The stalled holder finds out, and cannot release what is no longer its own.
        assert stalled.extend() is False
        stalled.release()
        info = current(engine, "migrate")
        assert info is not None and info.holder == "next"
        taken.release()
        # Other names are independent.
        with lease(engine, "purge", "x", 5.0), lease(engine, "reindex", "x", 5.0):
            assert {current(engine, n).holder for n in ("purge", "reindex")} == {"x"}  # type: ignore[union-attr]
        assert current(engine, "purge") is None and current(engine, "reindex") is None

        # Its holder killed (kill -9) on this machine: no need to wait out the TTL.
        dead = subprocess.Popen(["true"])
        dead.wait()
        killed = acquire(engine, "verify-repair", "killed", 600.0)
        killed._stop.set()
        killed._thread.join()
        machine = killed.token.rsplit(":", 2)[0]
        with engine.begin() as conn:
            conn.execute(leases_t.update().where(leases_t.c.name == "verify-repair")
                         .values(token=f"{machine}:{dead.pid}:0000"))
        acquire(engine, "verify-repair", "rerun", 5.0).release()
    finally:
        engine.dispose()



def test_one_uid_sent_to_both_nodes_at_once_leaves_the_index_describing_the_stored_bytes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Two modalities send different objects under one SOP Instance UID to the
    two nodes at the same instant: both are answered success (keep-first), one
    row is kept, and the object in the bucket is the one that row describes
    (an S3 PUT replaces: the loser's upload used to leave its bytes under the
    winner's row)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    study, series = generate_uid(), generate_uid()
    pairs = []
    for i in range(30):
        sop = generate_uid()
        pairs.append(tuple(
            dcmread(make_ct(tmp_path / f"{side}{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series,
                            SOPInstanceUID=sop, InstanceNumber=str(i + 1), PixelData=bytes([fill]) * 512))
            for side, fill in (("a", 1), ("b", 2))
        ))
    barrier = threading.Barrier(2)
    statuses: dict[str, list[int]] = {"a": [], "b": []}

    def send_side(side: int, node: PacsServer, calling: str) -> None:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=node.ae_title)
        try:
            for pair in pairs:
                barrier.wait(timeout=60)
                statuses["ab"[side]].append(assoc.send_c_store(pair[side]).Status)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send_side, args=(0, cluster.a, "CT_A")),
               threading.Thread(target=send_side, args=(1, cluster.b, "CT_B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert statuses["a"] == statuses["b"] == [0] * len(pairs)
    core = cluster.a.core()
    try:
        for pair in pairs:
            stored = core.reader.stored_instance(str(pair[0].SOPInstanceUID))
            assert stored is not None
            data = core.store.read_bytes(stored.storage_key)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (stored.size, stored.sha256), (
                f"{pair[0].SOPInstanceUID}: the index describes bytes that are not stored")
    finally:
        core.close()
