"""Review of `pacs export UID... --out DIR|FILE.zip [--deidentify]` (the
plain layout, ``<study>/<series>/<sop>.dcm``): bugs found by exporting
again into the same folder, as an operator does after a change of mind or
of the index, and reading the folder the way whoever receives it does
(every file in it, not only those the report counts).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread

from .dicomfiles import make_ct
from .peers import PacsServer
from .test_review_media import _export, archive  # noqa: F401  (archive: the sample studies served, a fixture)


def _sops_on_disk(root: Path) -> set[str]:
    """The SOP Instance UIDs of every file under *root* (what an import of the folder takes)."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in root.rglob("*") if p.is_file()}


def test_a_rerun_without_include_burned_in_withholds_what_the_first_run_wrote(archive: PacsServer,
                                                                             tmp_path: Path) -> None:
    """A de-identified export with --include-burned-in, then the same export
    again without it into the same folder (the images show the patient's
    name after all): the first run's copy of the burned-in image stayed in
    the folder, for whoever receives it. Now it is withheld as in a fresh
    export (exit 1) and the earlier copy removed."""
    from pacs.deidentify import Deidentifier

    study, burned, clean = ("1.2.826.0.1.3680043.9.7134.220.1", "1.2.826.0.1.3680043.9.7134.220.3.1",
                            "1.2.826.0.1.3680043.9.7134.220.3.2")
    made = tmp_path / "made"
    made.mkdir()
    for sop, flag in ((burned, "YES"), (clean, "NO")):
        make_ct(made / f"{sop[-1]}.dcm", sop_uid=sop, StudyInstanceUID=study,
                SeriesInstanceUID="1.2.826.0.1.3680043.9.7134.220.2", BurnedInAnnotation=flag)
    archive.cli("import", str(made))
    out = tmp_path / "research"
    first = _export(archive, study, "--out", str(out), "--deidentify", "--include-burned-in", "--salt", "rv-1")
    assert first["instances"] == 2 and first["burned_in_included"]["count"] == 1
    again = _export(archive, study, "--out", str(out), "--deidentify", "--salt", "rv-1", rc=1)
    assert again["not_exported_burned_in"]["count"] == 1 and again["already_there"] == 1, again
    assert _sops_on_disk(out) == {Deidentifier("rv-1").uid_map.map(clean)}


