"""Issue 7: routing rules with a durable queue, to a real DCMTK storescp that
goes down and comes back, across restarts of `pacs serve`, and drained by
two nodes sharing PostgreSQL and S3 without sending anything twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from .conftest import S3_ACCESS, S3_SECRET, Backend, PacsServer, free_port, wait_port
from .dicomfiles import make_ct
from .peers import create_database, dcmtk, drop_database, wait_until


class Receiver:
    """DCMTK storescp as a routing destination; counts every C-STORE it gets."""

    def __init__(self, workdir: Path, port: int | None = None, accept_all: bool = True) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.accept_all = accept_all
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "storescp.log"
        (workdir / "in").mkdir(parents=True, exist_ok=True)

    def start(self) -> Receiver:
        args = [dcmtk("storescp"), "-v", "-od", str(self.workdir / "in"), "-aet", "READING", str(self.port)]
        if self.accept_all:
            args.insert(1, "+xa")
        self.proc = subprocess.Popen(args, env={**os.environ, "TCP_NODELAY": "1"},
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def stores(self) -> int:
        return self.log.read_text(errors="replace").count("Received Store Request") if self.log.exists() else 0

    def files(self) -> dict[str, Path]:
        return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in (self.workdir / "in").iterdir()}

    def wait_for(self, count: int, timeout: float = 90, settled: Callable[[], bool] | None = None) -> int:
        """The stores received once *count* came (or *timeout* passed) and
        nothing more is coming: *settled* is the sender's word for it (every
        routing job of a single node recorded done: a job is sent again only
        before that); without it, 1.5 s more for a duplicate to show up."""
        deadline = time.monotonic() + timeout
        while self.stores() < count and time.monotonic() < deadline:
            time.sleep(0.3)
        if settled is None:
            time.sleep(1.5)  # anything extra (a duplicate) would show up now
        else:
            assert wait_until(settled, timeout=60), "the sender did not settle"
        return self.stores()


def _jobs(server: PacsServer) -> dict:
    return json.loads(server.cli("route", "list", "--json").stdout)


def _send(server: PacsServer, tmp_path: Path, calling: str, count: int, **attrs: object) -> list[str]:
    study = f"1.2.826.0.1.3680043.9.7136.{abs(hash((calling, tmp_path))) % 10**9}"
    uids = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = make_ct(tmp_path / f"{calling}-{i}-{time.monotonic_ns()}.dcm", StudyInstanceUID=study, **attrs)
        assert server.storescu(str(path), calling=calling).returncode == 0
        uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return uids


def test_rule_waits_for_a_down_receiver_and_survives_restarts(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "reading")
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
    server.cli("route", "add", "ct-from-satellite", "--if", "Modality=CT", "--if", "CallingAE~SAT_*",
               "--to-ae", "READING")
    server.start()
    try:
        routed = _send(server, tmp_path, "SAT_CT1", 3)
        _send(server, tmp_path, "LOCAL_CT", 2)  # another AE: not routed
        _send(server, tmp_path, "SAT_CT1", 1, Modality="MR")  # another modality: not routed
        wait_until(lambda: _jobs(server)["counts"].get("pending", 0) >= 3
                   and all(j["last_error"] for j in _jobs(server)["jobs"]), timeout=30)
        jobs = _jobs(server)
        assert sum(jobs["counts"].values()) == 3
        # Waiting for the destination, each job says why; a destination never
        # reached counts no try (its jobs would go dead while its link is down).
        assert all(j["attempts"] == 0 and "READING" in j["last_error"] for j in jobs["jobs"])
        # The operator reads which destination is down, once per round, not per object.
        assert re.search(r"routing to dicom:READING: \d+ of \d+ jobs failed \(retried later\); last error: "
                         r"association with READING", server.log_text()), server.log_text()[-2000:]
        # A graceful restart with the queue full...
        server.stop()
        server.start()
        more = _send(server, tmp_path, "SAT_CT2", 2)
        # ...and a crash (SIGKILL) with the queue full.
        server.stop(signal.SIGKILL)
        server.start()
        receiver.start()
        assert receiver.wait_for(5, settled=lambda: _jobs(server)["counts"] == {"done": 5}) == 5, \
            "every routed object exactly once"
        assert set(receiver.files()) == set(routed + more)
        wait_until(lambda: _jobs(server)["counts"] == {"done": 5}, timeout=20)
        assert _jobs(server)["counts"] == {"done": 5}
    finally:
        server.stop()
        receiver.stop()


def test_transcoding_and_deidentifying_on_the_way(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "reading").start()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
    server.cli("route", "add", "to-research", "--if", "CallingAE=RESEARCH_CT", "--to-ae", "READING",
               "--transcode", "j2k-lossless", "--deidentify", "--set", "InstitutionName=Research copy")
    server.start()
    try:
        originals = {}
        for i in range(3):
            path = make_ct(tmp_path / f"r{i}.dcm", StudyInstanceUID="1.2.826.0.1.3680043.9.7136.77",
                           SeriesInstanceUID="1.2.826.0.1.3680043.9.7136.77.1",
                           PatientName="Nguyễn^Văn An", PatientID="001085012345", SpecificCharacterSet="ISO_IR 192",
                           Rows=64, Columns=64, PixelData=(np.arange(4096, dtype=np.uint16) * (i + 3)).tobytes())
            assert server.storescu(str(path), calling="RESEARCH_CT").returncode == 0
            originals[i] = dcmread(path)
        assert receiver.wait_for(3, settled=lambda: _jobs(server)["counts"] == {"done": 3}) == 3
        received = [dcmread(f) for f in receiver.files().values()]
    finally:
        server.stop()
        receiver.stop()
    original_uids = {str(ds.SOPInstanceUID) for ds in originals.values()}
    for ds in received:
        assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert "PatientName" not in ds or "Nguy" not in str(ds.PatientName)
        assert ds.get("PatientID", "") != "001085012345"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.InstitutionName == "Research copy"
        assert str(ds.SOPInstanceUID) not in original_uids
    # UIDs are remapped consistently: one study, one series, three instances.
    assert len({str(d.StudyInstanceUID) for d in received}) == 1
    assert len({str(d.SeriesInstanceUID) for d in received}) == 1
    # Lossless: the decoded pixels are exactly the originals'.
    by_pixels = sorted(d.pixel_array.tobytes() for d in received)
    assert by_pixels == sorted(o.pixel_array.tobytes() for o in originals.values())


def test_two_nodes_drain_one_queue_without_sending_twice(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    pg = create_database()
    env = {"PACS_S3_ACCESS_KEY": S3_ACCESS, "PACS_S3_SECRET_KEY": S3_SECRET}
    backend = Backend("pg-s3", pg, s3_server.url("two-nodes"), env)
    receiver = Receiver(tmp_path / "reading")
    nodes = [
        PacsServer(tmp_path / f"node{i}", backend, extra_env={"PACS_NODE_ID": f"node-{i}"}) for i in range(2)
    ]
    try:
        nodes[0].cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
        nodes[0].cli("route", "add", "all-ct", "--if", "Modality=CT", "--to-ae", "READING")
        for node in nodes:
            node.start()
        sent = []
        for i in range(30):  # modalities send to both nodes
            sent += _send(nodes[i % 2], tmp_path / f"batch{i}", f"CT_{i % 3}", 1)
        assert len(set(sent)) == 30
        receiver.start()
        assert receiver.wait_for(30, timeout=120) == 30, "no job may be sent twice"
        assert set(receiver.files()) == set(sent)
        counts = _jobs(nodes[0])["counts"]
        assert counts == {"done": 30}
    finally:
        for node in nodes:
            node.stop()
        receiver.stop()
        drop_database(pg)


def test_stow_route_after_the_study_is_stable_and_dead_letters(tmp_path: Path) -> None:
    reader = PacsServer(tmp_path / "reader", Backend("sqlite-fs", None, None, {})).start()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "2", "PACS_ROUTE_RETRY_SECONDS": "0.1"})
    server.cli("route", "add", "axials-to-reader", "--if", "SeriesDescription=/^AX [0-9]+mm$/",
               "--to-url", f"http://127.0.0.1:{reader.http_port}/dicom-web", "--auth", f"Bearer {reader.token}",
               "--stable", "6")
    server.cli("route", "add", "to-nowhere", "--if", "Modality=CT", "--to-url", f"http://127.0.0.1:{free_port()}/x")
    server.cli("route", "add", "refused", "--if", "Modality=CT",
               "--to-url", f"http://127.0.0.1:{reader.http_port}/dicom-web", "--auth", "Bearer not-a-token")
    server.start()
    try:
        axial = _send(server, tmp_path / "ax", "CT_ROOM1", 3, SeriesDescription="AX 5mm")
        _send(server, tmp_path / "cor", "CT_ROOM1", 1, SeriesDescription="COR 5mm")  # the regex does not match
        # The study is still "arriving": nothing goes before 6 s without a new instance.
        assert reader.stats()["instances"] == 0
        assert wait_until(lambda: reader.stats()["instances"] == 3), _jobs(server)
        with reader.http() as client:
            found = client.get("/dicom-web/instances", params={"includefield": "SOPInstanceUID"}).json()
        assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(axial)
        # The destination that refuses them: two tries, then dead (a dead letter, not lost).
        assert wait_until(lambda: _jobs(server)["counts"].get("dead", 0) == 4), _jobs(server)
        dead = json.loads(server.cli("route", "list", "--state", "dead", "--json").stdout)["jobs"]
        assert {j["rule"] for j in dead} == {"refused"} and all(j["attempts"] == 2 for j in dead)
        assert all("HTTP 401" in j["last_error"] for j in dead), dead
        # The unreachable one: its jobs wait for it, saying why, however long it is down.
        waiting = [j for j in _jobs(server)["jobs"] if j["rule"] == "to-nowhere"]
        assert {j["state"] for j in waiting} == {"pending"} and all("STOW-RS" in j["last_error"] for j in waiting)
        # retry puts the dead ones back in the queue; cancel takes jobs out for good.
        assert json.loads(server.cli("route", "retry", "--json").stdout) == {"retried": 4}
        assert wait_until(lambda: _jobs(server)["counts"].get("dead", 0) == 4), _jobs(server)
        server.cli("route", "cancel", "--rule", "to-nowhere")
        server.cli("route", "cancel", "--rule", "refused")
        assert _jobs(server)["counts"].get("cancelled", 0) == 8, _jobs(server)
        assert _jobs(server)["counts"].get("done") == 3
    finally:
        server.stop()
        reader.stop()


def test_rules_from_the_config_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "pacs.toml").write_text(
        '[[route]]\nname = "ct-to-reading"\nif = ["Modality=CT", "CallingAE~SAT_*"]\nto_ae = "READING"\n'
        'transcode = "jpegls-lossless"\nstable_seconds = 30\n'
        '[[route]]\nname = "ai"\nif = ["StudyDescription=/(?i)chest/"]\nto_url = "https://ai.local/dicom-web"\n'
        'deidentify = true\nset = { InstitutionName = "AI" }\n', encoding="utf-8")
    server = PacsServer(data, Backend("sqlite-fs", None, None, {}))
    rules = {r["name"]: r for r in json.loads(server.cli("route", "rules", "--json").stdout)}
    assert set(rules) == {"ct-to-reading", "ai"}
    assert rules["ct-to-reading"]["stable_seconds"] == 30 and rules["ai"]["deidentify"] is True
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pacs.toml").write_text('[[route]]\nname = "x"\nif = ["Modality"]\nto_ae = "A"\n', encoding="utf-8")
    result = PacsServer(bad, Backend("sqlite-fs", None, None, {})).cli("route", "rules", check=False)
    assert result.returncode != 0 and "Modality" in (result.stderr + result.stdout)
    assert "Traceback" not in result.stderr
    for table, key in (('to_ae = "A"\ndeidentfy = true', "deidentfy"), ('to_ae = "A"\nto_url = "https://x"', "to_url"),
                       ('to_ae = "A"\nstable_seconds = -5', "stable_seconds")):
        (bad / "pacs.toml").write_text(f'[[route]]\nname = "x"\n{table}\n', encoding="utf-8")
        result = PacsServer(bad, Backend("sqlite-fs", None, None, {})).cli("route", "rules", check=False)
        assert result.returncode != 0 and key in (result.stderr + result.stdout)
        assert "Traceback" not in result.stderr


def test_finished_jobs_are_pruned_after_the_keep_time(tmp_path: Path) -> None:
    """Done and cancelled jobs older than route_keep_days go (by `pacs serve`
    and by `pacs route prune`); dead and pending ones stay."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert, select

    from pacs.index import create_index_engine
    from pacs.index.models import RouteJob, RoutingRule

    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_KEEP_DAYS": "30"})
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(free_port()))
    server.cli("route", "add", "all-ct", "--if", "Modality=CT", "--to-ae", "READING")
    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            rule = conn.execute(select(RoutingRule.__table__.c.pk)).scalar_one()
            for i, (state, age) in enumerate([("done", 40), ("cancelled", 40), ("dead", 40), ("pending", 40),
                                              ("done", 20), ("done", 1)]):
                conn.execute(insert(RouteJob.__table__).values(
                    rule_pk=rule, sop_uid=f"1.2.3.{i}", study_uid="1.2.3", destination_key="READING", state=state,
                    attempts=0, next_attempt_at=now + timedelta(days=1), claimed_by="", last_error="",
                    created_at=now - timedelta(days=age), updated_at=now - timedelta(days=age)))
        server.start()
        try:
            # The serving node prunes what is older than 30 days at once.
            assert wait_until(lambda: _jobs(server)["counts"] == {"dead": 1, "pending": 1, "done": 2}, timeout=30)
            # (Logged after the deletion's commit: the count may be seen first.)
            assert wait_until(lambda: "2 finished jobs older than 30 days deleted" in server.log_text(), timeout=10)
        finally:
            server.stop()
        pruned = json.loads(server.cli("route", "prune", "--older-than-days", "7", "--json").stdout)
        assert pruned == {"pruned": 1}
        assert _jobs(server)["counts"] == {"dead": 1, "pending": 1, "done": 1}
        # With route_keep_days = 0 (keep them), pruning needs an explicit age.
        server.extra_env["PACS_ROUTE_KEEP_DAYS"] = "0"
        refused = server.cli("route", "prune", check=False)
        assert refused.returncode == 2 and "--older-than-days" in refused.stderr
        assert _jobs(server)["counts"] == {"dead": 1, "pending": 1, "done": 1}
    finally:
        engine.dispose()


