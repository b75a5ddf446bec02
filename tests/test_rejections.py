"""Rejection notes (IHE IOCM): a modality withdraws images it sent with a
Key Object Selection titled "Rejected for Quality Reasons" (or patient
safety, wrong worklist entry, retention expired), sent by DCMTK storescu.

Only an AE granted ``reject`` by name withdraws anything; the note itself
is stored in any case. The images listed in the note's own study go through
the deletion path, audited as the AE's deletions; a signed report keeps
them (an administrator deletes on purpose), and so does a note from an AE
without the grant, or a "Quality Issue" flag.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs.aes import ALL_SERVICES, parse_services, services_text
from viewer_api.multipart import build_multipart_related

from .conftest import Backend, PacsServer
from .peers import index_writes_fail, wait_until
from .dicomfiles import make_ct
from .test_dimse_failures import scu_store_file
from .test_query_retrieve import StoreSCP, findscu, study_matches

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
CT = "1.2.840.10008.5.1.4.1.1.2"
REJECTED = ("113001", "DCM", "Rejected for Quality Reasons")
WRONG_ENTRY = ("113038", "DCM", "Incorrect Modality Worklist Entry")
QUALITY_ISSUE = ("113010", "DCM", "Quality Issue")
OF_INTEREST = ("113000", "DCM", "Of Interest")  # a key image note, no rejection
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


@pytest.fixture
def archive(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path / "data", backend)
    server.data_dir.mkdir(parents=True)
    for title, services in (("CT_ROOM1", "all,reject"), ("CT_ROOM2", "all")):
        server.cli("ae", "add", title, "--host", "127.0.0.1", "--port", "104", "--services", services)
    server.start()
    yield server
    server.stop()


def _study(server: PacsServer, folder: Path, patient: str, counts: list[int], calling: str = "CT_ROOM1",
           name: str = "NGUYEN^VAN AN", **extra: Any) -> tuple[str, list[list[str]]]:
    """A study of series of *counts* CT instances (with the attributes
    *extra*), sent with storescu; its UID and each series' [series UID, SOP UIDs...]."""
    folder.mkdir()
    study = generate_uid()
    series = []
    files = []
    for n, count in enumerate(counts):
        series_uid = generate_uid()
        sops = [generate_uid() for _ in range(count)]
        series.append([series_uid, *sops])
        files += [str(make_ct(folder / f"{n}-{i}.dcm", sop_uid=sop, StudyInstanceUID=study,
                              SeriesInstanceUID=series_uid, PatientID=patient, PatientName=name,
                              SeriesNumber=n + 1, InstanceNumber=i + 1, **extra))
                  for i, sop in enumerate(sops)]
    sent = server.storescu(*files, calling=calling)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return study, series


