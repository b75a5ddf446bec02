"""Lifted rejections and the reading worklist without withdrawn studies,
reviewed (see tests/test_rejections.py for the feature itself)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_rejections import QUALITY_ISSUE, _note, archive  # noqa: F401


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_study_of_images_without_a_modality_and_a_key_object_stays_on_the_worklist(archive: PacsServer,
                                                                                      tmp_path: Path) -> None:
    """Images whose Modality is empty (a scanned request, a secondary capture
    of a tool that leaves it out) add nothing to the study's modalities; a
    Key Object Selection flagging them made them "KO", and the study, its
    images unread, left the radiologists' worklist and its urgent count as
    if every image had been withdrawn."""
    server = archive
    folder = tmp_path / "s"
    folder.mkdir()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    image = make_ct(folder / "0.dcm", sop_uid=sop, StudyInstanceUID=study, SeriesInstanceUID=series,
                    PatientID="REJ-30", PatientName="NGUYEN^VAN AN", Modality="", RequestedProcedurePriority="STAT")
    assert server.storescu(str(image), calling="CT_ROOM2").returncode == 0
    radiologist = server.make_token("bs.lift", "radiologist")

    def worklist() -> tuple[set[str], int]:
        with server.http(radiologist) as http:
            found = http.get("/api/worklist").json()
        return {i["study_uid"] for i in found["items"]}, found.get("urgent_unread", 0)

    assert worklist() == ({study}, 1)
    flag = _note(tmp_path / "flag.dcm", study, "REJ-30", QUALITY_ISSUE, {study: [series, sop]})
    assert server.storescu(str(flag), calling="CT_ROOM2").returncode == 0
    assert worklist() == ({study}, 1)
