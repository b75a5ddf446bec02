"""Moving a hospital in, as a reviewer did it: `pacs import` of CD copies
(the DICOMDIR named on the command line, a CD mounted in lower case, a file
the copy lost), of a tree too large to list before the first file is
stored, and the same import run again after an interruption; `pacs remote
pull` from an old PACS that sends no Pending C-MOVE responses."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from .conftest import PacsServer, make_backend, pydicom_file
from .dicomfiles import image_dataset
from .fuzzing import core_on
from .peers import PACS_COMMANDS, free_port
from .test_cli_review import _json, pacs

CD_FILES = ("CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm")


def _cd(root: Path) -> list[str]:
    """A CD's file-set (PS3.10 8): DICOMDIR and one file per object in
    PTnnnnnn/STnnnnnn/SEnnnnnn/IMnnnnnn, as File IDs in upper case; the
    SOP Instance UIDs, in the DICOMDIR's order."""
    fileset = FileSet()
    uids = []
    for name in CD_FILES:
        ds = dcmread(pydicom_file(name))
        fileset.add(ds)
        uids.append(str(ds.SOPInstanceUID))
    fileset.write(root)
    return uids


def _lower_case(root: Path) -> None:
    """Names as Linux shows an ISO 9660 CD without Rock Ridge: lower case."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            if name != "DICOMDIR":
                os.rename(Path(folder) / name, Path(folder) / name.lower())


def test_a_dicomdir_named_on_the_command_line_imports_the_files_it_lists(tmp_path: Path) -> None:
    """`pacs import /media/cdrom/DICOMDIR` (how CD importers are pointed at
    a CD) stored nothing: 1 file, "1 DICOMDIR (skipped)", exit 0, and the
    operator put the CD away. The DICOMDIR's File IDs are followed, whatever
    the case the mount shows, and a file it lists that the copy lost fails,
    named (also when the folder is imported)."""
    cd = tmp_path / "cdrom"
    uids = _cd(cd)
    _lower_case(cd)
    lost = next(p for p in sorted(cd.rglob("*")) if p.is_file() and p.name != "DICOMDIR")
    lost_bytes = lost.read_bytes()
    lost.unlink()  # a copy of a scratched CD: one file did not come
    (cd / "autorun.inf").write_text("[autorun]\n")  # not listed: not read when the DICOMDIR is named

    result = pacs("import", str(cd / "DICOMDIR"), "--json", data_dir=tmp_path / "data")
    summary = _json(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (summary["stored"], summary["skipped"], summary["failed"], summary["not_dicom"]) == (2, 1, 1, 0), summary
    [error] = summary["errors"]
    assert "listed in the DICOMDIR" in error["error"] and error["path"].upper() == str(lost).upper(), error

    # The folder imported: the same file said missing, the others already here.
    result = pacs("import", str(cd), "--json", data_dir=tmp_path / "data")
    summary = _json(result)
    assert result.returncode == 1 and (summary["duplicates"], summary["failed"]) == (2, 1), summary
    assert "listed in the DICOMDIR" in summary["errors"][0]["error"]

    lost.write_bytes(lost_bytes)  # found again: the DICOMDIR's import completes
    result = pacs("import", str(cd / "DICOMDIR"), "--json", data_dir=tmp_path / "data")
    summary = _json(result)
    assert result.returncode == 0 and (summary["stored"], summary["duplicates"]) == (1, 2), summary
    stats = json.loads(pacs("stats", "--json", data_dir=tmp_path / "data").stdout)
    assert stats["instances"] == len(uids)


def test_an_import_stores_while_it_walks_the_tree(tmp_path: Path) -> None:
    """A USB disk of millions of files: every file was listed and queued (a
    future each, ~2 KB) before the first was counted, so nothing showed
    progress for the length of the walk and memory grew with the tree (GBs);
    Ctrl-C then waited for every queued file. Files are now taken from the
    walk a few at a time."""
    from pacs.importer import import_paths

    folders = []
    for n in range(40):
        folder = tmp_path / "usb" / f"{n:03d}"
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("not DICOM")
        folders.append(folder)
    taken = []

    def walk() -> Iterator[Path]:
        for folder in folders:
            taken.append(folder)
            yield folder

    taken_at_first_file: list[int] = []
    with core_on(tmp_path / "data") as core:
        summary = import_paths(core, walk(), workers=2,
                               on_file=lambda _p, _o: taken_at_first_file.append(len(taken)))
    assert summary.files == summary.not_dicom == 40
    assert taken_at_first_file[0] < len(folders) // 2, taken_at_first_file[:3]


def test_an_import_run_again_writes_no_object_already_stored(tmp_path: Path) -> None:
    """An interrupted import of a disk is run again: each file already
    stored was written whole (and fsynced) into the store's staging folder
    before the store said it had it, so the rerun cost what the first run
    did. The index is asked first: with the store's staging folder not
    writable, the rerun still finds every file already stored."""
    src = tmp_path / "usb"
    src.mkdir()
    for name in CD_FILES:
        shutil.copy(pydicom_file(name), src / name)
    data = tmp_path / "data"
    first = pacs("import", str(src), "--json", data_dir=data)
    assert first.returncode == 0 and _json(first)["stored"] == len(CD_FILES), first.stdout + first.stderr

    staging = data / "objects" / ".tmp"
    assert staging.is_dir()
    os.chmod(staging, 0o555)
    try:
        again = pacs("import", str(src), "--json", data_dir=data,
                     prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"))
    finally:
        os.chmod(staging, 0o755)
    summary = _json(again)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (summary["duplicates"], summary["stored"], summary["failed"]) == (len(CD_FILES), 0, 0), summary


# -- pacs remote pull from an old PACS that says nothing while it moves ------------------
QUIET_ROOT = "1.2.826.0.1.3680043.8.498.4243."
QUIET_INSTANCES = 8
# Our C-MOVE's wait for a response (dicom_timeout) in the pull below; the old
# PACS sends an object every QUIET_GAP seconds: all of them take longer.
QUIET_TIMEOUT = 3
QUIET_GAP = 0.6


def _quiet_study() -> list[Dataset]:
    return [image_dataset(sop_uid=f"{QUIET_ROOT}1.1.{n}", StudyInstanceUID=f"{QUIET_ROOT}1",
                          SeriesInstanceUID=f"{QUIET_ROOT}1.1", PatientID="QUIET1", PatientName="Quiet^Move",
                          StudyDate="20240301", StudyTime="101010", SeriesNumber=1, InstanceNumber=n)
            for n in range(1, QUIET_INSTANCES + 1)]


@contextmanager
def _quiet_old_pacs(ours: PacsServer, study: list[Dataset]) -> Iterator[int]:
    """An old PACS (pynetdicom, real associations) whose C-MOVE sends no
    Pending response, only the final one once every sub-operation is done:
    Pending responses are optional (PS3.4 C.1.3) and some archives send
    none. Answers C-FIND at study, series and image
    level for *study*; yields its port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    )

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = query.QueryRetrieveLevel
        seen: set[str] = set()
        for ds in study:
            key = {"STUDY": ds.StudyInstanceUID, "SERIES": ds.SeriesInstanceUID}.get(level, ds.SOPInstanceUID)
            if key in seen or any(query.get(k) not in (None, "", ds.get(k)) for k in
                                  ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
                continue
            seen.add(key)
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "PatientID", "SeriesInstanceUID",
                            "SOPInstanceUID"):
                if keyword in query:
                    setattr(answer, keyword, ds.get(keyword, ""))
            yield 0xFF00, answer

    def on_move(event: evt.Event) -> Iterator[object]:
        # The sub-operations first, on an association of its own, before any
        # response: the requester hears nothing until the final one.
        sender = AE(ae_title="QUIETPACS")
        sender.add_requested_context(CTImageStorage)
        assoc = sender.associate("127.0.0.1", ours.dicom_port, ae_title=ours.ae_title)
        try:
            for ds in study:
                assoc.send_c_store(ds)
                time.sleep(QUIET_GAP)
        finally:
            assoc.release()
        yield "127.0.0.1", ours.dicom_port
        yield 0  # the objects went above; the final response says success

    ae = AE(ae_title="QUIETPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move)])
    try:
        yield port
    finally:
        server.shutdown()


def test_a_pull_waits_for_a_c_move_whose_objects_keep_arriving(tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """The old PACS moves a study without Pending responses: our C-MOVE
    waited dicom_timeout for an answer and aborted the association while the
    study's objects were still arriving, every study longer than that
    (a large CT) ended `incomplete`, and the rerun's retrieves were cut the
    same way. The wait now goes on while the study's objects keep arriving
    here; it ends when nothing has come for dicom_timeout."""
    ours = PacsServer(tmp_path / "data", make_backend("sqlite-fs", request)).start()
    try:
        study = _quiet_study()
        with _quiet_old_pacs(ours, study) as port:
            ours.cli("ae", "add", "QUIETPACS", "--host", "127.0.0.1", "--port", str(port))
            env = {**ours.env, "PACS_DICOM_TIMEOUT": str(QUIET_TIMEOUT)}
            result = PACS_COMMANDS.run(["remote", "pull", "QUIETPACS", "--json", *ours.common_args()], env,
                                       timeout=300)
            report = json.loads(result.stdout)
            assert result.returncode == 0, result.stdout + result.stderr
            assert (report["pulled"], report["incomplete"], report["instances"]) == (1, 0, QUIET_INSTANCES), report
    finally:
        ours.stop()


def test_an_import_lists_failed_files_whatever_their_names(tmp_path: Path) -> None:
    """A failed file's name holding "[/...]" was taken for rich markup: the
    listing of failures ended in a MarkupError (a traceback, no summary)."""
    src = tmp_path / "disk"
    folder = src / "[" / "b] scan"  # the path reads ".../[/b] scan/...": a closing tag nothing opened
    folder.mkdir(parents=True)
    whole = pydicom_file("CT_small.dcm").read_bytes()
    (folder / "[red]1.dcm").write_bytes(whole[: len(whole) // 2])  # cut short: fails
    result = pacs("import", str(src), data_dir=tmp_path / "data")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "[/b] scan/[red]1.dcm" in result.stderr, result.stderr


def test_a_pull_with_its_dates_reversed_is_refused(tmp_path: Path) -> None:
    """--since after --until queried the reversed range, found nothing and
    said "0 studies", exit 0: a night of migration that did nothing."""
    assert pacs("db", "upgrade", data_dir=tmp_path / "d").returncode == 0
    result = pacs("remote", "pull", "OLDPACS", "--since", "20260101", "--until", "20250101", data_dir=tmp_path / "d")
    assert result.returncode == 2 and "--since 2026-01-01 is after --until 2025-01-01" in result.stderr, result.stderr
