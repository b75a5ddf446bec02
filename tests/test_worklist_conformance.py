"""Modality Worklist C-FIND and MPPS conformance (PS3.4 Annexes K and F),
from an exploratory comparison with DCMTK's wlmscpfs: every match answered
(no cap at 1,000), "*" as universal matching, SPS Status STARTED, optional
keys ignored for matching and returned, malformed dates and times refused,
MPPS without an Affected SOP Instance UID, DISCONTINUED steps putting the
order back on the worklist (IHE RAD-7), malformed MPPS dates refused,
sequence sub-keys and physician names matched without diacritics.

Everything goes over real sockets to one real `pacs serve` (SQLite) for the
module: pynetdicom and DCMTK findscu for the worklist, pynetdicom for MPPS,
HTTP and MLLP for the orders, and a stand-in HIS receiving the status
messages. Each test uses its own accessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder, wait_until
from .test_worklist_ris import _mpps_status, msa, orm, send, worklist

# Malformed DA/TM values are sent on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

PENDING = (0xFF00, 0xFF01)


@pytest.fixture(scope="module")
def his() -> Iterator[MLLPRecorder]:
    """The HIS: records the ORM^O01 status messages, answers AA."""
    recorder = MLLPRecorder(free_port())
    yield recorder
    recorder.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, his: MLLPRecorder) -> Iterator[PacsServer]:
    pacs = PacsServer(tmp_path_factory.mktemp("wlconf") / "data", Backend("sqlite", None, None, {}))
    pacs.extra_env["PACS_HIS_MLLP"] = f"127.0.0.1:{his.port}"
    pacs.start()
    yield pacs
    pacs.stop()


# -- helpers ------------------------------------------------------------------------------------
def place(server: PacsServer, accession: str, **fields: Any) -> dict[str, Any]:
    """An order over the JSON API (defaults: CT at CT_ROOM1, 5 Dec 2026 08:00)."""
    patient = {"id": fields.pop("pid", f"BN{accession}"), "issuer": "BVDK",
               "name": fields.pop("name", "Nguyễn^Văn An"), "birth_date": "19850101", "sex": "M"}
    body = {"patient": patient, "accession_number": accession, "modality": "CT", "station_ae_title": "CT_ROOM1",
            "start_date": "20261205", "start_time": "080000",
            "requested_procedure_description": "CT ngực không cản quang", **fields}
    with server.http() as http:
        created = http.post("/api/orders", json=body)
    assert created.status_code == 201, created.text
    return dict(created.json())


def order_status(server: PacsServer, accession: str) -> str:
    with server.http() as http:
        return str(http.get(f"/api/orders/{accession}").json()["status"])


def identifier(top: dict[str, Any] | None = None, step: dict[str, Any] | None = None) -> Dataset:
    """A worklist identifier: the keys given (None: a return key) plus an SPS item."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = ""
    ds.PatientName = ""
    for keyword, value in (top or {}).items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.ScheduledProcedureStepStatus = ""
    item.ScheduledProcedureStepStartDate = ""
    for keyword, value in (step or {}).items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


