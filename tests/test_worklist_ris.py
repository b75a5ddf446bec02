"""Issue 5: HIS orders over HL7 v2/MLLP (python-hl7 as the client) become the
Modality Worklist (DCMTK findscu -W), MPPS moves them along and reports back
to the HIS, studies are reconciled with their orders, patients merge."""

from __future__ import annotations

import copy
import json
import time
from typing import Any
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, StudyRootQueryRetrieveInformationModelFind

from .conftest import Backend, PacsServer, free_port, run_dcmtk
from .dicomfiles import make_ct
from .peers import MLLPRecorder, create_database, drop_database, wait_until


@pytest.fixture(params=["sqlite", "pg"])
def ris(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PacsServer]:
    pg = create_database() if request.param == "pg" else None
    server = PacsServer(tmp_path / "data", Backend(request.param, pg, None, {}))
    server.his_port = free_port()  # type: ignore[attr-defined]
    server.extra_env["PACS_HIS_MLLP"] = f"127.0.0.1:{server.his_port}"  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()
    if pg:
        drop_database(pg)


def send(server: PacsServer, message: str) -> str:
    """Send one HL7 message over MLLP with python-hl7's client; return the ACK."""
    with MLLPClient("127.0.0.1", server.hl7_port, encoding="utf-8") as client:
        reply = client.send_message(message.replace("\n", "\r"))
    return (reply.decode("utf-8") if isinstance(reply, bytes) else reply).strip("\x0b\x1c\r")


def msa(ack: str) -> tuple[str, str]:
    line = [s for s in ack.replace("\n", "\r").split("\r") if s.startswith("MSA")][0].split("|")
    return line[1], line[2]


def orm(control: str, accession: str, *, order_control: str = "NW", name: str = "Nguyễn^Văn An",
        pid: str = "001085012345", study_uid: str = "", modality: str = "CT", extra: str = "") -> str:
    zds = f"\nZDS|{study_uid}^100^Application^DICOM" if study_uid else ""
    return (
        f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ORM^O01|{control}|P|2.5|||||VN|UNICODE UTF-8\n"
        f"PID|1||{pid}^^^CCCD^NI~DN4797912345678^^^BHYT^HC||{name}||19850101|M\n"
        f"PV1|1|O||||||BS001^Đỗ^Thanh Tùng\n"
        f"ORC|{order_control}|P{accession}|F{accession}||SC\n"
        f"OBR|1|P{accession}|F{accession}|CT-NGUC^CT ngực không cản quang^L|||20241121090000|||||||||||"
        f"{accession}|RP{accession}|SPS{accession}||||{modality}|||^^^20241121090000^^R{zds}{extra}"
    )


