"""Critical results (pacs.critical_results) for the hospital's IT person and
its quality office, without the HTTP API: `pacs critical list` (open ones
oldest first, acknowledged ones with who was told and how; ``--json`` and
text) and the Prometheus figures of GET /metrics that an alert reads
(``pacs_critical_results_open``, ``pacs_critical_results_oldest_open_age_seconds``).

A real `pacs serve` on SQLite + files and on PostgreSQL + S3: DCMTK's
storescu sends three studies, a radiologist signs two reports flagged
critical and one normal report over HTTP, the EMR acknowledges them one by
one, and the CLI and the metrics follow.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_metrics import monitored, scrape, value  # noqa: F401 (fixtures)

NOTES = {"CRIT-A": "Tràn khí màng phổi phải lượng nhiều, cần dẫn lưu ngay",
         "CRIT-B": "Xuất huyết dưới màng cứng bán cầu trái, đẩy lệch đường giữa"}
TOLD = "BS. Lan, khoa Cấp cứu, qua điện thoại"
OPEN = "pacs_critical_results_open"
OLDEST = "pacs_critical_results_oldest_open_age_seconds"


def _send(server: PacsServer, folder: Path, accession: str) -> str:
    """A CT study of its own patient (CR-*accession*, a Vietnamese name), sent with storescu."""
    folder.mkdir()
    study = generate_uid()
    ct = make_ct(folder / "ct.dcm", StudyInstanceUID=study, PatientID=f"CR-{accession}", AccessionNumber=accession,
                 PatientName="Nguyễn^Văn An", SpecificCharacterSet="ISO_IR 192")
    assert server.storescu(str(ct)).returncode == 0
    return study


def _listed(server: PacsServer, state: str) -> dict[str, Any]:
    return json.loads(server.cli("critical", "list", "--state", state, "--json").stdout)


def _age_within(server: PacsServer, flagged_at: str) -> tuple[float, float, float]:
    """The oldest open result's age a scrape gives, between the ages it can
    have (flagged_at to just before and just after the scrape)."""
    flagged = datetime.fromisoformat(flagged_at).timestamp()
    before = time.time()
    age = value(scrape(server, server.monitor), OLDEST)  # type: ignore[attr-defined]
    after = time.time()
    assert age is not None
    # Rendered to the millisecond.
    return before - flagged - 0.001, age, after - flagged + 0.001


def test_critical_list_and_metrics_follow_flags_and_acknowledgements(monitored: PacsServer, tmp_path: Path) -> None:
    server = monitored  # no metrics cache: each scrape reads the index
    monitor = server.monitor  # type: ignore[attr-defined]

    # Nothing flagged: both series are there (an alert needs them), at 0.
    empty = scrape(server, monitor)
    assert value(empty, OPEN) == 0 and value(empty, OLDEST) == 0
    assert _listed(server, "open") == {"state": "open", "total": 0, "critical": []}
    assert "no open critical results" in server.cli("critical", "list").stdout

    studies = {acc: _send(server, tmp_path / acc, acc) for acc in ("CRIT-A", "CRIT-B", "NORM-C")}
    radiologist = server.make_token("bs.minh", "radiologist", "Trần^Minh")
    with server.http(radiologist) as rad:
        for accession, study in studies.items():  # A signed first: the oldest
            assert rad.put(f"/api/studies/{study}/report", json={
                "findings": "Xem kết luận.", "impression": NOTES.get(accession, "Bình thường")}).status_code == 200
            flagged = {"critical": True, "critical_note": NOTES[accession]} if accession in NOTES else {}
            signed = rad.post(f"/api/studies/{study}/report/sign", json=flagged)
            assert signed.status_code == 200, signed.text

    # Two open, the oldest first, with the study, its patient and who signed it.
    listed = _listed(server, "open")
    assert listed["state"] == "open" and listed["total"] == 2
    assert [c["study_uid"] for c in listed["critical"]] == [studies["CRIT-A"], studies["CRIT-B"]]
    first = listed["critical"][0]
    assert (first["accession"], first["patient_id"], first["patient_name"]) == ("CRIT-A", "CR-CRIT-A", "Nguyễn^Văn An")
    assert first["modalities"] == "CT\\DOC"  # as the API gives it: the signed PDF is stored in the study
    assert (first["flagged_by"], first["note"], first["version"]) == ("bs.minh", NOTES["CRIT-A"], 1)
    assert first["acknowledged_at"] is None and first["acknowledged_by"] == "" and first["acknowledgement"] == ""
    assert all(isinstance(c["minutes_open"], int) and c["minutes_open"] >= 0 for c in listed["critical"])
    assert listed["critical"][0]["flagged_at"] <= listed["critical"][1]["flagged_at"]
    assert _listed(server, "acknowledged")["total"] == 0
    refused = server.cli("critical", "list", "--state", "maybe", check=False)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr

    text = server.cli("critical", "list").stdout
    assert "2 open critical results" in text
    assert text.index("CRIT-A") < text.index("CRIT-B")  # oldest first
    for accession in ("CRIT-A", "CRIT-B"):
        assert studies[accession] in text and f"CR-{accession}" in text and NOTES[accession] in text
    assert "Nguyễn^Văn An  CT  " in text and "signed by bs.minh" in text and "min open" in text
    assert "DOC" not in text  # the examination's modality, not the report's PDF
    assert "NORM-C" not in text and studies["NORM-C"] not in text

    signed = scrape(server, monitor)
    assert value(signed, OPEN) == 2
    low, age, high = _age_within(server, first["flagged_at"])
    assert low <= age <= high
    # No patient, study or accession in the figures.
    page = signed["_text"][0][0]["text"]
    assert all(s not in page for s in (*studies.values(), "CRIT-A", "CR-CRIT", "Nguyễn"))

    # The EMR records who was told of A: B is the oldest open one now.
    emr = server.make_token("emr.bvdk", "emr")
    with server.http(emr) as http:
        done = http.post(f"/api/studies/{studies['CRIT-A']}/report/critical/ack", json={"acknowledgement": TOLD})
        assert done.status_code == 200, done.text
    still = _listed(server, "open")
    assert still["total"] == 1 and [c["study_uid"] for c in still["critical"]] == [studies["CRIT-B"]]
    assert value(scrape(server, monitor), OPEN) == 1
    low, age, high = _age_within(server, still["critical"][0]["flagged_at"])
    assert low <= age <= high

    acknowledged = _listed(server, "acknowledged")
    assert acknowledged["total"] == 1
    told = acknowledged["critical"][0]
    assert (told["study_uid"], told["acknowledged_by"], told["acknowledgement"]) == (studies["CRIT-A"], "emr.bvdk",
                                                                                       TOLD)
    assert told["acknowledged_at"] >= told["flagged_at"] and told["minutes_open"] >= 0
    text = server.cli("critical", "list", "--state", "acknowledged").stdout
    assert "1 acknowledged critical results" in text and studies["CRIT-A"] in text
    assert "acknowledged by emr.bvdk" in text and TOLD in text and NOTES["CRIT-A"] in text
    assert studies["CRIT-B"] not in text

    # B too: none open, the age back to 0; `--state all` shows both, newest first.
    with server.http(emr) as http:
        assert http.post(f"/api/studies/{studies['CRIT-B']}/report/critical/ack",
                         json={"acknowledgement": TOLD}).status_code == 200
    cleared = scrape(server, monitor)
    assert value(cleared, OPEN) == 0 and value(cleared, OLDEST) == 0
    assert _listed(server, "open")["total"] == 0
    everything = _listed(server, "all")
    assert [c["study_uid"] for c in everything["critical"]] == [studies["CRIT-B"], studies["CRIT-A"]]
    assert all(c["acknowledged_by"] == "emr.bvdk" for c in everything["critical"])

    # Each listing is audited as a query by the account that ran it, naming the studies it showed.
    with server.http() as admin:
        events = admin.get("/api/audit", params={"study": studies["CRIT-A"], "action": "query"}).json()
    shown = [e for e in events if e["protocol"] == "cli" and "pacs critical list" in e["detail"]]
    assert shown and all(e["patient_id"] == "CR-CRIT-A" for e in shown)



def test_an_amendment_flagged_again_is_acknowledged_with_the_first(monitored: PacsServer, tmp_path: Path) -> None:
    """Version 1 flagged and not yet acknowledged, the amendment flagged again:
    one acknowledgement (of the latest) closes both, or the first stayed open
    for ever (nothing can acknowledge it) and the alert never cleared."""
    server = monitored  # no metrics cache: each scrape reads the index
    study = _send(server, tmp_path / "amend", "CRIT-A")
    radiologist = server.make_token("bs.minh", "radiologist", "Trần^Minh")
    with server.http(radiologist) as rad:
        assert rad.put(f"/api/studies/{study}/report", json={"impression": NOTES["CRIT-A"]}).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign",
                        json={"critical": True, "critical_note": NOTES["CRIT-A"]}).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/amend").status_code == 200
        assert rad.put(f"/api/studies/{study}/report", json={"impression": NOTES["CRIT-B"]}).status_code == 200
        signed = rad.post(f"/api/studies/{study}/report/sign",
                          json={"critical": True, "critical_note": NOTES["CRIT-B"]})
        assert signed.status_code == 200, signed.text
    assert [c["version"] for c in _listed(server, "open")["critical"]] == [1, 2]

    emr = server.make_token("emr.bvdk", "emr")
    with server.http(emr) as http:
        done = http.post(f"/api/studies/{study}/report/critical/ack", json={"acknowledgement": TOLD})
        assert done.status_code == 200, done.text
        assert done.json()["version"] == 2
        again = http.post(f"/api/studies/{study}/report/critical/ack", json={"acknowledgement": TOLD})
        assert again.status_code == 409
    assert _listed(server, "open")["total"] == 0
    assert value(scrape(server, server.monitor), OPEN) == 0  # type: ignore[attr-defined]
    assert {(c["version"], c["acknowledged_by"]) for c in _listed(server, "all")["critical"]} == {
        (1, "emr.bvdk"), (2, "emr.bvdk")}