def find(server: PacsServer, ds: Dataset) -> tuple[int, list[Dataset]]:
    """C-FIND on the worklist with pynetdicom: the final status and the matches."""
    ae = AE(ae_title="CT_ROOM1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = 60
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
    assert assoc.is_established
    matches: list[Dataset] = []
    final = -1
    try:
        for status, found in assoc.send_c_find(ds, ModalityWorklistInformationFind):
            code = int(status.Status)
            if code in PENDING:
                matches.append(found)
            else:
                final = code
    finally:
        assoc.release()
    return final, matches


def accessions(matches: list[Dataset]) -> list[str]:
    return sorted(str(m.AccessionNumber) for m in matches)


def pps(order: dict[str, Any], **values: str) -> Dataset:
    """An MPPS N-CREATE attribute list performing *order*."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedStationAETitle = "CT_ROOM1"
    ds.PerformedProcedureStepStartDate = "20261205"
    ds.PerformedProcedureStepStartTime = "081000"
    ds.PerformedProcedureStepID = f"PPS{order['accession_number']}"
    item = Dataset()
    item.AccessionNumber = order["accession_number"]
    item.StudyInstanceUID = order["study_uid"]
    item.ScheduledProcedureStepID = order["step_id"]
    ds.ScheduledStepAttributesSequence = Sequence([item])
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def final(status: str, end_date: str = "20261205", end_time: str = "083000") -> Dataset:
    """An N-SET ending the step (COMPLETED or DISCONTINUED)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = end_date
    ds.PerformedProcedureStepEndTime = end_time
    return ds


def n_create(server: PacsServer, uid: str, attributes: Dataset) -> int:
    return int(_mpps_status(server, uid, attributes, create=True).Status)


def n_set(server: PacsServer, uid: str, attributes: Dataset) -> int:
    return int(_mpps_status(server, uid, attributes, create=False).Status)


def his_statuses(his: MLLPRecorder, accession: str) -> list[str]:
    """ORC-5 of each status message the HIS received about *accession*
    (OBR-18), in the order received."""
    out = []
    for message in list(his.messages):
        segments = {s.split("|")[0]: s.split("|") for s in message.decode("utf-8").split("\r") if s}
        orc, obr = segments.get("ORC"), segments.get("OBR")
        if orc and obr and len(obr) > 18 and obr[18] == accession and orc[1] == "SC":
            out.append(orc[5])
    return out


# -- 1. every match, streamed -----------------------------------------------------------------
def test_worklist_answers_every_match_beyond_1000(server: PacsServer) -> None:
    """It answered at most 1,000 items and then said Success."""
    from pacs.orders import OrderInfo, OrderService, PatientInfo

    core = server.core()
    try:
        patient = PatientInfo("BNBULK", issuer="BVDK", name="Trần^Thị Bích Ngọc", birth_date="19900101", sex="F")
        # Few distinct dates and times: most rows tie on them, and pages split
        # inside a tie (keyset on date, time and pk).
        OrderService(core.engine).apply([
            ("place", OrderInfo(patient=patient, accession_number=f"BK{n:04d}", modality="OT",
                                station_ae_title="BULK_AE", start_date=f"2026120{1 + n % 3}",
                                start_time=("0800", "093000")[n % 2]))
            for n in range(1100)
        ])
    finally:
        core.close()
    status, matches = find(server, identifier({"AccessionNumber": "BK*"},
                                              {"Modality": "OT", "ScheduledStationAETitle": "BULK_AE",
                                               "ScheduledProcedureStepStartTime": ""}))
    assert status == 0x0000
    found = [str(m.AccessionNumber) for m in matches]
    assert len(found) == 1100  # was 1,000: those scheduled latest were never offered
    assert set(found) == {f"BK{n:04d}" for n in range(1100)}
    # Soonest first.
    when = [(m.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate,
             m.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime) for m in matches]
    assert when == sorted(when)


# -- 2. "*" is universal matching; STARTED ------------------------------------------------------
def test_star_status_is_universal_and_in_progress_is_started(server: PacsServer) -> None:
    place(server, "ST2A")
    started, completed = place(server, "ST2B"), place(server, "ST2C")
    place(server, "ST2D")
    with server.http() as http:
        assert http.delete("/api/orders/ST2D").status_code == 200  # cancelled
    assert n_create(server, generate_uid(), pps(started)) == 0
    done = generate_uid()
    assert n_create(server, done, pps(completed)) == 0
    assert n_set(server, done, final("COMPLETED")) == 0

    def query(status: str) -> dict[str, str]:
        code, matches = find(server, identifier({"AccessionNumber": "ST2*"}, {"ScheduledProcedureStepStatus": status}))
        assert code == 0
        return {str(m.AccessionNumber): str(m.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus)
                for m in matches}

    active = {"ST2A": "SCHEDULED", "ST2B": "STARTED"}
    assert query("*") == active  # "*" switched the "active steps only" default off
    assert query("") == active
    assert query("STARTED") == {"ST2B": "STARTED"}  # found nothing
    assert query("IN PROGRESS") == {"ST2B": "STARTED"}  # still accepted
    assert query("SCHEDULED\\STARTED") == active
    assert query("COMPLETED") == {"ST2C": "COMPLETED"}  # asked for by name
    # "*" on any other key is universal too.
    code, matches = find(server, identifier({"AccessionNumber": "ST2*", "PatientID": "*"}, {"Modality": "*"}))
    assert (code, accessions(matches)) == (0, ["ST2A", "ST2B"])


# -- 3. optional keys ignored for matching, returned ------------------------------------------
OPTIONAL_KEYS = [
    pytest.param({"RequestedProcedureDescription": "*"}, {}, id="RequestedProcedureDescription=*"),
    pytest.param({"RequestedProcedureDescription": "MRI*"}, {}, id="RequestedProcedureDescription=MRI*"),
    pytest.param({}, {"ScheduledProcedureStepDescription": "*"}, id="ScheduledProcedureStepDescription=*"),
    pytest.param({}, {"ScheduledProcedureStepDescription": "MRI*"}, id="ScheduledProcedureStepDescription=MRI*"),
    pytest.param({"MedicalAlerts": "PENICILLIN"}, {}, id="MedicalAlerts"),
    pytest.param({"AdmissionID": "ADM1"}, {}, id="AdmissionID"),
    pytest.param({"PatientWeight": "70"}, {}, id="PatientWeight"),
    pytest.param({"InstitutionName": "BV*"}, {}, id="InstitutionName"),
    pytest.param({"StudyDate": "20261205"}, {}, id="StudyDate"),
    pytest.param({"PatientAge": "030Y"}, {}, id="PatientAge"),
    pytest.param({"PatientComments": "x"}, {}, id="PatientComments"),
    pytest.param({"QueryRetrieveLevel": "WORKLIST"}, {}, id="QueryRetrieveLevel"),
]


@pytest.fixture(scope="module")
def optional_order(server: PacsServer) -> dict[str, Any]:
    return place(server, "OPT3A")


@pytest.mark.parametrize(("top", "step"), OPTIONAL_KEYS)
def test_optional_keys_are_ignored_for_matching_and_returned(
    server: PacsServer, optional_order: dict[str, Any], top: dict[str, str], step: dict[str, str]
) -> None:
    """They made the whole query fail with 0xA900."""
    code, matches = find(server, identifier({"AccessionNumber": "OPT3A", **top}, step))
    assert (code, accessions(matches)) == (0, ["OPT3A"])
    item = matches[0]
    sps = item.ScheduledProcedureStepSequence[0]
    for keyword in top:
        assert keyword in item
    for keyword in step:
        assert keyword in sps
    if "RequestedProcedureDescription" in top:
        assert item.RequestedProcedureDescription == "CT ngực không cản quang"  # what we know, returned
    if "MedicalAlerts" in top:
        assert item.MedicalAlerts == ""  # unknown: zero length
    logged = [k for k, v in {**top, **step}.items() if v != "*" and k != "QueryRetrieveLevel"]
    for keyword in logged:
        assert wait_until(lambda: f"not used for matching: {keyword}" in server.log_text(), timeout=10)


# -- 4. malformed dates and times refused ------------------------------------------------------
MALFORMED = [
    ({}, {"ScheduledProcedureStepStartDate": "2026-12-05"}),
    ({}, {"ScheduledProcedureStepStartDate": "20261305"}),
    ({}, {"ScheduledProcedureStepStartDate": "TODAY"}),
    ({}, {"ScheduledProcedureStepStartDate": "2026120"}),
    ({}, {"ScheduledProcedureStepStartDate": "2026*"}),
    ({}, {"ScheduledProcedureStepStartTime": "25"}),
    ({}, {"ScheduledProcedureStepStartTime": "2400"}),
    ({}, {"ScheduledProcedureStepStartTime": "08:00-12:00"}),
    ({}, {"ScheduledProcedureStepStartTime": "1-"}),
    ({"PatientBirthDate": "19850230"}, {}),
]


def test_malformed_dates_and_times_are_refused(server: PacsServer, tmp_path: Path) -> None:
    """They were matched (no or every item) and answered Success; refused
    0xA900 now, as the Q/R C-FIND refuses them (one shared check)."""
    answered = {f"{top}{step}": find(server, identifier({"AccessionNumber": "DT4*", **top}, step))
                for top, step in MALFORMED}
    assert answered == {keys: (0xA900, []) for keys in answered}
    # Well-formed values and ranges (and "*") still match.
    place(server, "DT4A", start_date="20261207", start_time="101500")
    for date, time in (("20261207", "1015"), ("20261206-20261207", "1000-1100"), ("*", "101500"), ("20261207", "*")):
        found = worklist(server, tmp_path, "AccessionNumber=DT4*",
                         f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={date}",
                         f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime={time}")
        assert [str(i.AccessionNumber) for i in found] == ["DT4A"], (date, time)


# -- 5. MPPS N-CREATE without an Affected SOP Instance UID -----------------------------------
def _create_without_uid(server: PacsServer, attributes: Dataset) -> tuple[int, str | None]:
    """N-CREATE with no Affected SOP Instance UID: the status and the UID the
    response carries (read from the N-CREATE-RSP command set on the wire)."""
    answered: list[str | None] = []

    def received(event: Any) -> None:
        command = event.message.command_set
        if int(command.CommandField) == 0x8140:  # N-CREATE-RSP
            answered.append(str(command.AffectedSOPInstanceUID) if "AffectedSOPInstanceUID" in command else None)

    ae = AE(ae_title="CT_ROOM1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title,
                         evt_handlers=[(evt.EVT_DIMSE_RECV, received)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(attributes, ModalityPerformedProcedureStep, None)
    finally:
        assoc.release()
    return int(status.Status), answered[0] if answered else None


def test_mpps_create_without_instance_uid_gets_one(server: PacsServer) -> None:
    """The step was recorded under "" (order IN PROGRESS, HIS told), the
    answer was 0110H, and the next such N-CREATE was refused 0111H."""
    first, second = place(server, "NU5A"), place(server, "NU5B")
    code, uid = _create_without_uid(server, pps(first))
    assert code == 0x0000 and uid
    assert order_status(server, "NU5A") == "IN PROGRESS"
    code, other = _create_without_uid(server, pps(second))
    assert code == 0x0000 and other and other != uid
    # The modality goes on with the UID it was given.
    assert n_set(server, uid, final("COMPLETED")) == 0x0000
    assert order_status(server, "NU5A") == "COMPLETED"
    assert order_status(server, "NU5B") == "IN PROGRESS"


# -- 6. DISCONTINUED puts the order back on the worklist (IHE RAD-7) --------------------------
def test_discontinued_step_returns_the_order_to_the_worklist(
    server: PacsServer, his: MLLPRecorder, tmp_path: Path
) -> None:
    """It took the order off the worklist for good and the HIS could not change it."""
    assert msa(send(server, orm("DC6A1", "DC6A", pid="BN700601")))[0] == "AA"
    with server.http() as http:
        placed = http.get("/api/orders/DC6A").json()
    uid = generate_uid()
    assert n_create(server, uid, pps(placed)) == 0
    assert order_status(server, "DC6A") == "IN PROGRESS"
    wrong_entry = final("DISCONTINUED")
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator = "110514", "DCM"
    reason.CodeMeaning = "Incorrect worklist entry selected"
    wrong_entry.PerformedProcedureStepDiscontinuationReasonCodeSequence = Sequence([reason])
    assert n_set(server, uid, wrong_entry) == 0
    assert order_status(server, "DC6A") == "SCHEDULED"
    items = worklist(server, tmp_path, "AccessionNumber=DC6A", "ScheduledProcedureStepSequence[0].Modality",
                     "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus")
    assert [str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus) for i in items] == ["SCHEDULED"]
    # The HIS may change it again (was AE 207), and is told the order waits again: ORC-5 SC.
    assert msa(send(server, orm("DC6A2", "DC6A", pid="BN700601", order_control="XO")))[0] == "AA"
    assert wait_until(lambda: len(his_statuses(his, "DC6A")) >= 2, timeout=30)
    assert his_statuses(his, "DC6A") == ["IP", "SC"]
    # Performed again, for real this time.
    again = generate_uid()
    assert n_create(server, again, pps(placed)) == 0
    assert n_set(server, again, final("COMPLETED")) == 0
    assert order_status(server, "DC6A") == "COMPLETED"


def test_discontinuing_one_of_two_steps_leaves_the_order_in_progress(server: PacsServer, his: MLLPRecorder) -> None:
    """Discontinuing one set the order DC while the other ran; the second
    N-CREATE told the HIS IP twice."""
    placed = place(server, "DC6B")
    running, wrong = generate_uid(), generate_uid()
    assert n_create(server, running, pps(placed)) == 0
    assert n_create(server, wrong, pps(placed, PerformedProcedureStepID="PPSDC6B2")) == 0
    assert n_set(server, wrong, final("DISCONTINUED")) == 0
    assert order_status(server, "DC6B") == "IN PROGRESS"
    assert n_set(server, running, final("COMPLETED")) == 0
    assert order_status(server, "DC6B") == "COMPLETED"
    assert wait_until(lambda: "CM" in his_statuses(his, "DC6B"), timeout=30)
    assert his_statuses(his, "DC6B") == ["IP", "CM"]


# -- 7. malformed MPPS dates and times: 0106H, nothing changed --------------------------------
def test_mpps_malformed_dates_and_times_are_refused(server: PacsServer) -> None:
    """N-SET COMPLETED with End Date 2026-12-05 or End Time 9:30 was accepted."""
    placed = place(server, "BD7A")
    refused = generate_uid()
    assert n_create(server, refused, pps(placed, PerformedProcedureStepStartDate="2026-12-05")) == 0x0106
    assert n_create(server, generate_uid(), pps(placed, PerformedProcedureStepStartTime="8:10")) == 0x0106
    assert order_status(server, "BD7A") == "SCHEDULED"
    assert n_set(server, refused, final("COMPLETED")) == 0x0112  # never created
    uid = generate_uid()
    assert n_create(server, uid, pps(placed)) == 0
    status = _mpps_status(server, uid, final("COMPLETED", end_date="2026-12-05"), create=False)
    assert int(status.Status) == 0x0106 and "PerformedProcedureStepEndDate" in status.ErrorComment
    assert n_set(server, uid, final("COMPLETED", end_time="9:30")) == 0x0106
    assert n_set(server, uid, final("DISCONTINUED", end_date="20261305")) == 0x0106
    assert order_status(server, "BD7A") == "IN PROGRESS"
    assert n_set(server, uid, final("COMPLETED")) == 0  # the step was still open
    assert order_status(server, "BD7A") == "COMPLETED"


# -- 8. sequence sub-keys; physician names without case and diacritics ------------------------
def test_sequence_items_return_the_keys_asked_for(server: PacsServer) -> None:
    place(server, "SQ8A", procedure_code="MR-GOI", procedure_code_scheme="L", procedure_code_meaning="MRI khớp gối")
    code_value_only = Dataset()
    code_value_only.CodeValue = ""
    code, matches = find(server, identifier({"AccessionNumber": "SQ8A",
                                             "RequestedProcedureCodeSequence": Sequence([code_value_only])}))
    assert code == 0
    items = matches[0].RequestedProcedureCodeSequence
    assert [sorted(e.keyword for e in item) for item in items] == [["CodeValue"]]
    assert items[0].CodeValue == "MR-GOI"
    # An empty sequence asks for the items whole.
    code, matches = find(server, identifier({"AccessionNumber": "SQ8A", "RequestedProcedureCodeSequence": Sequence()}))
    item = matches[0].RequestedProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == ("MR-GOI", "L", "MRI khớp gối")


def test_physician_names_match_without_case_and_diacritics(server: PacsServer) -> None:
    place(server, "PH8A", referring_physician="Đỗ^Thanh Tùng", performing_physician="Bùi^Văn Kỹ")
    for top, step in (({"ReferringPhysicianName": "DO^THANH TUNG"}, {}),
                      ({"ReferringPhysicianName": "đỗ thanh*"}, {}),
                      ({"ReferringPhysicianName": "Đỗ^Thanh Tùng"}, {}),
                      ({}, {"ScheduledPerformingPhysicianName": "bui*"}),
                      ({}, {"ScheduledPerformingPhysicianName": "BUI^VAN KY"})):
        code, matches = find(server, identifier({"AccessionNumber": "PH8A", **top}, step))
        assert (code, accessions(matches)) == (0, ["PH8A"]), (top, step)
        assert str(matches[0].PatientName) == "Nguyễn^Văn An"
    for top, step in (({"ReferringPhysicianName": "Trần*"}, {}), ({}, {"ScheduledPerformingPhysicianName": "DO*"})):
        assert find(server, identifier({"AccessionNumber": "PH8A", **top}, step)) == (0, [])
    # A name with ideographic or phonetic groups is found by one group alone, as patient names are.
    place(server, "PH8B", referring_physician="Trần^Văn Bình=ちば^ていこ")
    for value in ("TRAN^VAN BINH", "tran van binh", "Trần*", "ちば^ていこ"):
        code, matches = find(server, identifier({"AccessionNumber": "PH8B", "ReferringPhysicianName": value}))
        assert (code, accessions(matches)) == (0, ["PH8B"]), value
    assert find(server, identifier({"AccessionNumber": "PH8B", "ReferringPhysicianName": "NGUYEN*"})) == (0, [])


# -- 9. End Date and End Time in different N-SETs ------------------------------------------------
def test_mpps_end_date_and_time_sent_in_different_n_sets(server: PacsServer) -> None:
    """A modality sending the End Date in one N-SET and the End Time with
    COMPLETED: the time replaced the date stored, the COMPLETED was refused
    0110H for a missing End Date and the step stayed IN PROGRESS. Each is now
    kept beside the other; the other order too."""
    for accession, first, then in (("ED12A", "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"),
                                   ("ED12B", "PerformedProcedureStepEndTime", "PerformedProcedureStepEndDate")):
        placed = place(server, accession)
        uid = generate_uid()
        assert n_create(server, uid, pps(placed)) == 0
        ending = final("COMPLETED")
        partial = Dataset()
        setattr(partial, first, ending[first].value)
        assert n_set(server, uid, partial) == 0
        closing = Dataset()
        closing.PerformedProcedureStepStatus = "COMPLETED"
        setattr(closing, then, ending[then].value)
        assert n_set(server, uid, closing) == 0, accession
        assert order_status(server, accession) == "COMPLETED"
    # One of the two never sent: still refused, the step open.
    placed = place(server, "ED12C")
    uid = generate_uid()
    assert n_create(server, uid, pps(placed)) == 0
    time_only = Dataset()
    time_only.PerformedProcedureStepStatus = "COMPLETED"
    time_only.PerformedProcedureStepEndTime = "093000.1"  # eight characters, no date
    assert n_set(server, uid, time_only) == 0x0110
    assert order_status(server, "ED12C") == "IN PROGRESS"
