"""Audit trail review fixes for the DICOM services and streamed HTTP answers,
against a real `pacs serve` (SQLite + files) with DCMTK movescu, getscu,
findscu, storescu and storescp, pynetdicom peers (move destinations, a C-GET
SCU, an MPPS SCU) and httpx:

2. a C-MOVE or C-GET is audited with the outcome of its transfer, from its
   final status and sub-operation counts (every store failed: a failure,
   not a successful export; partial, cancelled likewise), and a WADO-RS
   study download broken off midway (by the server, or by the client going
   away) is a failure saying so, one event per request;
3. C-FIND at every level and the Modality Worklist name the patients they
   showed, so `pacs audit --patient` finds those queries;
5. MPPS N-CREATE and N-SET are audited, naming the order, study and patient;
7. refused C-STOREs are audited (who, study and patient when the header was
   read, the status): once per study and status on an association, then
   how many in all;
8. a C-MOVE to an unknown destination names the study it asked for.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from .conftest import Backend, PacsServer, free_port, run_dcmtk
from .dicomfiles import image_dataset
from .peers import wait_until
from .qr_corpus import PATIENTS, series_uid, sop_uid, study_uid, write_corpus
from .test_dimse_review import HeldStoreSCP
from .test_query_retrieve import StoreSCP

MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
S1 = study_uid("S1")  # P1: two CT instances and one MR (JPEG 2000)
S1_COUNT = 3


def cx(key: str) -> str:
    """A patient of the archive as the trail names it (ID^^^issuer)."""
    return f"{PATIENT_IDS.get(key) or PATIENTS[key].pid}^^^CCCD"


class RefusingSCP:
    """A move destination (pynetdicom, in this process) answering every
    C-STORE with *status*, or accepting only *classes*."""

    def __init__(self, title: str, status: int = 0x0000, classes: list[str] | None = None) -> None:
        ae = AE(title)
        if classes is None:
            ae.supported_contexts = AllStoragePresentationContexts
        for sop_class in classes or []:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.status = status
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda _event: self.status)])

    def stop(self) -> None:
        self.server.shutdown()


# A study large enough that its WADO-RS answer cannot all sit in socket buffers
# when the client goes away (4 instances of 8 MB).
BIG_STUDY = "1.2.826.0.1.3680043.8.498.4242.1"
BIG_COUNT, BIG_SIDE = 4, 2048
# A study whose second object goes missing from the store after import.
BROKEN_STUDY = "1.2.826.0.1.3680043.8.498.4243.1"
PATIENT_IDS = {"BIG": "079555000111", "BROKEN": "079555000222"}


def _study(out: Path, study: str, count: int, side: int, patient: tuple[str, str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = image_dataset(sop_uid=f"{study}.1.{i + 1}", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1",
                           PatientID=patient[0], PatientName=patient[1], IssuerOfPatientID="CCCD", SeriesNumber=1,
                           InstanceNumber=i + 1, StudyDate="20241201", StudyTime="101010", AccessionNumber="",
                           Rows=side, Columns=side, BitsStored=12, HighBit=11,
                           PixelData=np.random.default_rng(i).integers(0, 4096, side * side, dtype=np.uint16).tobytes())
        path = out / f"{study}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """The known Q/R corpus, a big study and a study to break, with move
    destinations registered: FAILDEST (refuses every store 0xA700), CTONLY
    (accepts CT only), MOVEDEST (DCMTK storescp), HELDDEST (holds its first
    store)."""
    tmp = tmp_path_factory.mktemp("audit-dimse")
    srv = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    write_corpus(tmp / "corpus")
    _study(tmp / "corpus", BIG_STUDY, BIG_COUNT, BIG_SIDE, (PATIENT_IDS["BIG"], "Big^Study"))
    _study(tmp / "corpus", BROKEN_STUDY, 3, 64, (PATIENT_IDS["BROKEN"], "Broken^Study"))
    srv.cli("import", str(tmp / "corpus"))
    fail = RefusingSCP("FAILDEST", 0xA700)
    ct_only = RefusingSCP("CTONLY", classes=[CTImageStorage])
    store = StoreSCP(tmp / "movedest", accept_all=True)
    held = HeldStoreSCP()
    for title, port in (("FAILDEST", fail.port), ("CTONLY", ct_only.port), ("MOVEDEST", store.port),
                        ("HELDDEST", held.port)):
        srv.cli("ae", "add", title, "--host", "127.0.0.1", "--port", str(port))
    srv.start()
    srv.held = held  # type: ignore[attr-defined]
    yield srv
    srv.stop()
    for peer in (fail, ct_only, store, held):
        peer.stop()


def _events(server: PacsServer, found: Callable[[list[dict[str, Any]]], bool], **filters: str) -> list[dict[str, Any]]:
    """The trail's events matching *filters* once *found* holds of them (written in batches)."""
    from pacs import audit
    from pacs.index import create_index_engine

    engine = create_index_engine(f"sqlite:///{server.data_dir}/index.sqlite", pool_size=0)
    try:
        events: list[dict[str, Any]] = []

        def ready() -> bool:
            events[:] = audit.query(engine, **filters)
            return bool(found(events))

        wait_until(ready, timeout=20, interval=0.2)
        return events
    finally:
        engine.dispose()


