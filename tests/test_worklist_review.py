"""The worklist as a Vietnamese hospital's modalities and HIS use it (review
of 2026-12-06): HIS room names longer than SH's 16 characters are cut, not
the order refused; a procedure code without text still names the exam (Code
Meaning, Type 1); an order without modality or patient name is refused, not
served with empty Type 1 keys; the protocol code (OMI IPC-6) and the order
numbers reach the worklist; two N-CREATEs of one MPPS at once get 0111H on
PostgreSQL too; a NUL in a query key is refused A900 (worklist and Q/R);
modalities without MPPS complete their step by their images, and steps
never done expire from the worklist.

Everything over real sockets to one `pacs serve` per backend (SQLite, and
PostgreSQL where the findings were database-specific: every test runs on
both): HL7 over MLLP with a stand-in HIS recording what the archive sends
back, DCMTK findscu -W and storescu, pynetdicom for the worklist and MPPS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UltrasoundImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, StudyRootQueryRetrieveInformationModelFind

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import image_dataset
from .peers import MLLPRecorder, create_database, drop_database, wait_until
from .test_worklist_conformance import find, final, his_statuses, identifier, n_create, n_set
from .test_worklist_ris import msa, send, worklist

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
# Seconds of quiet after which images complete their step: long enough that a
# test sees the step IN PROGRESS (and sends its MPPS) well before.
STABLE_SECONDS = 10


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per backend, with a stand-in HIS (``server.his``), the
    hospital's zone, steps expiring 7 days after their date and images
    completing their step after STABLE_SECONDS of quiet."""
    pg = create_database() if request.param == "pg" else None
    his = MLLPRecorder(free_port())
    pacs = PacsServer(tmp_path_factory.mktemp(f"wlreview-{request.param}") / "data",
                      Backend(request.param, pg, None, {}))
    pacs.extra_env.update({
        "PACS_HIS_MLLP": f"127.0.0.1:{his.port}", "PACS_TIMEZONE": "Asia/Ho_Chi_Minh",
        "PACS_WORKLIST_EXPIRE_DAYS": "7", "PACS_WORKLIST_IMAGES_STABLE_SECONDS": str(STABLE_SECONDS),
    })
    pacs.his = his  # type: ignore[attr-defined]
    pacs.start()
    yield pacs
    pacs.stop()
    his.stop()
    if pg:
        drop_database(pg)


# -- messages -------------------------------------------------------------------------------------
def day(offset: int = 0) -> str:
    """The hospital's date *offset* days from today (YYYYMMDD)."""
    return (datetime.now(ZONE).date() + timedelta(days=offset)).strftime("%Y%m%d")


def _head(kind: str, control: str, pid: str, name: str) -> list[str]:
    return [f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|{day()}083000||{kind}|{control}|P|2.5|||||VN|UNICODE UTF-8",
            f"PID|1||{pid}^^^BVDK^PI||{name}||19850101|M",
            "PV1|1|O||||||BS001^Đỗ^Thanh Tùng"]


def orm(accession: str, *, modality: str = "US", code: str = "US-BUNG^Siêu âm bụng tổng quát^L",
        name: str = "Lê^Hoàng Phúc", pid: str = "", when: str = "", study_uid: str = "") -> str:
    """An ORM^O01 NW of one step (OBR-4 *code*, OBR-24 *modality*), today at 09:00 unless *when*."""
    when = when or f"{day()}090000"
    lines = _head("ORM^O01", f"C{accession}", pid or f"BN{accession}", name)
    lines += [f"ORC|NW|P{accession}|F{accession}||SC",
              f"OBR|1|P{accession}|F{accession}|{code}|||{when}|||||||||||{accession}|RP{accession}|"
              f"SPS{accession}||||{modality}|||^^^{when}^^R"]
    if study_uid:
        lines.append(f"ZDS|{study_uid}^100^Application^DICOM")
    return "\r".join(lines)


def omi(accession: str, steps: list[dict[str, str]], *, name: str = "Lê^Hoàng Phúc") -> str:
    """An OMI^O23 NW of one requested procedure: an IPC per step (IPC-4 step
    ID, -5 modality, -6 protocol, -7 station name, -8 location, -9 station AE)."""
    lines = _head("OMI^O23^OMI_O23", f"C{accession}", f"BN{accession}", name)
    lines += [f"ORC|NW|P{accession}|F{accession}||SC", f"TQ1|||||||{day()}090000||R",
              f"OBR|1|P{accession}|F{accession}|CT-NGUC^CT ngực^L"]
    for step in steps:
        lines.append("|".join(["IPC", accession, f"RP{accession}", "", step["id"], step.get("modality", "CT"),
                               step.get("protocol", ""), step.get("station", ""), step.get("location", ""),
                               step.get("ae", "")]))
    return "\r".join(lines)


