"""Fresh-eyes review of the leftovers fixes (test_leftovers_fixes): HL7
enhanced acknowledgment mode and QIDO-RS TimezoneOffsetFromUTC, against a
real `pacs serve` (SQLite + filesystem), raw MLLP sockets and the HTTP API.

Under the overwrite policy (an identical resend writes nothing). The
hospital's zone here is Europe/Berlin: an offset that changes with the
season (+0100 in winter, +0200 in summer).
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_hl7_review import CR, FS, VT, connect, fields, msa, orm, read_frame, with_modes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("leftovers2")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_TIMEZONE": "Europe/Berlin", "PACS_DUPLICATE_POLICY": "overwrite"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _send(sock: socket.socket, message: str) -> None:
    """*message* in an MLLP frame."""
    sock.sendall(VT + message.encode() + FS + CR)


# -- HL7: an acknowledgment is never acknowledged ---------------------------------------------------
def test_an_ack_the_his_sends_back_for_the_application_ack_is_not_answered(server: PacsServer) -> None:
    """The application ACK of enhanced mode is a message of its own: a HIS
    may acknowledge it (an accept ACK, or an original-mode AA, MSH-15/16
    empty). Acknowledging an acknowledgment loops (HL7 v2: ACKs are not
    acknowledged); the archive answered it AR 'message type ACK is not
    supported', which the HIS may acknowledge again. It must send nothing."""
    order = with_modes(orm(f"E{generate_uid()[-8:]}", "RLO2ACK", pid="BN7201^^^BVDK^MR"), "AL", "AL")
    probe = orm(f"PRB{generate_uid()[-8:]}", "RLO2PRB", pid="BN7201^^^BVDK^MR")
    with connect(server) as sock:
        _send(sock, order)
        accept, application = read_frame(sock), read_frame(sock)
        assert msa(accept)[0] == "CA" and msa(application)[0] == "AA"
        app_control = fields(application, "MSH")[9]
        for modes in (("", ""), ("AL", "AL")):
            # The HIS's ACK of our application ACK (its MSH-3/4 ours, as it answers us).
            reply = with_modes(
                f"MSH|^~\\&|HIS|BVDK|FILMLESS||20261207083000||ACK^O01^ACK|H{generate_uid()[-10:]}|P|2.5\r"
                f"MSA|AA|{app_control}", *modes)
            _send(sock, reply)
        _send(sock, probe)
        # The next frame is the probe's ACK: nothing was sent for the ACKs.
        assert msa(read_frame(sock)) == ("AA", fields(probe, "MSH")[9])


# -- QIDO-RS TimezoneOffsetFromUTC ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def studies(server: PacsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A winter and a summer study of one patient: date -> Study Instance UID."""
    tmp = tmp_path_factory.mktemp("tz")
    uids = {}
    for date in ("20240115", "20240715"):
        path = make_ct(tmp / f"{date}.dcm", PatientID="BN-TZ2", StudyDate=date, StudyTime="083000")
        assert server.storescu(str(path)).returncode == 0
        uids[date] = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return uids


def test_qido_timezone_offset_of_either_season_is_the_hospitals(server: PacsServer, studies: dict[str, str]) -> None:
    """Berlin is +0100 in winter, +0200 in summer: a client in the hospital
    sends the offset of its clock (or of the dates it searches); both are
    the hospital's zone, whatever the season the server is asked in. Only
    the offset of 'now' was taken, so half the year one of them was 400."""
    with server.http() as http:
        for offset in ("+0100", "+0200"):
            for date, study in studies.items():
                answer = http.get("/dicom-web/studies", params={
                    "PatientID": "BN-TZ2", "TimezoneOffsetFromUTC": offset, "StudyDate": date})
                assert answer.status_code == 200, (offset, date, answer.text)
                assert [s["0020000D"]["Value"][0] for s in answer.json()] == [study]
        # An offset the hospital never has is still refused, naming both of its own.
        refused = http.get("/dicom-web/studies", params={
            "PatientID": "BN-TZ2", "TimezoneOffsetFromUTC": "+0700", "StudyDate": "20240115"})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert "TimezoneOffsetFromUTC" in error and "+0100" in error and "+0200" in error, error


def test_qido_timezone_offset_with_an_unencoded_plus(server: PacsServer, studies: dict[str, str]) -> None:
    """`?TimezoneOffsetFromUTC=+0100` typed as PS3.18's examples write it
    (curl, a browser's address bar): the query string's '+' reaches the
    server as a space (form decoding), ' 0100'. It was refused 400 'not an
    offset'; a space then four digits can only be a '+' offset."""
    with server.http() as http:
        answer = http.get("/dicom-web/studies?PatientID=BN-TZ2&StudyDate=20240115&TimezoneOffsetFromUTC=+0100")
        assert answer.status_code == 200, answer.text
        assert [s["0020000D"]["Value"][0] for s in answer.json()] == [studies["20240115"]]
        # A minus sign is not decoded: still an offset, still refused when not the hospital's.
        refused = http.get("/dicom-web/studies?PatientID=BN-TZ2&StudyDate=20240115&TimezoneOffsetFromUTC=-0500")
        assert refused.status_code == 400 and "TimezoneOffsetFromUTC" in refused.json()["error"], refused.text