def _note(path: Path, study: str, patient: str, title: tuple[str, str, str],
          listed: dict[str, list[str]]) -> Path:
    """A rejection note (KOS, TID 2010) as a modality writes one: *listed*
    is {study UID: [series UID, SOP UIDs...], ...}, its own study first."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = KOS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient, "NGUYEN^VAN AN", "KO"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.ContentDate, ds.ContentTime = "20261207", "101500"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title
    ds.ConceptNameCodeSequence = Sequence([code])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    evidence, content = [], []
    for study_uid, (series_uid, *sops) in listed.items():
        refs = []
        for sop in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT, sop
            refs.append(ref)
            image = Dataset()
            image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
            image.ReferencedSOPSequence = Sequence([ref])
            content.append(image)
        series_item = Dataset()
        series_item.SeriesInstanceUID, series_item.ReferencedSOPSequence = series_uid, Sequence(refs)
        study_item = Dataset()
        study_item.StudyInstanceUID, study_item.ReferencedSeriesSequence = study_uid, Sequence([series_item])
        evidence.append(study_item)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence(evidence)
    ds.ContentSequence = Sequence(content)
    ds.save_as(path, enforce_file_format=True)
    return path


def _image_uids(server: PacsServer, study: str) -> set[str]:
    """The CT images QIDO-RS finds in the study."""
    with server.http() as http:
        answer = http.get(f"/dicom-web/studies/{study}/instances", params={"SOPClassUID": CT})
    if answer.status_code == 204:
        return set()
    assert answer.status_code == 200, answer.text
    return {i["00080018"]["Value"][0] for i in answer.json()}


def _events(server: PacsServer, study: str, outcome: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        with server.http() as http:
            events = [e for e in http.get("/api/audit", params={"study": study, "action": "delete"}).json()
                      if e["outcome"] == outcome]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def test_a_rejection_note_withdraws_the_images_it_lists(archive: PacsServer, tmp_path: Path) -> None:
    """Two of series 1's three images and the whole of series 2 rejected:
    both gone from QIDO-RS and the store, series 2 with them; the note is
    stored; each series' deletion is audited as CT_ROOM1's, with the reason."""
    server = archive
    study, (one, two) = _study(server, tmp_path / "s", "REJ-1", [3, 2])
    before = server.stats()
    note = _note(tmp_path / "note.dcm", study, "REJ-1", REJECTED, {study: [one[0], *one[1:3]]})
    # Series 2 in a second evidence item of the same study (a modality may list it so).
    note2 = _note(tmp_path / "note2.dcm", study, "REJ-1", REJECTED, {study: two})
    sent = server.storescu(str(note), str(note2), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == {one[3]}
    after = server.stats()
    assert after["instances"] == before["instances"] - 4 + 2  # four images withdrawn, two notes stored
    assert after["series"] == before["series"] - 1 + 2
    with server.http() as http:
        listed = {s["0020000E"]["Value"][0] for s in http.get(f"/dicom-web/studies/{study}/series").json()}
        assert one[0] in listed and two[0] not in listed
        notes = http.get(f"/dicom-web/studies/{study}/instances", params={"SOPClassUID": KOS}).json()
    assert len(notes) == 2
    verified = json.loads(server.cli("verify", "--json").stdout)
    assert verified["orphans"]["count"] == 0 and verified["missing"]["count"] == 0, verified
    events = _events(server, study, "success", 2)
    assert len(events) == 2 and {e["user"] for e in events} == {"CT_ROOM1"}, events
    assert all("Rejected for Quality Reasons (113001)" in e["detail"] and e["patient_id"] == "REJ-1"
               for e in events), events
    first = min(one[1:3])
    assert any(e["detail"].startswith(f"instance {first} and 1 more of series {one[0]}: 2 instances")
               for e in events), [e["detail"] for e in events]
    # Sent again (the modality missed our answer): stored, nothing more to withdraw.
    again = server.storescu(str(note), calling="CT_ROOM1")
    assert again.returncode == 0 and _image_uids(server, study) == {one[3]}
    assert server.alive()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_what_a_note_does_not_withdraw(archive: PacsServer, tmp_path: Path) -> None:
    """A note from an AE without "reject" ("all" does not grant it), a
    Quality Issue flag, and a note listing another study's images: each
    stored, acknowledged, and every image kept."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-2", [2], calling="CT_ROOM2")
    other, (elsewhere,) = _study(server, tmp_path / "o", "REJ-3", [1])
    notes = [_note(tmp_path / "a.dcm", study, "REJ-2", REJECTED, {study: one}),
             _note(tmp_path / "b.dcm", study, "REJ-2", QUALITY_ISSUE, {study: one}),
             _note(tmp_path / "c.dcm", study, "REJ-2", WRONG_ENTRY, {other: elsewhere})]
    assert server.storescu(str(notes[0]), calling="CT_ROOM2").returncode == 0
    sent = server.storescu(str(notes[1]), str(notes[2]), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == set(one[1:]) and _image_uids(server, other) == {elsewhere[1]}
    assert "1 instances of other studies (a note withdraws images of its own study)" in server.log_text()
    assert server.stats()["instances"] == 6


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_signed_report_keeps_the_images(archive: PacsServer, tmp_path: Path) -> None:
    """The study was reported and signed before the modality rejected an
    image: the image stays (an administrator deletes on purpose, pacs
    delete --force), the failure is audited as CT_ROOM1's, the note stored.
    An image the note lists that has not arrived is not barred either: what
    the note may not withdraw, it does not reject."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-4", [2])
    radiologist = server.make_token("bs.lan", "radiologist")
    with server.http(radiologist) as rad:
        assert rad.put(f"/api/studies/{study}/report", json={"findings": "Bình thường.", "impression": "Không."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{study}/report/sign").status_code == 200
    note = _note(tmp_path / "note.dcm", study, "REJ-4", REJECTED, {study: one[:2]})
    sent = server.storescu(str(note), calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _image_uids(server, study) == set(one[1:])
    failed = _events(server, study, "failure", 1)
    assert len(failed) == 1 and failed[0]["user"] == "CT_ROOM1" and "signed report" in failed[0]["detail"], failed
    assert _events(server, study, "success", 0) == []  # the same note's events: in the audit queue together
    late_series, late_sop = generate_uid(), generate_uid()
    note = _note(tmp_path / "late-note.dcm", study, "REJ-4", REJECTED, {study: [late_series, late_sop]})
    assert scu_store_file(server, note, calling="CT_ROOM1") == 0
    assert len(_events(server, study, "failure", 2)) == 2
    assert _rejections(server, "list", "--study", study)["total"] == 0
    late = make_ct(tmp_path / "late.dcm", sop_uid=late_sop, StudyInstanceUID=study, SeriesInstanceUID=late_series,
                   PatientID="REJ-4", PatientName="NGUYEN^VAN AN")
    assert scu_store_file(server, late, calling="CT_ROOM1") == 0
    assert late_sop in _image_uids(server, study)


def test_reject_is_granted_by_name_only() -> None:
    assert "reject" not in parse_services("all") and "reject" not in ALL_SERVICES
    assert parse_services("all,reject") == ALL_SERVICES | {"reject"}
    assert services_text(parse_services("*,reject")) == "*,reject"
    assert services_text(parse_services("store,reject")) == "store,reject"
    assert services_text(ALL_SERVICES) == "*"
    with pytest.raises(ValueError):
        parse_services("store,delete")


def test_a_note_not_applied_is_refused_so_the_modality_sends_it_again(archive: PacsServer, tmp_path: Path) -> None:
    """The index fails while the note's images are withdrawn: the note is
    stored, but answered 0xA700 (not a success the modality would take as
    done), audited in the study; sent again once the index works, it
    withdraws them."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-9", [2])
    note = _note(tmp_path / "note.dcm", study, "REJ-9", REJECTED, {study: one})
    index_writes_fail(server, "DELETE", True)
    try:
        assert scu_store_file(server, note, calling="CT_ROOM1") == 0xA700
    finally:
        index_writes_fail(server, "DELETE", False)
    assert _image_uids(server, study) == set(one[1:])
    failed = _events(server, study, "failure", 1)
    assert len(failed) == 1 and "not applied" in failed[0]["detail"] and failed[0]["user"] == "CT_ROOM1", failed
    assert scu_store_file(server, note, calling="CT_ROOM1") == 0
    assert _image_uids(server, study) == set()
    assert server.alive()


