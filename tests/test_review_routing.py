"""Reviewer findings on routing to satellite hospitals, each against real
peers: `pacs serve` nodes, DCMTK storescp as the destination (behind a TCP
proxy that slows the link, tests/link_proxy.py), a pynetdicom storage SCP
answering a warning status.

- A destination that could not be reached (link down, storescp stopped)
  counted a try for every job each round: after route_max_attempts rounds
  (about 17 minutes with the defaults) every job of a satellite whose link
  was down was parked dead, and nothing flowed once it came back until an
  operator ran `pacs route retry`. A try now counts only when the
  destination was reached; an unreachable one is retried with backoff for
  as long as it takes.
- A claim was renewed only between two objects: one object (or one STOW-RS
  request) taking longer than the lease over a slow link was taken over by
  another node of the cluster and sent a second time, in parallel, over the
  same slow link.
- C-STORE warnings of PS3.7 Annex C (0107H, 0116H) were taken for failures:
  the object, stored by the peer, was sent again and again, then dead."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .link_proxy import LinkProxy
from .peers import create_database, drop_database, free_port, wait_until
from .test_routing import Receiver
from .test_routing_review import _jobs, _states


def _store(server: PacsServer, folder: Path, calling: str, count: int, **attrs: object) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    uids = []
    for i in range(count):
        path = make_ct(folder / f"{i:03d}.dcm", StudyInstanceUID=study, **attrs)
        result = server.storescu(str(path), calling=calling)
        assert result.returncode == 0, result.stdout + result.stderr
        uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return uids


# -- 1. a satellite whose link stays down longer than route_max_attempts tries --------------
def test_a_destination_down_longer_than_the_tries_gets_every_job_once_it_is_back(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "satellite")
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "2", "PACS_ROUTE_RETRY_SECONDS": "0.05"})
    server.cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(receiver.port))
    server.cli("route", "add", "to-satellite", "--if", "CallingAE=SAT_DOWN", "--to-ae", "READING")
    server.start()
    try:
        uids = _store(server, tmp_path / "study", "SAT_DOWN", 3)
        failed_rounds = re.compile(r"routing to dicom:READING: \d+ of \d+ jobs failed")
        # Far more failed rounds than route_max_attempts: the link is down, not the objects refused.
        assert wait_until(lambda: len(failed_rounds.findall(server.log_text())) >= 5, timeout=60), \
            server.log_text()[-3000:]
        jobs = _jobs(server, "to-satellite")
        assert {j["state"] for j in jobs} == {"pending"}, jobs
        # The operator sees why they wait: the destination, in each job's last error.
        assert all("READING" in j["last_error"] for j in jobs), jobs
        # And the reason in `pacs route list`'s table (it showed the error's first 40 characters).
        table = server.cli("route", "list").stdout
        assert "[Errno 111]" in table and "refused" in table, table
        assert "parked as dead" not in server.log_text()
        receiver.start()
        assert receiver.wait_for(3, settled=lambda: _states(server, "to-satellite") == {"done": 3}) == 3, \
            "every job delivered once the link is back, each once"
        assert set(receiver.files()) == set(uids)
        assert wait_until(lambda: _states(server, "to-satellite") == {"done": 3}, timeout=30), \
            _jobs(server, "to-satellite")
    finally:
        server.stop()
        receiver.stop()


def test_a_destination_that_refuses_an_object_still_parks_it_dead(tmp_path: Path) -> None:
    """The destination is reached and refuses: that counts, and ends dead."""
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "2", "PACS_ROUTE_RETRY_SECONDS": "0.05"})
    refusing = _StatusSCP(0xA700).start()  # out of resources, every time
    server.cli("ae", "add", "FULL", "--host", "127.0.0.1", "--port", str(refusing.port))
    server.cli("route", "add", "to-full", "--if", "CallingAE=SAT_FULL", "--to-ae", "FULL")
    server.start()
    try:
        _store(server, tmp_path / "study", "SAT_FULL", 2)
        assert wait_until(lambda: _states(server, "to-full") == {"dead": 2}, timeout=60), _jobs(server, "to-full")
        jobs = _jobs(server, "to-full")
        assert all(j["attempts"] == 2 and "0xA700" in j["last_error"] for j in jobs), jobs
        assert refusing.stores == 4
    finally:
        server.stop()
        refusing.stop()


# -- 2. one object longer on the link than the claim's lease, two nodes ----------------------
def test_an_object_slower_than_the_lease_is_not_sent_again_by_another_node(tmp_path: Path) -> None:
    pg = create_database()
    receiver = Receiver(tmp_path / "satellite").start()
    # About 1 MB at 128 KB/s: 8 s on the link, the lease is 3 s.
    link = LinkProxy(free_port(), receiver.port, rate_up=128 * 1024).start()
    backend = Backend("pg-fs", pg, f"file://{tmp_path / 'objects'}", {})
    nodes = [PacsServer(tmp_path / f"node{i}", backend,
                        extra_env={"PACS_NODE_ID": f"node-{i}", "PACS_ROUTE_LEASE_SECONDS": "3"}) for i in range(2)]
    try:
        nodes[0].cli("ae", "add", "READING", "--host", "127.0.0.1", "--port", str(link.port))
        nodes[0].cli("route", "add", "slow-link", "--if", "CallingAE=SAT_SLOW", "--to-ae", "READING")
        for node in nodes:
            node.start()
        (uid,) = _store(nodes[0], tmp_path / "study", "SAT_SLOW", 1, Rows=724, Columns=724,
                        PixelData=bytes(724 * 724 * 2))
        assert wait_until(lambda: _states(nodes[0], "slow-link") == {"done": 1}, timeout=90), \
            _jobs(nodes[0], "slow-link")
        assert receiver.wait_for(1) == 1, "the object went over the link twice"
        assert set(receiver.files()) == {uid}
        assert link.connections == 1
    finally:
        for node in nodes:
            node.stop()
        link.stop()
        receiver.stop()
        drop_database(pg)


# -- 3. C-STORE warnings other than Bxxx ----------------------------------------------------
class _StatusSCP:
    """A storage SCP (pynetdicom, on a real port) answering every C-STORE with *status*."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.port = free_port()
        self.stores = 0
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.stores += 1
        return self.status

    def start(self) -> _StatusSCP:
        ae = AE(ae_title="WARNS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture
def warning_peers(tmp_path: Path) -> Iterator[tuple[PacsServer, dict[int, _StatusSCP]]]:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_ROUTE_MAX_ATTEMPTS": "3", "PACS_ROUTE_RETRY_SECONDS": "0.05"})
    peers = {code: _StatusSCP(code).start() for code in (0x0107, 0x0116)}
    for code, peer in peers.items():
        server.cli("ae", "add", f"W{code:04X}", "--host", "127.0.0.1", "--port", str(peer.port))
        server.cli("route", "add", f"warn-{code:04X}", "--if", "CallingAE=SAT_WARN", "--to-ae", f"W{code:04X}")
    server.start()
    try:
        yield server, peers
    finally:
        server.stop()
        for peer in peers.values():
            peer.stop()


def test_c_store_warnings_0107_and_0116_are_deliveries(warning_peers: tuple[PacsServer, dict[int, _StatusSCP]],
                                                       tmp_path: Path) -> None:
    # PS3.7 C.4: 0107H (attribute list error) and 0116H (attribute value out
    # of range) are warnings: the peer stored the object.
    server, peers = warning_peers
    _store(server, tmp_path / "study", "SAT_WARN", 2)
    for code, peer in peers.items():
        rule = f"warn-{code:04X}"
        assert wait_until(lambda rule=rule: _states(server, rule).keys() <= {"done", "dead"}
                          and sum(_states(server, rule).values()) == 2, timeout=60), _jobs(server, rule)
        assert _states(server, rule) == {"done": 2}, _jobs(server, rule)
        assert peer.stores == 2, f"{rule}: sent again after the peer stored it"
