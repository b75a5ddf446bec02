"""Audit coverage review fixes, against real peers: a running `pacs serve`
(httpx for the JSON orders API and reports, pynetdicom for MPPS), `pacs`
commands run as `sudo -u` would run them (SUDO_USER set), a second `pacs
serve` as the remote PACS of `pacs remote get/move/pull`, and a stand-in HIS
over MLLP that answers what each test tells it.

4. The JSON orders API named neither the patient nor the study of an order
   it created, changed (its patient's name too), cancelled or showed, nor
   the patients `GET /api/studies/unmatched` listed: `pacs audit --patient`
   did not find them, as it finds the same order sent over HL7.
6. CLI commands that read, copy or change patient data or security settings
   wrote no event: `pacs audit`, `orders unmatched/match`, `ae add/remove`,
   `route add/remove`, `import`, `migrate --to`, `db copy`, `remote
   move/get`; `remote pull` named no person.
9. What went to the HIS (ORU^R01 with a signed report, ORM^O01 order
   status) was not audited: now once per message, when the HIS acknowledged
   it or when it was parked dead, never per try.
"""

from __future__ import annotations

import contextlib
import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .peers import wait_until
from .qr_corpus import study_uid, write_corpus
from .test_dimse_failures import make_ct
from .test_outbox_delivery import ScriptedHIS, _sign
from .test_worklist_ris import _mpps

ALICE = f"alice (as {getpass.getuser()})"
ROOT = "1.2.826.0.1.3680043.9.7134.93"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """A server with the QR corpus, a stand-in HIS (``archive.his``, AA to
    everything unless a test says otherwise) and a token per role."""
    work = tmp_path_factory.mktemp("audit-coverage")
    his_port = free_port()
    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HIS_RETRY_SECONDS": "0.1"})
    write_corpus(work / "corpus")
    server.cli("import", str(work / "corpus"))
    server.start()
    his = ScriptedHIS(his_port)
    server.his = his  # type: ignore[attr-defined]
    server.radiologist = server.make_token("bs.tung", "radiologist", "Đỗ^Thanh Tùng")  # type: ignore[attr-defined]
    server.his_token = server.make_token("his1", "his")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        his.stop()
        server.stop()


def trail(server: PacsServer) -> list[dict[str, Any]]:
    """Every audit event, oldest first (the server's buffer written first)."""
    with server.http() as http:
        response = http.get("/api/audit", params={"limit": 10000})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()))


def since(server: PacsServer, pk: int) -> list[dict[str, Any]]:
    """The events after *pk*, but the reads of the trail by this test."""
    return [e for e in trail(server) if e["pk"] > pk and not e["detail"].startswith("/api/audit")]


def last_pk(server: PacsServer) -> int:
    return max((e["pk"] for e in trail(server)), default=0)


def cli_trail(server: PacsServer, *args: str) -> list[dict[str, Any]]:
    """What `pacs audit --format json *args` prints, oldest first."""
    return list(reversed(json.loads(server.cli("audit", "--format", "json", "--limit", "10000", *args).stdout)))


# -- 4. the JSON orders API ---------------------------------------------------------------------------
def test_json_orders_api_names_the_patient_and_study_of_each_order(archive: PacsServer) -> None:
    """An order placed, changed (the patient's name with it), read, refused
    and cancelled over /api/orders is found by `pacs audit --patient` and
    `--study`, each event naming the order's study and its patient as
    ID^^^issuer; the unmatched list names the patients it showed."""
    server = archive
    body = {"patient": {"id": "079555000777", "name": "Võ^Thị Mai", "issuer": "CCCD"},
            "accession_number": "AUD-1", "modality": "CT"}
    start = last_pk(server)
    with server.http(server.his_token) as his, server.http(server.radiologist) as rad:  # type: ignore[attr-defined]
        placed = his.post("/api/orders", json=body)
        assert placed.status_code == 201, placed.text
        order_study = placed.json()["study_uid"]
        assert his.post("/api/orders", json=body).status_code == 409  # refused: it exists
        body["patient"]["name"] = "Võ^Thị Mai Changed"
        assert his.put("/api/orders/AUD-1", json=body).status_code == 200
        assert rad.get("/api/orders/AUD-1").status_code == 200
        assert his.delete("/api/orders/AUD-1").status_code == 200
    with server.http() as admin:
        listed = admin.get("/api/studies/unmatched")
    assert listed.status_code == 200
    shown = {row["patient_id"] for row in listed.json()}
    assert "001085012345" in shown

    events = since(server, start)
    patient = "079555000777^^^CCCD"
    orders = [e for e in events if e["detail"].startswith("/api/orders")]
    assert [(e["action"], e["outcome"], e["study_uid"], e["patient_id"]) for e in orders] == [
        ("order", "success", order_study, patient),
        ("order", "failure", "", "079555000777"),  # refused before anything was stored: the ID it was for
        ("order", "success", order_study, patient),
        ("query", "success", order_study, patient),
        ("order", "success", order_study, patient),
    ], orders
    assert "the patient's name changed" in orders[2]["detail"]
    assert orders[3]["user"] == "bs.tung"
    (unmatched,) = [e for e in events if e["detail"].startswith("/api/studies/unmatched")]
    named = unmatched["patient_id"].split("\\")
    assert "001085012345^^^CCCD" in named and {p.split("^")[0] for p in named} == shown

    # The trail's own searches find them.
    by_patient = [e for e in cli_trail(server, "--patient", "079555000777") if e["pk"] > start]
    assert {e["pk"] for e in orders} <= {e["pk"] for e in by_patient}
    by_study = [e for e in cli_trail(server, "--study", order_study) if e["detail"].startswith("/api/orders")]
    assert len(by_study) == 4