def _stow(server: PacsServer, path: Path, token: str | None = None) -> Any:
    body, content_type = build_multipart_related([("application/dicom", path.read_bytes())])
    with server.http(token) as http:
        return http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_note_stored_over_stow_rs_withdraws_for_an_administrator_only(archive: PacsServer,
                                                                        tmp_path: Path) -> None:
    """STOW-RS: a note an administrator stores (a QC workstation, a script
    of the IT team) withdraws what it lists, audited as their deletion; a
    modality's token stores it and withdraws nothing (as an AE without
    "reject" over DICOM). A withdrawal the index fails is that part's
    0xA700 (503), the note stored; sent again, it withdraws them."""
    server = archive
    study, (one, two) = _study(server, tmp_path / "s", "REJ-14", [2, 2])
    modality = server.make_token("ct.room3", "modality")
    by_modality = _note(tmp_path / "m.dcm", study, "REJ-14", REJECTED, {study: one})
    stored = _stow(server, by_modality, modality)
    assert stored.status_code == 200, stored.text
    assert _image_uids(server, study) == set(one[1:] + two[1:])
    by_admin = _note(tmp_path / "a.dcm", study, "REJ-14", REJECTED, {study: one})
    index_writes_fail(server, "DELETE", True)
    try:
        failed = _stow(server, by_admin)
    finally:
        index_writes_fail(server, "DELETE", False)
    assert failed.status_code == 503, failed.text
    reason = failed.json()["00081198"]["Value"][0]
    assert reason["00081197"]["Value"] == [0xA700] and reason["00081155"]["Value"] == [_sop_of(by_admin)]
    assert _image_uids(server, study) == set(one[1:] + two[1:])
    assert _stow(server, by_admin).status_code == 200
    assert _image_uids(server, study) == set(two[1:])
    deleted = _events(server, study, "success", 1)
    assert {e["user"] for e in deleted} == {"pacs-test"} and all(e["protocol"] == "http" for e in deleted), deleted
    assert server.stats()["instances"] == 4  # two images and the two notes
    assert server.alive()


def route_jobs(server: PacsServer) -> list[dict[str, Any]]:
    """Every routing job of *server*, newest first (`pacs route list`)."""
    done = server.cli("route", "list", "--json", "--limit", "1000")
    return list(json.loads(done.stdout)["jobs"])


def all_delivered(server: PacsServer, count: int) -> bool:
    """*server* has *count* routing jobs, all done."""
    return len(found := route_jobs(server)) == count and all(j["state"] == "done" for j in found)


