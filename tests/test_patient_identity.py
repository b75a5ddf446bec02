"""Which patient a received study is filed under, when the HIS has moved or
deleted patients meanwhile (the ingest path caches patient keys)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from .conftest import PacsServer
from .test_dimse_failures import make_ct
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
