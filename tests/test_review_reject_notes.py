"""Review of rejection notes made here (pacs rejections reject, POST
/api/rejections/reject): the note's DICOM, and edge cases found in review."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from .conftest import Backend, PacsServer
from .peers import wait_until
from .dicomfiles import make_ct
from .test_query_retrieve import StoreSCP
from .test_rejections import CT, DOSE_SR, KOS, _image_uids, _study, all_delivered, archive, route_jobs  # noqa: F401


def _stored(server: PacsServer, sop_uid: str) -> Any:
    for path in server.data_dir.rglob("*"):
        if path.is_file() and path.suffix in (".dcm", ""):
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if str(ds.get("SOPInstanceUID", "")) == sop_uid:
                return ds
    raise AssertionError(f"{sop_uid} not in the store")


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_note_made_here_is_a_kos_of_the_study_in_utf8(archive: PacsServer, tmp_path: Path) -> None:
    server = archive
    study, (first, second) = _study(server, tmp_path / "s", "REJ-R1", [2, 2], calling="CT_ROOM2",
                                    name="Nguyễn^Thị Ánh", SpecificCharacterSet="ISO_IR 192")
    with server.http() as http:
        done = http.post("/api/rejections/reject", json={"study_uid": study, "sop_uids": [first[1], second[1]],
                                                          "reason": "chụp nhầm bệnh nhân"})
        assert done.status_code == 200, done.text
    note = _stored(server, done.json()["note_uid"])
    assert note.SpecificCharacterSet == "ISO_IR 192"
    assert str(note.PatientName) == "Nguyễn^Thị Ánh"
    assert note.Modality == "KO" and note.SOPClassUID == KOS
    evidence = note.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == study
    refs = {r.ReferencedSOPInstanceUID: (s.SeriesInstanceUID, r.ReferencedSOPClassUID)
            for s in evidence[0].ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert refs == {first[1]: (first[0], CT), second[1]: (second[0], CT)}
    assert _image_uids(server, study) == {first[2], second[2]}


@pytest.mark.parametrize("backend", ["pg-fs"], indirect=True)
def test_an_administrators_note_follows_each_rule_on_postgresql(tmp_path: Path, backend: Backend) -> None:
    copy = StoreSCP(tmp_path / "copy", accept_all=True)
    server = PacsServer(tmp_path / "data", backend)
    server.data_dir.mkdir(parents=True)
    try:
        server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(copy.port))
        server.cli("route", "add", "copy", "--if", "Modality=CT", "--to-ae", "MOVEDEST")
        server.cli("route", "add", "copy2", "--if", "Modality=CT", "--to-ae", "MOVEDEST", "--deidentify")
        server.start()

        def jobs() -> list[dict[str, Any]]:
            return route_jobs(server)

        def delivered(count: int) -> bool:
            return all_delivered(server, count)

        study, (one, two) = _study(server, tmp_path / "s", "REJ-R2", [3, 1], calling="CT_ROOM2")
        assert wait_until(lambda: delivered(8)), jobs()
        with server.http() as http:
            done = http.post("/api/rejections/reject", json={"study_uid": study, "series_uid": one[0],
                                                              "reason": "sai bệnh nhân"})
        assert done.status_code == 200, done.text
        note_uid = done.json()["note_uid"]
        assert _image_uids(server, study) == {two[1]}
        assert wait_until(lambda: delivered(10)), jobs()
        assert sorted(j["rule"] for j in jobs() if j["sop_uid"] == note_uid) == ["copy", "copy2"]
        assert note_uid in copy.received()
    finally:
        server.stop()
        copy.stop()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_the_cli_reject_event_names_the_patient_with_their_issuer(archive: PacsServer, tmp_path: Path) -> None:
    """Two hospitals' BN100 are two people: every event names the patient as
    an HL7 CX with its issuer (pacs.audit.patient_cx), and a search of that
    patient's trail finds only those. The ``reject`` event of ``pacs
    rejections reject`` must name the patient as its deletions do."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-R3", [2], calling="CT_ROOM2", IssuerOfPatientID="BVDK")
    done = server.cli("rejections", "reject", "--study", study, one[1], "--reason", "mờ", "--yes", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    with server.http() as http:
        events = http.get("/api/audit", params={"study": study}).json()
    deleted = [e["patient_id"] for e in events if e["action"] == "delete"]
    rejected = [e["patient_id"] for e in events if e["action"] == "reject"]
    assert deleted == ["REJ-R3^^^BVDK"], events
    assert rejected == ["REJ-R3^^^BVDK"], events



@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_note_made_here_references_a_dose_report_as_composite_not_image(archive: PacsServer,
                                                                          tmp_path: Path) -> None:
    """A whole study rejected takes its dose report (SR) too: the note's TID
    2010 item for it is a COMPOSITE, an IMAGE item referencing an image only
    (PS3.3 C.17.3.2.1; a viewer opens each IMAGE item as an image)."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-R6", [2], calling="CT_ROOM2")
    dose = make_ct(tmp_path / "dose.dcm", sop_class=DOSE_SR, StudyInstanceUID=study, Modality="SR",
                   SeriesInstanceUID=generate_uid(), PatientID="REJ-R6", PatientName="NGUYEN^VAN AN")
    assert server.storescu(str(dose), calling="CT_ROOM2").returncode == 0
    dose_uid = str(dcmread(dose, stop_before_pixels=True).SOPInstanceUID)
    with server.http() as http:
        done = http.post("/api/rejections/reject", json={"study_uid": study, "reason": "sai bệnh nhân"})
    assert done.status_code == 200, done.text
    assert done.json()["withdrawn"] == 3, done.json()
    note = _stored(server, done.json()["note_uid"])
    kinds = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
             for item in note.ContentSequence if "ReferencedSOPSequence" in item}
    assert kinds == {one[1]: "IMAGE", one[2]: "IMAGE", dose_uid: "COMPOSITE"}, kinds
