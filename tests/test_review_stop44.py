"""Review of the moved study's report (ORU^R01 posted as wrong, OBX-11 W),
the critical results and the FHIR/patient changes, against a real `pacs
serve` on SQLite with a stand-in HIS over MLLP. Bugs found:

- a report posted as wrong for the patient a study left (OBX-11 W) that the
  HIS refused until it was parked dead was marked "superseded" as soon as
  the copy for the new patient reached the HIS (same kind, same key): that
  copy replaces nothing the retraction said, so the retraction was never
  sent, `pacs outbox retry` could no longer send it, and the dead message an
  operator watches for vanished -- the other person's findings stayed in
  the first patient's record at the HIS;
- a reported study linked to another patient's order (`POST
  /api/studies/{uid}/match`, an order placed after it) takes the order's
  accession, but the report resent for the order's patient named the one
  the study came with (OBR-18, and OBR-3 for an order without placer and
  filler numbers): a HIS filing results by accession put it on another
  examination's record;
- HL7 took an other ID (a PID-3 repetition: citizen ID, insurance number)
  whose value or issuer is over LO's 64 characters, which the JSON API
  refuses: stored, it was served in C-FIND's Other Patient IDs Sequence as
  invalid DICOM (the issuer check of PID-3.4 left the other IDs out);
- a study moved while an amendment waited for the HIS (the final report
  delivered before): the report posted as wrong for the patient it left
  carried the amendment's text, not the version the HIS holds, and the new
  patient got the amendment twice (the queued one names the study's
  patient when it goes, then the copy made for them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder, ack_for, serving_with_his, wait_until
from .test_hl7_robustness import fields
from .test_review_radiology_day import A, _send_ct, _sign
from .test_worklist_ris import msa, send


def _posted_as_wrong(message: bytes) -> bool:
    """Whether an ORU^R01 posts its result as wrong (OBX-11 W)."""
    return any(s.startswith(b"OBX|") and s.split(b"|")[11:12] == [b"W"] for s in message.split(b"\r"))


class RetractionRefusingHIS(MLLPRecorder):
    """A HIS that answers AE to a result posted as wrong (OBX-11 W) until
    told to take it (``taking``), AA to everything else."""

    taking = False

    def reply(self, message: bytes) -> bytes | None:
        self.messages.append(message)
        return ack_for(message, "AE" if _posted_as_wrong(message) and not self.taking else "AA", "unknown result")


@pytest.fixture(scope="module")
def reading(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """An archive whose reports go to a HIS that refuses retractions
    (``reading.his``), retrying fast, with radiologist A's token."""
    tmp = tmp_path_factory.mktemp("stop44")
    his_port, http_port = free_port(), free_port()
    # The public URL puts the study's link (its UID) in each ORU, by which the tests find theirs.
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}), http_port=http_port,
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HIS_RETRY_SECONDS": "0.1",
                                   "PACS_PUBLIC_URL": f"http://127.0.0.1:{http_port}"})
    server.work = tmp  # type: ignore[attr-defined]
    with serving_with_his(server, his_port, A, his=RetractionRefusingHIS) as serving:
        yield serving


def _queued(server: PacsServer, study: str) -> list[dict[str, Any]]:
    """The outbox messages about *study*, oldest first."""
    listed = json.loads(server.cli("outbox", "list", "--json", "--limit", "1000").stdout)["messages"]
    return sorted((m for m in listed if m["key"] == f"study:{study}"), key=lambda m: m["id"])


