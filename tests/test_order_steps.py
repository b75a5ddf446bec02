"""Requested procedures of several scheduled steps (IHE RAD-4): one accession,
one Study Instance UID, several Scheduled Procedure Steps (CT chest without,
then with contrast; two stations; two modalities).

They were refused whole (one row per accession). Now each step is a worklist
item of its own, MPPS moves the steps it names, the HIS hears of the order
(the requested procedure) as before -- IP, then CM once every step is done --
CA withdraws every step not performed yet (or the one it names), XO changes
the steps it names and adds new ones, and an index of the previous schema
keeps its orders.

Everything goes over real sockets to a real `pacs serve` per index backend:
MLLP (python-hl7) for the orders, DCMTK findscu -W as the modality's
worklist, pynetdicom for MPPS, HTTP for the JSON API and reports, and a
stand-in HIS recording the status messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import create_database, drop_database, serving_with_his, wait_until
from .test_hl7_robustness import fields
from .test_worklist_conformance import his_statuses
from .test_worklist_ris import _cfind_names, _mpps_status, msa, send, worklist

MSH = "MSH|^~\\&|HIS|BVDK|FILMLESS|BVDK|20261206083000||{kind}|{control}|P|2.5|||||VN|UNICODE UTF-8"
PID = "PID|1||{pid}^^^BVDK^PI||Nguyễn^Thị Mai||19800202|F"
WITHOUT = ("CTN-KCQ", "CT ngực không cản quang")
WITH = ("CTN-CQ", "CT ngực có cản quang")

SPS = "ScheduledProcedureStepSequence[0]"
STEP_KEYS = [f"{SPS}.ScheduledProcedureStepID", f"{SPS}.ScheduledStationAETitle", f"{SPS}.Modality",
             f"{SPS}.ScheduledProcedureStepDescription", f"{SPS}.ScheduledProcedureStepStatus",
             f"{SPS}.ScheduledProcedureStepStartDate", "StudyInstanceUID", "RequestedProcedureID"]


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per index backend, with a stand-in HIS (``server.his``)
    and a radiologist (``server.radiologist``); each test its own accessions."""
    pg = create_database() if request.param == "pg" else None
    his_port = free_port()
    pacs = PacsServer(tmp_path_factory.mktemp("steps") / "data", Backend(request.param, pg, None, {}),
                      extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    with serving_with_his(pacs, his_port, ("bs.mai", "Lê^Thị Mai")) as serving:
        yield serving
    if pg:
        drop_database(pg)


# -- helpers ------------------------------------------------------------------------------------
def step(sps: str, station: str = "CT_ROOM1", protocol: tuple[str, str] = WITHOUT,
         modality: str = "CT") -> dict[str, Any]:
    """One scheduled step of an OMI: its SPS ID, station AE, protocol (code, text) and modality."""
    return {"sps": sps, "station": station, "protocol": protocol, "modality": modality}


def omi(control: str, accession: str, *steps: dict[str, Any], order_control: str = "NW", pid: str = "BN900001",
        study_uid: str = "", start: str = "20261206090000", priority: str = "R") -> str:
    """An OMI^O23 of one ORDER group: requested procedure *accession* with an
    IPC per step (IPC-1 accession, -2 procedure ID, -3 study UID, -4 SPS ID,
    -5 modality, -6 protocol, -7 station name, -8 location, -9 station AE)."""
    segments = [
        MSH.format(kind="OMI^O23^OMI_O23", control=control), PID.format(pid=pid), "PV1|1|O||||||BS001^Đỗ^Thanh Tùng",
        f"ORC|{order_control}|P{accession}|F{accession}||SC",
        f"TQ1|1||||||{start}||{priority}",  # TQ1-7 start, TQ1-9 priority
        # OBR-18: the accession of an order whose message has no IPC (a CA of all its steps).
        "|".join(["OBR", "1", f"P{accession}", f"F{accession}", "CT-NGUC^CT ngực^L", *[""] * 13, accession]),
    ]
    for s in steps:
        code, text = s["protocol"]
        segments.append(f"IPC|{accession}|RP{accession}|{study_uid}|{s['sps']}|{s['modality']}|{code}^{text}^L|"
                        f"{s['station']}|P.CT|{s['station']}")
    return "\n".join(segments)


def order(server: PacsServer, accession: str) -> dict[str, Any]:
    with server.http() as http:
        response = http.get(f"/api/orders/{accession}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def step_statuses(server: PacsServer, accession: str) -> dict[str, str]:
    return {s["step_id"]: s["status"] for s in order(server, accession)["steps"]}


def items(server: PacsServer, tmp_path: Path, accession: str, *keys: str) -> list[tuple[str, ...]]:
    """(SPS ID, station, modality, description, status) of the worklist items of *accession*."""
    found = worklist(server, tmp_path, f"AccessionNumber={accession}", *STEP_KEYS, *keys)
    return sorted((str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID),
                   str(i.ScheduledProcedureStepSequence[0].ScheduledStationAETitle),
                   str(i.ScheduledProcedureStepSequence[0].Modality),
                   str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription),
                   str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus)) for i in found)