def test_a_match_names_the_study_and_the_patients_it_moved_between(archive: PacsServer, tmp_path: Path) -> None:
    """POST /api/studies/{study}/match files the study under the order's
    patient: the event names both patients (the one it left, and the order's)."""
    server = archive
    study = f"{ROOT}.4.1"
    make_ct(tmp_path / "m.dcm", StudyInstanceUID=study, PatientID="TYPO-42", AccessionNumber="")
    server.storescu(str(tmp_path / "m.dcm"), calling="CT1")
    body = {"patient": {"id": "079555000888", "name": "Phan^Văn Khoa", "issuer": "CCCD"},
            "accession_number": "AUD-4", "modality": "CT"}
    with server.http(server.his_token) as his:  # type: ignore[attr-defined]
        assert his.post("/api/orders", json=body).status_code == 201
    start = last_pk(server)
    with server.http() as admin:
        matched = admin.post(f"/api/studies/{study}/match", json={"accession_number": "AUD-4"})
    assert matched.status_code == 200, matched.text
    events = [e for e in since(server, start) if e["action"] == "order"]
    assert {(e["study_uid"], e["patient_id"]) for e in events} == {(study, "079555000888^^^CCCD"),
                                                                   (study, "TYPO-42")}, events
    assert all("linked to order AUD-4" in e["detail"] for e in events)


# -- 9. outbound HL7 ----------------------------------------------------------------------------------
def _exports(server: PacsServer, start: int) -> list[dict[str, Any]]:
    return [e for e in since(server, start) if e["action"] == "export" and e["protocol"] == "hl7"]


def test_a_report_delivered_to_the_his_is_audited_once_whatever_its_tries(archive: PacsServer) -> None:
    """The HIS answers AR twice, then AA: one `export` event (success), with
    the study, its patient, the HIS's address, after the AA."""
    server, his = archive, archive.his  # type: ignore[attr-defined]
    refusals = {"left": 2}

    def answer(message: str) -> str:
        if "|ACC003|" in message and refusals["left"]:
            refusals["left"] -= 1
            return "AR"
        return "AA"

    his.answer = answer
    start = last_pk(server)
    _sign(server, study_uid("S3"), "Gan nhiễm mỡ nhẹ.")
    assert wait_until(lambda: [r.answer for r in his.about("ACC003")] == ["AR", "AR", "AA"], timeout=60), \
        his.received
    assert wait_until(lambda: _exports(server, start), timeout=30)
    (event,) = _exports(server, start)
    assert event["outcome"] == "success" and event["study_uid"] == study_uid("S3")
    assert event["patient_id"] == "079190000111^^^CCCD"
    assert event["client"] == f"127.0.0.1:{his.port}" and event["user"] == "hl7-outbound"
    assert "ORU^R01" in event["detail"] and "ACC003" in event["detail"] and "AA" in event["detail"]
    signed = [e for e in since(server, start) if e["action"] == "report-sign"]
    assert signed and signed[0]["pk"] < event["pk"]


def test_a_message_the_his_keeps_refusing_is_audited_as_a_failure_once_dead(archive: PacsServer) -> None:
    server, his = archive, archive.his  # type: ignore[attr-defined]
    his.answer = lambda m: "AE" if "|XYZ999|" in m else "AA"
    start = last_pk(server)
    _sign(server, study_uid("S4"), "Bình thường.")
    assert wait_until(lambda: len(his.about("XYZ999")) >= 3 and _exports(server, start), timeout=60), his.received
    (event,) = _exports(server, start)
    assert event["outcome"] == "failure" and event["study_uid"] == study_uid("S4")
    assert event["patient_id"] == "001077000222^^^CCCD"
    assert "parked dead" in event["detail"]
    his.answer = lambda m: "AA"


def test_an_order_status_sent_to_the_his_is_audited(archive: PacsServer) -> None:
    """MPPS IN PROGRESS for an order placed over the JSON API: the ORM^O01
    (IP) the HIS acknowledges is an `export` naming the order's patient and study."""
    server, his = archive, archive.his  # type: ignore[attr-defined]
    his.answer = lambda m: "AA"
    body = {"patient": {"id": "079555000999", "name": "Lý^Thu", "issuer": "CCCD"},
            "accession_number": "AUD-3", "modality": "CT", "step_id": "SPS-AUD-3", "station_ae_title": "CT_ROOM1"}
    with server.http(server.his_token) as http:  # type: ignore[attr-defined]
        placed = http.post("/api/orders", json=body)
    assert placed.status_code == 201, placed.text
    order_study = placed.json()["study_uid"]
    start = last_pk(server)
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedStationAETitle = "CT_ROOM1"
    create.PerformedProcedureStepStartDate = "20261206"
    create.PerformedProcedureStepStartTime = "091500"
    create.PerformedProcedureStepID = "PPS-AUD-3"
    scheduled = Dataset()
    scheduled.AccessionNumber = "AUD-3"
    scheduled.StudyInstanceUID = order_study
    scheduled.ScheduledProcedureStepID = "SPS-AUD-3"
    create.ScheduledStepAttributesSequence = Sequence([scheduled])
    assert _mpps(server, generate_uid(), create, create=True) == 0
    assert wait_until(lambda: _exports(server, start), timeout=30), his.received
    (event,) = _exports(server, start)
    assert event["outcome"] == "success" and event["study_uid"] == order_study
    assert event["patient_id"] == "079555000999^^^CCCD"
    assert "ORM^O01" in event["detail"] and "IN PROGRESS" in event["detail"] and "AUD-3" in event["detail"]