def test_a_database_outage_mid_batch_neither_resends_nor_holds_the_rest(tmp_path: Path, pg_url: str) -> None:
    """The index goes down while a batch is being forwarded: the object whose
    delivery could not be recorded is not sent again, and the rest of the
    batch goes out once the index is back, not after the 5-minute lease."""
    import threading
    from collections import Counter

    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage
    from sqlalchemy.engine import make_url

    from .test_dimse_failures import _TcpProxy

    url = make_url(pg_url)
    proxy = _TcpProxy(url.port or 5432)
    received: Counter[str] = Counter()

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] += 1
        if len(received) == 3 and received.total() == 3:
            proxy.down()
            threading.Timer(4.0, proxy.up).start()
        return 0

    dest = AE(ae_title="DEST")
    dest.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    dest_port = free_port()
    scp = dest.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    server = PacsServer(tmp_path / "data", Backend("pg", url.set(port=proxy.port).render_as_string(False), None, {}))
    server.start()
    try:
        server.cli("ae", "add", "DEST", "--host", "127.0.0.1", "--port", str(dest_port))
        server.cli("route", "add", "all", "--if", "Modality=CT", "--to-ae", "DEST", "--stable", "2")
        folder = tmp_path / "study"
        folder.mkdir()
        sent = {str(dcmread(make_ct(folder / f"{i}.dcm", StudyInstanceUID="1.2.826.0.1.3680043.9.7136.55",
                                    InstanceNumber=i), stop_before_pixels=True).SOPInstanceUID) for i in range(10)}
        assert server.storescu("+sd", str(folder)).returncode == 0
        assert wait_until(lambda: set(received) == sent, timeout=90), f"{len(received)} of 10 delivered"
        # A delivery the outage kept from being recorded is recorded once the index is back (the
        # forwarder's unsettled actions); a resend would come before its job is done, never after:
        # every job done, the count is final (no 3 s wait for a resend that does not come).
        assert wait_until(lambda: _jobs(server)["counts"] == {"done": 10}, timeout=60), _jobs(server)
    finally:
        server.stop()
        scp.shutdown()
        proxy.down()
    assert max(received.values()) == 1, received


