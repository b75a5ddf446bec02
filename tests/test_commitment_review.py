"""Storage commitment review: a modality deletes its copy once the archive
commits an instance, so a wrong "committed" is data loss. Not committed: an
object refused as a UID conflict (0111H), an object damaged in the store at
its indexed size. A definite failure is reported at once, on the waiting
modality's association; a report owed when the node stops cleanly is sent
as soon as a node runs again."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import build_role, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

from pacs.ingest import object_key
from storage.filesystem import FileStore

from .conftest import PacsServer, free_port, run_dcmtk
from .dicomfiles import make_ct
from .peers import wait_until
from .test_commitment import (
    MODALITY,
    _ask,
    _ask_and_leave,
    _modality_ae,
    _modality_listener,
    _report,
    _reports,
    _request,
    _send_study,
)


def _store_as(server: PacsServer, path: Path) -> int:
    """C-STORE one file as the modality with DCMTK storescu; the status it got."""
    run = run_dcmtk("storescu", "-v", "-aet", MODALITY, "-aec", server.ae_title, "127.0.0.1",
                    str(server.dicom_port), str(path))
    found = re.search(r"Received Store Response \((?:[^)]*?Status: )?(?:Success|0x([0-9A-Fa-f]+))",
                      run.stdout + run.stderr)
    assert found, run.stdout + run.stderr
    return int(found.group(1), 16) if found.group(1) else 0


def _same_uid(path: Path, sop_uid: str, **attributes: Any) -> Path:
    """A CT object under *sop_uid* (file meta too), with *attributes*."""
    return make_ct(path, sop_uid=sop_uid, **attributes)


def _commit_waiting(server: PacsServer, sops: list[str]) -> tuple[int, set[str], dict[str, int]]:
    """Ask on an association the modality keeps open for its report."""
    received, on_report = _reports()
    role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    assoc = _modality_ae().associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, ext_neg=[role],
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        transaction = generate_uid()
        assert _ask(assoc, _request(transaction, [(CTImageStorage, sop) for sop in sops])).Status == 0x0000
        report = _report(received, transaction)
        # pynetdicom sends the handler's N-EVENT-REPORT-RSP after the handler returned: released at once,
        # the association could end before it left, and the server waited its DIMSE timeout (60 s) for it.
        assert wait_until(lambda: any(transaction in line and "reported to" in line
                                      for line in server.log_text().splitlines()), 30)
        return report
    finally:
        assoc.release()


def _object_path(server: PacsServer, study: str, series: str, sop: str) -> Path:
    return FileStore(server.data_dir / "objects").path_for(object_key(study, series, sop))


def test_an_object_refused_as_a_uid_conflict_is_not_committed(pacs_server: PacsServer, tmp_path: Path) -> None:
    """The modality's object reuses a SOP Instance UID the archive keeps in
    another study (another patient's): refused 0111H, not stored. Its
    commitment fails (0110H) instead of vouching for the other patient's
    object; once the modality sends the UID into the kept study, it commits."""
    server = pacs_server
    (study, series, kept), (_, _, other) = _send_study(server, tmp_path / "study", 2)
    refused = _same_uid(tmp_path / "conflict.dcm", kept, StudyInstanceUID=generate_uid(),
                        SeriesInstanceUID=generate_uid(), PatientID="P2", PatientName="OTHER^PAT")
    assert _store_as(server, refused) == 0x0111

    assert _commit_waiting(server, [kept, other]) == (2, {other}, {kept: 0x0110})
    assert wait_until(lambda: f"sent SOP Instance UID {kept}" in server.log_text(), 30)

    # Sent again into the study and series the archive keeps it in: a resend.
    resent = _same_uid(tmp_path / "resent.dcm", kept, StudyInstanceUID=study, SeriesInstanceUID=series)
    assert _store_as(server, resent) == 0x0000
    assert _commit_waiting(server, [kept, other]) == (1, {kept, other}, {})


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_an_object_damaged_at_its_indexed_size_is_not_committed(pacs_server: PacsServer, tmp_path: Path) -> None:
    """Bytes damaged in the store, same size (what pacs verify calls corrupt):
    not committed (0110H), the log names the key."""
    server = pacs_server
    uids = _send_study(server, tmp_path / "study", 2)
    damaged = _object_path(server, *uids[0])
    damaged.write_bytes(b"\0" * damaged.stat().st_size)

    assert _commit_waiting(server, [sop for _, _, sop in uids]) == (2, {uids[1][2]}, {uids[0][2]: 0x0110})
    assert wait_until(lambda: f"{object_key(*uids[0])} is damaged" in server.log_text(), 30)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_definite_failure_is_reported_on_the_waiting_association(pacs_server: PacsServer, tmp_path: Path) -> None:
    """A truncated object is a definite failure, not an outage: the report
    goes at once on the association the modality keeps open for it (it was
    checked again for ~4 minutes while the PACS aborted the modality at its
    dicom_timeout: the report never arrived there)."""
    server = pacs_server
    uids = _send_study(server, tmp_path / "study", 3)
    truncated = _object_path(server, *uids[0])
    truncated.write_bytes(truncated.read_bytes()[:300])

    assert _commit_waiting(server, [sop for _, _, sop in uids]) == (
        2, {sop for _, _, sop in uids[1:]}, {uids[0][2]: 0x0110})
    assert wait_until(lambda: "reported to CT_COMMIT" in server.log_text(), 30)
    assert "new association" not in server.log_text()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_clean_stop_gives_the_owed_report_back_at_once(pacs_server: PacsServer, tmp_path: Path) -> None:
    """The node stops (SIGTERM) while the request's thread holds its report,
    waiting for the store: the report goes back to the outbox, due, and the
    next start sends it (it stayed "sending", held for ~5 minutes)."""
    server = pacs_server
    uids = _send_study(server, tmp_path / "study", 2)
    port = free_port()
    server.cli("ae", "add", MODALITY, "--host", "127.0.0.1", "--port", str(port))
    # The store cannot read this object for now (a directory where the file
    # was): the check waits for it, holding the report.
    blocked = _object_path(server, *uids[0])
    kept = blocked.read_bytes()
    blocked.unlink()
    blocked.mkdir()
    transaction = _ask_and_leave(server, uids)
    assert wait_until(lambda: object_key(*uids[0]) in server.log_text(), 30)  # checked once, waiting
    server.stop(signal.SIGTERM)

    listed = json.loads(server.cli("outbox", "list", "--json").stdout)
    owed = [m for m in listed["messages"] if m["destination"] == "commitment"]
    assert [m["state"] for m in owed] == ["pending"]

    blocked.rmdir()
    blocked.write_bytes(kept)
    received, on_report = _reports()
    scp = _modality_listener(port, on_report)
    try:
        server.start()
        report = _report(received, transaction)
    finally:
        scp.shutdown()
    assert report == (1, {sop for _, _, sop in uids}, {})