def accepted(server: PacsServer, message: str) -> None:
    ack = send(server, message)
    assert msa(ack)[0] == "AA", ack


def order(server: PacsServer, accession: str) -> dict[str, Any]:
    with server.http() as http:
        found = http.get(f"/api/orders/{accession}")
    assert found.status_code == 200, found.text
    return dict(found.json())


def step_statuses(server: PacsServer, accession: str) -> dict[str, str]:
    return {s["step_id"]: s["status"] for s in order(server, accession)["steps"]}


def images(server: PacsServer, tmp_path: Path, placed: dict[str, Any], count: int = 2, *,
           modality: str = "US") -> None:
    """*count* images of *modality* for the order *placed* (its Study Instance
    UID and accession, as a modality that picked the worklist item writes
    them), sent with DCMTK storescu."""
    series = generate_uid()
    files = []
    for number in range(count):
        ds = image_dataset(UltrasoundImageStorage, StudyInstanceUID=placed["study_uid"],
                           AccessionNumber=placed["accession_number"], SeriesInstanceUID=series,
                           PatientID=placed["patient_id"], PatientName="LE^HOANG PHUC", Modality=modality,
                           StudyDate=day(), StudyTime="091500", InstanceNumber=number + 1)
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    result = server.storescu(*files, calling="US_ROOM1")
    assert result.returncode == 0, result.stderr


