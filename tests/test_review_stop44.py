"""Review of the moved study's report (ORU^R01 posted as wrong, OBX-11 W),
the critical results and the FHIR/patient changes, against a real `pacs
serve` on SQLite with a stand-in HIS over MLLP. Bugs found:

- a report posted as wrong for the patient a study left (OBX-11 W) that the
  HIS refused until it was parked dead was marked "superseded" as soon as
  the copy for the new patient reached the HIS (same kind, same key): that
  copy replaces nothing the retraction said, so the retraction was never
  sent, `pacs outbox retry` could no longer send it, and the dead message an
  operator watches for vanished -- the other person's findings stayed in
  the first patient's record at the HIS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer, free_port
from .peers import MLLPRecorder, ack_for, wait_until
from .test_review_radiology_day import A, _send_ct, _sign


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
    his_port = free_port()
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}),
                        extra_env={"PACS_HIS_MLLP": f"127.0.0.1:{his_port}", "PACS_HIS_RETRY_SECONDS": "0.1"})
    server.start()
    server.work = tmp  # type: ignore[attr-defined]
    server.his = RetractionRefusingHIS(his_port)  # type: ignore[attr-defined]
    server.radiologist = server.make_token(A[0], "radiologist", A[1])  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.his.stop()  # type: ignore[attr-defined]
        server.stop()


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

