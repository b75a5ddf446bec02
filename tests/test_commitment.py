"""Storage Commitment Push Model (PS3.4 Annex J): after DCMTK storescu sends a
study, a modality (pynetdicom: DCMTK has no storage commitment SCU) asks
whether the PACS holds it and gets the N-EVENT-REPORT on its own association
or, once it has closed it, on a new association to its registered address."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from pacs.ingest import object_key
from storage import open_store

from .conftest import PacsServer, free_port, run_dcmtk
from .dicomfiles import make_ct

MODALITY = "CT_COMMIT"
# Long enough for the late path too: a report that crossed the modality's release waits
# for pynetdicom's 30 s ACSE timeout, then goes on a new association.
REPORT_WAIT = 75.0


def _send_study(server: PacsServer, folder: Path, count: int) -> list[tuple[str, str, str]]:
    """(study, series, sop) of *count* CT objects sent with DCMTK storescu."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    uids = []
    for n in range(count):
        path = make_ct(folder / f"ct{n}.dcm", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=n + 1)
        uids.append((study, series, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)))
    run_dcmtk("storescu", "-aet", MODALITY, "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
              *[str(p) for p in sorted(folder.glob("ct*.dcm"))])
    return uids


def _request(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    info.ReferencedSOPSequence = DicomSequence(items)
    return info


def _reports() -> tuple[queue.Queue[tuple[int, Dataset]], Any]:
    """A queue of (event type, event information) and the handler that fills it."""
    received: queue.Queue[tuple[int, Dataset]] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        received.put((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    return received, on_report


def _modality_ae() -> AE:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    return ae


def _ask(assoc: Any, info: Dataset, action: int = 1, instance: str = StorageCommitmentPushModelInstance) -> Dataset:
    """Send one N-ACTION; its status."""
    status, _ = assoc.send_n_action(info, action, StorageCommitmentPushModel, instance)
    return status


def _report(received: queue.Queue[tuple[int, Dataset]], transaction: str) -> tuple[int, set[str], dict[str, int]]:
    """The next report: event type, committed instances, failed ones with their reasons."""
    event_type, info = received.get(timeout=REPORT_WAIT)
    assert info.TransactionUID == transaction
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.get("FailedSOPSequence", [])}
    return event_type, committed, failed


def _ask_and_leave(server: PacsServer, uids: list[tuple[str, str, str]]) -> str:
    """Ask for the commitment of *uids* and release at once (refusing a report
    that beats the release, as modalities that take reports only on an
    association of their own do); the transaction UID."""
    assoc = _modality_ae().associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (0x0110, None))])
    transaction = generate_uid()
    status = _ask(assoc, _request(transaction, [(CTImageStorage, sop) for _, _, sop in uids]))
    assoc.release()
    assert status.Status == 0x0000
    return transaction


def _modality_listener(port: int, on_report: Any) -> Any:
    """The modality's own SCU port, taking reports from the PACS proposing
    itself as the Storage Commitment SCP."""
    listener = AE(ae_title=MODALITY)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    return listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])


@pytest.fixture
def stored(pacs_server: PacsServer, tmp_path: Path) -> Iterator[tuple[PacsServer, list[tuple[str, str, str]]]]:
    yield pacs_server, _send_study(pacs_server, tmp_path / "study", 4)


def test_report_on_the_same_association(stored: tuple[PacsServer, list[tuple[str, str, str]]]) -> None:
    """Committed: stored objects. Failed: an unknown instance (0x0112), a wrong
    SOP class (0x0119), and an object lost from the store behind the index
    (0x0112: the index alone does not vouch for a copy)."""
    server, uids = stored
    lost_study, lost_series, lost_sop = uids[3]
    backend = server.backend
    store = open_store(backend.storage_url or f"file://{server.data_dir / 'objects'}",
                       backend.env.get("PACS_S3_ACCESS_KEY"), backend.env.get("PACS_S3_SECRET_KEY"))
    store.delete(object_key(lost_study, lost_series, lost_sop))
    unknown = generate_uid()
    refs = [(CTImageStorage, sop) for _, _, sop in uids[:2]] + [
        (MRImageStorage, uids[2][2]), (CTImageStorage, unknown), (CTImageStorage, lost_sop),
    ]
    received, on_report = _reports()
    # This modality proposes both roles (some do, to be sent the report on
    # the association they opened); the PACS agrees.
    role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    assoc = _modality_ae().associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, ext_neg=[role],
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        transaction = generate_uid()
        assert _ask(assoc, _request(transaction, refs)).Status == 0x0000
        event_type, committed, failed = _report(received, transaction)
        # Delivered on this association (logged once marked sent). Released
        # before that, the modality's N-EVENT-REPORT-RSP, which pynetdicom
        # sends after the handler returns, could be cut off (under load): the
        # report then rightly goes again on a new association.
        _wait_for(lambda: "reported to CT_COMMIT" in server.log_text(), 30, "the report marked sent")
    finally:
        assoc.release()
    assert event_type == 2  # some failed
    assert committed == {uids[0][2], uids[1][2]}
    assert failed == {uids[2][2]: 0x0119, unknown: 0x0112, lost_sop: 0x0112}
    # Nothing was tried on a new one.
    assert "could not be delivered" not in server.log_text() and "new association" not in server.log_text()


