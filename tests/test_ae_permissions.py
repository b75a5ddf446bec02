"""Per-AE DICOM permissions (`pacs ae add NAME --services ...`).

A registered AE may use only its services: a CT that may store cannot
query or retrieve the archive, a reading workstation that may query and
retrieve cannot store into it, a worklist client gets only the worklist and
MPPS. Everything else is answered 0x0124 "Refused: Not Authorized" with an
Error Comment, audited, and the server keeps serving. DCMTK is the peer
wherever it has the tool (storescu, findscu, movescu, getscu, echoscu);
pynetdicom sends MPPS and storage commitment, which DCMTK has no tool for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.aes import AeRegistry

from .conftest import Backend, PacsServer, run_dcmtk
from .dicomfiles import make_ct

PATIENT = "PERM-001"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    root = tmp_path_factory.mktemp("permissions")
    pacs = PacsServer(root / "data", Backend("sqlite-fs", None, None, {}))
    pacs.data_dir.mkdir(parents=True)
    for title, services in (("CT_STORE", "store"), ("WS_READ", "query,retrieve"), ("US_WL", "worklist,mpps"),
                            ("ALL_OF_IT", "all")):
        pacs.cli("ae", "add", title, "--host", "127.0.0.1", "--port", "104", "--services", services)
    pacs.start()
    ct = make_ct(root / "ct.dcm", PatientID=PATIENT)
    assert pacs.storescu(str(ct), calling="CT_STORE").returncode == 0
    yield pacs
    pacs.stop()


def _find(server: PacsServer, calling: str, *extra: str) -> Any:
    return run_dcmtk("findscu", "-v", "-S", "-aet", calling, "-aec", server.ae_title, *extra,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT}", "-k", "StudyInstanceUID",
                     "127.0.0.1", str(server.dicom_port))


def _get(server: PacsServer, calling: str, out: Path) -> Any:
    out.mkdir(exist_ok=True)
    return run_dcmtk("getscu", "-v", "-S", "-aet", calling, "-aec", server.ae_title, "-od", str(out),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT}",
                     "127.0.0.1", str(server.dicom_port))


def _denied(server: PacsServer, user: str, action: str) -> list[dict[str, Any]]:
    """The audit trail's denied *action* events of *user*, once written (they are batched)."""
    deadline = time.monotonic() + 20
    while True:
        events = json.loads(server.cli("audit", "--user", user, "--format", "json").stdout)
        denied = [e for e in events if e["action"] == action and e["outcome"] == "denied"]
        if denied or time.monotonic() > deadline:
            return denied
        time.sleep(0.3)


def _refused(result: Any) -> bool:
    """Did a DCMTK tool (with -v) get 0x0124, "Refused: Not Authorized"?"""
    return "Status: 0x124)" in result.stdout + result.stderr


