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
from .dicomfiles import make_ct
from .peers import wait_until
from .qr_corpus import study_uid, write_corpus
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


# -- 6. the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def remote_pacs(archive: PacsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """An old PACS (a second `pacs serve`, AE OLDPACS) holding three studies
    the archive does not; each knows the other."""
    work = tmp_path_factory.mktemp("old-pacs")
    (work / "in").mkdir()
    for key in ("1", "2", "3"):
        make_ct(work / "in" / f"{key}.dcm", StudyInstanceUID=f"{ROOT}.9.{key}", PatientID=f"OLD-{key}",
                StudyDate="20200101", AccessionNumber=f"OLD{key}")
    old = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}), ae_title="OLDPACS")
    old.cli("import", str(work / "in"))
    old.start()
    old.cli("ae", "add", archive.ae_title, "--host", "127.0.0.1", "--port", str(archive.dicom_port))
    archive.cli("ae", "add", "OLDPACS", "--host", "127.0.0.1", "--port", str(old.dicom_port))
    try:
        yield old
    finally:
        old.stop()


@contextlib.contextmanager
def as_alice(server: PacsServer) -> Iterator[None]:
    """*server*'s `pacs` commands run as `sudo -u <this account> pacs ...` by alice."""
    server.extra_env["SUDO_USER"] = "alice"
    try:
        yield
    finally:
        server.extra_env.pop("SUDO_USER", None)


@pytest.fixture
def alice(archive: PacsServer) -> Iterator[None]:
    with as_alice(archive):
        yield


def mine(server: PacsServer, start: int) -> list[dict[str, Any]]:
    return [e for e in cli_trail(server) if e["pk"] > start and e["user"] == ALICE]


def test_commands_on_patient_data_and_security_settings_are_audited(archive: PacsServer, alice: None,
                                                                     tmp_path: Path) -> None:
    server = archive
    start = last_pk(server)
    # import: an event per study, found by `pacs audit --study`
    new_study = f"{ROOT}.6.1"
    (tmp_path / "in").mkdir()
    for i in range(2):
        make_ct(tmp_path / "in" / f"{i}.dcm", StudyInstanceUID=new_study, PatientID="IMP-1")
    server.cli("import", str(tmp_path / "in"))
    (imported,) = [e for e in cli_trail(server, "--study", new_study) if e["action"] == "store"]
    assert imported["user"] == ALICE and imported["protocol"] == "cli" and imported["patient_id"] == "IMP-1"
    assert "2 instances stored" in imported["detail"] and str(tmp_path / "in") in imported["detail"]

    # orders unmatched: the patients listed; orders match: the study and both patients
    server.cli("orders", "unmatched", "--json")
    body = {"patient": {"id": "079555000555", "name": "Đinh^Văn Nam", "issuer": "CCCD"},
            "accession_number": "AUD-6", "modality": "CT"}
    with server.http(server.his_token) as his:  # type: ignore[attr-defined]
        assert his.post("/api/orders", json=body).status_code == 201
    server.cli("orders", "match", new_study, "AUD-6")

    # the AE registry and routing: who may connect, where data goes
    server.cli("ae", "add", "WS_AUDIT", "--host", "10.0.2.10", "--port", "104", "--services", "query,retrieve")
    server.cli("ae", "remove", "WS_AUDIT")
    assert server.cli("ae", "remove", "NO_SUCH_AE", check=False).returncode == 1
    server.cli("route", "add", "to-cloud", "--if", "Modality=CT", "--to-url",
               "https://user:secret@cloud.example/dicomweb", "--auth", "Bearer TOPSECRET", "--deidentify")
    server.cli("route", "remove", "to-cloud")

    # every object to another store
    server.cli("migrate", "--to", f"file://{tmp_path / 'elsewhere'}")

    # reading the trail
    server.cli("audit", "--patient", "079555000555", "--format", "json")

    events = mine(server, start)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_action.setdefault(e["action"], []).append(e)
    assert all(e["protocol"] == "cli" for e in events)

    listed = [e for e in by_action["query"] if e["detail"].startswith("pacs orders unmatched")]
    assert listed and "IMP-1" in "\\".join(e["patient_id"] for e in listed)
    matched = [e for e in by_action["order"] if "pacs orders match" in e["detail"]]
    assert {(e["study_uid"], e["patient_id"], e["outcome"]) for e in matched} == {
        (new_study, "079555000555^^^CCCD", "success"), (new_study, "IMP-1", "success")}

    added, = by_action["ae-add"]
    assert "WS_AUDIT at 10.0.2.10:104" in added["detail"] and "query,retrieve" in added["detail"]
    assert [e["outcome"] for e in by_action["ae-remove"]] == ["success", "failure"]
    assert "10.0.2.10:104" in by_action["ae-remove"][0]["detail"]
    route, = by_action["route-add"]
    assert "to-cloud" in route["detail"] and "cloud.example/dicomweb" in route["detail"]
    assert "Modality=CT" in route["detail"] and "de-identified" in route["detail"]
    assert "secret" not in route["detail"] and "TOPSECRET" not in route["detail"]
    assert [e["outcome"] for e in by_action["route-remove"]] == ["success"]

    migrated, = by_action["migrate"]
    assert str(tmp_path / "elsewhere") in migrated["detail"] and "objects copied" in migrated["detail"]
    assert migrated["outcome"] == "success"

    read, = [e for e in by_action["query"] if e["detail"].startswith("pacs audit --patient")]
    assert read["patient_id"] == "079555000555" and read["study_uid"] == ""
    (by_study,) = [e for e in by_action["query"] if e["detail"].startswith("pacs audit --study")]
    assert by_study["study_uid"] == new_study and by_study["patient_id"] == "IMP-1"
    # Recorded after the read: the export a run prints does not hold its own event.
    printed = json.loads(server.cli("audit", "--format", "json", "--limit", "1").stdout)
    assert "1 events read" not in printed[0]["detail"]
    assert "pacs audit --format json: 1 events read" in cli_trail(server)[-1]["detail"]


