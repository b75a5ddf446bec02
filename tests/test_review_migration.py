"""Moving a hospital in, as a reviewer did it: `pacs import` run again
after an interruption."""

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