def mpps(placed: dict[str, Any], step_id: str, modality: str = "US") -> Dataset:
    """An N-CREATE attribute list performing step *step_id* of *placed*."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = modality
    ds.PerformedStationAETitle = "US_ROOM1"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = day(), "091000"
    ds.PerformedProcedureStepID = f"PPS{placed['accession_number']}"
    item = Dataset()
    item.AccessionNumber = placed["accession_number"]
    item.StudyInstanceUID = placed["study_uid"]
    item.ScheduledProcedureStepID = step_id
    ds.ScheduledStepAttributesSequence = Sequence([item])
    return ds


# -- 1. room names and locations longer than SH ----------------------------------------------------
def test_long_room_name_and_location_are_cut_not_the_order_refused(server: PacsServer, tmp_path: Path) -> None:
    """IPC-7/8 of 31 characters refused the whole order (AE 102): the exam
    never reached the worklist over a label the modality only shows."""
    room, floor = "Phòng chụp cắt lớp vi tính số 1", "Khoa Chẩn đoán hình ảnh tầng 2"
    accepted(server, omi("RN0001", [{"id": "S1", "station": room, "location": floor, "ae": "CT_ROOM1"}]))
    items = worklist(server, tmp_path, "AccessionNumber=RN0001", "ScheduledProcedureStepSequence[0].ScheduledStationName",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepLocation")
    assert len(items) == 1
    step = items[0].ScheduledProcedureStepSequence[0]
    name, location = str(step.ScheduledStationName), str(step.ScheduledProcedureStepLocation)
    assert 0 < len(name) <= 16 and room.startswith(name), name
    assert 0 < len(location) <= 16 and floor.startswith(location), location
    # A station asking by its (SH) name finds the step.
    again = worklist(server, tmp_path, "AccessionNumber", f"ScheduledProcedureStepSequence[0].ScheduledStationName={name}")
    assert "RN0001" in [str(i.AccessionNumber) for i in again]
    # Identifiers are still refused when too long: an AE title cut would name another station.
    ack = send(server, omi("RN0002", [{"id": "S1", "ae": "CT_ROOM1_TANG_HAI"}]))
    assert msa(ack)[0] == "AE" and "|102^" in ack, ack


# -- 2. a procedure code without text -----------------------------------------------------------------
def test_procedure_code_without_text_names_the_exam(server: PacsServer, tmp_path: Path) -> None:
    """OBR-4 = CT-SO-NAO: Code Meaning (Type 1) and both descriptions were empty."""
    accepted(server, orm("CM0001", modality="CT", code="CT-SO-NAO"))
    items = worklist(server, tmp_path, "AccessionNumber=CM0001", "RequestedProcedureCodeSequence",
                     "RequestedProcedureDescription", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
                     aet="CT_ROOM1")
    assert len(items) == 1
    code = items[0].RequestedProcedureCodeSequence[0]
    assert (str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)) == \
        ("CT-SO-NAO", "L", "CT-SO-NAO")
    assert str(items[0].RequestedProcedureDescription) == "CT-SO-NAO"
    assert str(items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription) == "CT-SO-NAO"


# -- 3. Type 1 return keys the HIS left empty -------------------------------------------------------
def test_order_without_modality_or_patient_name_is_refused(server: PacsServer, tmp_path: Path) -> None:
    """Both were acknowledged AA and served empty: without modality the exam
    was offered to no console while the HIS believed it scheduled."""
    ack = send(server, orm("TY0002", modality=""))
    assert msa(ack)[0] == "AE" and "|101^" in ack and "modality" in ack, ack
    ack = send(server, orm("TY0003", name=""))
    assert msa(ack)[0] == "AE" and "|101^" in ack and "name" in ack, ack
    with server.http() as http:
        assert http.get("/api/orders/TY0002").status_code == 404
        assert http.get("/api/orders/TY0003").status_code == 404
        refused = http.post("/api/orders", json={"patient": {"id": "BNTY0004", "name": "Lê^Hoàng Phúc"},
                                                 "accession_number": "TY0004"})
        assert refused.status_code == 400 and "modality" in refused.text, refused.text
    assert worklist(server, tmp_path, "AccessionNumber=TY000*", aet="US_ROOM1") == []


# -- 4. two N-CREATEs of one MPPS at once ---------------------------------------------------------------
def test_simultaneous_n_creates_of_one_instance_get_duplicate_sop_instance(server: PacsServer) -> None:
    """PostgreSQL answered the losers 0110H with a UniqueViolation traceback
    (a modality resending after a DIMSE timeout); SQLite answered 0111H."""
    accepted(server, orm("DU0001"))
    placed = order(server, "DU0001")
    uid = generate_uid()
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def create() -> None:
        ae = AE(ae_title="US_ROOM1")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        barrier.wait()
        status, _ = assoc.send_n_create(mpps(placed, "SPSDU0001"), ModalityPerformedProcedureStep, uid)
        statuses.append(int(status.Status))
        assoc.release()

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [0x0000, 0x0111, 0x0111, 0x0111], [hex(s) for s in statuses]
    assert "UniqueViolation" not in server.log_text()


# -- 5. protocol code and order numbers ---------------------------------------------------------------
def test_protocol_code_and_order_numbers_reach_the_worklist(server: PacsServer, tmp_path: Path) -> None:
    """Scheduled Protocol Code Sequence was always empty and the placer and
    filler order numbers answered zero-length."""
    accepted(server, omi("PR0001", [{"id": "S1", "protocol": "CTCHEST-C^Ngực có cản quang^99HOSP",
                                     "ae": "CT_ROOM1"}]))
    items = worklist(server, tmp_path, "AccessionNumber=PR0001", "PlacerOrderNumberImagingServiceRequest",
                     "FillerOrderNumberImagingServiceRequest",
                     "ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription")
    assert len(items) == 1
    assert str(items[0].PlacerOrderNumberImagingServiceRequest) == "PPR0001"
    assert str(items[0].FillerOrderNumberImagingServiceRequest) == "FPR0001"
    step = items[0].ScheduledProcedureStepSequence[0]
    assert len(step.ScheduledProtocolCodeSequence) == 1
    protocol = step.ScheduledProtocolCodeSequence[0]
    assert (str(protocol.CodeValue), str(protocol.CodingSchemeDesignator), str(protocol.CodeMeaning)) == \
        ("CTCHEST-C", "99HOSP", "Ngực có cản quang")
    assert str(step.ScheduledProcedureStepDescription) == "Ngực có cản quang"


# -- 6. a NUL byte in a query key ------------------------------------------------------------------------
def test_nul_in_a_query_key_is_refused(server: PacsServer) -> None:
    """PostgreSQL answered C000 with the driver's error text; SQLite 0 matches."""
    accepted(server, orm("NU0001"))
    status, matches = find(server, identifier({"PatientName": "L\x00*"}))
    assert (status, matches) == (0xA900, [])
    assert "worklist query failed" not in server.log_text()
    # The Q/R C-FIND shares the check.
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "L\x00*"
    query.StudyInstanceUID = ""
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        answers = [int(s.Status) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()
    assert answers == [0xA900]


# -- 7a. modalities without MPPS -------------------------------------------------------------------------
def test_images_without_mpps_complete_the_step_and_tell_the_his(server: PacsServer, tmp_path: Path) -> None:
    """The step stayed SCHEDULED for ever: on the worklist, and the HIS never
    heard of the exam. Now IN PROGRESS (IP) on the images, COMPLETED (CM)
    once the study is stable, off the worklist. Of a procedure of two steps,
    only the step of the images' modality."""
    accepted(server, orm("IM0001"))
    accepted(server, omi("IM0002", [{"id": "CT1", "modality": "CT", "ae": "CT_ROOM1"},
                                    {"id": "US1", "modality": "US", "ae": "US_ROOM1"}]))
    single, pair = order(server, "IM0001"), order(server, "IM0002")
    images(server, tmp_path, single)
    images(server, tmp_path, pair)
    his = server.his  # type: ignore[attr-defined]
    assert wait_until(lambda: order(server, "IM0001")["status"] == "COMPLETED", timeout=STABLE_SECONDS * 6)
    assert wait_until(lambda: step_statuses(server, "IM0002")["US1"] == "COMPLETED", timeout=STABLE_SECONDS * 6)
    assert step_statuses(server, "IM0002")["CT1"] == "SCHEDULED"
    assert wait_until(lambda: his_statuses(his, "IM0001") == ["IP", "CM"], timeout=30), his_statuses(his, "IM0001")
    assert wait_until(lambda: his_statuses(his, "IM0002") == ["IP"], timeout=30), his_statuses(his, "IM0002")
    # Off the worklist as a completed step is; the waiting CT step stays on it.
    listed = worklist(server, tmp_path, "AccessionNumber=IM000*", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
                      aet="US_ROOM1")
    assert [(str(i.AccessionNumber), str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID))
            for i in listed] == [("IM0002", "CT1")]