def test_a_store_only_modality_may_not_query_or_retrieve(server: PacsServer, tmp_path: Path) -> None:
    """CT_STORE stored the CT (fixture); its C-FIND, C-GET and C-MOVE are
    refused 0x0124, nothing is sent, each refusal is audited, and C-ECHO
    still works."""
    found = _find(server, "CT_STORE")
    assert _refused(found) and "Pending" not in found.stdout + found.stderr, found.stdout + found.stderr
    got = _get(server, "CT_STORE", tmp_path / "got")
    assert _refused(got) and not list((tmp_path / "got").iterdir()), got.stdout + got.stderr
    moved = run_dcmtk("movescu", "-v", "-S", "-aet", "CT_STORE", "-aec", server.ae_title, "-aem", "ALL_OF_IT",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT}",
                      "127.0.0.1", str(server.dicom_port))
    assert _refused(moved), moved.stdout + moved.stderr
    echo = run_dcmtk("echoscu", "-aet", "CT_STORE", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
    assert echo.returncode == 0, echo.stderr
    assert [e["detail"] for e in _denied(server, "CT_STORE", "query")] == ["query not permitted for CT_STORE"]
    deadline = time.monotonic() + 20
    while len(retrieves := _denied(server, "CT_STORE", "retrieve")) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(retrieves) == 2, retrieves
    assert "retrieve request from CT_STORE (127.0.0.1) refused: not among its services" in server.log_text()
    assert server.alive()


def test_a_reading_workstation_may_query_and_retrieve_but_not_store(server: PacsServer, tmp_path: Path) -> None:
    before = server.stats()["instances"]
    other = make_ct(tmp_path / "other.dcm", PatientID="PERM-002")
    sent = server.storescu("-v", str(other), calling="WS_READ")
    assert _refused(sent), sent.stdout + sent.stderr
    assert server.stats()["instances"] == before
    assert [e["detail"] for e in _denied(server, "WS_READ", "store")] == ["store not permitted for WS_READ"]
    found = _find(server, "WS_READ")
    assert found.returncode == 0 and "Pending" in found.stdout + found.stderr, found.stdout + found.stderr
    got = _get(server, "WS_READ", tmp_path / "got")
    assert got.returncode == 0 and not _refused(got), got.stdout + got.stderr
    assert len(list((tmp_path / "got").iterdir())) == 1


def _association(server: PacsServer, calling: str, *contexts: str) -> Any:
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    return assoc


def _mpps_attributes() -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "US_WL"
    ds.PerformedProcedureStepStartDate = "20241120"
    ds.PerformedProcedureStepStartTime = "090000"
    ds.Modality = "US"
    ds.PatientName = "Test"
    ds.PatientID = PATIENT
    ds.ScheduledStepAttributesSequence = []
    return ds


def test_worklist_client_gets_worklist_and_mpps_only(server: PacsServer) -> None:
    """US_WL: the worklist answers (no orders: no matches, success), a study
    C-FIND is refused; MPPS N-CREATE from a store-only CT is refused 0x0124
    with nothing created, as is storage commitment from US_WL."""
    worklist = run_dcmtk("findscu", "-v", "-W", "-aet", "US_WL", "-aec", server.ae_title, "-k", "PatientID",
                         "127.0.0.1", str(server.dicom_port))
    assert worklist.returncode == 0, worklist.stdout + worklist.stderr
    assert not _refused(worklist)
    assert _refused(_find(server, "US_WL"))

    assoc = _association(server, "CT_STORE", ModalityPerformedProcedureStep)
    try:
        status, created = assoc.send_n_create(_mpps_attributes(), ModalityPerformedProcedureStep, None)
    finally:
        assoc.release()
    assert (status.Status, status.ErrorComment) == (0x0124, "mpps not permitted for CT_STORE"), status
    assert created is None
    assert _denied(server, "CT_STORE", "mpps")

    assoc = _association(server, "US_WL", StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelFind)
    try:
        info = Dataset()
        info.TransactionUID = "1.2.826.0.1.3680043.9.7134.99.1"
        info.ReferencedSOPSequence = []
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert (status.Status, status.ErrorComment) == (0x0124, "commitment not permitted for US_WL"), status
        # The same association goes on: its next request is answered as usual.
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = PATIENT
        answers = [(s.Status, s.ErrorComment) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assert answers == [(0x0124, "query not permitted for US_WL")]
        assert assoc.is_established
    finally:
        assoc.release()
    assert _denied(server, "US_WL", "commit")  # audited as storage commitment is when granted
    assert server.alive()


def test_the_registry_keeps_and_shows_services(server: PacsServer) -> None:
    listed = {ae["title"]: ae for ae in json.loads(server.cli("ae", "list", "--json").stdout)}
    assert listed["CT_STORE"]["services"] == "store"
    assert listed["WS_READ"]["services"] == "query,retrieve"
    assert listed["ALL_OF_IT"]["services"] == "*"
    assert listed["CT_STORE"]["cert_sha256"] is None
    # Re-adding a title with a new address keeps its services; --services changes them.
    moved = json.loads(server.cli("ae", "add", "CT_STORE", "--host", "10.1.2.3", "--port", "104", "--json").stdout)
    assert moved["services"] == "store" and moved["replaced"] == "127.0.0.1:104"
    changed = json.loads(server.cli("ae", "add", "CT_STORE", "--host", "127.0.0.1", "--port", "104",
                                    "--services", "worklist, STORE", "--json").stdout)
    assert changed["services"] == "store,worklist"
    server.cli("ae", "add", "CT_STORE", "--host", "127.0.0.1", "--port", "104", "--services", "store")
    # A new AE may do everything unless told otherwise.
    added = json.loads(server.cli("ae", "add", "NEWCOMER", "--host", "127.0.0.1", "--port", "104", "--json").stdout)
    assert added["services"] == "*"
    server.cli("ae", "remove", "NEWCOMER")
    for bad in ("print", "", "store,delete"):
        refused = server.cli("ae", "add", "CT_BAD", "--host", "127.0.0.1", "--port", "104", "--services", bad,
                             check=False)
        assert refused.returncode == 2 and "service" in refused.stderr, refused.stderr
    for bad in ("abc", "12" * 31):
        refused = server.cli("ae", "add", "CT_BAD", "--host", "127.0.0.1", "--port", "104", "--client-cert", bad,
                             check=False)
        assert refused.returncode == 2 and "SHA-256" in refused.stderr, refused.stderr
    assert "CT_BAD" not in server.cli("ae", "list").stdout
    # Fingerprints as openssl prints them (colons, upper case) are stored plain.
    pinning = server.cli("ae", "add", "CT_PIN", "--host", "127.0.0.1", "--port", "104", "--client-cert",
                         ":".join(["AB"] * 32), "--json")
    assert json.loads(pinning.stdout)["cert_sha256"] == "ab" * 32
    # This server asks no client for a certificate: the pin would refuse every call, and the command says so.
    assert "tls_require_client_cert" in pinning.stderr
    cleared = json.loads(server.cli("ae", "add", "CT_PIN", "--host", "127.0.0.1", "--port", "104",
                                    "--client-cert", "none", "--json").stdout)
    assert cleared["cert_sha256"] is None
    server.cli("ae", "remove", "CT_PIN")
    time.sleep(AeRegistry.CACHE_SECONDS + 0.5)  # the running server re-reads the registry


def test_an_unregistered_ae_is_not_restricted_without_the_allowlist(server: PacsServer) -> None:
    """Permissions belong to registered titles; an unknown title is the
    allowlist's business (off here), as before this feature."""
    found = _find(server, "SOMEBODY")
    assert found.returncode == 0 and "Pending" in found.stdout + found.stderr, found.stderr
