"""Which patient a received study is filed under, when the HIS has moved or
deleted patients meanwhile (the ingest path caches patient keys)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from .conftest import PacsServer
from .dicomfiles import make_ct
from .test_worklist_ris import _cfind_names, msa, orm, ris, send

__all__ = ["ris"]


def _store(server: PacsServer, path: Path) -> str:
    assert server.storescu(str(path)).returncode == 0
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_a_patient_the_his_deleted_is_not_confused_with_the_next_new_one(ris: PacsServer, tmp_path: Path) -> None:
    """An emergency CT under a temporary ID, re-filed by its late order (the
    temporary patient is deleted, and SQLite hands its key to the next new
    patient); a second study under the temporary ID must not land under
    that stranger."""
    assert msa(send(ris, orm("ID1", "ACC7000")))[0] == "AA"  # the registered patient
    first = _store(ris, make_ct(tmp_path / "er1.dcm", PatientID="TEMP7", PatientName="CAP^CUU",
                                AccessionNumber="ACC7001"))
    assert msa(send(ris, orm("ID2", "ACC7001")))[0] == "AA"  # late order: re-files the study
    assert _cfind_names(ris, StudyInstanceUID=first) == [("Nguyễn^Văn An", "001085012345", first)]
    other = _store(ris, make_ct(tmp_path / "walkin.dcm", PatientID="OTHER7", PatientName="KHAC^NGUOI"))
    second = _store(ris, make_ct(tmp_path / "er2.dcm", PatientID="TEMP7", PatientName="CAP^CUU"))
    assert _cfind_names(ris, StudyInstanceUID=second) == [("CAP^CUU", "TEMP7", second)]
    assert _cfind_names(ris, StudyInstanceUID=other) == [("KHAC^NGUOI", "OTHER7", other)]


def test_an_instance_after_a_purge_is_not_filed_in_another_study(ris: PacsServer, tmp_path: Path) -> None:
    """Purge while serving deletes the newest series; SQLite gives its key to the
    next new series; the purged series' next instance must make its own study
    again, not join the newer one."""
    study, series = "1.2.826.0.1.3680043.8.498.7100", "1.2.826.0.1.3680043.8.498.7100.1"
    _store(ris, make_ct(tmp_path / "x1.dcm", PatientID="PX", PatientName="LE^X", StudyDate="20000101",
                        StudyInstanceUID=study, SeriesInstanceUID=series))
    purged = ris.cli("purge", "--older-than", "3650", "--yes")
    assert "studies deleted" in purged.stdout, purged.stdout
    newer = _store(ris, make_ct(tmp_path / "y1.dcm", PatientID="PY", PatientName="PHAM^Y"))
    _store(ris, make_ct(tmp_path / "x2.dcm", PatientID="PX", PatientName="LE^X", StudyDate="20000101",
                        StudyInstanceUID=study, SeriesInstanceUID=series))
    assert _cfind_names(ris, StudyInstanceUID=study) == [("LE^X", "PX", study)]
    assert _cfind_names(ris, StudyInstanceUID=newer) == [("PHAM^Y", "PY", newer)]
    with ris.http() as http:
        counts = http.get("/dicom-web/studies", params={"StudyInstanceUID": newer}).json()[0]
        assert counts["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances


def test_people_sent_without_a_patient_id_are_not_one_patient(ris: PacsServer, tmp_path: Path) -> None:
    """Two unidentified emergency patients, both sent with an empty Patient
    ID: two patients, each study listed under its own name (the second was
    listed under the first one's name). More objects of a study, through the
    server or `pacs import` (no cached keys), make no further patient."""
    series = "1.2.826.0.1.3680043.8.498.7300.1"
    first = _store(ris, make_ct(tmp_path / "a1.dcm", PatientID="", PatientName="CAP CUU^NAM 1",
                                SeriesInstanceUID=series))
    _store(ris, make_ct(tmp_path / "a2.dcm", PatientID="", PatientName="CAP CUU^NAM 1",
                        StudyInstanceUID=first, SeriesInstanceUID=series))
    second = _store(ris, make_ct(tmp_path / "b1.dcm", PatientID="", PatientName="CAP CUU^NU 2"))
    (tmp_path / "imp").mkdir()
    make_ct(tmp_path / "imp" / "a3.dcm", PatientID="", PatientName="CAP CUU^NAM 1", StudyInstanceUID=first)
    ris.cli("import", str(tmp_path / "imp"))
    assert _cfind_names(ris, StudyInstanceUID=first) == [("CAP CUU^NAM 1", "", first)]
    assert _cfind_names(ris, StudyInstanceUID=second) == [("CAP CUU^NU 2", "", second)]
    stats = ris.stats()
    assert (stats["patients"], stats["studies"], stats["series"], stats["instances"]) == (2, 2, 3, 4)
