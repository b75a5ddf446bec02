"""Rejection notes (IHE IOCM) reviewed: what a malformed, oversized or
cross-study note does, and what the audit trail says of it (see
tests/test_rejections.py for the feature itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .conftest import PacsServer
from .test_rejections import CT, REJECTED, _events, _image_uids, _note, _study, archive  # noqa: F401


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_images_of_other_studies_kept_are_audited(archive: PacsServer, tmp_path: Path) -> None:
    """A note listing one image of its own study and one of another: its own
    goes, the other stays, and what stayed is audited as a failed delete by
    CT_ROOM1 in the note's study (README: "logged and audited")."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-10", [2])
    other, (elsewhere,) = _study(server, tmp_path / "o", "REJ-11", [1])
    note = _note(tmp_path / "note.dcm", study, "REJ-10", REJECTED, {study: one[:2], other: elsewhere})
    sent = server.storescu(str(note), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == {one[2]} and _image_uids(server, other) == {elsewhere[1]}
    failed = _events(server, study, "failure", 1)
    assert len(failed) == 1 and failed[0]["user"] == "CT_ROOM1", failed
    assert "1 instances of other studies" in failed[0]["detail"] and failed[0]["patient_id"] == "REJ-10", failed
    assert len(_events(server, study, "success", 1)) == 1


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_an_item_without_its_series_does_not_stop_the_others(archive: PacsServer, tmp_path: Path) -> None:
    """One evidence item of the note's own study without a Series Instance
    UID: its image is kept (audited as a failed delete in the study, not an
    unexpected error), the images listed properly are withdrawn."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-12", [3])
    note = _note(tmp_path / "note.dcm", study, "REJ-12", REJECTED, {study: one[:2]})
    ds = dcmread(note)
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT, one[2]
    series_item = Dataset()
    series_item.ReferencedSOPSequence = Sequence([ref])  # no SeriesInstanceUID
    ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence.append(series_item)
    ds.save_as(note, enforce_file_format=True)
    sent = server.storescu(str(note), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == set(one[2:])
    failed = _events(server, study, "failure", 1)
    assert len(failed) == 1 and failed[0]["user"] == "CT_ROOM1", failed
    assert "1 instances listed without a series" in failed[0]["detail"], failed
    assert server.alive()


@pytest.mark.parametrize("backend", ["pg-s3"], indirect=True)
def test_a_note_listing_more_instances_than_a_statement_binds(archive: PacsServer, tmp_path: Path) -> None:
    """A note listing 70,000 instances of one series (PostgreSQL binds at
    most 65,535 parameters in one statement): the two stored are withdrawn,
    the others counted as not stored, the note acknowledged."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-13", [2])
    listed = [one[0], *one[1:], *(f"2.25.{n}" for n in range(1, 70_001))]
    note = _note(tmp_path / "note.dcm", study, "REJ-13", REJECTED, {study: listed})
    ds = dcmread(note)
    del ds.ContentSequence  # the evidence is what counts; a smaller file
    ds.save_as(note, enforce_file_format=True)
    sent = server.storescu(str(note), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == set()
    events = _events(server, study, "success", 1)
    assert len(events) == 1 and "2 instances" in events[0]["detail"], events
    # A note's refusals are audited before its deletions (one queue, in order): once the
    # deletion shows, none can come; no 20 s wait to see none.
    assert _events(server, study, "failure", 0) == []


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_the_deletions_name_the_patient_with_its_issuer(archive: PacsServer, tmp_path: Path) -> None:
    """Every other DICOM event names the patient with its issuer (an HL7 CX,
    BN100^^^BVDK): so do the deletions a note makes, or the patient's trail
    misses them."""
    server = archive
    study, ((series, *sops),) = _study(server, tmp_path / "s", "REJ-14", [2], IssuerOfPatientID="BVDK")
    note = _note(tmp_path / "note.dcm", study, "REJ-14", REJECTED, {study: [series, sops[0]]})
    ds = dcmread(note)
    ds.IssuerOfPatientID = "BVDK"
    ds.save_as(note, enforce_file_format=True)
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0
    assert _image_uids(server, study) == {sops[1]}
    events = _events(server, study, "success", 1)
    assert len(events) == 1 and events[0]["patient_id"] == "REJ-14^^^BVDK", events


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_the_ae_audit_names_the_services_as_given(archive: PacsServer) -> None:
    """CT_ROOM1 was added with "all,reject", CT_ROOM2 with "all": the audit
    trail says "all" for both, never the stored form "*"."""
    with archive.http() as http:
        details = [e["detail"] for e in http.get("/api/audit", params={"action": "ae-add"}).json()]
    assert any(d.startswith("AE CT_ROOM1 ") and "services all,reject" in d for d in details), details
    assert any(d.startswith("AE CT_ROOM2 ") and "services all" in d for d in details), details
    assert not any("*" in d for d in details), details