def test_a_note_follows_the_images_it_withdrew_where_routing_sent_them(tmp_path: Path) -> None:
    """A CT study was forwarded by routing rules to a reading site (another
    archive, over STOW-RS) and to a DCMTK storescp before the modality
    withdrew two of its images: the note follows them to both, under the
    rules that sent them though they route CT only, and the reading site
    withdraws them too. A rule that sent none of them sends nothing."""
    reader = PacsServer(tmp_path / "reader", Backend("sqlite-fs", None, None, {})).start()
    copy = StoreSCP(tmp_path / "copy", accept_all=True)
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}))
    server.data_dir.mkdir(parents=True)
    try:
        server.cli("ae", "add", "CT_ROOM1", "--host", "127.0.0.1", "--port", "104", "--services", "all,reject")
        server.cli("ae", "add", "MOVEDEST", "--host", "127.0.0.1", "--port", str(copy.port))
        server.cli("route", "add", "reading", "--if", "Modality=CT", "--to-url",
                   f"http://127.0.0.1:{reader.http_port}/dicom-web", "--auth", f"Bearer {reader.token}")
        server.cli("route", "add", "copy", "--if", "Modality=CT", "--to-ae", "MOVEDEST")
        server.cli("route", "add", "mr-copy", "--if", "Modality=MR", "--to-ae", "MOVEDEST")
        server.start()

        def jobs() -> list[dict[str, Any]]:
            return route_jobs(server)

        def delivered(count: int) -> bool:
            return all_delivered(server, count)

        study, (one,) = _study(server, tmp_path / "s", "REJ-15", [3])
        assert wait_until(lambda: delivered(6)), jobs()
        assert _image_uids(reader, study) == set(one[1:])
        note = _note(tmp_path / "note.dcm", study, "REJ-15", WRONG_ENTRY, {study: one[:3]})
        assert scu_store_file(server, note, calling="CT_ROOM1") == 0
        assert _image_uids(server, study) == {one[3]}
        assert wait_until(lambda: delivered(8)), jobs()
        note_uid = _sop_of(note)
        assert sorted(j["rule"] for j in jobs() if j["sop_uid"] == note_uid) == ["copy", "reading"]
        assert note_uid in copy.received()
        # The reading site's administrator token: the note withdraws them there too.
        assert _image_uids(reader, study) == {one[3]}
        assert _rejections(reader, "list", "--study", study)["total"] == 2
    finally:
        server.stop()
        reader.stop()
        copy.stop()


def _sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _rejections(server: PacsServer, *args: str) -> dict[str, Any]:
    done = server.cli("rejections", *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_a_rejected_instance_sent_again_is_refused_until_lifted(archive: PacsServer, tmp_path: Path) -> None:
    """The modality resends the whole study after its note (its automatic
    retry): the withdrawn images, and one the note listed that had not
    arrived, are refused 0xA771 over DICOM, 409 over STOW-RS and by an
    import (counted as rejected), their copies not kept; the image the note did not list is a
    plain resend. ``pacs rejections lift`` lets one in again, audited, and
    the same note sent again does not withdraw it again."""
    server = archive
    folder = tmp_path / "s"
    study, (one,) = _study(server, folder, "REJ-10", [3])
    series_uid, kept, *withdrawn = one
    late = generate_uid()  # listed by the note, not received yet (a router brings it later)
    late_file = make_ct(tmp_path / "late.dcm", sop_uid=late, StudyInstanceUID=study, SeriesInstanceUID=series_uid,
                        PatientID="REJ-10", PatientName="NGUYEN^VAN AN", SeriesNumber=1, InstanceNumber=9)
    note = _note(tmp_path / "note.dcm", study, "REJ-10", REJECTED, {study: [series_uid, *withdrawn, late]})
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0
    assert _image_uids(server, study) == {kept}
    before = server.stats()
    files = {path.stem: path for path in folder.iterdir()}
    sent = {sop: files[f"0-{i}"] for i, sop in enumerate(one[1:])}
    assert scu_store_file(server, sent[kept], calling="CT_ROOM1") == 0
    for sop in withdrawn:
        assert scu_store_file(server, sent[sop], calling="CT_ROOM2") == 0xA771
    assert scu_store_file(server, late_file, calling="CT_ROOM2") == 0xA771
    refused = _stow(server, sent[withdrawn[0]])
    assert refused.status_code == 409, refused.text
    assert refused.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA771]
    # An import counts it refused as rejected: the archive's choice, not a failure (exit 0).
    imported = server.cli("import", str(late_file), "--json")
    report = json.loads(imported.stdout)
    assert report["rejected"] == 1 and report["failed"] == 0 and report["stored"] == 0, imported
    assert _image_uids(server, study) == {kept}
    assert server.stats() == before
    verified = json.loads(server.cli("verify", "--json").stdout)
    assert verified["orphans"]["count"] == 0, verified  # no refused copy left in the store
    assert "pacs rejections lift" in server.log_text()

    listed = _rejections(server, "list", "--study", study)
    assert listed["total"] == 3
    assert {r["sop_uid"] for r in listed["rejected"]} == {*withdrawn, late}
    assert {(r["code"], r["reason"], r["rejected_by"], r["note_uid"]) for r in listed["rejected"]} == {
        ("113001", "Rejected for Quality Reasons", "CT_ROOM1", _note_uid(note))}
    # Without --yes nothing changes.
    dry = _rejections(server, "lift", withdrawn[0], "--reason", "sent with the same UIDs after correction")
    assert dry["dry_run"] and [e["sop_uid"] for e in dry["lifted"]] == [withdrawn[0]]
    assert scu_store_file(server, sent[withdrawn[0]], calling="CT_ROOM2") == 0xA771
    done = _rejections(server, "lift", withdrawn[0], "--reason", "sent with the same UIDs after correction", "--yes")
    assert not done["dry_run"] and [e["sop_uid"] for e in done["lifted"]] == [withdrawn[0]]
    assert scu_store_file(server, sent[withdrawn[0]], calling="CT_ROOM2") == 0
    assert _image_uids(server, study) == {kept, withdrawn[0]}
    assert _rejections(server, "list", "--study", study)["total"] == 2
    # The modality sends the whole study again, its note with it: the lift stands.
    assert scu_store_file(server, note, calling="CT_ROOM1") == 0
    assert _image_uids(server, study) == {kept, withdrawn[0]}
    assert scu_store_file(server, sent[withdrawn[1]], calling="CT_ROOM2") == 0xA771
    # Another note rejecting it rejects it anew.
    second = _note(tmp_path / "note2.dcm", study, "REJ-10", WRONG_ENTRY, {study: [series_uid, withdrawn[0]]})
    assert scu_store_file(server, second, calling="CT_ROOM1") == 0
    assert _image_uids(server, study) == {kept}
    assert scu_store_file(server, sent[withdrawn[0]], calling="CT_ROOM2") == 0xA771
    assert {(r["sop_uid"], r["code"]) for r in _rejections(server, "list", "--study", study)["rejected"]} == {
        (withdrawn[0], "113038"), (withdrawn[1], "113001"), (late, "113001")}
    with server.http() as http:
        events = http.get("/api/audit", params={"study": study, "action": "rejection-lift"}).json()
    assert len(events) == 1 and "sent with the same UIDs after correction" in events[0]["detail"], events
    assert server.alive()


