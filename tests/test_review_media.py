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

from .peers import Backend, PacsServer


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Iterator[PacsServer]:
    """The sample studies in an archive (no server: the CLI reads it)."""
    server = PacsServer(tmp_path_factory.mktemp("review-media") / "data", Backend("sqlite-fs", None, None, {}))
    server.cli("import", str(samples))
    manifest = json.loads((samples / "manifest.json").read_text())
    server.studies = {s["name"]: s["study_instance_uid"] for s in manifest["studies"]}  # type: ignore[attr-defined]
    yield server


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
