"""Lifted rejections and the reading worklist without withdrawn studies,
reviewed (see tests/test_rejections.py for the feature itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_dimse_failures import scu_store_file
from .test_rejections import (  # noqa: F401
    QUALITY_ISSUE, REJECTED, WRONG_ENTRY, _image_uids, _note, _rejections, _study, archive)


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


@pytest.mark.parametrize("backend", ["sqlite-fs"], indirect=True)
def test_a_lift_stands_against_every_note_that_rejected_the_image(archive: PacsServer, tmp_path: Path) -> None:
    """Two notes list the image before its rejection is lifted (the
    modality's, then the QC workstation's; or a note lifted, another note
    rejecting it anew, lifted in turn). The rejection remembered the first
    note only (or the last): the other one sent again with the whole study
    withdrew the image again, a lift not standing."""
    server = archive
    folder = tmp_path / "s"
    study, (one,) = _study(server, folder, "REJ-31", [3])
    series_uid, kept, image, other = one
    files = {path.stem: path for path in folder.iterdir()}
    first = _note(tmp_path / "a.dcm", study, "REJ-31", REJECTED, {study: [series_uid, image]})
    second = _note(tmp_path / "b.dcm", study, "REJ-31", WRONG_ENTRY, {study: [series_uid, image]})
    for note in (first, second):
        assert scu_store_file(server, note, calling="CT_ROOM1") == 0
    assert _image_uids(server, study) == {kept, other}
    lifted = _rejections(server, "lift", image, "--reason", "rejected by mistake", "--yes")["lifted"]
    assert [e["sop_uid"] for e in lifted] == [image]
    assert scu_store_file(server, files["0-1"], calling="CT_ROOM2") == 0
    for note in (first, second):  # both sent again with the study: the lift stands
        assert scu_store_file(server, note, calling="CT_ROOM1") == 0
        assert _image_uids(server, study) == {kept, image, other}
    # A third note rejects it anew; lifted again, none of the three withdraws it any more.
    third = _note(tmp_path / "c.dcm", study, "REJ-31", REJECTED, {study: [series_uid, image, other]})
    assert scu_store_file(server, third, calling="CT_ROOM1") == 0
    assert _image_uids(server, study) == {kept}
    assert _rejections(server, "list", "--study", study)["total"] == 2
    lifted = _rejections(server, "lift", "--study", study, "--reason", "rejected by mistake", "--yes")["lifted"]
    assert {e["sop_uid"] for e in lifted} == {image, other}
    assert _rejections(server, "lift", "--study", study, "--reason", "again", "--yes")["lifted"] == []
    for name in ("0-1", "0-2"):
        assert scu_store_file(server, files[name], calling="CT_ROOM2") == 0
    for note in (first, second, third):
        assert scu_store_file(server, note, calling="CT_ROOM1") == 0
        assert _image_uids(server, study) == {kept, image, other}
    assert _rejections(server, "list", "--study", study)["total"] == 0