def _note_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_study_whose_every_image_was_withdrawn_leaves_the_reading_worklist(archive: PacsServer,
                                                                              tmp_path: Path) -> None:
    """A STAT study sent under the wrong patient, withdrawn whole by its
    modality: what is left (the note) has nothing to read, so it neither
    waits "unread" in the radiologists' worklist nor keeps the urgent count
    up, nor is it listed in the patient's history: over FHIR, QIDO-RS or
    C-FIND (DCMTK findscu). Nor is one that keeps only its dose report. A
    search naming the study, or asking for its modality (KO), still finds
    it. A study keeping one image stays, as does a study of a report and a
    key image note that nothing rejected."""
    server = archive
    study, ((series, *sops),) = _study(server, tmp_path / "s", "REJ-11", [2], RequestedProcedurePriority="STAT")
    other, (kept_series,) = _study(server, tmp_path / "o", "REJ-12", [2])
    radiologist = server.make_token("bs.rej", "radiologist")

    def worklist() -> tuple[set[str], int]:
        with server.http(radiologist) as http:
            found = http.get("/api/worklist").json()
        return {i["study_uid"] for i in found["items"]}, found.get("urgent_unread", 0)

    assert worklist() == ({study, other}, 1)
    # A CT study with its dose report (SR): withdrawn whole but for the report, the wrong patient's
    # dose. And a study of a report and a key image note, never rejected: it stays.
    dosed, (dosed_images,) = _study(server, tmp_path / "d", "REJ-16", [2])
    keyed, report_series, report = generate_uid(), generate_uid(), generate_uid()
    others = [make_ct(tmp_path / "dose.dcm", sop_class=DOSE_SR, StudyInstanceUID=dosed, Modality="SR",
                      SeriesInstanceUID=generate_uid(), PatientID="REJ-16", PatientName="NGUYEN^VAN AN"),
              make_ct(tmp_path / "report.dcm", sop_class=DOSE_SR, sop_uid=report, StudyInstanceUID=keyed,
                      Modality="SR", SeriesInstanceUID=report_series, PatientID="REJ-17",
                      PatientName="NGUYEN^VAN AN"),
              _note(tmp_path / "key.dcm", keyed, "REJ-17", OF_INTEREST, {keyed: [report_series, report]})]
    assert server.storescu(*map(str, others), calling="CT_ROOM1").returncode == 0
    notes = [_note(tmp_path / "a.dcm", study, "REJ-11", WRONG_ENTRY, {study: [series, *sops]}),
             _note(tmp_path / "b.dcm", other, "REJ-12", REJECTED, {other: kept_series[:2]}),
             _note(tmp_path / "c.dcm", dosed, "REJ-16", WRONG_ENTRY, {dosed: dosed_images})]
    assert server.storescu(*map(str, notes), calling="CT_ROOM1").returncode == 0
    assert _image_uids(server, study) == set() and _image_uids(server, other) == {kept_series[2]}
    assert _image_uids(server, dosed) == set()
    assert worklist() == ({other, keyed}, 0)
    # Nor does the EMR list it in the patient's history (FHIR), where it read as an empty study.
    with server.http(radiologist) as http:
        for patient, expected in (("REJ-11", 0), ("REJ-12", 1), ("REJ-16", 0), ("REJ-17", 1)):
            bundle = http.get("/fhir/ImagingStudy", params={"patient.identifier": patient}).json()
            assert bundle["total"] == expected, bundle

        def qido(**params: str) -> set[str]:
            answer = http.get("/dicom-web/studies", params=params)
            assert answer.status_code in (200, 204), answer.text
            return {s["0020000D"]["Value"][0] for s in answer.json()} if answer.status_code == 200 else set()

        assert qido(PatientName="NGUYEN*") >= {other} and study not in qido(PatientName="NGUYEN*")
        assert qido(PatientID="REJ-11") == set() and qido(PatientID="REJ-12") == {other}
        assert qido(PatientID="REJ-16") == set() and qido(PatientID="REJ-17") == {keyed}
        # A viewer's modality filter is no request for the notes: the wrong patient's dose report stays out.
        assert qido(PatientID="REJ-16", ModalitiesInStudy="CT\\SR") == set()
        assert qido(PatientID="REJ-16", ModalitiesInStudy="SR,KO") == {dosed}

        def across(level: str, **params: str) -> set[str]:
            """The studies of a series or instance search across studies."""
            answer = http.get(f"/dicom-web/{level}", params=params)
            assert answer.status_code in (200, 204), answer.text
            return {s["0020000D"]["Value"][0] for s in answer.json()} if answer.status_code == 200 else set()

        assert across("series", PatientID="REJ-11") == set() and across("instances", PatientID="REJ-16") == set()
        assert across("series", PatientID="REJ-12") == {other} and across("instances", PatientID="REJ-17") == {keyed}
        assert across("series", PatientID="REJ-11", Modality="KO") == {study}
        named = http.get(f"/dicom-web/studies/{dosed}/series").json()
        assert sorted(s["00080060"]["Value"][0] for s in named) == ["KO", "SR"], named
        assert qido(StudyInstanceUID=study) == {study}
        assert qido(PatientID="REJ-11", ModalitiesInStudy="KO") == {study}
    assert study_matches(server, tmp_path, PatientID="REJ-11") == set()
    assert study_matches(server, tmp_path, PatientID="REJ-12") == {other}
    assert study_matches(server, tmp_path, PatientID="REJ-16") == set()
    assert study_matches(server, tmp_path, PatientID="REJ-17") == {keyed}
    named = findscu(server, tmp_path, "STUDY", {"StudyInstanceUID": study, "PatientID": ""})
    assert [str(r.StudyInstanceUID) for r in named] == [study]
    assert study_matches(server, tmp_path, PatientID="REJ-11", ModalitiesInStudy="KO") == {study}


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_rejections_over_the_json_api(archive: PacsServer, tmp_path: Path) -> None:
    """GET /api/rejections and POST /api/rejections/lift do what the CLI
    does, for administrators only, audited; bad requests are 400s."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-13", [2])
    note = _note(tmp_path / "note.dcm", study, "REJ-13", REJECTED, {study: one[:2]})
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0
    admin, radiologist = server.make_token("it.admin", "admin"), server.make_token("bs.rej2", "radiologist")
    with server.http(radiologist) as http:
        assert http.get("/api/rejections").status_code == 403
        assert http.post("/api/rejections/lift", json={"sop_uids": [one[1]], "reason": "x"}).status_code == 403
    with server.http(admin) as http:
        listed = http.get("/api/rejections", params={"study": study}).json()
        assert listed["total"] == 1 and listed["rejected"][0]["sop_uid"] == one[1], listed
        assert listed["rejected"][0]["reason"] == "Rejected for Quality Reasons"
        assert http.get("/api/rejections", params={"study": "1.2.x"}).status_code == 400
        assert http.get("/api/rejections", params={"limit": 0}).status_code in (400, 422)
        for bad in ({"reason": "no target"}, {"sop_uids": ["1.2.x"], "reason": "bad UID"},
                    {"sop_uids": [one[1]], "reason": "   "}, {"sop_uids": [one[1]]}):
            assert http.post("/api/rejections/lift", json=bad).status_code in (400, 422), bad
        dry = http.post("/api/rejections/lift", params={"dry_run": "true"},
                        json={"study_uid": study, "reason": "same UIDs resent after correction"}).json()
        assert dry["dry_run"] and [e["sop_uid"] for e in dry["lifted"]] == [one[1]]
        assert http.get("/api/rejections", params={"study": study}).json()["total"] == 1
        done = http.post("/api/rejections/lift",
                         json={"study_uid": study, "reason": "same UIDs resent after correction"})
        assert done.status_code == 200 and [e["sop_uid"] for e in done.json()["lifted"]] == [one[1]], done.text
        assert http.get("/api/rejections", params={"study": study}).json()["total"] == 0
        events = http.get("/api/audit", params={"study": study, "action": "rejection-lift"}).json()
    assert [e["user"] for e in events if e["outcome"] == "success"] == ["it.admin", "it.admin"], events
    assert any(e["detail"].startswith("lifted the rejection of 1 instances") for e in events), events
    files = sorted((tmp_path / "s").iterdir())
    assert scu_store_file(server, files[0], calling="CT_ROOM2") == 0
    assert one[1] in _image_uids(server, study)


def test_an_administrator_rejects_a_series_the_modality_cannot(archive: PacsServer, tmp_path: Path) -> None:
    """Most modalities in service cannot send a rejection note: ``pacs
    rejections reject`` makes one here. A dry run changes nothing; then
    the series goes, audited, recorded as rejected (the modality resending
    the study gets 0xA771 for it), and the note is a KOS of the study that
    keeps the patient's Vietnamese name and says why."""
    server = archive
    study, (first, second) = _study(server, tmp_path / "s", "REJ-20", [2, 1], calling="CT_ROOM2",
                                    name="Nguyễn^Văn Ân", SpecificCharacterSet="ISO_IR 192")
    args = ["rejections", "reject", "--study", study, "--series", first[0], "--code", "Incorrect Modality "
            "Worklist Entry", "--reason", "chụp nhầm bệnh nhân: sent under REJ-20 instead of REJ-21", "--json"]
    dry = json.loads(server.cli(*args).stdout)
    assert dry["dry_run"] and dry["instances"] == 2 and dry["code"] == "113038", dry
    assert dry["series"] == [{"series_uid": first[0], "instances": 2}] and dry["patient_id"] == "REJ-20"
    assert _image_uids(server, study) == set(first[1:] + second[1:])
    done = json.loads(server.cli(*args, "--yes").stdout)
    assert not done["dry_run"] and done["withdrawn"] == 2 and done["kept"] == [], done
    assert _image_uids(server, study) == {second[1]}
    assert {r["sop_uid"] for r in _rejections(server, "list", "--study", study)["rejected"]} == set(first[1:])
    files = sorted((tmp_path / "s").iterdir())
    assert [scu_store_file(server, f, calling="CT_ROOM2") for f in files] == [0xA771, 0xA771, 0]
    with server.http() as http:
        found = http.get(f"/dicom-web/studies/{study}/series", params={"Modality": "KO"}).json()
        (note_series,) = [s["0020000E"]["Value"][0] for s in found]
        answer = http.get(f"/dicom-web/studies/{study}/series/{note_series}/metadata")
        (note,) = answer.json()
        events = http.get("/api/audit", params={"study": study}).json()
    assert note["00080016"]["Value"] == [KOS] and note["00100010"]["Value"][0]["Alphabetic"] == "Nguyễn^Văn Ân"
    assert note["0040A043"]["Value"][0]["00080100"]["Value"] == ["113038"]
    texts = [i["0040A160"]["Value"][0] for i in note["0040A730"]["Value"] if i["0040A040"]["Value"] == ["TEXT"]]
    assert "chụp nhầm bệnh nhân: sent under REJ-20 instead of REJ-21" in texts
    deleted = [e for e in events if e["action"] == "delete" and e["outcome"] == "success"]
    assert len(deleted) == 1 and deleted[0]["protocol"] == "cli" and "chụp nhầm" in deleted[0]["detail"], deleted
    assert [e["protocol"] for e in events if e["action"] == "reject"] == ["cli"], events
    refused = server.cli("rejections", "reject", "--study", "1.2.3.999", "--reason", "x", "--yes", check=False)
    assert refused.returncode == 2 and "no study" in refused.stderr, refused.stderr
    refused = server.cli("rejections", "reject", "--study", study, "--reason", "bell\x07", "--yes", check=False)
    assert refused.returncode == 2 and "control characters" in refused.stderr, refused.stderr
    with server.http() as http:
        failed = [e for e in http.get("/api/audit", params={"study": study, "action": "reject"}).json()
                  if e["outcome"] == "failure"]
    assert len(failed) == 1 and failed[0]["protocol"] == "cli" and "(400)" in failed[0]["detail"], failed


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_rejecting_over_the_json_api(archive: PacsServer, tmp_path: Path) -> None:
    """POST /api/rejections/reject: administrators only; one instance
    rejected by name, after a dry run; the note follows no rule here; bad
    requests are 400, an unknown study or instance 404, a signed study 409."""
    server = archive
    study, (one,) = _study(server, tmp_path / "s", "REJ-22", [3])
    signed, (kept,) = _study(server, tmp_path / "t", "REJ-23", [1])
    radiologist = server.make_token("bs.rej3", "radiologist")
    with server.http(radiologist) as rad:
        body = {"study_uid": study, "sop_uids": [one[1]], "reason": "blurred"}
        assert rad.post("/api/rejections/reject", json=body).status_code == 403
        assert rad.put(f"/api/studies/{signed}/report", json={"findings": "Bình thường.", "impression": "Không."}
                       ).status_code == 200
        assert rad.post(f"/api/studies/{signed}/report/sign").status_code == 200
    with server.http() as http:
        dry = http.post("/api/rejections/reject", params={"dry_run": "true"}, json=body)
        assert dry.status_code == 200 and dry.json()["dry_run"] and dry.json()["instances"] == 1, dry.text
        assert dry.json()["code"] == "113001" and dry.json()["reason"] == "Rejected for Quality Reasons"
        for bad, status in (({**body, "code": "113000"}, 400), ({**body, "study_uid": "1.2.x"}, 400),
                            ({**body, "sop_uids": ["1.2.x"]}, 400), ({**body, "reason": "  "}, 400),
                            ({**body, "study_uid": "1.2.3.998"}, 404), ({**body, "sop_uids": [kept[1]]}, 404),
                            ({"study_uid": signed, "reason": "blurred"}, 409)):
            answer = http.post("/api/rejections/reject", json=bad)
            assert answer.status_code == status, (bad, answer.text)
        done = http.post("/api/rejections/reject", json={**body, "code": "113037"})
        assert done.status_code == 200, done.text
        assert done.json()["withdrawn"] == 1 and done.json()["code"] == "113037", done.json()
        events = http.get("/api/audit", params={"study": study, "action": "reject"}).json()
        # The same administrator's key images, saved and cleared, leave the note alone (not their selection).
        for images in ([{"sop_uid": one[2]}], []):
            assert http.put(f"/api/studies/{study}/key-images", json={"images": images}).status_code == 200
        notes = http.get(f"/dicom-web/studies/{study}/instances", params={"SOPClassUID": KOS}).json()
        assert [n["00080018"]["Value"][0] for n in notes] == [done.json()["note_uid"]], notes
    assert _image_uids(server, study) == set(one[2:]) and _image_uids(server, signed) == {kept[1]}
    assert [(e["user"], e["outcome"]) for e in events if not e["detail"].startswith("would")].count(
        ("pacs-test", "success")) == 1, events
    assert _rejections(server, "list", "--study", study)["rejected"][0]["code"] == "113037"