def test_a_retraction_the_his_refused_stays_dead_for_a_retry(reading: PacsServer) -> None:
    """The HIS refuses the report posted as wrong for Lê Văn Sai (AE, three
    times: parked dead); the copy for the patient the study moved to is
    delivered after it. The retraction stays dead (not superseded by a
    report for another patient), and once the HIS takes it, `pacs outbox
    retry` delivers it."""
    study, wrong, right = generate_uid(), "001185044001", "038092044001"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName="Lê^Văn Sai",
             AccessionNumber="CT26-4401")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Nang thận phải 10 mm.", "Nang thận phải.")
    assert wait_until(lambda: [m["state"] for m in _queued(reading, study)] == ["sent"], timeout=30)
    with reading.http() as admin:
        moved = admin.post(f"/api/studies/{study}/patient", json={
            "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "reason": "nhầm"})
        assert moved.status_code == 200 and moved.json()["report_resent"] is True, moved.text
    assert wait_until(lambda: [m["state"] for m in _queued(reading, study)][2:] == ["sent"], timeout=30), \
        _queued(reading, study)
    retraction = _queued(reading, study)[1]
    assert retraction["status"] == "wrong" and retraction["state"] == "dead", retraction

    reading.his.taking = True  # type: ignore[attr-defined]
    retried = reading.cli("outbox", "retry", "--id", str(retraction["id"]))
    assert retried.returncode == 0, retried.stderr
    assert wait_until(lambda: _queued(reading, study)[1]["state"] == "sent", timeout=30), _queued(reading, study)


def _fields(message: str, segment: str) -> list[list[str]]:
    """Every *segment* of an HL7 *message*, as its fields (index = HL7 field number, but for MSH)."""
    return [s.split("|") for s in message.split("\r") if s.startswith(segment + "|")]


def _orus(server: PacsServer, study: str, count: int) -> list[str]:
    """The ORU^R01 of *study* the HIS received but those posted as wrong, once there are *count* (or after 30 s)."""
    def taken() -> list[str]:
        return [m.decode() for m in list(server.his.messages)  # type: ignore[attr-defined]
                if b"ORU^R01" in m and study.encode() in m and not _posted_as_wrong(m)]
    wait_until(lambda: len(taken()) >= count, timeout=30)
    return taken()


def test_a_report_resent_for_the_order_s_patient_names_the_order_s_accession(reading: PacsServer) -> None:
    """The CT came without order under the wrong patient, accession
    CT26-4410 (the modality's), and was reported; linked by hand to Đặng
    Thị Đúng's order CT26-4411, the study takes that accession. The report
    sent for her answers that order: OBR-18 (and, for an order the HIS gave
    no placer or filler number, OBR-3) is its accession, not the one the
    study arrived with -- a HIS filing results by accession put her report
    on another examination's record."""
    study, wrong, right = generate_uid(), "001185044010", "038092044010"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName="Lê^Văn Sai",
             AccessionNumber="CT26-4410")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Gãy xương sườn 5 phải.", "Gãy xương sườn.")
    assert len(_orus(reading, study, 1)) == 1
    with reading.http() as admin:
        placed = admin.post("/api/orders", json={
            "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "accession_number": "CT26-4411",
            "modality": "CT", "start_date": "20261207"})
        assert placed.status_code in (200, 201), placed.text
        matched = admin.post(f"/api/studies/{study}/match", json={"accession_number": "CT26-4411"})
        assert matched.status_code == 200, matched.text
    orus = _orus(reading, study, 2)
    assert len(orus) == 2, orus
    resent = orus[1]
    assert _fields(resent, "PID")[0][3] == f"{right}^^^CCCD", resent
    assert _fields(resent, "OBR")[0][18] == "CT26-4411", resent
    assert _fields(resent, "OBR")[0][3] == "CT26-4411", resent


def test_an_other_id_longer_than_lo_is_refused_over_hl7_as_over_json(reading: PacsServer) -> None:
    """The JSON API refuses an other ID (a PID-3 repetition: the citizen ID,
    the insurance number) whose value or issuer is over LO's 64 characters;
    HL7 stored it, served in C-FIND's Other Patient IDs Sequence as invalid
    DICOM. Now an AE 102 naming the field, as for the patient ID's issuer."""
    long = "BH" + "Y" * 63  # 65 characters
    msh = "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261207090000||ADT^A08^ADT_A01|{}|P|2.5|||||VNM|UNICODE UTF-8"
    for control, other in (("S44-A08-1", f"GD4797912345^^^{long}^HC"), ("S44-A08-2", f"{long}^^^BHYT^HC")):
        ack = send(reading, "\n".join((msh.format(control), "EVN|A08|20261207090000",
                                       f"PID|1||BN4460^^^BVDK^PI~{other}||Võ^Văn Tám||19700101|M", "PV1|1|O")))
        assert msa(ack) == ("AE", control), ack
        err = fields(ack, "ERR")
        assert err[3].startswith("102^") and "64" in err[8], ack
    with reading.http() as http:
        assert http.get("/api/patients/BN4460", params={"issuer": "BVDK"}).status_code == 404
    ack = send(reading, "\n".join((msh.format("S44-A08-3"), "EVN|A08|20261207090000",
                                   f"PID|1||BN4460^^^BVDK^PI~GD4797912345^^^{long[:64]}^HC||Võ^Văn Tám||19700101|M",
                                   "PV1|1|O")))
    assert msa(ack)[0] == "AA", ack  # 64 characters are an issuer


def test_an_amendment_still_queued_reaches_the_new_patient_once(reading: PacsServer) -> None:
    """The HIS holds the final report under Lê Văn Sai; the amendment is
    signed while the HIS is down, and the study is moved then. Back up, the
    HIS gets the report posted as wrong for him -- the version it holds --
    and the amendment once for Đặng Thị Đúng: the queued amendment names the
    patient the study is filed under when it goes, so a copy of it for her
    was a second one."""
    study, wrong, right = generate_uid(), "001185044020", "038092044020"
    _send_ct(reading, study, 1, PatientID=wrong, IssuerOfPatientID="CCCD", PatientName="Lê^Văn Sai",
             AccessionNumber="CT26-4420")
    with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
        _sign(rad, study, "Nốt phổi thùy trên phải 6 mm.", "Nốt phổi.")
    assert len(_orus(reading, study, 1)) == 1
    his = reading.his  # type: ignore[attr-defined]
    his.stop()
    try:
        with reading.http(token=reading.radiologist) as rad:  # type: ignore[attr-defined]
            assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
            _sign(rad, study, "Nốt phổi thùy trên phải 8 mm.", "Nốt phổi, theo dõi.")
        with reading.http() as admin:
            moved = admin.post(f"/api/studies/{study}/patient", json={
                "patient": {"id": right, "issuer": "CCCD", "name": "Đặng^Thị Đúng"}, "reason": "nhầm"})
            assert moved.status_code == 200 and moved.json()["report_resent"] is True, moved.text
    finally:
        reading.his = RetractionRefusingHIS(his.port)  # type: ignore[attr-defined]
        reading.his.taking = True  # type: ignore[attr-defined]
    assert wait_until(lambda: all(m["state"] == "sent" for m in _queued(reading, study)), timeout=30), \
        _queued(reading, study)
    received = [m.decode() for m in reading.his.messages if study.encode() in m]  # type: ignore[attr-defined]
    retracted = [m for m in received if _posted_as_wrong(m.encode())]
    for_her = [m for m in received if f"PID|1||{right}^^^CCCD" in m]
    assert len(retracted) == 1 and f"PID|1||{wrong}^^^CCCD" in retracted[0], received
    assert "6 mm" in retracted[0], retracted  # the version the HIS holds under him
    assert len(for_her) == 1 and "8 mm" in for_her[0], received
    assert _fields(for_her[0], "OBR")[0][25] == "C", for_her