def _settled(server: PacsServer, user: str, count: int) -> list[dict[str, Any]]:
    """The events of *user* once there are *count* of them, and still *count* a moment later."""
    _events(server, lambda evs: len(evs) >= count, user=user)
    time.sleep(0.6)  # more than the writer's batch delay: a second event would be in by now
    return _events(server, lambda evs: True, user=user)


def _movescu(server: PacsServer, calling: str, destination: str, study: str) -> str:
    done = run_dcmtk("movescu", "-S", "-v", "-aet", calling, "-aem", destination, "-aec", server.ae_title,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                     "127.0.0.1", str(server.dicom_port))
    return done.stderr


# -- 2. C-MOVE / C-GET: the outcome of the transfer -------------------------------------------------
def test_move_whose_every_store_fails_is_a_failed_export(server: PacsServer) -> None:
    """Was: `export success` written when the destination association
    opened, although every sub-operation failed (final 0xA702)."""
    said = _movescu(server, "AUDMOVEFAIL", "FAILDEST", S1)
    assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in said, said
    [event] = _settled(server, "AUDMOVEFAIL", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("export", "failure", S1)
    assert event["patient_id"] == cx("P1")
    assert event["detail"].startswith(f"C-MOVE to FAILDEST: failed: 0 of {S1_COUNT} instance(s) sent, "
                                      f"{S1_COUNT} failed (0xA702)"), event
    assert "0xA700" in event["detail"], event  # the destination's answer


def test_move_partly_refused_is_a_partial_failure(server: PacsServer) -> None:
    """CTONLY takes the two CT objects and no MR: 0xB000, a failure naming the counts."""
    said = _movescu(server, "AUDMOVEPART", "CTONLY", S1)
    assert "Final Move Response (Warning" in said, said
    [event] = _settled(server, "AUDMOVEPART", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("export", "failure", S1)
    assert event["detail"].startswith("C-MOVE to CTONLY: partial: 2 of 3 instance(s) sent, 1 failed (0xB000)"), event
    assert "no context accepted for MR Image Storage" in event["detail"], event


def test_move_complete_is_a_success_with_its_count(server: PacsServer) -> None:
    said = _movescu(server, "AUDMOVEOK", "MOVEDEST", S1)
    assert "Final Move Response (Success)" in said, said
    [event] = _settled(server, "AUDMOVEOK", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("export", "success", S1)
    assert event["detail"] == f"C-MOVE to MOVEDEST: {S1_COUNT} of {S1_COUNT} instance(s) sent", event


def test_cancelled_move_is_not_a_success(server: PacsServer) -> None:
    """A C-CANCEL during the first store: 0xFE00, one sent, two not (was: `export success`)."""
    held: HeldStoreSCP = server.held  # type: ignore[attr-defined]
    ae = AE("AUDMOVECANCEL")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", S1
    statuses: list[int] = []

    def move() -> None:
        statuses.extend(int(s.Status) for s, _ in assoc.send_c_move(identifier, "HELDDEST", MOVE) if s)

    mover = threading.Thread(target=move)
    mover.start()
    try:
        assert held.started.wait(30), "the first sub-operation never reached HELDDEST"
        assoc.send_c_cancel(1, query_model=MOVE)
        time.sleep(0.3)  # the cancel is read before the held store is answered
    finally:
        held.release()
        mover.join(60)
        assoc.release()
    assert statuses[-1] == 0xFE00, [hex(s) for s in statuses]
    [event] = _settled(server, "AUDMOVECANCEL", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("export", "failure", S1)
    # One sent (held until after the cancel), unless the machine was slow to read the cancel.
    sent = re.fullmatch(r"C-MOVE to HELDDEST: cancelled by the requester: (\d) of 3 instance\(s\) sent, "
                        r"(\d) not sent \(0xFE00\)", event["detail"])
    assert sent and int(sent[1]) >= 1 and int(sent[1]) + int(sent[2]) == 3, event


def test_get_audited_with_its_outcome(server: PacsServer, tmp_path: Path) -> None:
    """DCMTK getscu receives the study: a success with its count. A C-GET SCU
    refusing every store: a failure (was: `retrieve success` before any store)."""
    done = run_dcmtk("getscu", "-v", "-S", "-aet", "AUDGETOK", "-od", str(tmp_path), "-aec", server.ae_title,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={S1}",
                     "127.0.0.1", str(server.dicom_port))
    assert done.returncode == 0 and len(list(tmp_path.iterdir())) == S1_COUNT, done.stderr
    [event] = _settled(server, "AUDGETOK", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("retrieve", "success", S1)
    assert event["detail"] == f"C-GET: {S1_COUNT} of {S1_COUNT} instance(s) sent", event

    ae = AE("AUDGETFAIL")
    ae.add_requested_context(GET)
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0xA700)])
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", S1
    try:
        statuses = [int(s.Status) for s, _ in assoc.send_c_get(identifier, GET) if s]
    finally:
        assoc.release()
    assert statuses[-1] == 0xA702, [hex(s) for s in statuses]
    [event] = _settled(server, "AUDGETFAIL", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("retrieve", "failure", S1)
    assert event["detail"].startswith(f"C-GET: failed: 0 of {S1_COUNT} instance(s) sent, {S1_COUNT} failed (0xA702)")


# -- 8. C-MOVE to an unknown destination ------------------------------------------------------------
def test_move_to_an_unknown_destination_names_the_study(server: PacsServer) -> None:
    """Was: `export denied` with no study: who tried, not what they tried to send out."""
    said = _movescu(server, "AUDNOBODY", "NOBODY", study_uid("S2"))
    assert "MoveDestinationUnknown" in said, said
    [event] = _settled(server, "AUDNOBODY", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("export", "denied", study_uid("S2"))
    assert event["patient_id"] == cx("P1")
    assert event["detail"] == "C-MOVE to unknown destination NOBODY"


# -- 2. WADO-RS: a study download broken off midway --------------------------------------------------
def _object_path(server: PacsServer, sop: str) -> Path:
    [path] = [p for p in (server.data_dir / "objects").rglob(f"{sop}.dcm")]
    return path


def test_study_stream_broken_by_the_server_is_a_failure(server: PacsServer, tmp_path: Path) -> None:
    """The second object is gone from the store: the client gets 200 and a
    body that breaks off; the event (was: success) says the server failed."""
    token = server.make_token("aud.broken", "radiologist")
    missing = _object_path(server, f"{BROKEN_STUDY}.1.2")
    missing.rename(tmp_path / "moved.dcm")
    try:
        with server.http(token=token) as http, pytest.raises(httpx.HTTPError):
            with http.stream("GET", f"/dicom-web/studies/{BROKEN_STUDY}") as answer:
                assert answer.status_code == 200
                for _ in answer.iter_raw():
                    pass
    finally:
        (tmp_path / "moved.dcm").rename(missing)
    [event] = _settled(server, "aud.broken", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("retrieve", "failure", BROKEN_STUDY)
    assert event["patient_id"] == cx("BROKEN")
    assert f"/dicom-web/studies/{BROKEN_STUDY} -> 200, broken off after " in event["detail"], event
    assert "server error" in event["detail"], event


def test_study_stream_left_by_the_client_is_a_failure(server: PacsServer) -> None:
    """The client reads the first megabyte of 32 and goes away: the event
    (was: success) says the client went away; a whole download is a success."""
    token = server.make_token("aud.leaver", "radiologist")
    with server.http(token=token) as http:
        with http.stream("GET", f"/dicom-web/studies/{BIG_STUDY}") as answer:
            assert answer.status_code == 200
            read = 0
            for chunk in answer.iter_raw():
                read += len(chunk)
                if read > 1 << 20:
                    break
    [event] = _settled(server, "aud.leaver", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("retrieve", "failure", BIG_STUDY)
    assert event["detail"].startswith(f"/dicom-web/studies/{BIG_STUDY} -> 200, broken off after "), event
    assert event["detail"].endswith("bytes: the client went away"), event
    sent = int(event["detail"].split("broken off after ")[1].split(" ")[0])
    assert sent < BIG_COUNT * BIG_SIDE * BIG_SIDE * 2

    whole = server.make_token("aud.whole", "radiologist")
    with server.http(token=whole) as http:
        body = http.get(f"/dicom-web/studies/{BIG_STUDY}")
        assert body.status_code == 200 and len(body.content) > BIG_COUNT * BIG_SIDE * BIG_SIDE * 2
        assert http.head(f"/dicom-web/studies/{BIG_STUDY}").status_code == 200
    events = _settled(server, "aud.whole", 2)
    assert sorted((e["outcome"], e["detail"]) for e in events) == [
        ("success", f"/dicom-web/studies/{BIG_STUDY}"), ("success", f"HEAD /dicom-web/studies/{BIG_STUDY}")]


# -- 3. C-FIND and the worklist name the patients shown ----------------------------------------------
@pytest.mark.parametrize(
    ("level", "keys", "shown"),
    [
        ("PATIENT", {"PatientID": "", "PatientName": ""}, ["P1", "P2", "P3", "P4", "P5", "BIG", "BROKEN"]),
        ("STUDY", {"PatientID": PATIENTS["P1"].pid, "StudyInstanceUID": ""}, ["P1"]),
        ("SERIES", {"StudyInstanceUID": study_uid("S3"), "SeriesInstanceUID": ""}, ["P2"]),
        ("IMAGE", {"StudyInstanceUID": study_uid("S6"), "SeriesInstanceUID": series_uid("S6", 0),
                   "SOPInstanceUID": ""}, ["P5"]),
    ],
)
def test_cfind_names_the_patients_it_showed(server: PacsServer, level: str, keys: dict[str, str],
                                            shown: list[str]) -> None:
    """Was: one event before matching with the keys only (`patient_id=''`)."""
    calling = f"AUDFIND{level[:3]}"
    args = ["-P", "-aet", calling, "-aec", server.ae_title, "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    done = run_dcmtk("findscu", *args, "127.0.0.1", str(server.dicom_port))
    assert done.returncode == 0, done.stderr
    [event] = _settled(server, calling, 1)
    assert (event["action"], event["outcome"]) == ("query", "success")
    assert sorted(event["patient_id"].split("\\")) == sorted(cx(p) for p in shown)
    assert "match(es)" in event["detail"] and event["detail"].startswith(f"C-FIND {level} ")
    # `pacs audit --patient` finds the query by each patient shown.
    found = json.loads(server.cli("audit", "--patient", cx(shown[0]).split("^")[0], "--user", calling).stdout)
    assert [e["action"] for e in found] == ["query"]


def test_refused_cfind_is_audited(server: PacsServer) -> None:
    """An identifier refused 0xA900 (a key of a lower level) was not audited at all."""
    done = run_dcmtk("findscu", "-v", "-S", "-aet", "AUDFINDBAD", "-aec", server.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", "SOPInstanceUID=1.2.3", "127.0.0.1", str(server.dicom_port))
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in done.stderr, done.stderr
    [event] = _settled(server, "AUDFINDBAD", 1)
    assert (event["action"], event["outcome"]) == ("query", "failure")
    assert event["detail"].startswith("C-FIND refused 0xA900: "), event


ORDER_PATIENT = {"id": "079555000777", "name": "Vo^Thi Mai", "issuer": "CCCD"}


def _order(server: PacsServer, accession: str, patient: dict[str, str]) -> dict[str, Any]:
    his = server.make_token(f"his.{accession.lower()}", "his")
    with server.http(token=his) as http:
        made = http.post("/api/orders", json={"patient": patient, "accession_number": accession, "modality": "CT",
                                              "station_ae_title": f"ST{accession[-1]}"})
        assert made.status_code in (200, 201), made.text
        order: dict[str, Any] = made.json()
        return order


def test_worklist_query_names_the_patients_it_showed(server: PacsServer, tmp_path: Path) -> None:
    """Was: `worklist-query patient_id=''`; `pacs audit --patient` printed []."""
    _order(server, "AUDWL1", ORDER_PATIENT)
    out = tmp_path / "wl"
    out.mkdir()
    done = run_dcmtk("findscu", "-W", "-aet", "AUDMWL", "-aec", server.ae_title, "-X", "-od", str(out),
                     "-k", "PatientID", "-k", "AccessionNumber=AUDWL1",
                     "-k", "ScheduledProcedureStepSequence[0].Modality=CT", "127.0.0.1", str(server.dicom_port))
    assert done.returncode == 0, done.stderr
    assert [str(dcmread(p).PatientID) for p in out.glob("rsp*.dcm")] == ["079555000777"]
    [event] = _settled(server, "AUDMWL", 1)
    assert (event["action"], event["outcome"], event["patient_id"]) == ("worklist-query", "success",
                                                                          "079555000777^^^CCCD")
    assert event["detail"].startswith("MWL C-FIND: 1 scheduled step(s); ")
    found = json.loads(server.cli("audit", "--patient", "079555000777", "--user", "AUDMWL").stdout)
    assert [e["action"] for e in found] == ["worklist-query"]


# -- 5. MPPS ---------------------------------------------------------------------------------------------
def test_mpps_create_and_set_are_audited(server: PacsServer) -> None:
    """Was: nothing recorded, although the order went IN PROGRESS and COMPLETED."""
    patient = {"id": "079555000888", "name": "Le^Van Mpps", "issuer": "CCCD"}
    order = _order(server, "AUDMPPS2", patient)
    ae = AE("AUDMPPS")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    uid = generate_uid()
    try:
        ds = Dataset()
        ds.PerformedProcedureStepStatus, ds.Modality, ds.PerformedStationAETitle = "IN PROGRESS", "CT", "AUDMPPS"
        ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20241201", "101010"
        ds.PatientName, ds.PatientID, ds.PerformedProcedureStepID = "Le^Van Mpps", "079555000888", "1"
        ref = Dataset()
        ref.AccessionNumber, ref.StudyInstanceUID = "AUDMPPS2", order["study_uid"]
        ref.RequestedProcedureID = ref.ScheduledProcedureStepID = ""
        ds.ScheduledStepAttributesSequence = [ref]
        status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate, done.PerformedProcedureStepEndTime = "20241201", "102000"
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        again, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)  # a final step: refused
        assert again.Status == 0x0110
    finally:
        assoc.release()
    events = sorted(_settled(server, "AUDMPPS", 3), key=lambda e: e["pk"])
    assert [(e["action"], e["outcome"], e["study_uid"], e["patient_id"]) for e in events] == [
        ("mpps", outcome, order["study_uid"], "079555000888^^^CCCD") for outcome in ("success", "success", "failure")]
    step = f"accession AUDMPPS2 step {order['step_id']}"
    assert events[0]["detail"] == f"MPPS N-CREATE {uid}: IN PROGRESS; {step}"
    assert events[1]["detail"] == f"MPPS N-SET {uid}: COMPLETED; {step}"
    assert events[2]["detail"].startswith(f"MPPS N-SET {uid}: COMPLETED refused 0x0110: ")
    assert [e["action"] for e in json.loads(server.cli("audit", "--patient", "079555000888",
                                                       "--user", "AUDMPPS").stdout)] == ["mpps"] * 3


# -- 7. refused C-STOREs ----------------------------------------------------------------------------------
def test_refused_stores_are_audited_once_per_study_and_status(server: PacsServer, tmp_path: Path) -> None:
    """Copies of P1's three uncompressed kept instances under a new Study UID:
    each refused 0x0111 (the UID is kept in another study), sent on one
    association. Was: no event at all. Now: the first refusal at once, then
    the count."""
    conflict_study = "1.2.826.0.1.3680043.8.498.4244.1"
    files = []
    for i, (study, series, instance) in enumerate([("S1", 0, 0), ("S1", 0, 1), ("S2", 0, 0)]):
        source = next((server.data_dir / "objects").rglob(f"{sop_uid(study, series, instance)}.dcm"))
        ds = dcmread(source)
        ds.StudyInstanceUID = conflict_study
        ds.SeriesInstanceUID = f"{conflict_study}.{i}"
        ds.save_as(tmp_path / f"conflict{i}.dcm")
        files.append(str(tmp_path / f"conflict{i}.dcm"))
    done = server.storescu("-v", "-nh", *files, calling="AUDSTORE")  # -nh: on after a refusal
    assert done.stderr.count("Received Store Response (Unknown Status: 0x111)") == 3, done.stderr
    events = sorted(_settled(server, "AUDSTORE", 2), key=lambda e: e["pk"])
    assert [(e["action"], e["outcome"], e["study_uid"], e["patient_id"]) for e in events] == [
        ("store", "failure", conflict_study, cx("P1"))] * 2
    assert events[0]["detail"].startswith("C-STORE refused 0x0111: SOP Instance UID already stored in study ")
    assert events[0]["detail"].endswith(f"(SOP Instance {sop_uid('S1', 0, 0)})")
    assert events[1]["detail"].startswith("C-STORE refused 0x0111 for 3 instances on this association in all")


def test_store_refused_as_invalid_is_audited(server: PacsServer, tmp_path: Path) -> None:
    """An object without Study Instance UID is refused 0xA900: audited with the
    calling AE and the reason (no study to name: its header was not read)."""
    ds = dcmread(next((server.data_dir / "objects").rglob(f"{sop_uid('S3', 0, 0)}.dcm")))
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "nostudy.dcm")
    done = server.storescu("-v", str(tmp_path / "nostudy.dcm"), calling="AUDSTOREBAD")
    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in done.stderr, done.stderr
    [event] = _settled(server, "AUDSTOREBAD", 1)
    assert (event["action"], event["outcome"], event["study_uid"]) == ("store", "failure", "")
    assert event["detail"].startswith("C-STORE refused 0xA900: missing StudyInstanceUID"), event
    assert str(ds.SOPInstanceUID) in event["detail"]

