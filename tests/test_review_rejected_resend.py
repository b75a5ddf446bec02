"""Rejected images stay rejected (IHE IOCM), reviewed: what else brings a
rejected instance back, and how the archive's own fetches take the refusal
(see tests/test_rejections.py for the feature itself)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Backend, PacsServer
from .test_rejections import REJECTED, _image_uids, _note, _study, archive  # noqa: F401


@pytest.fixture
def old_pacs(tmp_path: Path, backend: Backend) -> Iterator[PacsServer]:
    """Another archive as the hospital's old PACS (C-FIND, C-GET)."""
    server = PacsServer(tmp_path / "old", Backend("sqlite-fs", None, None, {}))
    server.ae_title = "OLDPACS"
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_pull_takes_rejected_instances_for_accounted_for(archive: PacsServer, old_pacs: PacsServer,
                                                            tmp_path: Path) -> None:
    """The modality sent the study to both archives (parallel running) and
    then rejected two images here. `pacs remote pull` (and prefetch, which
    pulls as it does) asked the old PACS for them at every run, had them
    refused (0xA771) and called the study incomplete: exit 1 for ever, each
    run retrieving them again. They are accounted for: the study is complete."""
    server = archive
    folder = tmp_path / "s"
    study, (one,) = _study(server, folder, "REJ-20", [3])
    files = sorted(str(p) for p in folder.iterdir())
    sent = old_pacs.storescu(*files, calling="CT_ROOM1")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    series_uid, kept, *withdrawn = one
    note = _note(tmp_path / "note.dcm", study, "REJ-20", REJECTED, {study: [series_uid, *withdrawn]})
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0
    assert _image_uids(server, study) == {kept}
    server.cli("ae", "add", "OLDPACS", "--host", "127.0.0.1", "--port", str(old_pacs.dicom_port))
    for _ in range(2):  # the next run (or the next prefetch) alike
        done = server.cli("remote", "pull", "OLDPACS", "--method", "get", "--json", check=False)
        report = json.loads(done.stdout)
        assert done.returncode == 0 and report["complete"] == 1 and not report["problems"], report
    assert _image_uids(server, study) == {kept}