def test_a_resent_instance_is_routed_as_its_sender_s_objects_are(tmp_path: Path) -> None:
    """A satellite resends a study that partly arrived by another path (no
    rule for it): the resent duplicates were acknowledged and never routed,
    so the destination had the study incomplete. Routed once, not twice."""
    receiver = Receiver(tmp_path / "reading").start()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
    server.cli("route", "add", "from-satellite", "--if", "CallingAE=SATELLITE", "--to-ae", "READING")
    server.start()
    try:
        study = "1.2.826.0.1.3680043.9.7136.55"
        paths = [make_ct(tmp_path / f"s{i}.dcm", StudyInstanceUID=study) for i in range(3)]
        assert server.storescu(str(paths[0]), calling="MODALITY").returncode == 0  # the other path
        for path in paths:
            assert server.storescu(str(path), calling="SATELLITE").returncode == 0
        assert receiver.wait_for(3, settled=lambda: _jobs(server)["counts"] == {"done": 3}) == 3
        assert server.storescu(str(paths[0]), calling="SATELLITE").returncode == 0  # once more
        # A resend's routing jobs are recorded before it is acknowledged (Ingest._duplicate): a job
        # sending it again would be pending now and done only once the receiver has it; no 5 s wait.
        assert wait_until(lambda: set(_jobs(server)["counts"]) == {"done"}, timeout=60), _jobs(server)
        assert receiver.stores() == 3, "a routed instance was sent again"
        assert len(receiver.files()) == 3
    finally:
        server.stop()
        receiver.stop()


