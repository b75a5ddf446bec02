"""Who may talk to the archive at all. A DICOM peer names itself (any
machine can claim a modality's AE title), and HL7 over MLLP carries no
credentials: with ``ae_check_host`` a registered AE must call from its
registered host, and ``hl7_allowed_hosts`` limits who may send orders,
patient updates and merges. Every refusal, and every change a HIS makes to
a patient, is in the audit trail."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Backend, PacsServer, run_dcmtk
from .test_worklist_ris import send


def _events(server: PacsServer, found: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The audit trail once *found* holds (events are written in batches)."""
    deadline = time.monotonic() + 20
    while True:
        events = json.loads(server.cli("audit", "--format", "json").stdout)
        if found(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.extra_env.update({"PACS_AE_ALLOWLIST": "true", "PACS_AE_CHECK_HOST": "true",
                             "PACS_HL7_ALLOWED_HOSTS": "10.9.9.9, 192.168.77.0/24"})
    server.data_dir.mkdir(parents=True)
    for title, host in (("CT_FAR", "10.9.9.9"), ("CT_HERE", "127.0.0.1"), ("CT_NAMED", "localhost")):
        server.cli("ae", "add", title, "--host", host, "--port", "104")
    server.start()
    yield server
    server.stop()


def _echo(server: PacsServer, title: str) -> int:
    return run_dcmtk("echoscu", "-aet", title, "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                     ).returncode


def test_a_registered_title_from_another_host_is_refused_and_audited(guarded: PacsServer) -> None:
    """CT_FAR is registered at 10.9.9.9: the same title from 127.0.0.1 is
    refused as an unknown calling AE, like a title nobody registered; the
    AEs registered at this address (by number or by name) are served."""
    assert _echo(guarded, "CT_HERE") == 0
    assert _echo(guarded, "CT_NAMED") == 0
    assert _echo(guarded, "CT_FAR") != 0
    assert _echo(guarded, "NOBODY") != 0
    assert ("association from 127.0.0.1 (calling CT_FAR, called FILMLESS) refused: calling AE CT_FAR is registered "
            "at another host (10.9.9.9, ae_check_host)") in guarded.log_text()
    events = _events(guarded, lambda evs: len([e for e in evs if e["action"] == "associate"]) >= 2)
    refused = {(e["user"], e["outcome"], e["client"]) for e in events if e["action"] == "associate"}
    assert refused == {("CT_FAR", "denied", "127.0.0.1"), ("NOBODY", "denied", "127.0.0.1")}
    details = " ".join(e["detail"] for e in events if e["action"] == "associate")
    assert "registered at another host" in details and "not in the registry" in details


def test_hl7_from_an_address_not_allowed_is_refused_and_audited(guarded: PacsServer) -> None:
    """Only 10.9.9.9 and 192.168.77.0/24 may send HL7: a merge sent from
    127.0.0.1 gets no ACK (the connection is closed) and changes nothing."""
    a40 = ("MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120090000||ADT^A40|A40-9|P|2.5\n"
           "PID|1||079195000444^^^CCCD^NI||Phạm^Thị Hương\nMRG|OLD-77^^^^MR")
    try:
        answer = send(guarded, a40)
    except OSError:  # reset while sending
        answer = ""
    assert answer == ""  # no ACK
    with socket.create_connection(("127.0.0.1", guarded.hl7_port), timeout=10) as sock:
        assert sock.recv(10) == b""  # closed at once
    events = _events(guarded, lambda evs: any(e["action"] == "hl7-connect" for e in evs))
    assert {(e["outcome"], e["client"]) for e in events if e["action"] == "hl7-connect"} == {("denied", "127.0.0.1")}
    assert "HL7 connection from 127.0.0.1 refused" in guarded.log_text()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_segments_are_acknowledged_at_once(pacs_server: PacsServer, tmp_path: Path) -> None:
    """DCMTK keeps Nagle's algorithm on unless TCP_NODELAY=1 is in its
    environment: it sends a PDU's second segment only once the first is
    acknowledged, and a delayed ACK held each ~40 ms (a default storescu or
    getscu moved 22 objects/s). Our sockets ask for immediate ACKs
    (TCP_QUICKACK, renewed after every read), and such a storescu is served."""
    import os
    import subprocess

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pacs.dicom_net import tune_socket

    ae = AE(ae_title="QUICKACK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pacs_server.dicom_port, ae_title=pacs_server.ae_title)
    try:
        tune_socket(assoc)
        assert assoc.send_c_echo().Status == 0
        raw = assoc.dul.socket.socket
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        assoc.release()
    from .dicomfiles import make_ct

    files = [str(make_ct(tmp_path / f"{n}.dcm")) for n in range(20)]
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}  # DCMTK's default: Nagle on
    sent = subprocess.run(["storescu", "-aec", pacs_server.ae_title, "127.0.0.1", str(pacs_server.dicom_port),
                           *files], env=env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert '"instances": 20' in pacs_server.cli("stats", "--json").stdout
