"""Orders and reconciliation that were wrong (a review of the HIS side):

1. a new order took an unrelated OLD study sharing only its accession number
   (migrated from the old PACS, whose counter the new HIS repeats) and
   refiled it under the order's patient; the ingest did the same for a study
   arriving after the order. The accession alone now links a study only
   when its patient or its date fits the order; otherwise it stays where it
   was and `pacs orders unmatched` says why (IHE PIR). The emergency study
   under a temporary ID is still reconciled;
2. an exam done before its order (MPPS naming the accession, completed)
   was ignored by the order placed later: SCHEDULED on the worklist for
   ever, the HIS never told IP / CM. The order now adopts the step;
3. a CA of ORC alone (ORC-2 placer, ORC-3 filler, no OBR) was refused AE
   204: the filler number was taken for the accession;
4. one ORC with two OBRs: the second exam was dropped and AA answered;
5. worklist values that broke their types: a date-only schedule had an
   empty start time, impossible dates and times were accepted, descriptions
   longer than LO's 64 characters were served whole.

Everything over real sockets to a real `pacs serve` per index backend:
MLLP (python-hl7) for the HIS, DCMTK storescu / findscu, pynetdicom for
MPPS, HTTP for the JSON API, a stand-in HIS recording status messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .dicomfiles import make_ct
from .peers import create_database, drop_database, serving_with_his, wait_until
from .test_order_edges import queued_statuses
from .test_order_steps import completed, order, pps
from .test_worklist_conformance import his_statuses
from .test_worklist_ris import _cfind_names, _mpps_status, send, worklist

SPS = "ScheduledProcedureStepSequence[0]"


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """One server per index backend with a stand-in HIS (``server.his``); each test its own accessions."""
    pg = create_database() if request.param == "pg" else None
    his_port = free_port()
    pacs = PacsServer(tmp_path_factory.mktemp("review") / "data", Backend(request.param, pg, None, {}),
                      extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}"})
    with serving_with_his(pacs, his_port, ("bs.lan", "Phạm^Thị Lan")) as serving:
        yield serving
    if pg:
        drop_database(pg)


def header(control: str) -> str:
    return f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261205083000||ORM^O01|{control}|P|2.5|||||VN|UNICODE UTF-8"


def nw(control: str, accession: str, *, pid: str = "001085012345", name: str = "Trịnh^Thị Mới",
       when: str | None = None, description: str = "CT ngực") -> str:
    """An ORM^O01 NW of one ORC/OBR: ORC-2/ORC-3 P<acc>/F<acc>, OBR-18 the
    accession, scheduled *when* (OBR-27.4; default now)."""
    when = when or datetime.now().strftime("%Y%m%d%H%M%S")
    return "\n".join([
        header(control), f"PID|1||{pid}^^^CCCD^NI||{name}||19850101|F", "PV1|1|O||||||BS001^Đỗ^Thanh Tùng",
        f"ORC|NW|P{accession}|F{accession}||SC",
        f"OBR|1|P{accession}|F{accession}|CT-NGUC^{description}^L|||{when}|||||||||||{accession}|RP{accession}|"
        f"SPS{accession}||||CT|||^^^{when}^^R",
    ])


def ack(server: PacsServer, message: str) -> tuple[str, str, str]:
    """(MSA-1, ERR-3 code, MSA-3 text) of the ACK to *message*."""
    reply = send(server, message).replace("\n", "\r").split("\r")
    msa_line = next(s for s in reply if s.startswith("MSA")).split("|")
    err = next((s.split("|") for s in reply if s.startswith("ERR")), [])
    return msa_line[1], (err[3].split("^")[0] if len(err) > 3 else ""), (msa_line[3] if len(msa_line) > 3 else "")


def store(server: PacsServer, path: Path) -> str:
    assert server.storescu(str(path)).returncode == 0
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def unmatched(server: PacsServer) -> dict[str, dict[str, str]]:
    rows = json.loads(server.cli("orders", "unmatched", "--json", "--limit", "1000").stdout)
    return {row["study_uid"]: row for row in rows}


# -- 1. the accession alone is no proof ----------------------------------------------------------
def test_an_old_study_sharing_only_its_accession_stays_with_its_patient(server: PacsServer, tmp_path: Path) -> None:
    old = store(server, make_ct(tmp_path / "old.dcm", PatientID="OLD-A-778", PatientName="Bui^Van Old",
                                StudyDate="20190314", AccessionNumber="RV1001"))
    assert ack(server, nw("RV1", "RV1001", pid="NEW-B-555"))[0] == "AA"
    assert _cfind_names(server, StudyInstanceUID=old) == [("Bui^Van Old", "OLD-A-778", old)]
    reason = unmatched(server)[old]["reason"]
    assert "RV1001" in reason and "20190314" in reason and "pacs orders match" in reason
    # A person who decides it is that exam still links it by hand.
    server.cli("orders", "match", old, "RV1001")
    assert _cfind_names(server, StudyInstanceUID=old) == [("Trịnh^Thị Mới", "NEW-B-555", old)]


def test_an_old_study_arriving_after_an_order_with_its_accession_is_not_filed_under_it(
        server: PacsServer, tmp_path: Path) -> None:
    assert ack(server, nw("RV2", "RV1002", pid="NEW-C-556"))[0] == "AA"
    old = store(server, make_ct(tmp_path / "old2.dcm", PatientID="OLD-D-779", PatientName="Le^Van Cu",
                                StudyDate="20180102", AccessionNumber="RV1002"))
    assert _cfind_names(server, StudyInstanceUID=old) == [("Le^Van Cu", "OLD-D-779", old)]
    assert "RV1002" in unmatched(server)[old]["reason"]


def test_a_plausible_accession_match_is_still_reconciled(server: PacsServer, tmp_path: Path) -> None:
    """The emergency exam under a temporary ID, done today, and an old study
    of the order's own patient: both are the order's."""
    today = datetime.now().strftime("%Y%m%d")
    emergency = store(server, make_ct(tmp_path / "er.dcm", PatientID="TEMP-RV3", PatientName="CAP^CUU",
                                      StudyDate=today, AccessionNumber="RV1003"))
    assert ack(server, nw("RV3", "RV1003", pid="BN-RV3", name="Hồ^Văn Ba"))[0] == "AA"
    assert _cfind_names(server, StudyInstanceUID=emergency) == [("Hồ^Văn Ba", "BN-RV3", emergency)]
    own = store(server, make_ct(tmp_path / "own.dcm", PatientID="BN-RV4", PatientName="HO^VAN BON",
                                StudyDate="20190101", AccessionNumber="RV1004"))
    assert ack(server, nw("RV4", "RV1004", pid="BN-RV4", name="Hồ^Văn Bốn"))[0] == "AA"
    assert _cfind_names(server, StudyInstanceUID=own) == [("Hồ^Văn Bốn", "BN-RV4", own)]
    assert emergency not in unmatched(server) and own not in unmatched(server)


# -- 2. an exam done before its order --------------------------------------------------------------
def test_an_exam_performed_before_its_order_is_taken_by_the_order(server: PacsServer, tmp_path: Path) -> None:
    study_uid = generate_uid()
    step = generate_uid()
    create = pps("RV2001", study_uid)
    create.PerformedProcedureStepStartDate = datetime.now().strftime("%Y%m%d")
    assert int(_mpps_status(server, step, create, create=True).Status) == 0
    store(server, make_ct(tmp_path / "emg.dcm", PatientID="BN-RV21", PatientName="LY^VAN H", AccessionNumber="RV2001",
                          StudyInstanceUID=study_uid))
    assert int(_mpps_status(server, step, completed(), create=False).Status) == 0
    assert ack(server, nw("RV21", "RV2001", pid="BN-RV21", name="Lý^Văn H"))[0] == "AA"
    assert order(server, "RV2001")["status"] == "COMPLETED"
    found = worklist(server, tmp_path, "AccessionNumber=RV2001", f"{SPS}.ScheduledProcedureStepStatus")
    assert found == []  # no longer offered for imaging
    assert queued_statuses(server, "RV2001") == ["IN PROGRESS", "COMPLETED"]
    assert wait_until(lambda: his_statuses(server.his, "RV2001") == ["IP", "CM"], timeout=30)  # type: ignore[attr-defined]
    # One still in progress: the order is IN PROGRESS, the HIS told IP.
    running = generate_uid()
    create = pps("RV2002", generate_uid())
    create.PerformedProcedureStepStartDate = datetime.now().strftime("%Y%m%d")
    assert int(_mpps_status(server, running, create, create=True).Status) == 0
    assert ack(server, nw("RV22", "RV2002", pid="BN-RV22"))[0] == "AA"
    assert order(server, "RV2002")["status"] == "IN PROGRESS"
    assert queued_statuses(server, "RV2002") == ["IN PROGRESS"]
    assert int(_mpps_status(server, running, completed(), create=False).Status) == 0
    assert order(server, "RV2002")["status"] == "COMPLETED"


# -- 3. a withdrawal of ORC alone ----------------------------------------------------------------
def test_a_cancel_of_orc_alone_finds_its_order_by_its_order_numbers(server: PacsServer) -> None:
    pid = "PID|1||BN-RV31^^^CCCD^NI||Đặng^Văn G||19850101|M"
    for n, accession in enumerate(("RV3001", "RV3002", "RV3003")):
        assert ack(server, nw(f"RV3{n}", accession, pid="BN-RV31"))[0] == "AA"
    # ORC-2 and ORC-3 as in the NW, no OBR: AA, and the order leaves the worklist.
    assert ack(server, "\n".join([header("RV35"), pid, "ORC|CA|PRV3001|FRV3001||CA"]))[0] == "AA"
    assert order(server, "RV3001")["status"] == "CANCELLED"
    assert ack(server, "\n".join([header("RV36"), pid, "ORC|CA|PRV3002|||CA"]))[0] == "AA"  # placer alone
    assert order(server, "RV3002")["status"] == "CANCELLED"
    assert ack(server, "\n".join([header("RV37"), pid, "ORC|DC||FRV3003||CA"]))[0] == "AA"  # filler alone
    assert order(server, "RV3003")["status"] == "DISCONTINUED"
    assert ack(server, "\n".join([header("RV38"), pid, "ORC|CA|PNONE|FNONE||CA"]))[:2] == ("AE", "204")


# -- 4. one ORC, two OBRs ------------------------------------------------------------------------
def test_one_orc_with_two_obr_is_refused_whole(server: PacsServer, tmp_path: Path) -> None:
    message = "\n".join([
        header("RV41"), "PID|1||BN-RV41^^^CCCD^NI||Võ^Thị F||19700101|F", "PV1|1|O", "ORC|NW|PRV41|FRV41||SC",
        "OBR|1|PRV4001|FRV4001|CT-NGUC^CT ngực^L||||||||||||||RV4001|RPRV4001|SPSRV4001||||CT|||^^^20261205100000^^R",
        "OBR|2|PRV4002|FRV4002|XQ-PHOI^X quang^L||||||||||||||RV4002|RPRV4002|SPSRV4002||||DX|||^^^20261205103000^^R",
    ])
    code, error, text = ack(server, message)
    assert (code, error) == ("AE", "100") and "OBR" in text
    assert worklist(server, tmp_path, "AccessionNumber=RV400*") == []


# -- 5. worklist values that fit their types -------------------------------------------------------
def test_a_date_only_schedule_gets_a_start_time_the_modality_can_query(server: PacsServer, tmp_path: Path) -> None:
    assert ack(server, nw("RV51", "RV5001", when="20261207"))[0] == "AA"
    assert ack(server, nw("RV53", "RV5003", when="2026120709"))[0] == "AA"  # an hour alone: its start
    with server.http() as http:
        created = http.post("/api/orders", json={"patient": {"id": "BN-RV52", "name": "Hoàng^Văn E"},
                                                 "accession_number": "RV5002", "modality": "CT",
                                                 "start_date": "20261207"})
        assert created.status_code == 201, created.text
    keys = [f"{SPS}.ScheduledProcedureStepStartDate=20261207", f"{SPS}.ScheduledProcedureStepStartTime=0000-2359"]
    found = worklist(server, tmp_path, "AccessionNumber=RV500*", *keys)
    assert sorted((str(i.AccessionNumber), str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime))
                  for i in found) == [("RV5001", "000000"), ("RV5002", "000000"), ("RV5003", "0900")]


def test_impossible_dates_and_times_are_refused(server: PacsServer, tmp_path: Path) -> None:
    for n, when in enumerate(("20261345250000", "20261205250000", "20261231236100")):
        assert ack(server, nw(f"RV6{n}", f"RV600{n}", when=when))[:2] == ("AE", "102"), when
    with server.http() as http:
        for n, (date, time_) in enumerate((("20261399", "1000"), ("20261205", "123"), ("20261205", "250000"),
                                           ("20260230", ""))):
            refused = http.post("/api/orders", json={"patient": {"id": "BN-RV6"}, "accession_number": f"RV61{n}",
                                                     "modality": "CT", "start_date": date, "start_time": time_})
            assert refused.status_code == 422, (date, time_, refused.text)
    assert worklist(server, tmp_path, "AccessionNumber=RV6*") == []


def test_descriptions_longer_than_lo_are_served_cut(server: PacsServer, tmp_path: Path) -> None:
    """Cut to LO's 64 characters (63 when the padding space would make a 65th)."""
    description = "CT ngực bụng chậu có tiêm thuốc cản quang đa dãy 128 lát cắt dựng hình 3D mạch máu"
    assert len(description) > 64
    assert ack(server, nw("RV71", "RV7001", description=description))[0] == "AA"
    found = worklist(server, tmp_path, "AccessionNumber=RV7001", "RequestedProcedureDescription",
                     f"{SPS}.ScheduledProcedureStepDescription")
    served = [(str(i.RequestedProcedureDescription), str(i.ScheduledProcedureStepSequence[0]
                                                         .ScheduledProcedureStepDescription)) for i in found]
    assert len(served) == 1 and all(description.startswith(d) and 60 <= len(d) <= 64 for d in served[0]), served
    assert order(server, "RV7001")["requested_procedure_description"] == description  # kept whole