def test_an_mpps_after_the_images_wins(server: PacsServer, tmp_path: Path) -> None:
    """Images start the step; an MPPS then naming it decides alone: its
    stable study does not complete it (N-SET COMPLETED does), and a
    DISCONTINUED MPPS puts it back to SCHEDULED for good."""
    for accession in ("MW0001", "MW0002", "MW0003"):
        accepted(server, orm(accession))
    running, wrong, control = (order(server, a) for a in ("MW0001", "MW0002", "MW0003"))
    his = server.his  # type: ignore[attr-defined]
    images(server, tmp_path, running)
    images(server, tmp_path, wrong)
    for accession in ("MW0001", "MW0002"):
        assert wait_until(lambda a=accession: order(server, a)["status"] == "IN PROGRESS", timeout=STABLE_SECONDS * 4,
                          interval=0.2)
    uid_running, uid_wrong = generate_uid(), generate_uid()
    assert n_create(server, uid_running, mpps(running, "SPSMW0001")) == 0
    assert n_create(server, uid_wrong, mpps(wrong, "SPSMW0002")) == 0
    assert n_set(server, uid_wrong, final("DISCONTINUED", day(), "091500")) == 0
    assert order(server, "MW0002")["status"] == "SCHEDULED"
    # A control study sent after both: once images completed it, theirs had
    # been stable longer -- had images still decided, both were completed.
    images(server, tmp_path, control)
    assert wait_until(lambda: order(server, "MW0003")["status"] == "COMPLETED", timeout=STABLE_SECONDS * 6)
    assert order(server, "MW0001")["status"] == "IN PROGRESS"
    assert order(server, "MW0002")["status"] == "SCHEDULED"
    assert n_set(server, uid_running, final("COMPLETED", day(), "093000")) == 0
    assert order(server, "MW0001")["status"] == "COMPLETED"
    assert wait_until(lambda: his_statuses(his, "MW0001") == ["IP", "CM"], timeout=30), his_statuses(his, "MW0001")
    assert wait_until(lambda: his_statuses(his, "MW0002") == ["IP", "SC"], timeout=30), his_statuses(his, "MW0002")


# -- 7b. steps never done expire from the worklist ----------------------------------------------------
def test_scheduled_steps_expire_from_the_worklist(server: PacsServer, tmp_path: Path) -> None:
    """Nothing expired them: a console asking without a date range got every
    order never performed nor cancelled, for ever. Expired ones are only not
    listed; the order stays."""
    for accession, offset in (("EX0001", -10), ("EX0002", -3), ("EX0003", 1), ("EX0004", -10)):
        accepted(server, orm(accession, pid="BNEXPIRE", when=f"{day(offset)}090000"))
    started = order(server, "EX0004")
    assert n_create(server, generate_uid(), mpps(started, "SPSEX0004")) == 0
    listed = worklist(server, tmp_path, "PatientID=BNEXPIRE", "AccessionNumber",
                      "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus", aet="US_ROOM1")
    assert sorted((str(i.AccessionNumber), str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus))
                  for i in listed) == [("EX0002", "SCHEDULED"), ("EX0003", "SCHEDULED"), ("EX0004", "STARTED")]
    # Asked for by its status or its accession, the expired step is not offered either...
    assert worklist(server, tmp_path, "AccessionNumber=EX0001",
                    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus=SCHEDULED", aet="US_ROOM1") == []
    # ...but the order is still there.
    assert order(server, "EX0001")["status"] == "SCHEDULED"