def test_objects_deleted_since_the_last_run_leave_the_folder(archive: PacsServer, tmp_path: Path) -> None:
    """An image turns out to be another patient's after its study was
    exported: it is deleted as sent in error (`pacs delete`) and the study
    exported again into the same folder. Its file (and a deleted series'
    folder) stayed there, listed nowhere but taken by whoever imports the
    folder. Files of this export's studies that it no longer writes are now
    removed, and the folders they leave empty."""
    study, series_a, series_b = ("1.2.826.0.1.3680043.9.7134.221.1", "1.2.826.0.1.3680043.9.7134.221.2",
                                 "1.2.826.0.1.3680043.9.7134.221.3")
    made = tmp_path / "made"
    made.mkdir()
    for series, sop in ((series_a, f"{series_a}.1"), (series_a, f"{series_a}.2"), (series_b, f"{series_b}.1")):
        make_ct(made / f"{sop}.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series)
    archive.cli("import", str(made))
    out = tmp_path / "out"
    assert _export(archive, study, "--out", str(out))["instances"] == 3
    archive.cli("delete", study, "--series", series_a, "--instance", f"{series_a}.2", "--reason", "other patient",
                "--yes")
    archive.cli("delete", study, "--series", series_b, "--reason", "other patient", "--yes")
    again = _export(archive, study, "--out", str(out))
    assert again["already_there"] == 1 and again["instances"] == 0, again
    assert _sops_on_disk(out) == {f"{series_a}.1"}
    assert [p.name for p in (out / study).iterdir()] == [series_a]


def test_a_rerun_after_the_study_was_reconciled_writes_the_corrected_patient(archive: PacsServer,
                                                                            tmp_path: Path) -> None:
    """A study exported with the modality's wrong patient, reconciled with
    the HIS order, exported again into the same folder: every file was
    "already there" and kept, still naming the wrong patient, while
    retrieval and a fresh export give the corrected one. A file is now kept
    only when it carries the index's current corrected values."""
    study = "1.2.826.0.1.3680043.9.7134.222.1"
    made = tmp_path / "made"
    made.mkdir()
    make_ct(made / "1.dcm", sop_uid=f"{study}.3.1", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2",
            PatientID="WRONG-ID-2", PatientName="Sai^Bệnh Nhân", SpecificCharacterSet="ISO_IR 192",
            AccessionNumber="ACCRVEXP1")
    archive.cli("import", str(made))
    out = tmp_path / "out"
    _export(archive, study, "--out", str(out))
    _reconcile(archive, study, "ACCRVEXP1", "079300000777", "Trần^Thị Thu")
    again = _export(archive, study, "--out", str(out))
    assert again["instances"] == 1 and again["already_there"] == 0, again
    (path,) = [p for p in out.rglob("*") if p.is_file()]
    ds = dcmread(path, stop_before_pixels=True)
    assert (str(ds.PatientName), ds.PatientID) == ("Trần^Thị Thu", "079300000777")
    # Nothing changed since: a third run keeps the file.
    third = _export(archive, study, "--out", str(out))
    assert third["already_there"] == 1 and third["instances"] == 0, third


def test_a_deidentified_rerun_after_reconciliation_gives_the_new_patients_pseudonym(archive: PacsServer,
                                                                                   tmp_path: Path) -> None:
    """The de-identified variant: files an earlier run wrote under the
    pseudonym of the modality's (wrong) patient were kept, so the research
    folder filed the study under the wrong pseudonymous patient, unlike a
    fresh export. A kept file must now carry the pseudonym of the index's
    patient of its study."""
    from pacs.deidentify import Deidentifier

    study = "1.2.826.0.1.3680043.9.7134.223.1"
    made = tmp_path / "made"
    made.mkdir()
    make_ct(made / "1.dcm", sop_uid=f"{study}.3.1", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2",
            PatientID="WRONG-ID-3", PatientName="Sai^Bệnh Nhân", SpecificCharacterSet="ISO_IR 192",
            AccessionNumber="ACCRVEXP2")
    archive.cli("import", str(made))
    out = tmp_path / "research"
    _export(archive, study, "--out", str(out), "--deidentify", "--salt", "rv-2")
    _reconcile(archive, study, "ACCRVEXP2", "079300000666", "Lê^Văn Hùng")
    again = _export(archive, study, "--out", str(out), "--deidentify", "--salt", "rv-2")
    assert again["instances"] == 1 and again["already_there"] == 0, again
    (path,) = [p for p in out.rglob("*") if p.is_file()]
    assert dcmread(path, stop_before_pixels=True).PatientID == Deidentifier("rv-2").pseudonym("079300000666",
                                                                                               issuer="CCCD")
    third = _export(archive, study, "--out", str(out), "--deidentify", "--salt", "rv-2")
    assert third["already_there"] == 1 and third["instances"] == 0, third


def _reconcile(server: PacsServer, study: str, accession: str, patient_id: str, name: str) -> None:
    """Match *study* with a new HIS order of another patient (CCCD issuer)."""
    with server.http() as http:
        order = http.post("/api/orders", json={
            "patient": {"id": patient_id, "issuer": "CCCD", "name": name, "birth_date": "19800303", "sex": "F"},
            "accession_number": accession, "modality": "CT", "start_date": "20240813", "start_time": "150000"})
        assert order.status_code == 201, order.text
    server.cli("orders", "match", study, accession)


def test_a_mistyped_study_uid_writes_nothing(archive: PacsServer, tmp_path: Path) -> None:
    """`pacs export KNOWN MISTYPED --out x.zip` wrote x.zip without the
    mistyped study (exit 1, "no such study"), and the corrected command was
    then refused: "x.zip exists: choose another name"; with only unknown
    UIDs, an empty zip or folder was left. As for media, nothing is written
    now when a UID names no study (exit 1), and the corrected command works."""
    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    for out in (tmp_path / "out", tmp_path / "out.zip"):
        unknown = archive.cli("export", ct, "1.2.3.999999", "--out", str(out), check=False)
        said = unknown.stdout + unknown.stderr
        assert unknown.returncode == 1 and "no such study" in said and "1.2.3.999999" in said, said
        assert "nothing written" in said, said
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    report = _export(archive, ct, "--out", str(tmp_path / "out.zip"))
    assert report["studies"] == 1 and report["instances"] >= 1


def test_identified_and_deidentified_exports_are_not_mixed_in_one_folder(archive: PacsServer, tmp_path: Path) -> None:
    """A research folder that de-identified exports fill study by study
    took an export without --deidentify (forgotten once) beside them, exit
    0: patients' names and IDs among the data sent on to the researchers;
    a de-identified export into a folder of identified copies likewise.
    Either is now refused (exit 2), nothing written; exports of one kind
    still add studies to the folder."""
    ct, mr, us = (archive.studies[k] for k in ("ct", "dx", "us"))  # type: ignore[attr-defined]
    research, plain = tmp_path / "research", tmp_path / "plain"
    _export(archive, ct, "--out", str(research), "--deidentify", "--salt", "rv-3")
    _export(archive, ct, "--out", str(plain))
    before = {p: p.stat().st_mtime_ns for root in (research, plain) for p in root.rglob("*")}
    forgot = archive.cli("export", mr, "--out", str(research), check=False)
    assert forgot.returncode == 2 and "de-identified" in forgot.stderr, forgot.stderr
    mixed = archive.cli("export", mr, "--out", str(plain), "--deidentify", "--salt", "rv-3", check=False)
    assert mixed.returncode == 2 and "not de-identified" in mixed.stderr, mixed.stderr
    assert {p: p.stat().st_mtime_ns for root in (research, plain) for p in root.rglob("*")} == before
    assert _export(archive, us, "--out", str(research), "--deidentify", "--salt", "rv-3")["studies"] == 1
    assert _export(archive, mr, "--out", str(plain))["studies"] == 1


def test_an_interrupted_export_is_audited_with_what_it_wrote(archive: PacsServer, tmp_path: Path) -> None:
    """Ctrl-C during a study's export (the USB stick had to go) left the
    objects written so far in the folder, a patient's identified images
    out of the archive, and no `export` event for the study: each study was
    audited only once all its objects were through. The study in progress
    is now audited as well: a failure, with what was written and why it
    stopped."""
    import os
    import signal
    import subprocess

    from pacs import audit

    from .peers import PACS

    study = "1.2.826.0.1.3680043.9.7134.224.1"
    made = tmp_path / "made"
    made.mkdir()
    for i in (1, 2, 3):
        make_ct(made / f"{i}.dcm", sop_uid=f"{study}.3.{i}", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2",
                PatientID="BN224")
    archive.cli("import", str(made))
    core = archive.core()
    try:
        second = list(core.reader.iter_stored(study))[1]
        stored = Path(core.settings.data_dir) / "objects"
    finally:
        core.close()
    (path,) = stored.rglob(f"{second.sop_uid}.dcm")
    kept = path.read_bytes()
    path.unlink()
    os.mkfifo(path)  # the store hangs on the second object: the export is mid-study
    out = tmp_path / "usb"
    proc = subprocess.Popen([PACS, "export", study, "--out", str(out), *archive.common_args()], env=archive.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not list(out.rglob("*.dcm")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        path.unlink()
        path.write_bytes(kept)
    assert len(list(out.rglob("*.dcm"))) == 1
    core = archive.core()
    try:
        (event,) = audit.query(core.engine, action="export", study_uid=study)
    finally:
        core.close()
    assert event["outcome"] == "failure" and event["patient_id"] == "BN224", event
    assert "1 instances written" in event["detail"] and "interrupted" in event["detail"], event


@pytest.mark.parametrize("name", ["usb", "usb.zip"])
def test_a_second_export_into_the_folder_does_not_break_the_one_running(archive: PacsServer, tmp_path: Path,
                                                                       name: str) -> None:
    """Two exports into one folder at once (the same command started twice,
    or two studies sent to the same USB stick from two terminals): the
    second, starting, removed the temporary files "an interrupted run left",
    the ones the first was writing; the first then lost that object
    ("failed", exit 1). Into one zip name, the second truncated the first's
    .partial and renamed it as its own zip (exit 0), which the first went on
    writing into. The second is now refused while the first runs (exit 2),
    and the first completes."""
    import os
    import subprocess
    import threading

    from .peers import PACS

    study = f"1.2.826.0.1.3680043.9.7134.225.{len(name)}"
    made = tmp_path / "made"
    made.mkdir()
    make_ct(made / "1.dcm", sop_uid=f"{study}.3.1", StudyInstanceUID=study, SeriesInstanceUID=f"{study}.2")
    archive.cli("import", str(made))
    (path,) = (archive.data_dir / "objects").rglob(f"{study}.3.1.dcm")
    kept = path.read_bytes()
    path.unlink()
    os.mkfifo(path)  # the store gives the object as slowly as the test feeds it
    go_on = threading.Event()

    def feed() -> None:
        with path.open("wb") as fifo:  # opens once the export reads
            fifo.write(kept[:1000])
            fifo.flush()
            go_on.wait(timeout=120)
            fifo.write(kept[1000:])

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = tmp_path / name
    running = out.with_name(out.name + ".partial") if name.endswith(".zip") else out / ".export-*.tmp"
    first = subprocess.Popen([PACS, "export", study, "--out", str(out), "--json", *archive.common_args()],
                             env=archive.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while first.poll() is None and not list(running.parent.glob(running.name)):
            time.sleep(0.02)
        ct = archive.studies["ct"]  # type: ignore[attr-defined]
        second = archive.cli("export", ct, "--out", str(out), check=False)
        go_on.set()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        go_on.set()
        if first.poll() is None:
            first.kill()
            first.wait()
        if feeder.is_alive():
            with path.open("rb") as fifo:  # the export never read: let the feeder end
                fifo.read()
        feeder.join()
        path.unlink()
        path.write_bytes(kept)
    assert second.returncode == 2 and "another" in second.stderr, second.stdout + second.stderr
    assert first.returncode == 0, stdout + stderr
    assert json.loads(stdout)["instances"] == 1
    if name.endswith(".zip"):
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None and [Path(n).name for n in zf.namelist()] == [f"{study}.3.1.dcm"]
    else:
        assert _sops_on_disk(out) == {f"{study}.3.1"}


def test_a_read_only_destination_stops_the_export_with_one_message(archive: PacsServer, tmp_path: Path) -> None:
    """A USB stick the kernel remounted read-only (a FAT error), or a folder
    the export's user may not write: every object failed on its own, one
    warning and one "failed" row each (thousands for a CT study) and the
    export ran to the end. As for a full disk, it now stops at the first
    object, with one message saying why."""
    import subprocess

    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    stick = tmp_path / "stick"
    stick.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(stick)], check=True)
    try:
        (stick / "usb").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(stick)], check=True)
        result = archive.cli("export", ct, "--out", str(stick / "usb"), check=False)
    finally:
        subprocess.run(["umount", "-l", str(stick)], check=False)
    said = result.stdout + result.stderr
    assert result.returncode == 1 and said.count("Read-only file system") == 1, said
    assert "stopped" in said, said