def worklist(server: PacsServer, tmp_path: Path, *keys: str, aet: str = "CT_ROOM1") -> list[Dataset]:
    out = tmp_path / f"wl-{time.monotonic_ns()}"
    out.mkdir()
    args = ["-W", "-aet", aet, "-aec", server.ae_title, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk("findscu", *args, "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


WL_KEYS = [
    "ScheduledProcedureStepSequence[0].Modality=CT",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT_ROOM1",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
    "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyInstanceUID",
    "RequestedProcedureID", "RequestedProcedureDescription", "ReferringPhysicianName",
]


def test_order_reaches_the_worklist_and_cancel_removes_it(ris: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    code, control = msa(send(ris, orm("M1", "ACC1001", study_uid=study_uid)))
    assert (code, control) == ("AA", "M1")
    items = worklist(ris, tmp_path, *WL_KEYS)
    assert len(items) == 1
    from .test_network_access import _events

    queries = [e for e in _events(ris, lambda evs: any(e["action"] == "worklist-query" for e in evs))
               if e["action"] == "worklist-query"]
    assert [(e["user"], e["detail"].split(";")[0]) for e in queries] == [("CT_ROOM1", "MWL C-FIND: 1 scheduled step(s)")]
    item = items[0]
    assert item.SpecificCharacterSet == "ISO_IR 192"
    assert str(item.PatientName) == "Nguyễn^Văn An"
    assert item.PatientID == "001085012345"
    assert item.PatientBirthDate == "19850101" and item.PatientSex == "M"
    assert item.AccessionNumber == "ACC1001"
    assert item.StudyInstanceUID == study_uid
    assert item.RequestedProcedureID == "RPACC1001"
    assert item.RequestedProcedureDescription == "CT ngực không cản quang"
    assert str(item.ReferringPhysicianName) == "Đỗ^Thanh Tùng"
    step = item.ScheduledProcedureStepSequence[0]
    assert step.Modality == "CT"
    assert step.ScheduledProcedureStepStartDate == "20241121"
    assert step.ScheduledProcedureStepStartTime == "090000"
    assert step.ScheduledProcedureStepID == "SPSACC1001"
    # Filtering: another modality or day sees nothing.
    assert worklist(ris, tmp_path, "ScheduledProcedureStepSequence[0].Modality=MR", "PatientName") == []
    assert worklist(ris, tmp_path, "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20241122",
                    "PatientName") == []
    # Cancel: the item leaves the worklist.
    assert msa(send(ris, orm("M2", "ACC1001", order_control="CA")))[0] == "AA"
    assert worklist(ris, tmp_path, *WL_KEYS) == []


def test_vietnamese_names_match_without_diacritics(ris: PacsServer, tmp_path: Path) -> None:
    assert msa(send(ris, orm("V1", "ACC2001", name="Trần^Thị Bích Ngọc", pid="079190000111")))[0] == "AA"
    assert msa(send(ris, orm("V2", "ACC2002", name="Nguyễn^Văn An")))[0] == "AA"
    found = worklist(ris, tmp_path, "PatientName=NGUYEN*", "AccessionNumber")
    assert [i.AccessionNumber for i in found] == ["ACC2002"]
    assert str(worklist(ris, tmp_path, "PatientName=tran thi*", "PatientName")[0].PatientName) == "Trần^Thị Bích Ngọc"
    by_id = worklist(ris, tmp_path, "PatientID=DN4797912345678", "AccessionNumber")  # insurance number
    assert sorted(i.AccessionNumber for i in by_id) == ["ACC2001", "ACC2002"]


def test_malformed_messages_get_ae_or_ar_and_leave_no_partial_state(ris: PacsServer, tmp_path: Path) -> None:
    assert msa(send(ris, "this is not hl7"))[0] == "AR"
    no_pid = orm("B1", "ACC3001").replace("PID|", "XXX|")
    code, control = msa(send(ris, no_pid))
    assert (code, control) == ("AE", "B1")
    # Two orders; the second has no accession anywhere: neither is stored.
    two = orm("B2", "ACC3002") + "\nORC|NW|||\nOBR|2||||||||||||||||||||||CT"
    ack = send(ris, two)
    assert msa(ack)[0] == "AE"
    assert "ERR|" in ack and "HL70357" in ack
    assert worklist(ris, tmp_path, "AccessionNumber", "PatientName") == []
    unsupported = orm("B3", "ACC3003").replace("ORM^O01", "ORU^R01")
    assert msa(send(ris, unsupported))[0] == "AR"
    duplicate = orm("B4", "ACC3004")
    assert msa(send(ris, duplicate))[0] == "AA"
    assert msa(send(ris, duplicate.replace("|B4|", "|B5|")))[0] == "AE"  # same accession again
    assert len(worklist(ris, tmp_path, "AccessionNumber")) == 1
    assert ris.alive()


def _mpps_status(server: PacsServer, uid: str, attributes: Dataset, *, create: bool) -> Dataset:
    ae = AE(ae_title="CT_ROOM1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    if create:
        status, _ = assoc.send_n_create(attributes, ModalityPerformedProcedureStep, uid)
    else:
        status, _ = assoc.send_n_set(attributes, ModalityPerformedProcedureStep, uid)
    assoc.release()
    return status


def _mpps(server: PacsServer, uid: str, attributes: Dataset, *, create: bool) -> int:
    return int(_mpps_status(server, uid, attributes, create=create).Status)


def test_mpps_moves_the_order_and_reports_to_the_his_even_when_it_was_down(ris: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    assert msa(send(ris, orm("P1", "ACC4001", study_uid=study_uid)))[0] == "AA"
    mpps_uid = generate_uid()
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedStationAETitle = "CT_ROOM1"
    create.PerformedProcedureStepStartDate = "20241121"
    create.PerformedProcedureStepStartTime = "091500"
    create.PerformedProcedureStepID = "PPS4001"
    scheduled = Dataset()
    scheduled.AccessionNumber = "ACC4001"
    scheduled.StudyInstanceUID = study_uid
    scheduled.ScheduledProcedureStepID = "SPSACC4001"
    create.ScheduledStepAttributesSequence = Sequence([scheduled])
    # Type 1 attributes missing or empty, N-SETs of what may not change, a
    # completion without its end: refused with the attributes named (PS3.4 F.7.2).
    lacking = copy.deepcopy(create)
    del lacking.PerformedProcedureStepID
    refused = _mpps_status(ris, generate_uid(), lacking, create=True)
    assert int(refused.Status) == 0x0120 and "PerformedProcedureStepID" in refused.ErrorComment
    lacking.PerformedProcedureStepID = ""
    assert _mpps(ris, generate_uid(), lacking, create=True) == 0x0121
    lacking.PerformedProcedureStepID = "PPS4001"
    unnamed = Dataset()
    unnamed.AccessionNumber = "ACC4001"
    unnamed.StudyInstanceUID = ""  # Type 1 in the scheduled step item too
    lacking.ScheduledStepAttributesSequence = Sequence([unnamed])
    assert _mpps(ris, generate_uid(), lacking, create=True) == 0x0121
    assert _mpps(ris, mpps_uid, create, create=True) == 0x0000
    with ris.http() as http:
        assert http.get("/api/orders/ACC4001").json()["status"] == "IN PROGRESS"
    moved = Dataset()
    moved.Modality = "MR"
    assert _mpps(ris, mpps_uid, moved, create=False) == 0x0106
    unfinished = Dataset()
    unfinished.PerformedProcedureStepStatus = "COMPLETED"
    assert _mpps(ris, mpps_uid, unfinished, create=False) == 0x0110
    unfinished.PerformedProcedureStepEndDate = "20241121"  # a date without its time is not an end either
    assert _mpps(ris, mpps_uid, unfinished, create=False) == 0x0110
    # The HIS is down: nothing may be lost. Complete the step meanwhile.
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = "20241121"
    done.PerformedProcedureStepEndTime = "093000"
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.ReferencedImageSequence = Sequence([])
    done.PerformedSeriesSequence = Sequence([series])
    assert _mpps(ris, mpps_uid, done, create=False) == 0x0000
    with ris.http() as http:
        assert http.get("/api/orders/ACC4001").json()["status"] == "COMPLETED"

    def found_down() -> bool:  # both messages queued, the first tried and refused: the HIS was down
        queued = json.loads(ris.cli("outbox", "list", "--json").stdout)["messages"]
        mine = {m["status"]: m for m in queued if m["accession"] == "ACC4001"}
        return {"IN PROGRESS", "COMPLETED"} <= mine.keys() and mine["IN PROGRESS"]["attempts"] >= 1
    assert wait_until(found_down, timeout=30, interval=0.2), ris.cli("outbox", "list").stdout  # not a fixed 2 s
    his = MLLPRecorder(ris.his_port)  # type: ignore[attr-defined]
    try:
        messages = his.wait_for(2, timeout=60)
    finally:
        his.stop()
    assert len(messages) >= 2, "status messages were not delivered after the HIS came back"
    texts = [m.decode("utf-8") for m in messages]
    assert any("ORC|SC|PACC4001|FACC4001||IP" in t for t in texts)
    assert any("ORC|SC|PACC4001|FACC4001||CM" in t for t in texts)
    assert all("Nguyễn^Văn An" in t for t in texts)
    # A second N-SET on a completed step is refused: a processing failure
    # whose Error ID says why (PS3.4 F.7.2.2.4).
    refused = _mpps_status(ris, mpps_uid, done, create=False)
    assert (int(refused.Status), int(refused.ErrorID)) == (0x0110, 0xA710)
    assert _mpps(ris, generate_uid(), done, create=False) == 0x0112


def _cfind_names(server: PacsServer, **keys: str) -> list[tuple[str, str, str]]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    out = [
        (str(m.PatientName), str(m.PatientID), str(m.StudyInstanceUID))
        for s, m in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
        if s is not None and s.Status == 0xFF00
    ]
    assert assoc.is_established
    assoc.release()
    return out


def test_mistyped_study_is_reconciled_with_its_order(ris: PacsServer, tmp_path: Path) -> None:
    assert msa(send(ris, orm("R1", "ACC5001")))[0] == "AA"
    typo = make_ct(tmp_path / "typo.dcm", PatientName="NGUYEN^VAN ANN", PatientID="TYPO123", AccessionNumber="ACC5001",
                   SpecificCharacterSet="ISO_IR 100")
    assert ris.storescu(str(typo)).returncode == 0
    study = str(dcmread(typo, stop_before_pixels=True).StudyInstanceUID)
    assert _cfind_names(ris, StudyInstanceUID=study) == [("Nguyễn^Văn An", "001085012345", study)]
    assert _cfind_names(ris, PatientID="TYPO123") == []  # the typed patient was never filed
    with ris.http() as http:
        qido = http.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
        assert qido[0]["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn An"
        corrections = {c["keyword"]: c for c in http.get(f"/api/studies/{study}/corrections").json()}
        assert corrections["PatientName"]["received"] == "NGUYEN^VAN ANN"
        assert corrections["PatientID"]["corrected"] == "001085012345"
        # Retrieval applies the correction; the stored bytes stay as received.
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(f"http://127.0.0.1:{ris.http_port}/dicom-web", headers=ris.auth_headers)
        retrieved = client.retrieve_study(study)[0]
        assert str(retrieved.PatientName) == "Nguyễn^Văn An" and retrieved.PatientID == "001085012345"
    core = ris.core()
    try:
        stored = core.reader.stored_instance(str(dcmread(typo, stop_before_pixels=True).SOPInstanceUID))
        assert stored is not None
        assert b"NGUYEN^VAN ANN" in core.store.read_bytes(stored.storage_key)
    finally:
        core.close()


def test_unmatched_studies_and_manual_match(ris: PacsServer, tmp_path: Path) -> None:
    stray = make_ct(tmp_path / "stray.dcm", PatientName="LE^VAN X", PatientID="STRAY1", AccessionNumber="NOORDER")
    assert ris.storescu(str(stray)).returncode == 0
    study = str(dcmread(stray, stop_before_pixels=True).StudyInstanceUID)
    unmatched = json.loads(ris.cli("orders", "unmatched", "--json").stdout)
    assert [u["study_uid"] for u in unmatched] == [study]
    with ris.http() as http:
        created = http.post("/api/orders", json={
            "patient": {"id": "038095000333", "issuer": "CCCD", "name": "Lê^Đức Thắng", "birth_date": "19950303", "sex": "M"},
            "accession_number": "ACC6001", "modality": "CT", "start_date": "20241121", "start_time": "100000",
        })
        assert created.status_code == 201, created.text
        assert http.post("/api/orders", json={"accession_number": "X"}).status_code == 400
    ris.cli("orders", "match", study, "ACC6001")
    assert json.loads(ris.cli("orders", "unmatched", "--json").stdout) == []
    assert _cfind_names(ris, StudyInstanceUID=study) == [("Lê^Đức Thắng", "038095000333", study)]
    with ris.http() as http:
        assert http.delete("/api/orders/ACC6001").json()["status"] == "CANCELLED"
        assert http.delete("/api/orders/NOPE").status_code == 404


def test_adt_a40_merges_patients(ris: PacsServer, tmp_path: Path) -> None:
    first = make_ct(tmp_path / "a.dcm", PatientName="Phạm^Thị Hương", PatientID="OLD-77", SpecificCharacterSet="ISO_IR 192")
    second = make_ct(tmp_path / "b.dcm", PatientName="Phạm^Thị Hương", PatientID="079195000444",
                     SpecificCharacterSet="ISO_IR 192")
    for f in (first, second):
        assert ris.storescu(str(f)).returncode == 0
    a40 = (
        "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120090000||ADT^A40|A40-1|P|2.5|||||VN|UNICODE UTF-8\n"
        "EVN|A40|20241120090000\n"
        "PID|1||079195000444^^^CCCD^NI||Phạm^Thị Hương||19950505|F\n"
        "MRG|OLD-77^^^^MR"
    )
    assert msa(send(ris, a40))[0] == "AA"
    studies = {s for _, _, s in _cfind_names(ris, PatientID="079195000444")}
    assert studies == {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in (first, second)}
    # The merged-away ID is an alias of the surviving patient: a query by it finds that patient.
    assert {p for _, p, _ in _cfind_names(ris, PatientID="OLD-77")} == {"079195000444"}
    unknown = a40.replace("OLD-77", "NOBODY").replace("A40-1", "A40-2")
    assert msa(send(ris, unknown))[0] == "AE"
    a08 = a40.replace("ADT^A40", "ADT^A08").replace("A40-1", "A08-1").replace("Phạm^Thị Hương", "Phạm^Thị Thu Hương")
    assert msa(send(ris, a08))[0] == "AA"
    names = {n for n, _, _ in _cfind_names(ris, PatientID="079195000444")}
    assert names == {"Phạm^Thị Thu Hương"}
    # What the HIS did to which patients is in the audit trail (IHE ATNA Patient Record).
    from .test_network_access import _events

    def changes(events: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(e["action"], e["patient_id"], e["outcome"]) for e in events
                if e["protocol"] == "hl7" and e["action"].startswith("patient")}

    assert changes(_events(ris, lambda evs: len(changes(evs)) >= 5)) == {
        ("patient-merge", "079195000444", "success"), ("patient-merge", "OLD-77", "success"),
        ("patient-merge", "079195000444", "failure"), ("patient-merge", "NOBODY", "failure"),
        ("patient-update", "079195000444", "success"),
    }