def test_qido_an_empty_timezone_offset_is_universal_matching(server: PacsServer, studies: dict[str, str]) -> None:
    """`TimezoneOffsetFromUTC=` (or `00080201=`) with no value: universal
    matching, the attribute asked for (PS3.4 C.2.2.2.3, as a C-FIND
    identifier's empty key), no offset given. It was refused 400 "'' is not
    an offset from UTC"."""
    with server.http() as http:
        for key in ("TimezoneOffsetFromUTC", "00080201"):
            answer = http.get("/dicom-web/studies", params={"PatientID": "BN-TZ2", "StudyDate": "20240115", key: ""})
            assert answer.status_code == 200, (key, answer.text)
            assert [s["0020000D"]["Value"][0] for s in answer.json()] == [studies["20240115"]]


# -- HL7: the accept ACK's CR is for what can never be accepted -----------------------------------------
def test_accept_ack_cr_only_for_an_unsupported_interaction_ce_for_a_failure_to_resend(server: PacsServer) -> None:
    """HL7 table 0008: CR (commit reject) is for a message whose type, event,
    version or processing mode this receiver does not take; CE (commit
    error) for a message it cannot accept for any other reason. Every AR
    was sent as CR, also 'internal error: please resend' (the index failing
    the order) and a message not in its declared character set: a HIS in
    accept-only mode (AL/NE, the common enhanced setup) takes CR as final
    and never resends the order. Those are CE now; unsupported ones stay CR."""
    pid = "BN7301^^^BVDK^MR"

    def accept_ack(message: str | bytes) -> tuple[str, str]:
        raw = message.encode() if isinstance(message, str) else message
        with connect(server) as sock:
            sock.sendall(VT + raw + FS + CR)
            return msa(read_frame(sock))

    # The index refuses the order (a fault of ours, not of the message): AR 207 in original mode.
    db = sqlite3.connect(server.data_dir / "index.sqlite", timeout=30)
    try:
        db.execute("CREATE TRIGGER review_fail BEFORE INSERT ON orders BEGIN SELECT RAISE(ABORT, 'disk fault'); END")
        db.commit()
        failing = with_modes(orm(f"F{generate_uid()[-8:]}", "RLO3F", pid=pid), "AL", "NE")
        assert accept_ack(failing)[0] == "CE"
    finally:
        db.execute("DROP TRIGGER IF EXISTS review_fail")
        db.commit()
        db.close()
    # Bytes not in the declared UNICODE UTF-8: CE (the sender can fix and resend).
    latin1 = with_modes(orm(f"L{generate_uid()[-8:]}", "RLO3L", pid=pid), "AL", "NE").encode("latin-1", "replace")
    assert accept_ack(latin1.replace(b"Nguy?n", b"Nguy\xe9n"))[0] == "CE"
    # What this archive never takes: CR.
    unsupported = with_modes(orm(f"U{generate_uid()[-8:]}", "RLO3U", pid=pid), "AL", "NE").replace("ORM^O01", "ORM^O02")
    assert accept_ack(unsupported)[0] == "CR"
    training = with_modes(orm(f"T{generate_uid()[-8:]}", "RLO3T", pid=pid), "AL", "NE").replace("|P|2.5|", "|T|2.5|")
    assert accept_ack(training)[0] == "CR"
    # The failing order is taken once the index works again.
    assert accept_ack(failing)[0] == "CA"


# -- overwrite policy: an identical object framed by another File Meta -----------------------------------
def test_an_identical_resend_from_another_ae_writes_nothing(server: PacsServer,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """The archive writes its own File Meta around a received dataset: the
    calling AE (0002,0016) and this version's Implementation Version Name
    (0002,0013). The very object resent by another AE (a router, the old
    PACS re-sending during a migration), or by the same modality after an
    upgrade of this archive, differs from the stored copy in that framing
    only, and was stored again as a correction (a second copy, the row
    switched). Identical datasets write nothing now; a changed one still does."""
    tmp = tmp_path_factory.mktemp("resend")
    path = make_ct(tmp / "ct.dcm", PatientID="BN-RESEND2")
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert server.storescu(str(path), calling="CT_ROOM1").returncode == 0

    def files() -> list[tuple[str, int]]:
        return sorted((p.name, p.stat().st_mtime_ns) for p in (server.data_dir / "objects").rglob(f"{sop}*.dcm"))

    first = files()
    assert [name for name, _ in first] == [f"{sop}.dcm"]
    for calling in ("OLD_PACS", "ROUTER_AE_LONG16"):
        again = server.storescu(str(path), calling=calling)
        assert again.returncode == 0 and "Failed" not in again.stderr, again.stderr
        assert files() == first, calling
    # A changed object from another AE is still a correction.
    ds = dcmread(path)
    ds.SeriesDescription = "corrected"
    ds.save_as(tmp / "changed.dcm")
    assert server.storescu(str(tmp / "changed.dcm"), calling="OLD_PACS").returncode == 0
    core = server.core()
    try:
        assert core.reader.instance_key(sop).endswith(f"{sop}.resent.dcm")
    finally:
        core.close()