def test_a_zip_removed_for_a_full_disk_is_not_audited_as_exported(archive: PacsServer, tmp_path: Path) -> None:
    """A zip export of two studies ran out of room in the second: the
    .partial was removed (nothing left the archive) but the audit trail kept
    "export to x.zip: 1 instances written", a success, for the first, as if
    it had been handed over. A zip's studies are now audited with the zip's
    fate: a failure when it was removed."""
    import os
    import subprocess

    from pacs import audit

    small, big = "1.2.826.0.1.3680043.9.7134.226.1", "1.2.826.0.1.3680043.9.7134.227.1"
    made = tmp_path / "made"
    made.mkdir()
    make_ct(made / "small.dcm", sop_uid=f"{small}.3.1", StudyInstanceUID=small, SeriesInstanceUID=f"{small}.2")
    for i in range(4):
        make_ct(made / f"big{i}.dcm", sop_uid=f"{big}.3.{i}", StudyInstanceUID=big, SeriesInstanceUID=f"{big}.2",
                Rows=1024, Columns=1024, PixelData=os.urandom(1024 * 1024 * 2))
    archive.cli("import", str(made))
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        result = archive.cli("export", small, big, "--out", str(disk / "x.zip"), check=False)
        assert result.returncode == 1 and "disk full" in result.stderr, result.stdout + result.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    core = archive.core()
    try:
        events = {uid: audit.query(core.engine, action="export", study_uid=uid) for uid in (small, big)}
    finally:
        core.close()
    assert [e["outcome"] for e in events[big]] == ["failure"], events
    ((event,),) = [events[small]]
    assert event["outcome"] == "failure" and "removed" in event["detail"], event


def test_a_zip_is_not_written_through_a_link_planted_at_its_partial_name(archive: PacsServer,
                                                                         tmp_path: Path) -> None:
    """`pacs export ... --out /tmp/x.zip` wrote the zip as x.zip.partial,
    opened without refusing a symbolic link: another user of the machine who
    put x.zip.partial there, linked to a file of theirs, received the
    patient's images in it (the export only truncated and re-moded it). A
    link there is now refused (exit 2), the linked file untouched."""
    import os

    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"not yours")
    os.chmod(theirs, 0o666)
    os.chown(theirs, 65534, 65534)  # nobody's
    (tmp_path / "x.zip.partial").symlink_to(theirs)
    result = archive.cli("export", ct, "--out", str(tmp_path / "x.zip"), check=False)
    assert result.returncode == 2 and "link" in result.stderr, result.stdout + result.stderr
    assert theirs.read_bytes() == b"not yours" and not (tmp_path / "x.zip").exists()
