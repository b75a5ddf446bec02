"""Reviewer findings on association set-up (dicom_scp.associate_rq), each
against a real `pacs serve` -- one process, and two DICOM worker processes
with the AE allowlist on -- spoken to over raw sockets, DCMTK and pynetdicom,
with DCMTK's storescp as the reference acceptor:

1. what a peer puts in its A-ASSOCIATE-RQ reaches the log escaped and cut
   short, once, and a peer sending the same bad request again and again
   gets a few lines a minute: no forged lines, no NUL bytes, no log growing
   faster than the peer sends;
2. A-ASSOCIATE-RQ quirks DCMTK accepts are accepted (NUL-padded titles, a
   long Implementation Version Name, unknown items and sub-items, a bad
   Maximum Length sub-item); what is still aborted is said and audited;
3. every refused association gives one log line with the address, the
   calling and called AE title, the reason and the A-ASSOCIATE-RJ code, and
   its audit event the same reason;
7. an application context other than DICOM's is refused 1/1/2, and a
   protocol version is tested on bit 0 only (PS3.8 9.3.2, 9.3.4);
8. a request without a Maximum Length sub-item is served, as unlimited.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from .conftest import PacsServer, free_port, run_dcmtk
from .peers import Backend, dcmtk, read_pdu, wait_port, wait_until

APP = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT = b"1.2.840.10008.1.2"
FORGED = b"2031-01-01 07:00:00,000 WARNING pacs.audit: audit trail purged by admin"


# -- raw PDUs -----------------------------------------------------------------------------
def item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def context(cid: int = 1, abstract: bytes = VERIFICATION, syntaxes: tuple[bytes, ...] = (IMPLICIT,),
            extra: bytes = b"") -> bytes:
    return item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract) + b"".join(item(0x40, s) for s in syntaxes) + extra)


def user_info(max_pdu: bytes | None = struct.pack(">I", 16384), version: bytes | None = b"RAW",
              extra: bytes = b"") -> bytes:
    body = (item(0x51, max_pdu) if max_pdu is not None else b"") + item(0x52, b"1.2.826.0.1.3680043.9.7777")
    return item(0x50, body + extra + (item(0x55, version) if version is not None else b""))


def associate_rq(called: bytes = b"FILMLESS", calling: bytes = b"RAWSCU", *, version: int = 1, app: bytes = APP,
                 contexts: bytes | None = None, ui: bytes | None = None, extra: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ; titles shorter than 16 bytes are padded with spaces."""
    body = (struct.pack(">HH", version, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
            + item(0x10, app) + (contexts if contexts is not None else context()) + extra
            + (ui if ui is not None else user_info()))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _element(element: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        value = struct.pack("<H", value)
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, element, len(value)) + value


ECHO_RQ = b"".join([_element(0x0002, VERIFICATION), _element(0x0100, 0x0030), _element(0x0110, 1),
                    _element(0x0800, 0x0101)])
ECHO_PDATA = (struct.pack(">BBI", 4, 0, len(ECHO_RQ) + 6 + 12) + struct.pack(">IBB", len(ECHO_RQ) + 12 + 2, 1, 3)
              + struct.pack("<HHII", 0, 0, 4, len(ECHO_RQ)) + ECHO_RQ)
RELEASE_RQ = struct.pack(">BBI", 5, 0, 4) + bytes(4)


def outcome(port: int, pdu: bytes, source: str = "127.0.0.1") -> tuple[Any, ...]:
    """What an acceptor answers *pdu*: ("AC", C-ECHO status), ("RJ", result,
    source, reason), ("ABORT",) or ("closed",); sent from *source* (another
    127.x address keeps each test's log lines apart)."""
    with socket.socket() as sock:
        sock.settimeout(20)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(pdu)
        try:
            kind, body = read_pdu(sock)
            if kind == 3:
                return ("RJ", *body[1:4])
            if kind == 7:
                return ("ABORT",)
            assert kind == 2, kind
            sock.sendall(ECHO_PDATA)
            kind, body = read_pdu(sock)
            if kind != 4:
                return ("AC", "no echo response", kind)
            command = body[6:]
            status = None
            pos = 0
            while pos + 8 <= len(command):
                _, element, length = struct.unpack_from("<HHI", command, pos)
                if element == 0x0900:
                    status = struct.unpack_from("<H", command, pos + 8)[0]
                pos += 8 + length
            sock.sendall(RELEASE_RQ)
            read_pdu(sock)
            return ("AC", status)
        except (EOFError, ConnectionError):
            return ("closed",)


def audit(server: PacsServer, found: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The association audit events once *found* holds (written in batches)."""
    deadline = time.monotonic() + 30
    while True:
        events = [e for e in json.loads(server.cli("audit", "--format", "json").stdout) if e["action"] == "associate"]
        if found(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def logged(server: PacsServer, *lines: str) -> str:
    """The server log once it holds every one of *lines* (a refusal is said
    as the A-ASSOCIATE-RJ goes out), or after 10 s."""
    wait_until(lambda: all(line in server.log_text() for line in lines), timeout=10, interval=0.1)
    return server.log_text()


# -- servers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One process, no allowlist, max_associations 3 (per host: more)."""
    tmp = tmp_path_factory.mktemp("assoc-single")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_MAX_ASSOCIATIONS": "3", "PACS_MAX_ASSOCIATIONS_PER_HOST": "8"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Two DICOM worker processes, the AE allowlist on, max_associations 4
    (2 per worker)."""
    tmp = tmp_path_factory.mktemp("assoc-workers")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}), extra_env={
        "PACS_DICOM_WORKERS": "2", "PACS_AE_ALLOWLIST": "true", "PACS_MAX_ASSOCIATIONS": "4",
        "PACS_MAX_ASSOCIATIONS_PER_HOST": "16"})
    server.data_dir.mkdir(parents=True)
    for title in ("RAWSCU", "CTOLD", "ECHOSCU", "HOLDER"):
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", "104")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["single", "workers"])
def server(request: pytest.FixtureRequest) -> PacsServer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """DCMTK's storescp, the reference acceptor."""
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


# -- 1: peer text in the log ---------------------------------------------------------------
def test_peer_text_is_escaped_bounded_said_once_and_rate_limited(single: PacsServer) -> None:
    """A newline in a value forged whole log lines, a NUL made the log
    binary, and each 65,000-byte value was written twice (pynetdicom's ERROR
    and our WARNING): 200 requests of 13 MB grew the log 26 MB. Now a bad
    value is escaped, cut short and said once, and one address gets at most
    five such lines a minute; every attempt is still audited."""
    source = "127.0.0.11"
    start = single.log_path.stat().st_size
    injected = b"1.2\n" + FORGED + b"\0" + b"9" * 60_000  # an abstract syntax pynetdicom refuses
    forged_title = b"CT\n" + FORGED[:12]
    sent = 0
    for _ in range(10):
        for pdu in (associate_rq(contexts=context(abstract=injected)), associate_rq(calling=forged_title)):
            assert outcome(single.dicom_port, pdu, source) == ("ABORT",)
            sent += len(pdu)
    # Each line is written before the A-ABORT is sent.
    raw = single.log_path.read_bytes()[start:]
    assert b"\0" not in raw
    text = raw.decode("utf-8", "replace")
    assert "\n" + FORGED.decode() not in text and "\n" + FORGED[:12].decode() not in text, text[-3000:]
    lines = [line for line in text.splitlines() if source in line]
    refused = [line for line in lines if "refused: A-ASSOCIATE-RQ not understood" in line]
    assert len(refused) == 5, lines  # five a minute for one address and kind
    assert any("calling CT\\n" + FORGED[:12].decode() in line for line in refused), refused
    assert all("A-ABORT sent" in line and len(line) < 600 for line in refused), refused
    # Said once: neither pynetdicom's ERROR nor its traceback.
    assert "Unable to decode" not in text and "pynetdicom" not in text and "Traceback" not in text, text[-3000:]
    assert len(raw) < sent / 100, f"{len(raw)} bytes of log for {sent} bytes sent"
    events = audit(single, lambda evs: len([e for e in evs if e["client"] == source]) >= 20)
    mine = [e for e in events if e["client"] == source]
    assert len(mine) == 20 and all(e["outcome"] == "denied" for e in mine)
    assert {e["user"] for e in mine} == {"RAWSCU", "CT\\n" + FORGED[:12].decode()}
    assert all("\n" not in e["detail"] and len(e["detail"]) <= 500 for e in mine)
    # The Implementation Version Name is informational: even this one is
    # accepted now (finding 2), and it reaches the log as an escaped note.
    start = single.log_path.stat().st_size
    assert outcome(single.dicom_port, associate_rq(ui=user_info(version=b"X\n" + FORGED)), source) == ("AC", 0)
    assert wait_until(lambda: b"read as DCMTK reads it" in single.log_path.read_bytes()[start:], timeout=10)
    text = single.log_text(start)
    assert "\n" + FORGED.decode() not in text and "Implementation Version Name X\\n2031-01-01" in text, text


# -- 2, 7, 8: what DCMTK accepts -------------------------------------------------------------
QUIRKS: dict[str, bytes] = {
    "called AE title padded with NULs": associate_rq(called=b"FILMLESS".ljust(16, b"\0")),
    "calling AE title padded with NULs": associate_rq(calling=b"CTOLD".ljust(16, b"\0")),
    "Implementation Version Name of 17 characters": associate_rq(ui=user_info(version=b"DR_SYSTEM_V2.1.34")),
    "user information sub-item of an unknown type": associate_rq(ui=user_info(extra=item(0x5F, b"abc"))),
    "item of an unknown type": associate_rq(extra=item(0x60, b"xyz")),
    "presentation context sub-item of an unknown type": associate_rq(contexts=context(extra=item(0x3F, b"?"))),
    "Maximum Length sub-item of 3 bytes": associate_rq(ui=user_info(max_pdu=b"\x00\x40\x00")),
    "no Maximum Length sub-item": associate_rq(ui=user_info(max_pdu=None)),
    "no User Information item": associate_rq(ui=b""),
    "protocol version 0x0003 (bit 0 set)": associate_rq(version=3),
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_requests_dcmtk_accepts_are_accepted(server: PacsServer, storescp: int, quirk: str) -> None:
    """Each was an A-ABORT (or, without a Maximum Length, an AC and then an
    A-ABORT with a traceback at the first response); DCMTK's storescp
    accepts them and answers the C-ECHO, and so do we, with one process and
    with two workers under the allowlist (CTOLD is registered there)."""
    pdu = QUIRKS[quirk]
    assert outcome(storescp, pdu) == ("AC", 0)
    assert outcome(server.dicom_port, pdu, "127.0.0.12") == ("AC", 0)
    assert "Traceback" not in server.log_text()


def test_quirk_is_said_once_at_info(single: PacsServer) -> None:
    """The operator learns what was tolerated, once an hour per address."""
    source = "127.0.0.13"
    start = single.log_path.stat().st_size
    for _ in range(3):
        assert outcome(single.dicom_port, associate_rq(called=b"FILMLESS".ljust(16, b"\0")), source) == ("AC", 0)
    lines = [line for line in single.log_text(start).splitlines() if source in line]
    assert len(lines) == 1 and " INFO " in lines[0], lines
    assert "(calling RAWSCU, called FILMLESS) read as DCMTK reads it: called AE title padded with NUL bytes" in lines[0]


def test_application_context_and_protocol_version(server: PacsServer, storescp: int) -> None:
    """An application context other than DICOM's was accepted (the AC even
    named DICOM's): A-ASSOCIATE-RJ 1/1/2 as DCMTK sends (PS3.8 9.3.4). A
    version without bit 0 stays refused 1/2/2, now logged with the address
    and titles and audited (it said only "Unsupported protocol version")."""
    source = "127.0.0.14"
    for port in (storescp, server.dicom_port):
        assert outcome(port, associate_rq(app=b"1.2.3.4"), source) == ("RJ", 1, 1, 2)
        assert outcome(port, associate_rq(version=2), source) == ("RJ", 1, 2, 2)
    context_line = (f"association from {source} (calling RAWSCU, called FILMLESS) refused: application context "
                    "1.2.3.4 is not DICOM's (1.2.840.10008.3.1.1.1) (A-ASSOCIATE-RJ 1/1/2)")
    version_line = (f"association from {source} (calling RAWSCU, called FILMLESS) refused: protocol version 0x0002 "
                    "not supported (bit 0 not set) (A-ASSOCIATE-RJ 1/2/2)")
    log = logged(server, context_line, version_line)
    assert context_line in log and version_line in log, log[-3000:]
    assert "Unsupported protocol version" not in log
    events = audit(server, lambda evs: len([e for e in evs if e["client"] == source]) >= 2)
    details = sorted(e["detail"] for e in events if e["client"] == source)
    assert details == ["application context 1.2.3.4 is not DICOM's (1.2.840.10008.3.1.1.1) (A-ASSOCIATE-RJ 1/1/2)",
                       "protocol version 0x0002 not supported (bit 0 not set) (A-ASSOCIATE-RJ 1/2/2)"]


def test_request_still_aborted_is_said_and_audited(server: PacsServer) -> None:
    """A blank calling AE title is not allowed (PS3.8 9.3.2) and stays an
    A-ABORT: said with the address and the called title (it was "malformed
    PDU from peer" with neither) and audited (it was not)."""
    source = "127.0.0.15"
    assert outcome(server.dicom_port, associate_rq(calling=b""), source) == ("ABORT",)
    # The line is written before the A-ABORT is sent.
    assert (f"association from {source} (calling (blank), called FILMLESS) refused: A-ASSOCIATE-RQ not understood: "
            "Invalid 'Calling AE Title' value - must not consist entirely of spaces; A-ABORT sent"
            ) in server.log_text(), server.log_text()[-3000:]
    events = audit(server, lambda evs: any(e["client"] == source for e in evs))
    assert [(e["user"], e["outcome"]) for e in events if e["client"] == source] == [("(blank)", "denied")]


def test_maximum_length_no_pdv_fits_in_is_aborted_without_traceback(server: PacsServer, storescp: int) -> None:
    """A Maximum Length of 1-6 leaves no room for a PDV (PS3.8 9.3.5): the
    association was accepted and each response died with a traceback in the
    log, the peer waiting for it. DCMTK accepts and aborts at its first
    response; we abort the request at once, say it once and audit it, and
    keep serving (7 is the smallest that works)."""
    source = "127.0.0.19"
    start = server.log_path.stat().st_size
    for maximum in (1, 4, 6):
        pdu = associate_rq(ui=user_info(max_pdu=struct.pack(">I", maximum)))
        assert outcome(storescp, pdu) == ("AC", "no echo response", 7)  # DCMTK: A-ABORT instead of the answer
        assert outcome(server.dicom_port, pdu, source) == ("ABORT",)
    # The aborted associations leave as the peer closes, a few ms later
    # (max_associations is 3): another address, so their refusals, if any,
    # are not counted below.
    seven = associate_rq(ui=user_info(max_pdu=struct.pack(">I", 7)))
    assert wait_until(lambda: outcome(server.dicom_port, seven, "127.0.0.20")[0] == "AC", timeout=10, interval=0.1)
    # The association just closed may still hold its slot for a moment (2/3/2, local limit exceeded).
    assert wait_until(lambda: outcome(server.dicom_port, associate_rq(), "127.0.0.20") == ("AC", 0), timeout=10,
                      interval=0.1)
    text = server.log_text(start)
    lines = [line for line in text.splitlines() if source in line]
    said = [f"association from {source} (calling RAWSCU, called FILMLESS) refused: Maximum Length {n} cannot carry "
            "a PDV (at least 7, or 0 for no limit: PS3.8 9.3.5, D.1); A-ABORT sent" for n in (1, 4, 6)]
    assert len(lines) == 3 and all(s in line and " WARNING " in line for s, line in zip(said, lines)), lines
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    events = audit(server, lambda evs: len([e for e in evs if e["client"] == source]) >= 3)
    assert [e["detail"] for e in events if e["client"] == source][-1].startswith("Maximum Length ")


# -- 3: every refusal said, with its reason ----------------------------------------------------
def _echoscu(server: PacsServer, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(server.dicom_port))


def test_wrong_called_ae_title_is_logged_and_audited_with_the_reason(server: PacsServer) -> None:
    """The ultrasound "says association rejected": the log said nothing, and
    the audit detail could not tell a misspelt called AE title from a full
    server."""
    calling = "ECHOSCU"
    assert _echoscu(server, calling, "FILMLES").returncode != 0
    assert _echoscu(server, calling, "filmless").returncode != 0
    misspelt = ("association from 127.0.0.1 (calling ECHOSCU, called FILMLES) refused: called AE title FILMLES is "
                "not FILMLESS (A-ASSOCIATE-RJ 1/1/7)")
    lower = ("association from 127.0.0.1 (calling ECHOSCU, called filmless) refused: called AE title filmless is "
             "not FILMLESS (AE titles are case-sensitive) (A-ASSOCIATE-RJ 1/1/7)")
    log = logged(server, misspelt, lower)
    assert misspelt in log and lower in log, log[-3000:]
    events = audit(server, lambda evs: len([e for e in evs if "1/1/7" in e["detail"]]) >= 2)
    details = {e["detail"] for e in events if e["user"] == calling}
    assert details == {"called AE title FILMLES is not FILMLESS (A-ASSOCIATE-RJ 1/1/7)",
                       "called AE title filmless is not FILMLESS (AE titles are case-sensitive) (A-ASSOCIATE-RJ 1/1/7)"}


def test_unregistered_calling_ae_title_is_logged(workers: PacsServer) -> None:
    """With the allowlist, an unregistered (or differently cased) calling
    AE title was refused 1/1/3 without a line in the log."""
    assert _echoscu(workers, "INTRUDER", "FILMLESS").returncode != 0
    assert _echoscu(workers, "rawscu", "FILMLESS").returncode != 0
    assert _echoscu(workers, "RAWSCU", "FILMLESS").returncode == 0
    intruder = ("association from 127.0.0.1 (calling INTRUDER, called FILMLESS) refused: calling AE title INTRUDER "
                "is not in the registry (ae_allowlist) (A-ASSOCIATE-RJ 1/1/3)")
    lower = ("association from 127.0.0.1 (calling rawscu, called FILMLESS) refused: calling AE title rawscu is not "
             "in the registry (ae_allowlist); RAWSCU is (AE titles are case-sensitive) (A-ASSOCIATE-RJ 1/1/3)")
    log = logged(workers, intruder, lower)
    assert intruder in log and lower in log, log[-3000:]
    events = audit(workers, lambda evs: {"INTRUDER", "rawscu"} <= {e["user"] for e in evs})
    assert {e["detail"] for e in events if e["user"] == "INTRUDER"} == {
        "calling AE title INTRUDER is not in the registry (ae_allowlist) (A-ASSOCIATE-RJ 1/1/3)"}


@pytest.mark.parametrize("which", ["single", "workers"])
def test_max_associations_refusal_is_logged_and_audited(request: pytest.FixtureRequest, which: str) -> None:
    """At max_associations (with workers: a worker's share of it) the
    refusal (2/3/2) was silent, and audited as "too many associations, or
    the called AE title"."""
    server: PacsServer = request.getfixturevalue(which)
    source = "127.0.0.16" if which == "single" else "127.0.0.17"
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    refused = None
    try:
        for _ in range(6):
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, bind_address=(source, 0))
            if not assoc.is_established:
                refused = assoc
                break
            held.append(assoc)
    finally:
        for assoc in held:
            assoc.release()
    assert refused is not None and refused.is_rejected, f"{len(held)} held, none refused"
    rj = refused.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
    share = " (this DICOM worker's share of max_associations)" if which == "workers" else ""
    limit = 3 if which == "single" else 2
    expected = f"{limit} associations open, max_associations is {limit}{share} (A-ASSOCIATE-RJ 2/3/2)"
    assert wait_until(lambda: f"association from {source} (calling HOLDER, called FILMLESS) refused: {expected}"
                      in server.log_text(), timeout=10), server.log_text()[-3000:]
    events = audit(server, lambda evs: any(e["client"] == source for e in evs))
    assert [e["detail"] for e in events if e["client"] == source] == [expected]


def test_pynetdicom_lines_quoting_a_peer_are_escaped(single: PacsServer) -> None:
    """pynetdicom's own lines echo the peer too (a non-conformant UID is
    accepted with a WARNING quoting it): the log handlers' filter makes them
    one escaped line (pacs.logtext.OneLineFilter)."""
    source = "127.0.0.18"
    start = single.log_path.stat().st_size
    odd = b"1.2\n" + FORGED[:40] + b"\x001"  # 64 characters at most: accepted, then not supported
    pdu = associate_rq(contexts=context() + context(3, odd))
    assert outcome(single.dicom_port, pdu, source) == ("AC", 0)
    raw = single.log_path.read_bytes()[start:]
    assert b"\0" not in raw and b"\n" + FORGED[:40] not in raw, raw.decode(errors="replace")
    assert b"Non-conformant 'Abstract Syntax Name' value '1.2\\n" + FORGED[:40] + b"\\x001'" in raw, raw
