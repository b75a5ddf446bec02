"""Leftovers of earlier reviews, decided as Orthanc or dcm4chee would, against
real `pacs serve` processes and `pacs` commands (SQLite): HL7 over MLLP
(python-hl7), FHIR R4 and the JSON API over HTTP, QIDO-RS, `pacs import`,
`pacs rejections`, `pacs reindex`.

- FHIR: a Patient id an ADT^A40 merge replaced reads as the inactive
  Patient linked replaced-by the survivor, but a search by ``_id`` with it
  found nothing: the search now answers the same resource as the read;
- ``GET /api/patients/{id}`` counted the studies rejection notes withdrew in
  ``studies``, which C-FIND, QIDO-RS and FHIR leave out: ``studies`` counts
  the ones users see, ``withdrawn`` the others (an administrator's view);
- HL7 took an Issuer of Patient ID (PID-3.4) over 64 characters (DICOM LO),
  which the JSON API refuses: now an AE with ERR 102 naming the field;
- `pacs reindex` did not apply the rejection notes it indexed: what they
  withdrew was no longer refused, a modality resending the study brought
  the images back. It now applies them at its end as `pacs verify --repair`
  applies the notes it adopts (instances whose objects are gone).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Backend, PacsServer
from .dicomfiles import make_ct
from .test_hl7_robustness import fields
from .test_recovery_review import _lose_index
from .test_review_operator_year import SERIES, STUDY, _files, _indexed_sops
from .test_worklist_ris import msa, orm, send

UID = "1.2.826.0.1.3680043.8.498.93"
MERGED_STUDY, SURVIVOR_STUDY = f"{UID}.500", f"{UID}.501"
WITHDRAWN_STUDY, KEPT_STUDY = f"{UID}.900", f"{UID}.901"
MSH = "MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261207090000||{}|{}|P|2.5|||||VNM|UNICODE UTF-8"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    """Two registrations of one person (to merge) and a patient with two
    studies (one to withdraw); an EMR."""
    tmp = tmp_path_factory.mktemp("leftovers3")
    server = PacsServer(tmp / "data", Backend("sqlite", None, None, {}))
    utf8 = {"SpecificCharacterSet": "ISO_IR 192", "StudyDate": "20261207", "StudyTime": "080000"}
    files = tmp / "in"
    files.mkdir()
    make_ct(files / "m500.dcm", PatientID="BN500", IssuerOfPatientID="BVTW", PatientName="Mai^Văn Hải",
            StudyInstanceUID=MERGED_STUDY, AccessionNumber="M500", **utf8)
    make_ct(files / "m501.dcm", PatientID="BN501", IssuerOfPatientID="BVDK", PatientName="Mai^Văn Hải",
            StudyInstanceUID=SURVIVOR_STUDY, AccessionNumber="M501", **utf8)
    for study, accession in ((WITHDRAWN_STUDY, "W900"), (KEPT_STUDY, "K901")):
        make_ct(files / f"{accession}.dcm", PatientID="BN900", PatientName="Lê^Thị Hoa", StudyInstanceUID=study,
                AccessionNumber=accession, **utf8)
    server.cli("import", str(files))
    server.start()
    server.emr = server.make_token("emr.leftovers", "emr", "EMR")  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def _ids(bundle: dict[str, Any]) -> list[str]:
    assert bundle["resourceType"] == "Bundle", bundle
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _hl7(server: PacsServer, kind: str, control: str, *segments: str) -> str:
    """Send one HL7 message; its ACK."""
    return send(server, "\n".join((MSH.format(kind, control), *segments)))


# -- 1 ----------------------------------------------------------------------------------------
def test_a_search_by_the_id_a_merge_replaced_answers_what_the_read_does(served: PacsServer) -> None:
    old, survivor = "BVTW.BN500", "BVDK.BN501"
    ack = _hl7(served, "ADT^A40^ADT_A39", "L3-A40", "EVN|A40|20261207090000",
               "PID|1||BN501^^^BVDK^PI||Mai^Văn Hải||19600101|M", "MRG|BN500^^^BVTW^PI")
    assert msa(ack)[0] == "AA", ack
    with served.http(token=served.emr) as http:  # type: ignore[attr-defined]
        read = http.get(f"/fhir/Patient/{old}")
        assert read.status_code == 200 and read.json()["active"] is False, read.text
        found = http.get("/fhir/Patient", params={"_id": old}).json()
        assert found["total"] == 1 and [e["resource"] for e in found["entry"]] == [read.json()], found
        assert found["entry"][0]["fullUrl"].endswith(f"/fhir/Patient/{old}")
        both = http.get("/fhir/Patient", params={"_id": f"{old},{survivor}"}).json()
        assert both["total"] == 2 and sorted(_ids(both)) == sorted([old, survivor]), both
        # Paged as any search: the total on every page, the former id once.
        pages = [http.get("/fhir/Patient", params={"_id": f"{survivor},{old}", "_count": "1", "_offset": str(n)})
                 .json() for n in (0, 1)]
        assert [p["total"] for p in pages] == [2, 2] and sorted(_ids(pages[0]) + _ids(pages[1])) == sorted(
            [old, survivor]), pages
        # Its other parameters apply to the resource the read gives: its old identifier, no name.
        assert _ids(http.get("/fhir/Patient", params={"_id": old, "identifier": "BVTW|BN500"}).json()) == [old]
        assert http.get("/fhir/Patient", params={"_id": old, "identifier": "BVDK|BN501"}).json()["total"] == 0
        assert http.get("/fhir/Patient", params={"_id": old, "name": "mai"}).json()["total"] == 0
        assert http.get("/fhir/Patient", params={"_id": "BVTW.BN599"}).json()["total"] == 0


# -- 2 ----------------------------------------------------------------------------------------
def _patient(http: httpx.Client, patient_id: str) -> dict[str, Any]:
    answer = http.get(f"/api/patients/{patient_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_patients_study_count_leaves_out_the_withdrawn_ones(served: PacsServer) -> None:
    with served.http() as http:
        assert (_patient(http, "BN900")["studies"], _patient(http, "BN900")["withdrawn"]) == (2, 0)
        rejected = http.post("/api/rejections/reject", json={"study_uid": WITHDRAWN_STUDY, "code": "113038",
                                                              "reason": "chụp nhầm bệnh nhân"})
        assert rejected.status_code == 200 and rejected.json()["withdrawn"] == 1, rejected.text
        qido = http.get("/dicom-web/studies", params={"PatientID": "BN900"})
        assert qido.status_code == 200 and len(qido.json()) == 1, qido.text
        patient = _patient(http, "BN900")
        # What the other lists show, and the withdrawn study named as such.
        assert (patient["studies"], patient["withdrawn"]) == (1, 1), patient
    with served.http(token=served.emr) as emr:  # type: ignore[attr-defined]
        assert emr.get("/fhir/ImagingStudy", params={"patient.identifier": "BN900"}).json()["total"] == 1


# -- 3 ----------------------------------------------------------------------------------------
def test_an_issuer_longer_than_lo_is_refused_over_hl7_as_over_json(served: PacsServer) -> None:
    issuer = "BV" + "D" * 63  # 65 characters; Issuer of Patient ID is LO (64)
    with served.http() as http:
        refused = http.put("/api/patients/BN950", json={"issuer": issuer, "name": "Võ^Văn Tám"})
        assert refused.status_code in (400, 422), refused.text
    ack = _hl7(served, "ADT^A08^ADT_A01", "L3-A08", "EVN|A08|20261207090000",
               f"PID|1||BN950^^^{issuer}^PI||Võ^Văn Tám||19700101|M", "PV1|1|O")
    assert msa(ack) == ("AE", "L3-A08"), ack
    err = fields(ack, "ERR")
    assert err[3].startswith("102^") and "IssuerOfPatientID" in err[8] and "64" in err[8], ack
    order = orm("L3-ORM", "L3ORM1", pid=f"BN950^^^{issuer}^PI")
    ack = send(served, order)
    assert msa(ack)[0] == "AE" and "IssuerOfPatientID" in fields(ack, "ERR")[8], ack
    with served.http() as http:
        assert http.get("/api/patients/BN950").status_code == 404
        assert http.get("/api/orders/L3ORM1").status_code == 404
    # 64 characters are an issuer.
    ack = _hl7(served, "ADT^A08^ADT_A01", "L3-A08-64", "EVN|A08|20261207090000",
               f"PID|1||BN950^^^{issuer[:64]}^PI||Võ^Văn Tám||19700101|M", "PV1|1|O")
    assert msa(ack)[0] == "AA", ack


# -- 4 ----------------------------------------------------------------------------------------
def test_reindex_applies_the_rejection_notes_it_finds(tmp_path: Path) -> None:
    """The index is lost after a rejection; `pacs reindex` rebuilds it from
    the store, which holds the note: what it withdrew stays refused."""
    server = PacsServer(tmp_path / "data", Backend("sqlite", None, None, {}))
    files = _files(tmp_path, 3)
    assert json.loads(server.cli("import", *map(str, files), "--json").stdout)["stored"] == 3
    server.cli("rejections", "reject", "--study", STUDY, f"{SERIES}.0", "--reason", "phim hỏng", "--yes")

    _lose_index(tmp_path / "data")
    rebuilt = server.cli("reindex", "--json", check=False)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert [n["not_stored"] for n in report["rejections"]["items"]] == [1], report
    kept = _indexed_sops(server)
    assert {f"{SERIES}.1", f"{SERIES}.2"} <= kept and f"{SERIES}.0" not in kept
    listed = json.loads(server.cli("rejections", "list", "--json").stdout)
    assert [r["sop_uid"] for r in listed["rejected"]] == [f"{SERIES}.0"], listed
    # The modality sends the study again: the withdrawn image does not come back.
    resent = json.loads(server.cli("import", *map(str, files), "--json", check=False).stdout)
    assert resent["rejected"] == 1 and resent["stored"] == 0, resent
    assert f"{SERIES}.0" not in _indexed_sops(server)
    # Run again (an interrupted run is started over): nothing changes.
    again = server.cli("reindex", "--json", check=False)
    assert again.returncode == 0 and json.loads(again.stdout)["indexed"] == 0, again.stdout
