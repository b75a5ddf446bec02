"""Rejected images stay rejected (IHE IOCM), reviewed: what else brings a
rejected instance back, and how the archive's own fetches take the refusal
(see tests/test_rejections.py for the feature itself)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

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


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_verify_repair_removes_the_left_copy_of_a_rejected_instance(archive: PacsServer, tmp_path: Path) -> None:
    """A refused copy left in the store (its delete failed, or the process
    died between writing it and the refusal) is an orphan. `pacs verify
    --repair` took it for one to adopt: the ingest refused it and deleted
    it, and the run reported it an invalid orphan to move out of the store
    (gone already) and exited 1. It is removed, reported so, the run ok."""
    server = archive
    folder = tmp_path / "s"
    study, (one,) = _study(server, folder, "REJ-21", [2])
    series_uid, kept, withdrawn = one
    note = _note(tmp_path / "note.dcm", study, "REJ-21", REJECTED, {study: [series_uid, withdrawn]})
    assert server.storescu(str(note), calling="CT_ROOM1").returncode == 0
    key = f"{study}/{series_uid}/{withdrawn}.dcm"
    core = server.core()
    try:
        core.store.put(key, io.BytesIO((folder / "0-1.dcm").read_bytes()))
    finally:
        core.close()
    assert json.loads(server.cli("verify", "--json", check=False).stdout)["orphans"]["count"] == 1
    repaired = server.cli("verify", "--repair", "--json", check=False)
    report = json.loads(repaired.stdout)
    assert repaired.returncode == 0 and report["ok"], report
    assert [r["key"] for r in report["rejected_removed"]["items"]] == [key], report
    assert report["invalid_orphans"]["count"] == 0 and report["adopted"]["count"] == 0, report
    core = server.core()
    try:
        assert not core.store.exists(key)
    finally:
        core.close()
    assert _image_uids(server, study) == {kept}
    assert json.loads(server.cli("verify", "--json").stdout)["ok"]


def test_a_corrected_resend_racing_the_note_on_postgresql_is_refused(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL, overwrite policy: the modality resends an image with
    other bytes (a correction) while the note withdrawing it is being
    applied. The resend's INSERT waited for the deletion of the old row
    (its SOP Instance UID's unique key), then went in: its NOT EXISTS
    (rejected_instances) had been read before the deletion committed. The
    rejected image was back in the study, acknowledged. It is refused."""
    from pacs.app import Pacs
    from pacs.errors import IngestError, Status
    from pacs.ingest import Origin
    from pacs.maintenance.delete import Target, delete_target
    from pacs.rejections import _recorder
    from pacs.settings import load_settings

    from .dicomfiles import make_ct
    from .test_order_edges import Background
    from .test_pg_concurrency import until, waiting

    core = Pacs.open(load_settings(data_dir=tmp_path / "data", index_url=pg_url, duplicate_policy="overwrite"))
    try:
        study, series, sop, other = (generate_uid() for _ in range(4))
        common = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "PatientID": "REJ-22"}
        for uid in (sop, other):
            assert core.ingest_file(make_ct(tmp_path / f"{uid}.dcm", sop_uid=uid, InstanceNumber=1, **common),
                                    Origin("dimse", "CT_ROOM1")).status == 0
        corrected = make_ct(tmp_path / "corrected.dcm", sop_uid=sop, InstanceNumber=7, **common)
        recorded, go = threading.Event(), threading.Event()
        bar = _recorder(study, series, {sop}, "113001", generate_uid(), "CT_ROOM1")

        def record_then_wait(conn: Any) -> None:
            bar(conn)
            recorded.set()
            assert go.wait(120)

        deletion = Background(lambda: delete_target(core, Target(study, series, sop_uids=(sop,)),
                                                    reason="rejection note", user="test", also=record_then_wait))
        assert recorded.wait(60)
        resend = Background(lambda: core.ingest_file(corrected, Origin("dimse", "CT_ROOM1")))
        until(lambda: waiting(core) >= 1)  # the resend waits for the deletion's rows
        go.set()
        deletion.outcome()
        with pytest.raises(IngestError) as refused:
            resend.outcome()
        assert refused.value.status == Status.REJECTED_INSTANCE
        assert core.reader.instance_key(sop) is None
        assert {o.key for o in core.store.list()} == {f"{study}/{series}/{other}.dcm"}
    finally:
        core.close()
