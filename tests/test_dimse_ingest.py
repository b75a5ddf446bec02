"""Issue 2 acceptance 1-2: DCMTK storescu -> pacs serve, byte-identical, indexed,
on SQLite and PostgreSQL, on the filesystem and on S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs.index.models import Instance, Patient, PatientIdentifier, Series, Study
from pacs.names import fold_name

from .conftest import ALL_BACKENDS, PacsServer, dataset_bytes, make_backend, run_dcmtk
from .peers import c_get_study
from .dicomfiles import (
    PYDICOM_FILES,
    copy_files,
    group_by_flag,
    jpegls_near_lossless,
    transfer_syntax,
    what_storescu_sends,
)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend_server(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = PacsServer(tmp_path / "data", make_backend(request.param, request)).start()
    yield server
    server.stop()


def send_as_is(server: PacsServer, files: list[Path]) -> None:
    """Send each file in its own transfer syntax (storescu flag per syntax)."""
    for flag, group in group_by_flag(files).items():
        result = server.storescu(flag, *map(str, group))
        assert result.returncode == 0, f"storescu {flag} failed:\n{result.stderr}\n{server.log_text()[-3000:]}"


def assert_stored_as_sent(server: PacsServer, files: list[Path], workdir: Path) -> None:
    on_the_wire = what_storescu_sends(files, workdir)
    core = server.core()
    try:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            stored = core.reader.stored_instance(ds.SOPInstanceUID)
            assert stored is not None, f"{path.name} not indexed"
            data = core.store.read_bytes(stored.storage_key)
            sent = on_the_wire[str(ds.SOPInstanceUID)]
            assert dataset_bytes(data) == sent, f"{path.name}: dataset bytes differ"
            assert stored.transfer_syntax_uid == transfer_syntax(path)
            assert stored.size == len(data)
            assert core.store.checksum(stored.storage_key) == stored.sha256
            # The stored file is a valid Part 10 file with our meta.
            meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert meta.SourceApplicationEntityTitle == "STORESCU"
    finally:
        core.close()


def test_echo(pacs_server: PacsServer) -> None:
    result = run_dcmtk("echoscu", "-aec", "FILMLESS", "127.0.0.1", str(pacs_server.dicom_port))
    assert result.returncode == 0, result.stderr


def test_pydicom_files_every_syntax_byte_identical(any_backend_server: PacsServer, tmp_path: Path) -> None:
    files = copy_files(PYDICOM_FILES, tmp_path / "in") + [jpegls_near_lossless(tmp_path / "in")]
    send_as_is(any_backend_server, files)
    assert_stored_as_sent(any_backend_server, files, tmp_path)
    stats = any_backend_server.stats()
    assert stats["instances"] == len(files)
    assert stats["bytes"] > 0


def test_sample_studies_indexed_right(any_backend_server: PacsServer, samples: Path, tmp_path: Path) -> None:
    manifest = json.loads((samples / "manifest.json").read_text())
    files = sorted(p for p in samples.rglob("*.dcm"))
    send_as_is(any_backend_server, files)
    assert_stored_as_sent(any_backend_server, files, tmp_path)

    stats = any_backend_server.stats()
    assert stats["studies"] == manifest["study_count"]
    assert stats["instances"] == manifest["instance_count"]
    assert stats["patients"] == manifest["patient_count"]
    assert stats["series"] == sum(s["series_count"] for s in manifest["studies"])

    core = any_backend_server.core()
    studies, series_t, instances = Study.__table__, Series.__table__, Instance.__table__
    try:
        with core.engine.connect() as conn:
            for study in manifest["studies"]:
                row = conn.execute(
                    select(studies, Patient.name, Patient.name_folded, Patient.patient_id, Patient.issuer)
                    .join(Patient.__table__, Patient.pk == studies.c.patient_pk)
                    .where(studies.c.study_uid == study["study_instance_uid"])
                ).one()
                assert row.name == study["patient_name"]  # exact, diacritics kept
                assert row.name_folded == fold_name(study["patient_name"])
                assert row.name_folded.isascii()
                assert row.patient_id == study["patient_id"]
                assert row.issuer == study["patient"]["issuer_of_patient_id"]
                assert row.accession_number == study["accession_number"]
                assert row.study_date == study["study_date"]
                assert row.description == study["study_description"]
                assert row.referring_physician == study["referring_physician_name"]
                assert row.num_instances == study["instance_count"]
                assert row.num_series == study["series_count"]
                assert sorted(row.modalities.split("\\")) == sorted(study["modalities_in_study"])
                for series in study["series"]:
                    srow = conn.execute(
                        select(series_t).where(series_t.c.series_uid == series["series_instance_uid"])
                    ).one()
                    assert srow.modality == series["modality"]
                    assert srow.series_number == series["series_number"]
                    assert srow.num_instances == series["instance_count"]
                    assert srow.body_part == series["body_part_examined"]
                    inst = conn.execute(
                        select(instances).where(instances.c.series_pk == srow.pk).limit(1)
                    ).one()
                    assert inst.rows == series["rows"] and inst.columns == series["columns"]
                    assert inst.sop_class_uid == series["sop_class_uid"]
                    assert inst.transfer_syntax_uid == series["transfer_syntax_uid"]
                    assert inst.calling_ae == "STORESCU"
                    assert len(inst.sha256) == 64
                for other in study["patient"]["other_patient_ids"]:
                    ident = conn.execute(
                        select(PatientIdentifier.__table__).where(PatientIdentifier.value == other["id"])
                    ).one()
                    assert ident.issuer == other["issuer"]
    finally:
        core.close()


def test_retired_storage_class_stored_and_retrieved(pacs_server: PacsServer, tmp_path: Path) -> None:
    """An old ultrasound sends Ultrasound Image Storage (Retired): kept as sent, and
    a C-GET requestor gets it back (DCMTK's storescp and Orthanc take it too)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    retired_us = "1.2.840.10008.5.1.4.1.1.6"
    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = retired_us
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "US"
    path = tmp_path / "in" / "old-us.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)

    result = pacs_server.storescu("-R", str(path))  # -R: propose the file's own class
    assert result.returncode == 0, result.stderr
    core = pacs_server.core()
    try:
        stored = core.reader.stored_instance(ds.SOPInstanceUID)
        assert stored is not None and stored.sop_class_uid == retired_us, stored
        kept = dataset_bytes(core.store.read_bytes(stored.storage_key))
    finally:
        core.close()

    statuses, received = c_get_study(pacs_server, ds.StudyInstanceUID, retired_us, "OLDVIEWER")
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert len(received) == 1
    assert received[0] == kept
    assert dcmread(io.BytesIO(received[0]), force=True).PixelData == ds.PixelData
