"""Moving a hospital in, as a reviewer did it: `pacs import` of CD copies
(the DICOMDIR named on the command line, a CD mounted in lower case, a file
the copy lost), of a tree too large to list before the first file is
stored, and the same import run again after an interruption."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet

from .conftest import pydicom_file
from .fuzzing import core_on
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