def test_report_on_a_new_association_to_the_registered_modality(
    stored: tuple[PacsServer, list[tuple[str, str, str]]],
) -> None:
    """The modality releases right after the N-ACTION-RSP (or refuses the
    report on that association): the report reaches the address registered
    for its AE title on a new association, the PACS in the SCP role."""
    server, uids = stored
    received, on_report = _reports()
    port = free_port()
    scp = _modality_listener(port, on_report)
    try:
        server.cli("ae", "add", MODALITY, "--host", "127.0.0.1", "--port", str(port))
        report = _report(received, _ask_and_leave(server, uids))
    finally:
        scp.shutdown()
    assert report == (1, {sop for _, _, sop in uids}, {})  # all committed
    _wait_for(lambda: "reported to CT_COMMIT" in server.log_text(), 30, "the report marked sent")


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_bad_requests_get_clear_statuses(stored: tuple[PacsServer, list[tuple[str, str, str]]]) -> None:
    server, uids = stored
    transaction = generate_uid()
    good = _request(transaction, [(CTImageStorage, uids[0][2])])
    no_transaction = _request(generate_uid(), [(CTImageStorage, uids[0][2])])
    del no_transaction.TransactionUID
    empty = _request(generate_uid(), [])
    bad_uid = _request(generate_uid(), [(CTImageStorage, "1.2.abc")])
    cases = [
        (no_transaction, 1, StorageCommitmentPushModelInstance, 0x0120),
        (empty, 1, StorageCommitmentPushModelInstance, 0x0120),
        (bad_uid, 1, StorageCommitmentPushModelInstance, 0x0115),
        (good, 2, StorageCommitmentPushModelInstance, 0x0123),  # no such action type
        (good, 1, generate_uid(), 0x0117),  # not the well-known instance
    ]
    received, on_report = _reports()
    assoc = _modality_ae().associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        for info, action, instance, expected in cases:
            status = _ask(assoc, info, action, instance)
            assert status.Status == expected, (action, instance, info)
            assert status.get("ErrorComment")
        # Nothing is reported for a refused request; a good one still works.
        assert _ask(assoc, good).Status == 0x0000
        assert _report(received, transaction) == (1, {uids[0][2]}, {})
        assert received.empty()
    finally:
        assoc.release()
    assert server.alive()



def test_a_short_index_outage_delays_the_report_instead_of_failing_it(tmp_path: Path, pg_url: str) -> None:
    """The index is down when the check runs: the report waits for it and
    commits the stored instances (it reported them all failed, 0110H, and the
    modality kept copies it could have deleted, or worse, sent them again)."""
    import threading

    from sqlalchemy.engine import make_url

    from .conftest import Backend
    from .test_dimse_failures import _TcpProxy

    url = make_url(pg_url)
    proxy = _TcpProxy(url.port or 5432)
    server = PacsServer(tmp_path / "data", Backend("pg", url.set(port=proxy.port).render_as_string(False), None, {}))
    server.start()
    try:
        uids = _send_study(server, tmp_path / "study", 2)
        received, on_report = _reports()
        role = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        assoc = _modality_ae().associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, ext_neg=[role],
                                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        assert assoc.is_established
        try:
            proxy.down()
            threading.Timer(3.0, proxy.up).start()
            transaction = generate_uid()
            assert _ask(assoc, _request(transaction, [(CTImageStorage, sop) for _, _, sop in uids])).Status == 0
            event_type, committed, failed = _report(received, transaction)
        finally:
            assoc.release()
    finally:
        server.stop()
        proxy.down()
    assert (event_type, committed, failed) == (1, {sop for _, _, sop in uids}, {})


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_report_owed_when_the_node_dies_is_sent_after_the_restart(
    stored: tuple[PacsServer, list[tuple[str, str, str]]],
) -> None:
    """The modality closed its association and is switched off when the
    report is due; the PACS is killed while the report waits for its next try.
    After the restart the report still reaches the modality (it was kept in
    memory only, and lost with the process), and the outbox shows it sent."""
    import json
    import signal

    server, uids = stored
    port = free_port()  # the modality's report port: nothing listens yet
    server.cli("ae", "add", MODALITY, "--host", "127.0.0.1", "--port", str(port))
    transaction = _ask_and_leave(server, uids)

    def owed() -> list[dict[str, Any]]:
        listed = json.loads(server.cli("outbox", "list", "--json").stdout)
        return [m for m in listed["messages"] if m["destination"] == "commitment"]

    _wait_for(lambda: [(m["state"], m["attempts"]) for m in owed()] == [("pending", 1)], 60,
              "a first try on a new association")
    server.stop(signal.SIGKILL)

    received, on_report = _reports()
    scp = _modality_listener(port, on_report)
    try:
        server.start()
        report = _report(received, transaction)
    finally:
        scp.shutdown()
    assert report == (1, {sop for _, _, sop in uids}, {})
    _wait_for(lambda: "reported to CT_COMMIT" in server.log_text(), 30, "the report marked sent")
    assert [(m["kind"], m["state"], m["attempts"]) for m in owed()] == [("storage_commitment", "sent", 1)]
