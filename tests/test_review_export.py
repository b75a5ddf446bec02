"""Review of `pacs export UID... --out DIR|FILE.zip [--deidentify]` (the
plain layout, ``<study>/<series>/<sop>.dcm``): bugs found by exporting
again into the same folder, as an operator does after a change of mind or
of the index, and reading the folder the way whoever receives it does
(every file in it, not only those the report counts).
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
    server = PacsServer(tmp_path_factory.mktemp("review-export") / "data", Backend("sqlite-fs", None, None, {}))
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