def test_an_import_applies_the_rejection_notes_it_brings(archive: PacsServer, tmp_path: Path) -> None:
    """An old archive's files: studies, and the rejection notes that withdrew
    two images of each. Imported together, the images are stored and then
    withdrawn (audited as the operator's deletions); imported after their
    note, they are refused (counted rejected). Nothing failed (exit 0), and
    importing it all again changes nothing."""
    server = archive

    def old_study(name: str) -> tuple[str, list[str], Path, Path]:
        images, notes = tmp_path / name / "images", tmp_path / name / "notes"
        images.mkdir(parents=True)
        notes.mkdir()
        study, series = generate_uid(), generate_uid()
        sops = [generate_uid() for _ in range(3)]
        for i, sop in enumerate(sops):
            make_ct(images / f"img{i}.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID="REJ-30", PatientName="NGUYEN^VAN AN", InstanceNumber=i + 1)
        _note(notes / "note.dcm", study, "REJ-30", REJECTED, {study: [series, *sops[:2]]})
        return study, sops, images, notes

    def imported(*paths: Path) -> dict[str, Any]:
        return dict(json.loads(server.cli("import", *map(str, paths), "--json").stdout))

    # The images first, then their note: withdrawn.
    study, sops, images, notes = old_study("a")
    assert imported(images)["stored"] == 3
    report = imported(notes)
    assert report["withdrawn"] == 2 and report["stored"] == 1 and report["failed"] == 0, report
    assert _image_uids(server, study) == {sops[2]}
    deleted = _events(server, study, "success", 1)
    assert len(deleted) == 1 and deleted[0]["protocol"] == "cli" and "rejection note" in deleted[0]["detail"]
    # The note first, then the images: the two it lists are refused.
    study, sops, images, notes = old_study("b")
    assert imported(notes)["withdrawn"] == 0
    report = imported(images)
    assert report["rejected"] == 2 and report["stored"] == 1 and report["failed"] == 0, report
    assert _image_uids(server, study) == {sops[2]}
    # Both together, in any order the threads meet them: the notes apply once every file is in.
    study, sops, images, notes = old_study("c")
    report = imported(notes, images)
    assert report["failed"] == 0 and report["withdrawn"] == 2 and report["rejected"] == 0, report
    again = imported(images, notes)
    assert again["rejected"] == 2 and again["duplicates"] == 2 and again["failed"] == 0, again
    assert _image_uids(server, study) == {sops[2]}
    assert {r["sop_uid"] for r in _rejections(server, "list", "--study", study)["rejected"]} == set(sops[:2])