def test_stop_is_not_held_by_a_frozen_destination(tmp_path: Path) -> None:
    """A satellite that stops answering in the middle of a C-STORE (a frozen
    link) held `pacs serve`'s shutdown for the network timeout: the port
    stayed taken and systemd or Docker killed the process. The send is now
    aborted and its job goes back to the queue, untried."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    frozen, release = threading.Event(), threading.Event()

    def hang(event):  # type: ignore[no-untyped-def]
        frozen.set()
        release.wait(120)
        return 0x0000

    scp = AE(ae_title="FROZEN")
    scp.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    port = free_port()
    listener = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, hang)])
    try:
        _stop_while_routing_to(tmp_path, port, frozen, "the routed C-STORE never reached the destination",
                               {"PACS_DICOM_TIMEOUT": "600"})
    finally:
        release.set()
        listener.shutdown()


def test_stop_is_not_held_by_a_destination_frozen_at_connect(tmp_path: Path) -> None:
    """A link that freezes right after the TCP handshake (no A-ASSOCIATE-AC):
    the stop waited the ACSE timeout and charged the jobs a failed attempt."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    got = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()  # and never answers
        accepted.append(conn)
        got.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        _stop_while_routing_to(tmp_path, listener.getsockname()[1], got, "the routing association never connected")
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def _stop_while_routing_to(tmp_path: Path, port: int, reached: Any, never: str,
                           env: dict[str, str] | None = None) -> None:
    """Route a CT to the frozen destination FROZEN on *port*, wait until it is
    *reached*, stop the server: a clean exit, and the job back in the queue
    untried."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}), extra_env=env or {})
    server.cli("ae", "add", "FROZEN", "--host", "127.0.0.1", "--port", str(port))
    server.cli("route", "add", "to-frozen", "--if", "Modality=CT", "--to-ae", "FROZEN")
    server.start()
    try:
        assert server.storescu(str(make_ct(tmp_path / "x.dcm"))).returncode == 0
        assert reached.wait(60), never
        server.stop()
        assert server.proc is not None and server.proc.returncode == 0, "stopped only by SIGKILL"
        jobs = _jobs(server)
        assert jobs["counts"] == {"pending": 1} and jobs["jobs"][0]["attempts"] == 0, jobs
    finally:
        server.stop()


def test_a_big_endian_object_and_a_report_reach_a_transcoding_destination(tmp_path: Path) -> None:
    """A Big Endian object (an old modality) under a --transcode rule was
    relabelled, not converted: the destination refused it and the job was
    retried for good (found by a codec tester). It is byte-swapped, then
    encoded; its pixel values are the originals. An object without pixels
    (an SR) was labelled JPEG 2000 and only that was proposed: a destination
    taking uncompressed objects refused it (found by a regression tester)."""
    from .conftest import pydicom_file

    receiver = Receiver(tmp_path / "reading").start()
    plain = Receiver(tmp_path / "plain", accept_all=False).start()  # uncompressed syntaxes only
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
    server.cli("ae", "add", "PLAIN", "--host", "127.0.0.1", "--port", str(plain.port))
    server.cli("route", "add", "old-mr", "--if", "CallingAE=OLD_MR", "--to-ae", "READING",
               "--transcode", "j2k-lossless")
    server.cli("route", "add", "reports", "--if", "Modality=SR", "--to-ae", "PLAIN", "--transcode", "j2k-lossless")
    server.start()
    source, report = pydicom_file("MR_small_bigendian.dcm"), pydicom_file("test-SR.dcm")
    try:
        assert server.storescu(str(source), calling="OLD_MR").returncode == 0
        assert server.storescu(str(report), calling="SR_APP").returncode == 0
        both_done = lambda: _jobs(server)["counts"] == {"done": 2}  # noqa: E731
        assert receiver.wait_for(1, settled=both_done) == 1
        assert plain.wait_for(1, settled=both_done) == 1, _jobs(server)
        got = dcmread(next(iter(receiver.files().values())))
        sent_report = dcmread(next(iter(plain.files().values())))
    finally:
        server.stop()
        receiver.stop()
        plain.stop()
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(got.pixel_array, dcmread(source).pixel_array)
    assert sent_report.SOPInstanceUID == dcmread(report).SOPInstanceUID


class _RefusingStow:
    """A STOW-RS endpoint that answers 202 and lists every instance it got as
    failed (0xA700), as a full archive does: a real HTTP server on a socket."""

    def __init__(self) -> None:
        import http.server
        import io as _io
        import threading

        received: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"] or 0)) if self.headers.get(
                    "Content-Length") else self._chunked()
                boundary = self.headers["Content-Type"].split("boundary=", 1)[1].split(";")[0].strip('"')
                failed = []
                for part in body.split(b"--" + boundary.encode())[1:-1]:
                    uid = str(dcmread(_io.BytesIO(part.split(b"\r\n\r\n", 1)[1])).SOPInstanceUID)
                    received.append(uid)
                    failed.append({"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [0xA700]}})
                answer = json.dumps({"00081198": {"vr": "SQ", "Value": failed}}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def _chunked(self) -> bytes:
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if not size:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_deidentified_copies_are_checked_and_burned_in_ones_stay(tmp_path: Path) -> None:
    """Findings of a privacy tester: a --deidentify rule sent objects with
    Burned In Annotation = YES (text in the pixels nobody cleans) and marked
    them done; over STOW-RS the destination's failures were looked up under
    the original SOP Instance UID, so refused de-identified copies were done too."""
    stow = _RefusingStow()
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "1"})
    server.cli("route", "add", "research", "--if", "CallingAE=RESEARCH_US", "--to-url", stow.url, "--deidentify")
    server.start()
    try:
        clean = _send(server, tmp_path / "clean", "RESEARCH_US", 1, BurnedInAnnotation="NO")
        burned = _send(server, tmp_path / "burned", "RESEARCH_US", 1, BurnedInAnnotation="YES")
        # Settled: neither pending nor being sent.
        assert wait_until(lambda: sum(_jobs(server)["counts"].values()) == 2
                          and not set(_jobs(server)["counts"]) & {"pending", "sending"}), _jobs(server)
        jobs = json.loads(server.cli("route", "list", "--state", "dead", "--json").stdout)["jobs"]
        by_uid = {j["sop_uid"]: j for j in jobs}
        assert set(by_uid) == set(clean + burned), _jobs(server)  # refused by STOW: not done
        assert "0xA700" in by_uid[clean[0]]["last_error"]
        assert "burned-in" in by_uid[burned[0]]["last_error"]
        assert len(stow.received) == 1 and stow.received[0] != clean[0]  # only the clean one, de-identified
    finally:
        server.stop()
        stow.stop()