def pps(accession: str, study_uid: str, *sps_ids: str, station: str = "CT_ROOM1", modality: str = "CT") -> Dataset:
    """An MPPS N-CREATE with a Scheduled Step Attributes item per SPS ID
    (one item without SPS ID when none is given: the unscheduled case)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = modality
    ds.PerformedStationAETitle = station
    ds.PerformedProcedureStepStartDate = "20261206"
    ds.PerformedProcedureStepStartTime = "091000"
    ds.PerformedProcedureStepID = f"PPS{accession}"
    references = []
    for sps in sps_ids or ("",):
        item = Dataset()
        item.AccessionNumber = accession
        item.StudyInstanceUID = study_uid
        item.ScheduledProcedureStepID = sps
        references.append(item)
    ds.ScheduledStepAttributesSequence = Sequence(references)
    return ds


def completed() -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20261206"
    ds.PerformedProcedureStepEndTime = "093000"
    return ds


def perform(server: PacsServer, attributes: Dataset, *, complete: bool = True) -> str:
    """N-CREATE (and N-SET COMPLETED) of a performed step; its UID."""
    uid = generate_uid()
    assert int(_mpps_status(server, uid, attributes, create=True).Status) == 0
    if complete:
        assert int(_mpps_status(server, uid, completed(), create=False).Status) == 0
    return uid


def status_messages(server: PacsServer, accession: str) -> list[list[str]]:
    """The ORC and OBR of each ORM status message the HIS got about *accession*."""
    out = []
    for message in list(server.his.messages):  # type: ignore[attr-defined]
        segments = {s.split("|")[0]: s for s in message.decode("utf-8").split("\r") if s}
        obr = segments.get("OBR", "").split("|")
        if "ORM^O01" in segments["MSH"] and len(obr) > 18 and obr[18] == accession:
            out.append([segments["PID"], segments["ORC"], segments["OBR"]])
    return out


# -- the worklist ---------------------------------------------------------------------------------
def test_two_ipc_of_one_accession_are_two_items_of_one_procedure(server: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    two = omi("W1", "SWL001", step("SWL001-1", "CT_ROOM1", WITHOUT), step("SWL001-2", "CT_ROOM2", WITH),
              study_uid=study_uid)
    assert msa(send(server, two)) == ("AA", "W1")
    found = worklist(server, tmp_path, "AccessionNumber=SWL001", *STEP_KEYS)
    assert len(found) == 2
    assert {(str(i.AccessionNumber), str(i.StudyInstanceUID), str(i.RequestedProcedureID)) for i in found} == {
        ("SWL001", study_uid, "RPSWL001")}
    assert items(server, tmp_path, "SWL001") == [
        ("SWL001-1", "CT_ROOM1", "CT", "CT ngực không cản quang", "SCHEDULED"),
        ("SWL001-2", "CT_ROOM2", "CT", "CT ngực có cản quang", "SCHEDULED"),
    ]
    # Each station sees the step scheduled for it.
    for station, sps in (("CT_ROOM1", "SWL001-1"), ("CT_ROOM2", "SWL001-2")):
        mine = worklist(server, tmp_path, "AccessionNumber=SWL001", f"{SPS}.ScheduledStationAETitle={station}",
                        f"{SPS}.ScheduledProcedureStepID", aet=station)
        assert [str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for i in mine] == [sps]
    assert worklist(server, tmp_path, "AccessionNumber=SWL001", f"{SPS}.ScheduledStationAETitle=MR_ROOM1",
                    f"{SPS}.ScheduledProcedureStepID", aet="MR_ROOM1") == []
    placed = order(server, "SWL001")
    assert placed["status"] == "SCHEDULED" and placed["study_uid"] == study_uid
    assert [(s["step_id"], s["station_ae_title"], s["status"]) for s in placed["steps"]] == [
        ("SWL001-1", "CT_ROOM1", "SCHEDULED"), ("SWL001-2", "CT_ROOM2", "SCHEDULED")]


def test_orm_with_an_orc_obr_per_step_and_two_modalities(server: PacsServer, tmp_path: Path) -> None:
    """ORM^O01 the IHE way: one ORC/OBR per step, OBR-18 the accession, OBR-20
    the SPS ID, OBR-24 the modality; ZDS-1 the study."""
    study_uid = generate_uid()

    def obr(number: int, service: str, sps: str, modality: str) -> str:
        fields = ["OBR", str(number), "PSWL002", "FSWL002", service, *[""] * 13, "SWL002", "RPSWL002", sps,
                  "", "", "", modality]
        return "|".join(fields)

    groups = [
        MSH.format(kind="ORM^O01", control="W2"), PID.format(pid="BN900002"),
        "ORC|NW|PSWL002|FSWL002||SC||^^^20261206100000^^R",
        obr(1, "CT-BUNG^CT bụng^L", "SWL002-CT", "CT"),
        f"ZDS|{study_uid}^100^Application^DICOM",
        "ORC|NW|PSWL002|FSWL002||SC||^^^20261206110000^^R",
        obr(2, "SA-BUNG^Siêu âm bụng^L", "SWL002-US", "US"),
        f"ZDS|{study_uid}^100^Application^DICOM",
    ]
    assert msa(send(server, "\n".join(groups))) == ("AA", "W2")
    found = worklist(server, tmp_path, "AccessionNumber=SWL002", *STEP_KEYS, f"{SPS}.ScheduledProcedureStepStartTime")
    assert sorted((str(i.ScheduledProcedureStepSequence[0].Modality),
                   str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime),
                   str(i.StudyInstanceUID)) for i in found) == [("CT", "100000", study_uid),
                                                                  ("US", "110000", study_uid)]
    ultrasound = worklist(server, tmp_path, "AccessionNumber=SWL002", f"{SPS}.Modality=US",
                          f"{SPS}.ScheduledProcedureStepID", aet="US_ROOM1")
    assert [str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID) for i in ultrasound] == ["SWL002-US"]


# -- MPPS and the HIS ----------------------------------------------------------------------------
def test_mpps_moves_its_step_and_the_order_completes_with_its_last_step(server: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    assert msa(send(server, omi("M1", "SMP001", step("SMP001-1", protocol=WITHOUT), step("SMP001-2", protocol=WITH),
                                study_uid=study_uid)))[0] == "AA"
    first = perform(server, pps("SMP001", study_uid, "SMP001-1"), complete=False)
    assert step_statuses(server, "SMP001") == {"SMP001-1": "IN PROGRESS", "SMP001-2": "SCHEDULED"}
    assert order(server, "SMP001")["status"] == "IN PROGRESS"
    assert [(i[0], i[4]) for i in items(server, tmp_path, "SMP001")] == [("SMP001-1", "STARTED"),
                                                                         ("SMP001-2", "SCHEDULED")]
    assert int(_mpps_status(server, first, completed(), create=False).Status) == 0
    # One step of two done: the order is under way, the other step still offered.
    assert step_statuses(server, "SMP001") == {"SMP001-1": "COMPLETED", "SMP001-2": "SCHEDULED"}
    assert order(server, "SMP001")["status"] == "IN PROGRESS"
    assert [(i[0], i[4]) for i in items(server, tmp_path, "SMP001")] == [("SMP001-2", "SCHEDULED")]
    perform(server, pps("SMP001", study_uid, "SMP001-2"))
    assert step_statuses(server, "SMP001") == {"SMP001-1": "COMPLETED", "SMP001-2": "COMPLETED"}
    assert order(server, "SMP001")["status"] == "COMPLETED"
    assert items(server, tmp_path, "SMP001") == []

    # The HIS gets what it gets for an order of one step: IP, then CM, about the order.
    single_uid = generate_uid()
    assert msa(send(server, omi("M2", "SMP002", step("SMP002-1"), study_uid=single_uid)))[0] == "AA"
    perform(server, pps("SMP002", single_uid, "SMP002-1"))
    assert wait_until(lambda: len(status_messages(server, "SMP001")) >= 2
                      and len(status_messages(server, "SMP002")) >= 2, timeout=60)
    assert his_statuses(server.his, "SMP001") == ["IP", "CM"]  # type: ignore[attr-defined]
    assert his_statuses(server.his, "SMP002") == ["IP", "CM"]  # type: ignore[attr-defined]
    two_steps = status_messages(server, "SMP001")
    one_step = [[s.replace("SMP002", "SMP001") for s in segments] for segments in status_messages(server, "SMP002")]
    assert two_steps == one_step
    assert two_steps[1][1].startswith("ORC|SC|PSMP001|FSMP001||CM")
    # What was performed is not cancelled.
    ack = send(server, omi("M3", "SMP001", order_control="CA"))
    assert msa(ack) == ("AE", "M3") and "unable to cancel" in fields(ack, "ERR")[8]


def test_an_mpps_of_several_steps_and_one_without_step_id(server: PacsServer) -> None:
    """IHE RAD-6: the group case lists each step performed; an item without
    SPS ID (the unscheduled case) takes the step scheduled for its station
    and modality, and none when that leaves a choice."""
    study_uid = generate_uid()
    assert msa(send(server, omi("G1", "SGR001", step("SGR001-1", "CT_ROOM1"), step("SGR001-2", "CT_ROOM2"),
                                study_uid=study_uid)))[0] == "AA"
    perform(server, pps("SGR001", study_uid, station="CT_ROOM2"), complete=False)
    assert step_statuses(server, "SGR001") == {"SGR001-1": "SCHEDULED", "SGR001-2": "IN PROGRESS"}
    # Now one step is left to do: an item without SPS ID from anywhere is that one.
    perform(server, pps("SGR001", study_uid, station="CT_ROOM9"))
    assert step_statuses(server, "SGR001") == {"SGR001-1": "COMPLETED", "SGR001-2": "IN PROGRESS"}

    both_here = generate_uid()
    assert msa(send(server, omi("G2", "SGR002", step("SGR002-1"), step("SGR002-2", protocol=WITH),
                                study_uid=both_here)))[0] == "AA"
    guess = perform(server, pps("SGR002", both_here), complete=False)  # accepted, but which step?
    assert step_statuses(server, "SGR002") == {"SGR002-1": "SCHEDULED", "SGR002-2": "SCHEDULED"}
    assert int(_mpps_status(server, guess, completed(), create=False).Status) == 0
    assert order(server, "SGR002")["status"] == "SCHEDULED"
    # The group case: one performed step listing both moves both.
    group = perform(server, pps("SGR002", both_here, "SGR002-1", "SGR002-2"), complete=False)
    assert step_statuses(server, "SGR002") == {"SGR002-1": "IN PROGRESS", "SGR002-2": "IN PROGRESS"}
    assert int(_mpps_status(server, group, completed(), create=False).Status) == 0
    assert order(server, "SGR002")["status"] == "COMPLETED"
    assert wait_until(lambda: "CM" in his_statuses(server.his, "SGR002"), timeout=60)  # type: ignore[attr-defined]
    assert his_statuses(server.his, "SGR002") == ["IP", "CM"]  # type: ignore[attr-defined]


def test_a_discontinued_step_puts_only_its_step_back(server: PacsServer, tmp_path: Path) -> None:
    """IHE RAD-7: discontinued (wrong worklist entry), the step is to be done
    again; the order goes back to SCHEDULED when nothing else of it started."""
    study_uid = generate_uid()
    assert msa(send(server, omi("D1", "SDC001", step("SDC001-1"), step("SDC001-2", protocol=WITH),
                                study_uid=study_uid)))[0] == "AA"
    wrong = perform(server, pps("SDC001", study_uid, "SDC001-2"), complete=False)
    stop = completed()
    stop.PerformedProcedureStepStatus = "DISCONTINUED"
    assert int(_mpps_status(server, wrong, stop, create=False).Status) == 0
    assert step_statuses(server, "SDC001") == {"SDC001-1": "SCHEDULED", "SDC001-2": "SCHEDULED"}
    assert [(i[0], i[4]) for i in items(server, tmp_path, "SDC001")] == [("SDC001-1", "SCHEDULED"),
                                                                         ("SDC001-2", "SCHEDULED")]
    assert wait_until(lambda: len(his_statuses(server.his, "SDC001")) >= 2, timeout=60)  # type: ignore[attr-defined]
    assert his_statuses(server.his, "SDC001") == ["IP", "SC"]  # type: ignore[attr-defined]


# -- cancel and change -------------------------------------------------------------------------------
def test_cancel_withdraws_the_steps_not_performed_or_the_one_named(server: PacsServer, tmp_path: Path) -> None:
    assert msa(send(server, omi("C1", "SCA001", step("SCA001-1"), step("SCA001-2", protocol=WITH))))[0] == "AA"
    assert msa(send(server, omi("C2", "SCA001", order_control="CA"))) == ("AA", "C2")
    assert step_statuses(server, "SCA001") == {"SCA001-1": "CANCELLED", "SCA001-2": "CANCELLED"}
    assert order(server, "SCA001")["status"] == "CANCELLED"
    assert items(server, tmp_path, "SCA001") == []

    study_uid = generate_uid()
    three = [step("SCA002-1"), step("SCA002-2", protocol=WITH), step("SCA002-3", "CT_ROOM2")]
    assert msa(send(server, omi("C3", "SCA002", *three, study_uid=study_uid)))[0] == "AA"
    # A CA with one IPC withdraws that step.
    assert msa(send(server, omi("C4", "SCA002", three[1], order_control="CA", study_uid=study_uid)))[0] == "AA"
    assert step_statuses(server, "SCA002") == {"SCA002-1": "SCHEDULED", "SCA002-2": "CANCELLED",
                                               "SCA002-3": "SCHEDULED"}
    assert [i[0] for i in items(server, tmp_path, "SCA002")] == ["SCA002-1", "SCA002-3"]
    refused = _mpps_status(server, generate_uid(), pps("SCA002", study_uid, "SCA002-2"), create=True)
    assert int(refused.Status) == 0x0110 and "cancelled" in refused.ErrorComment
    unknown = send(server, omi("C5", "SCA002", step("SCA002-9"), order_control="CA", study_uid=study_uid))
    assert msa(unknown)[0] == "AE" and fields(unknown, "ERR")[3].startswith("204^")
    # Step 1 performed, then the order cancelled: step 3 goes, the order is
    # completed -- news to the HIS, which cancelled and gets CM.
    perform(server, pps("SCA002", study_uid, "SCA002-1"))
    assert order(server, "SCA002")["status"] == "IN PROGRESS"
    assert msa(send(server, omi("C6", "SCA002", *three, order_control="CA", study_uid=study_uid)))[0] == "AA"
    assert step_statuses(server, "SCA002") == {"SCA002-1": "COMPLETED", "SCA002-2": "CANCELLED",
                                               "SCA002-3": "CANCELLED"}
    assert order(server, "SCA002")["status"] == "COMPLETED"
    assert wait_until(lambda: "CM" in his_statuses(server.his, "SCA002"), timeout=60)  # type: ignore[attr-defined]
    assert his_statuses(server.his, "SCA002") == ["IP", "CM"]  # type: ignore[attr-defined]
    assert his_statuses(server.his, "SCA001") == []  # type: ignore[attr-defined]  # its own CA is not echoed


def test_change_updates_the_named_step_and_adds_new_ones(server: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    assert msa(send(server, omi("X1", "SXO001", step("SXO001-1"), study_uid=study_uid)))[0] == "AA"
    change = omi("X2", "SXO001", step("SXO001-1", "CT_ROOM2"), step("SXO001-2", "CT_ROOM1", WITH),
                 order_control="XO", study_uid=study_uid)
    assert msa(send(server, change)) == ("AA", "X2")
    assert items(server, tmp_path, "SXO001") == [
        ("SXO001-1", "CT_ROOM2", "CT", "CT ngực không cản quang", "SCHEDULED"),
        ("SXO001-2", "CT_ROOM1", "CT", "CT ngực có cản quang", "SCHEDULED"),
    ]
    assert {str(i.StudyInstanceUID) for i in worklist(server, tmp_path, "AccessionNumber=SXO001",
                                                      "StudyInstanceUID")} == {study_uid}
    # A change of step values that names no step of several is refused (which one?).
    unnamed = send(server, omi("X3", "SXO001", order_control="XO"))  # timing (TQ1) and OBR-4 of which step?
    assert msa(unnamed)[0] == "AE" and fields(unnamed, "ERR")[3].startswith("101^")
    # The procedure's own values (priority: TQ1-9) change on every step.
    urgent = omi("X4", "SXO001", step("SXO001-2", "CT_ROOM1", WITH), order_control="XO", study_uid=study_uid,
                 priority="S")
    assert msa(send(server, urgent))[0] == "AA"
    found = worklist(server, tmp_path, "AccessionNumber=SXO001", "RequestedProcedurePriority",
                     f"{SPS}.ScheduledProcedureStepID")
    assert sorted(str(i.RequestedProcedurePriority) for i in found) == ["STAT", "STAT"]
    # A change that resends a performed step with a new one adds the new one.
    perform(server, pps("SXO001", study_uid, "SXO001-1", station="CT_ROOM2"))
    resent = omi("X5", "SXO001", step("SXO001-1", "CT_ROOM2"), step("SXO001-3", "CT_ROOM1", WITH),
                 order_control="XO", study_uid=study_uid)
    assert msa(send(server, resent))[0] == "AA"
    assert step_statuses(server, "SXO001") == {"SXO001-1": "COMPLETED", "SXO001-2": "SCHEDULED",
                                               "SXO001-3": "SCHEDULED"}
    # Alone, a change of the performed step is refused, as for an order of one step.
    alone = send(server, omi("X6", "SXO001", step("SXO001-1", "CT_ROOM3"), order_control="XO", study_uid=study_uid))
    assert msa(alone)[0] == "AE" and "completed and cannot change" in fields(alone, "ERR")[8]


def test_a_change_of_a_single_step_order_changes_that_step(server: PacsServer, tmp_path: Path) -> None:
    """An HIS that placed an order without SPS ID (the accession stands in)
    and sends one with its XO means the same step: it changes, no second
    item appears (a later CA of that ID left the first on the worklist); a
    step named twice in one change is refused, not merged (the last won)."""
    study_uid = generate_uid()
    # An IPC without IPC-4 (the modality is needed: a step without one is refused).
    assert msa(send(server, omi("Y1", "SXO009", step(""), study_uid=study_uid)))[0] == "AA"
    assert [i[0] for i in items(server, tmp_path, "SXO009")] == ["SXO009"]
    moved = omi("Y2", "SXO009", step("SXO009-A", "CT_ROOM2"), order_control="XO", study_uid=study_uid)
    assert msa(send(server, moved))[0] == "AA"
    assert [i[:2] for i in items(server, tmp_path, "SXO009")] == [("SXO009-A", "CT_ROOM2")]
    twice = omi("Y3", "SXO009", step("SXO009-A", "CT_ROOM1"), step("SXO009-A", "CT_ROOM3"),
                order_control="XO", study_uid=study_uid)
    refused = send(server, twice)
    assert msa(refused)[0] == "AE" and fields(refused, "ERR")[3].startswith("205^")
    assert [i[:2] for i in items(server, tmp_path, "SXO009")] == [("SXO009-A", "CT_ROOM2")]
    assert msa(send(server, omi("Y4", "SXO009", step("SXO009-A"), order_control="CA", study_uid=study_uid)))[0] == "AA"
    assert items(server, tmp_path, "SXO009") == []


def test_a_withdrawal_after_completion_is_refused(server: PacsServer) -> None:
    """One step performed, the other withdrawn: the order is completed (the
    HIS heard CM). A CA or DC of the whole order is refused AE 207, as for a
    completed order of one step, and changes no step."""
    study_uid = generate_uid()
    assert msa(send(server, omi("W1", "SWD001", step("SWD001-1"), step("SWD001-2", protocol=WITH),
                                study_uid=study_uid)))[0] == "AA"
    perform(server, pps("SWD001", study_uid, "SWD001-1"))
    assert msa(send(server, omi("W2", "SWD001", step("SWD001-2", protocol=WITH), order_control="CA",
                                study_uid=study_uid)))[0] == "AA"
    assert order(server, "SWD001")["status"] == "COMPLETED"
    for control, kind in (("W3", "DC"), ("W4", "CA")):
        refused = send(server, omi(control, "SWD001", order_control=kind, study_uid=study_uid))
        assert msa(refused)[0] == "AE" and fields(refused, "ERR")[3].startswith("207^"), kind
    assert step_statuses(server, "SWD001") == {"SWD001-1": "COMPLETED", "SWD001-2": "CANCELLED"}


def test_what_stays_unsupported_is_refused_whole(server: PacsServer) -> None:
    """Two Study Instance UIDs under one accession (two requested procedures of
    one order: DICOM allows it, these orders do not), a step twice, steps
    without their IDs, NW of an accession that exists: AE, nothing stored."""
    two_studies = "\n".join([
        omi("U1", "SUN001", step("SUN001-1"), study_uid=generate_uid()),
        f"IPC|SUN001|RPSUN001|{generate_uid()}|SUN001-2|CT|||P.CT|CT_ROOM1",
    ])
    ack = send(server, two_studies)
    assert msa(ack) == ("AE", "U1")
    assert fields(ack, "ERR")[3].startswith("205^") and "several requested procedures" in fields(ack, "ERR")[8]
    twice = send(server, omi("U2", "SUN001", step("SUN001-1"), step("SUN001-1", protocol=WITH)))
    assert msa(twice)[0] == "AE" and fields(twice, "ERR")[3].startswith("205^")
    unnamed = send(server, omi("U3", "SUN001", step(""), step("", protocol=WITH)))
    assert msa(unnamed)[0] == "AE" and fields(unnamed, "ERR")[3].startswith("101^")
    with server.http() as http:
        assert http.get("/api/orders/SUN001").status_code == 404
    assert msa(send(server, omi("U4", "SUN001", step("SUN001-1"))))[0] == "AA"
    again = send(server, omi("U5", "SUN001", step("SUN001-2")))
    assert msa(again)[0] == "AE" and "already exists" in fields(again, "ERR")[8]
    assert list(step_statuses(server, "SUN001")) == ["SUN001-1"]


def test_new_orders_racing_for_one_accession_or_study_uid_place_it_once(server: PacsServer) -> None:
    """The accession and the Study Instance UID are no unique keys any more
    (a row per step): eight connections placing one accession (each with
    another step), and eight placing one study UID under eight accessions,
    all at once, still place it once; the others are refused AE, not AR."""
    from concurrent.futures import ThreadPoolExecutor

    same_accession = [omi(f"RA{n}", "SRA001", step(f"SRA001-{n}"), pid="BN900030") for n in range(8)]
    study_uid = generate_uid()
    same_study = [omi(f"RB{n}", f"SRB00{n}", step(f"SRB00{n}-1"), pid="BN900031", study_uid=study_uid)
                  for n in range(8)]
    with ThreadPoolExecutor(16) as pool:
        acks = list(pool.map(lambda m: msa(send(server, m))[0], same_accession + same_study))
    assert sorted(acks[:8]) == ["AA"] + ["AE"] * 7, acks
    assert len(order(server, "SRA001")["steps"]) == 1
    assert sorted(acks[8:]) == ["AA"] + ["AE"] * 7, acks
    with server.http() as http:
        placed = [a for a in (f"SRB00{n}" for n in range(8)) if http.get(f"/api/orders/{a}").status_code == 200]
    assert len(placed) == 1 and order(server, placed[0])["study_uid"] == study_uid


# -- the JSON API -----------------------------------------------------------------------------------------
def test_json_api_places_reads_changes_and_cancels_steps(server: PacsServer, tmp_path: Path) -> None:
    body = {
        "patient": {"id": "BN900010", "issuer": "BVDK", "name": "Trần^Văn Bình"},
        "accession_number": "SJS001", "modality": "CT", "start_date": "20261206", "start_time": "140000",
        "requested_procedure_description": "CT ngực",
        "steps": [
            {"step_id": "SJS001-1", "station_ae_title": "CT_ROOM1", "step_description": WITHOUT[1]},
            {"step_id": "SJS001-2", "station_ae_title": "CT_ROOM2", "step_description": WITH[1],
             "start_time": "143000"},
        ],
    }
    with server.http() as http:
        created = http.post("/api/orders", json=body)
        assert created.status_code == 201, created.text
        assert [s["step_id"] for s in created.json()["steps"]] == ["SJS001-1", "SJS001-2"]
        got = http.get("/api/orders/SJS001").json()
        assert got["status"] == "SCHEDULED" and got["accession_number"] == "SJS001"
        assert [(s["step_id"], s["station_ae_title"], s["start_time"], s["status"]) for s in got["steps"]] == [
            ("SJS001-1", "CT_ROOM1", "140000", "SCHEDULED"), ("SJS001-2", "CT_ROOM2", "143000", "SCHEDULED")]
        assert http.post("/api/orders", json={**body, "accession_number": "SJS002", "steps": [
            {"station_ae_title": "CT_ROOM1"}, {"station_ae_title": "CT_ROOM2"}]}).status_code == 400
        assert http.get("/api/orders/SJS002").status_code == 404
        changed = http.put("/api/orders/SJS001", json={**body, "steps": [
            {"step_id": "SJS001-3", "station_ae_title": "CT_ROOM3", "step_description": "CT ngực liều thấp"}]})
        assert changed.status_code == 200, changed.text
        assert [s["step_id"] for s in changed.json()["steps"]] == ["SJS001-1", "SJS001-2", "SJS001-3"]
    assert [i[:2] for i in items(server, tmp_path, "SJS001")] == [
        ("SJS001-1", "CT_ROOM1"), ("SJS001-2", "CT_ROOM2"), ("SJS001-3", "CT_ROOM3")]
    with server.http() as http:
        one = http.delete("/api/orders/SJS001", params={"step_id": "SJS001-2"})
        assert one.status_code == 200 and one.json()["status"] == "SCHEDULED"
        assert http.delete("/api/orders/SJS001", params={"step_id": "NOPE"}).status_code == 404
        rest = http.delete("/api/orders/SJS001").json()
    assert rest["status"] == "CANCELLED" and {s["status"] for s in rest["steps"]} == {"CANCELLED"}
    assert items(server, tmp_path, "SJS001") == []


# -- reconciliation and reports ---------------------------------------------------------------------------
def test_the_study_of_a_procedure_is_linked_once_and_reported_as_its_order(server: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    assert msa(send(server, omi("R1", "SRE001", step("SRE001-1"), step("SRE001-2", protocol=WITH),
                                pid="BN900020", study_uid=study_uid)))[0] == "AA"
    perform(server, pps("SRE001", study_uid, "SRE001-2"))
    ct = make_ct(tmp_path / "re.dcm", PatientName="NGUYEN^THI MAI", PatientID="TYPED20", AccessionNumber="SRE001",
                 StudyInstanceUID=study_uid)
    assert server.storescu(str(ct)).returncode == 0
    assert _cfind_names(server, StudyInstanceUID=study_uid) == [("Nguyễn^Thị Mai", "BN900020", study_uid)]
    assert study_uid not in server.cli("orders", "unmatched", "--json").stdout
    with server.http() as http:
        corrections = {c["keyword"] for c in http.get(f"/api/studies/{study_uid}/corrections").json()}
        assert "PatientID" in corrections
    with server.http(token=server.radiologist) as rad:  # type: ignore[attr-defined]
        assert rad.put(f"/api/studies/{study_uid}/report", json={"findings": "Phổi sáng.", "impression": "Bình thường."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study_uid}/report/sign").status_code == 200

    def oru() -> list[str]:
        return [m.decode("utf-8") for m in server.his.messages  # type: ignore[attr-defined]
                if b"ORU^R01" in m and b"SRE001" in m]

    assert wait_until(lambda: bool(oru()), timeout=60)
    obr = next(s for s in oru()[0].split("\r") if s.startswith("OBR|")).split("|")
    assert (obr[2], obr[3], obr[18]) == ("PSRE001", "FSRE001", "SRE001")
    # Reported: the HIS can no longer withdraw the step left.
    ack = send(server, omi("R2", "SRE001", step("SRE001-1"), order_control="CA", pid="BN900020", study_uid=study_uid))
    assert msa(ack)[0] == "AE" and "reported" in fields(ack, "ERR")[8]
    assert order(server, "SRE001")["study_uid"] == study_uid


# -- an index of the previous schema -----------------------------------------------------------------------
def _upgrade_keeps_a_single_step_order(engine: Engine) -> None:
    """An index at 0015 with an order (no step ID, as older versions could
    store it), its study, link and performed step; upgraded to head: all
    kept, the order is one step of its procedure, and procedures of several
    steps can be placed beside it."""
    from datetime import UTC, datetime

    from sqlalchemy import func, select

    from pacs.index import upgrade_schema
    from pacs.index.models import Order, Patient, PerformedStep, Study, StudyOrderLink
    from pacs.orders import OrderError, OrderInfo, OrderService, PatientInfo

    upgrade_schema(engine, "0015")
    now = datetime.now(UTC)
    blank = {"issuer": "BVDK", "name": "Võ^Văn Cũ", "name_folded": "VO^VAN CU", "name_words": "VO VAN CU",
             "birth_date": "", "sex": "", "created_at": now, "updated_at": now}
    empty = {c: "" for c in ("placer_order_number", "filler_order_number", "requested_procedure_id",
                             "requested_procedure_description", "procedure_code", "procedure_code_scheme",
                             "procedure_code_meaning", "step_id", "step_description", "station_name", "location",
                             "start_time", "performing_physician", "referring_physician", "priority", "reason")}
    with engine.begin() as conn:
        patient = conn.execute(Patient.__table__.insert().values(patient_id="BN800001", **blank)
                               ).inserted_primary_key[0]
        order_pk = conn.execute(Order.__table__.insert().values(
            patient_pk=patient, accession_number="OLD001", study_uid="1.2.826.0.1.3680043.10.1", modality="CT",
            station_ae_title="CT_ROOM1", start_date="20261206", status="IN PROGRESS", source="hl7:HIS",
            created_at=now, updated_at=now, **empty)).inserted_primary_key[0]
        study = conn.execute(Study.__table__.insert().values(
            patient_pk=patient, study_uid="1.2.826.0.1.3680043.10.1", study_date="", study_time="",
            accession_number="OLD001", study_id="", referring_physician="", referring_physician_folded="",
            description="", institution="", modalities="", num_series=0, num_instances=0, size_bytes=0,
            created_at=now, updated_at=now)).inserted_primary_key[0]
        conn.execute(StudyOrderLink.__table__.insert().values(study_pk=study, order_pk=order_pk, matched_by="study uid",
                                                              created_at=now))
        conn.execute(PerformedStep.__table__.insert().values(
            sop_uid="1.2.826.0.1.3680043.10.2", order_pk=order_pk, order_pks=f"[{order_pk}]", status="IN PROGRESS",
            modality="CT", station_ae_title="CT_ROOM1", start="20261206090000", end="", performed_series="[]",
            created_at=now, updated_at=now))
    upgrade_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(StudyOrderLink.__table__)).scalar() == 1
        assert conn.execute(select(Order.__table__.c.step_id)).scalars().all() == ["OLD001"]
    service = OrderService(engine)
    old = service.get("OLD001")
    assert old is not None and old["status"] == "IN PROGRESS" and [s["step_id"] for s in old["steps"]] == ["OLD001"]
    # Its performed step completes it, as before the upgrade.
    done = service.record_step("1.2.826.0.1.3680043.10.2", status="COMPLETED", end="20261206093000", create=False)
    assert done["status"] == "COMPLETED"
    patient_info = PatientInfo("BN800002", issuer="BVDK", name="Lê^Văn Mới")
    placed = service.place_steps([
        OrderInfo(patient=patient_info, accession_number="NEW001", step_id="NEW001-1", modality="CT"),
        OrderInfo(patient=patient_info, accession_number="NEW001", step_id="NEW001-2", modality="MR"),
    ])
    assert [s["modality"] for s in placed["steps"]] == ["CT", "MR"]
    try:
        service.place(OrderInfo(patient=patient_info, accession_number="NEW002", study_uid="1.2.826.0.1.3680043.10.1"))
        raise AssertionError("a study UID of another order was accepted")
    except OrderError as exc:
        assert exc.code == "205"
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for the pool


def test_upgrade_across_0016_keeps_a_single_step_order_sqlite(tmp_path: Path) -> None:
    from pacs.index import create_index_engine

    engine = create_index_engine(f"sqlite:///{tmp_path}/index.sqlite")
    try:
        _upgrade_keeps_a_single_step_order(engine)
    finally:
        engine.dispose()


def test_upgrade_across_0016_keeps_a_single_step_order_postgresql(pg_empty_url: str) -> None:
    from pacs.index import create_index_engine

    engine = create_index_engine(pg_empty_url)
    try:
        _upgrade_keeps_a_single_step_order(engine)
    finally:
        engine.dispose()


def test_an_hl7_change_and_a_group_mpps_in_opposite_order_do_not_deadlock(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: an XO of procedures A then B while a group N-SET names B
    then A. The MPPS now takes the HIS messages' per-accession locks, in the
    same sorted order; it took none, and one of the two failed with
    DeadlockDetected (an N-SET COMPLETED most modalities never resend).
    The pauses only force the interleaving."""
    import threading
    import time

    from pacs.index import create_index_engine, upgrade_schema
    from pacs.orders import OrderInfo, OrderService, PatientInfo

    engine = create_index_engine(pg_url)
    try:
        upgrade_schema(engine)
        service = OrderService(engine)
        patient = PatientInfo("BN900077", issuer="BVDK", name="Test^A")
        for accession in ("LKA", "LKB"):
            service.place_steps([OrderInfo(patient=patient, accession_number=accession, step_id=f"{accession}1",
                                           station_ae_title="CT_ROOM1", modality="CT")])
        sop = generate_uid()

        def mpps(status: str, create: bool) -> None:
            service.record_step(sop, status=status, scheduled=[("LKB", "", "LKB1"), ("LKA", "", "LKA1")] if create
                                else None, modality="CT", station_ae_title="CT_ROOM1", start="20261206090000",
                                end="" if create else "20261206100000", create=create)

        mpps("IN PROGRESS", True)
        change, move = OrderService._change, OrderService._move_step

        def slow_change(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = change(self, *args, **kwargs)
            time.sleep(1.0)
            return result

        def slow_move(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = move(self, *args, **kwargs)
            time.sleep(1.0)
            return result

        monkeypatch.setattr(OrderService, "_change", slow_change)
        monkeypatch.setattr(OrderService, "_move_step", slow_move)
        outcome: dict[str, str] = {}

        def run(name: str, job: Any, delay: float) -> None:
            time.sleep(delay)
            try:
                job()
                outcome[name] = "ok"
            except Exception as exc:  # what failed, for the assertion below
                outcome[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

        threads = [
            threading.Thread(target=run, args=("hl7", lambda: service.apply([
                ("change", OrderInfo(patient=patient, accession_number="LKA", step_id="LKA1", priority="STAT")),
                ("change", OrderInfo(patient=patient, accession_number="LKB", step_id="LKB1", priority="STAT"))]),
                0.0)),
            threading.Thread(target=run, args=("mpps", lambda: mpps("COMPLETED", False), 0.3)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcome == {"hl7": "ok", "mpps": "ok"}
        assert {service.get(a)["status"] for a in ("LKA", "LKB")} == {"COMPLETED"}
    finally:
        engine.dispose()