def test_remote_retrieves_are_audited_with_who_ran_them(archive: PacsServer, remote_pacs: PacsServer,
                                                        alice: None) -> None:
    """`pacs remote get`, `remote move` (here, and to a third AE) and `remote
    pull`: who had the old PACS send which study where, and with what result."""
    server = archive
    start = last_pk(server)
    server.cli("remote", "get", "OLDPACS", "--study", f"{ROOT}.9.1")
    server.cli("remote", "move", "OLDPACS", "--study", f"{ROOT}.9.2", "--destination", server.ae_title)
    refused = server.cli("remote", "move", "OLDPACS", "--study", f"{ROOT}.9.2", "--destination", "NOWHERE",
                         check=False)
    assert refused.returncode == 1
    server.cli("remote", "pull", "OLDPACS", "--method", "get")
    events = [e for e in mine(server, start) if e["action"] == "retrieve"]
    got = [e for e in events if "pacs remote get" in e["detail"]]
    assert [(e["study_uid"], e["client"], e["outcome"]) for e in got] == [(f"{ROOT}.9.1", "OLDPACS", "success")]
    assert "1 completed" in got[0]["detail"]
    moved = [e for e in events if "pacs remote move" in e["detail"]]
    assert [(e["study_uid"], e["outcome"]) for e in moved] == [(f"{ROOT}.9.2", "success"),
                                                                (f"{ROOT}.9.2", "failure")]
    assert f"to {server.ae_title}" in moved[0]["detail"] and "to NOWHERE" in moved[1]["detail"]
    pulled = [e for e in events if "pacs remote pull" in e["detail"]]
    assert [(e["study_uid"], e["patient_id"], e["outcome"]) for e in pulled] == [(f"{ROOT}.9.3", "OLD-3", "success")]


def test_an_index_copy_is_audited_in_both_indexes(tmp_path: Path) -> None:
    """`pacs db copy` takes the whole index -- users and the audit trail
    included -- to another database: both trails say who did it and where."""
    archive = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    make_ct(tmp_path / "one.dcm", StudyInstanceUID=f"{ROOT}.7.1", PatientID="COPY-1")
    archive.cli("import", str(tmp_path / "one.dcm"))
    target = f"sqlite:///{tmp_path / 'copy.sqlite'}"
    with as_alice(archive):
        archive.cli("db", "copy", "--to", target)
        refused = archive.cli("db", "copy", "--to", target, check=False)  # not empty any more
    assert refused.returncode == 1

    events = [e for e in cli_trail(archive) if e["action"] == "index-copy"]
    assert [(e["user"], e["outcome"]) for e in events] == [(ALICE, "success"), (ALICE, "failure")]
    assert "copy.sqlite" in events[0]["detail"] and "1 instances" in events[0]["detail"]
    assert "already holds data" in events[1]["detail"]
    the_copy = PacsServer(tmp_path / "copy-data", Backend("sqlite-fs", target, None, {}))
    copied = [e for e in cli_trail(the_copy) if e["action"] == "index-copy"]
    assert [(e["user"], e["outcome"]) for e in copied] == [(ALICE, "success")]
