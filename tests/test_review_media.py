"""Review of patient media export (`pacs export --media`, GET
/api/studies/{uid}/media): bugs found by exporting the way an operator at
the film desk does it, and reading the media the way a receiving hospital's
PACS does (every file under the folder, not only those the DICOMDIR lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from .dicomfiles import make_ct
from .peers import Backend, PacsServer


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Iterator[PacsServer]:
    """A server with the sample studies."""
    server = PacsServer(tmp_path_factory.mktemp("review-media") / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(samples))
    manifest = json.loads((samples / "manifest.json").read_text())
    server.studies = {s["name"]: s["study_instance_uid"] for s in manifest["studies"]}  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


def _export(server: PacsServer, *args: str, rc: int = 0) -> dict[str, Any]:
    result = server.cli("export", *args, "--json", check=False)
    assert result.returncode == rc, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def _studies_on_disk(root: Path) -> set[str]:
    """The Study Instance UIDs of every DICOM file under *root* (what an import of the folder takes)."""
    return {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in root.rglob("*")
            if p.is_file() and p.name not in ("DICOMDIR", "README.TXT")}


def test_an_interrupted_export_of_another_patient_is_not_left_on_this_patients_media(archive: PacsServer,
                                                                                      tmp_path: Path) -> None:
    """An export stopped before its DICOMDIR (Ctrl-C, a full USB stick: the
    DICOMDIR is written last) left DICOM/PAT00001/... of one patient; the
    next patient's export into the same folder passed the folder check (no
    DICOMDIR to read), overwrote the first few files and left the rest: the
    second patient's CD carried seven CT images of the first, listed in no
    DICOMDIR but imported by any PACS that reads the folder. Now refused,
    nothing touched; the interrupted export itself still resumes there."""
    ct, dx = archive.studies["ct"], archive.studies["dx"]  # type: ignore[attr-defined]
    out = tmp_path / "usb"
    _export(archive, ct, "--out", str(out), "--media")
    (out / "DICOMDIR").unlink()  # as an interrupted run leaves it
    (out / "README.TXT").unlink()
    before = sorted((p, p.read_bytes()) for p in out.rglob("*") if p.is_file())
    refused = archive.cli("export", dx, "--out", str(out), "--media", check=False)
    assert refused.returncode == 2 and ct in refused.stderr and "empty folder" in refused.stderr, refused.stderr
    assert sorted((p, p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert _studies_on_disk(out) == {ct}
    # The interrupted export resumes, and may take the other study along.
    report = _export(archive, ct, dx, "--out", str(out), "--media")
    assert report["already_there"] == len(before) and report["instances"] == 1
    assert _studies_on_disk(out) == {ct, dx}


def test_a_rerun_after_the_study_was_reconciled_writes_the_corrected_patient(archive: PacsServer,
                                                                            tmp_path: Path) -> None:
    """The film desk exports a study to a USB stick, sees the modality's
    wrong patient on it, has the study reconciled with the HIS order and
    exports again into the same folder: every file was "already there" (same
    object, same transfer syntax) and kept, so the files, the DICOMDIR and
    README.TXT still named the wrong patient, while retrieval and a fresh
    export give the corrected one. A file is now kept only when it carries
    the index's current corrected values."""
    us = archive.studies["us"]  # type: ignore[attr-defined]
    out = tmp_path / "usb"
    first = _export(archive, us, "--out", str(out), "--media")
    files = [p for p in (out / "DICOM").rglob("*") if p.is_file()]
    assert first["instances"] == len(files) >= 1
    with archive.http() as http:
        order = http.post("/api/orders", json={
            "patient": {"id": "079300000888", "issuer": "CCCD", "name": "Vũ^Thị Hằng", "birth_date": "19920202",
                        "sex": "F"},
            "accession_number": "ACCREVIEW1", "modality": "US", "start_date": "20240813", "start_time": "150000"})
        assert order.status_code == 201, order.text
    archive.cli("orders", "match", us, "ACCREVIEW1")
    again = _export(archive, us, "--out", str(out), "--media")
    assert again["instances"] == len(files) and again["already_there"] == 0, again
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        assert (str(ds.PatientName), ds.PatientID) == ("Vũ^Thị Hằng", "079300000888"), path
    patient = next(r for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert (str(patient.PatientName), patient.PatientID) == ("Vũ^Thị Hằng", "079300000888")
    assert "Vũ Thị Hằng" in (out / "README.TXT").read_text("utf-8-sig")
    # Nothing changed since: a third run keeps every file.
    third = _export(archive, us, "--out", str(out), "--media")
    assert third["already_there"] == len(files) and third["instances"] == 0


def test_a_mistyped_study_uid_writes_no_media(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs export --media` with a UID that names no study (or is no UID
    at all) printed "no such study", then "DICOM media in ...: copy them to
    the disc's root", and wrote a DICOMDIR and README.TXT without it (a
    zip too, whose name then refused the corrected rerun: "exists: choose
    another name"); a patient's CD missing a study the operator named. Now
    nothing is written: exit 2 for a malformed UID, 1 for an unknown study."""
    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    for out in (tmp_path / "cd", tmp_path / "cd.zip"):
        malformed = archive.cli("export", ct, "1.2.3.4.x", "--out", str(out), "--media", check=False)
        assert malformed.returncode == 2 and "not a DICOM UID" in malformed.stderr, malformed.stderr
        unknown = archive.cli("export", ct, "1.2.3.999999", "--out", str(out), "--media", check=False)
        said = unknown.stdout + unknown.stderr
        assert unknown.returncode == 1 and "no such study" in said and "1.2.3.999999" in said, said
        assert "copy them to the disc" not in said
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # The corrected command writes the media.
    report = _export(archive, ct, "--out", str(tmp_path / "cd.zip"), "--media")
    assert report["studies"] == 1 and report["instances"] >= 1


def test_a_rerun_without_include_burned_in_withholds_what_the_first_run_wrote(archive: PacsServer,
                                                                             tmp_path: Path) -> None:
    """A de-identified media export with --include-burned-in, then the same
    export again without it into the same folder (the operator changed
    their mind: the images show the patient's name): the burned-in image
    was "already there" and kept, listed in the DICOMDIR, exit 0 with
    nothing withheld. Now it is withheld as in a fresh export (exit 1) and
    the first run's copy is removed from the media."""
    study, burned, clean = "1.2.826.0.1.3680043.9.7134.210.1", "1.2.826.0.1.3680043.9.7134.210.3.1", \
        "1.2.826.0.1.3680043.9.7134.210.3.2"
    made = tmp_path / "made"
    made.mkdir()
    for sop, flag in ((burned, "YES"), (clean, "NO")):
        make_ct(made / f"{sop[-1]}.dcm", sop_uid=sop, StudyInstanceUID=study,
                SeriesInstanceUID="1.2.826.0.1.3680043.9.7134.210.2", BurnedInAnnotation=flag)
    archive.cli("import", str(made))
    out = tmp_path / "research"
    first = _export(archive, study, "--out", str(out), "--media", "--deidentify", "--include-burned-in",
                    "--salt", "review-1")
    assert first["instances"] == 2 and first["burned_in_included"]["count"] == 1
    again = _export(archive, study, "--out", str(out), "--media", "--deidentify", "--salt", "review-1", rc=1)
    assert again["not_exported_burned_in"]["count"] == 1 and again["already_there"] == 1, again
    from pacs.deidentify import Deidentifier

    new_uid = Deidentifier("review-1").uid_map.map
    on_disk = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in (out / "DICOM").rglob("*") if p.is_file()}
    assert on_disk == {new_uid(clean)}
    listed = {str(r.ReferencedSOPInstanceUIDInFile) for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence
              if "ReferencedSOPInstanceUIDInFile" in r}
    assert listed == {new_uid(clean)}


def test_objects_deleted_since_the_last_run_leave_the_media(archive: PacsServer, tmp_path: Path) -> None:
    """An image turns out to be another patient's after the study went to a
    USB stick: it is deleted as sent in error (`pacs delete`) and the study
    exported again into the same folder. The DICOMDIR no longer listed it,
    but its file stayed in DICOM/ (and a deleted series' folder with its
    files), so any PACS importing the stick took the wrong patient's image
    again. Files of this export's studies that the new DICOMDIR does not
    list are now removed, and their emptied folders."""
    study, series_a, series_b = ("1.2.826.0.1.3680043.9.7134.211.1", "1.2.826.0.1.3680043.9.7134.211.2",
                                 "1.2.826.0.1.3680043.9.7134.211.3")
    made = tmp_path / "made"
    made.mkdir()
    for series, sop, number in ((series_a, f"{series_a}.1", 1), (series_a, f"{series_a}.2", 2),
                                (series_b, f"{series_b}.1", 1)):
        make_ct(made / f"{sop}.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series,
                InstanceNumber=number)
    archive.cli("import", str(made))
    out = tmp_path / "usb"
    assert _export(archive, study, "--out", str(out), "--media")["instances"] == 3
    archive.cli("delete", study, "--series", series_a, "--instance", f"{series_a}.2", "--reason", "other patient",
                "--yes")
    archive.cli("delete", study, "--series", series_b, "--reason", "other patient", "--yes")
    again = _export(archive, study, "--out", str(out), "--media")
    assert again["already_there"] + again["instances"] == 1 and again["failed"]["count"] == 0
    on_disk = [p for p in (out / "DICOM").rglob("*") if p.is_file()]
    assert [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in on_disk] == [f"{series_a}.1"]
    assert [p.name for p in (out / "DICOM" / "PAT00001" / "STU00001").iterdir()] == ["SER00001"]
    listed = [str(r.ReferencedSOPInstanceUIDInFile) for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence
              if "ReferencedSOPInstanceUIDInFile" in r]
    assert listed == [f"{series_a}.1"]


def test_readme_does_not_give_the_directorys_invented_date_as_the_study_date(archive: PacsServer,
                                                                            tmp_path: Path) -> None:
    """A STUDY record must have a Study Date (Type 1): one the objects lack
    (every de-identified study: the Basic Profile empties it) is invented
    as 19000101, as dcmmkdir +I does. README.TXT, written for the people
    who receive the media, printed it as the study's date ("1900-01-01  CT
    ..."). It now says "-" there, as for any value the objects do not have."""
    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    out = tmp_path / "research"
    _export(archive, ct, "--out", str(out), "--media", "--deidentify", "--salt", "review-2")
    study = next(r for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence if r.DirectoryRecordType == "STUDY")
    assert study.StudyDate == "19000101"  # the directory's own, required value
    readme = (out / "README.TXT").read_text("utf-8-sig")
    assert "1900" not in readme, readme
    assert "    -  CT  " in readme, readme


def test_a_deidentified_rerun_after_reconciliation_gives_the_new_patients_pseudonym(archive: PacsServer,
                                                                                   tmp_path: Path) -> None:
    """The de-identified variant of the reconciled rerun: the files an
    earlier run wrote under the modality's patient's pseudonym were kept,
    so the research media filed the study under the wrong (pseudonymous)
    patient, unlike a fresh export. A kept file must now carry the
    pseudonym of the index's patient of its study."""
    from pacs.deidentify import Deidentifier

    study = "1.2.826.0.1.3680043.9.7134.212.1"
    made = tmp_path / "made"
    made.mkdir()
    make_ct(made / "1.dcm", sop_uid=f"{study}.3.1", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2",
            SpecificCharacterSet="ISO_IR 192", PatientID="WRONG-ID-1", PatientName="Sai^Bệnh Nhân",
            AccessionNumber="ACCREVIEW2")
    archive.cli("import", str(made))
    out = tmp_path / "research"
    _export(archive, study, "--out", str(out), "--media", "--deidentify", "--salt", "review-3")
    with archive.http() as http:
        order = http.post("/api/orders", json={
            "patient": {"id": "079300000999", "issuer": "CCCD", "name": "Đúng^Bệnh Nhân", "birth_date": "19700101",
                        "sex": "M"},
            "accession_number": "ACCREVIEW2", "modality": "CT", "start_date": "20240813", "start_time": "150000"})
        assert order.status_code == 201, order.text
    archive.cli("orders", "match", study, "ACCREVIEW2")
    again = _export(archive, study, "--out", str(out), "--media", "--deidentify", "--salt", "review-3")
    assert again["instances"] == 1 and again["already_there"] == 0, again
    expected = Deidentifier("review-3").pseudonym("079300000999", issuer="CCCD")
    (path,) = [p for p in (out / "DICOM").rglob("*") if p.is_file()]
    assert dcmread(path, stop_before_pixels=True).PatientID == expected
    patient = next(r for r in dcmread(out / "DICOMDIR").DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert patient.PatientID == expected
