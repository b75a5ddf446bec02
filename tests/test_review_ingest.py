"""Reviewer findings on what the archive accepts and how it reads it, each
against a real `pacs serve` over real sockets (DCMTK storescu, a pynetdicom
SCU sending file bytes as they are, STOW-RS):

1. an MR Spectroscopy object (Rows and Columns, no Bits Allocated, its data
   in Spectroscopy Data (5600,0020), PS3.3 C.8.14.4) is stored: it was
   taken for an image cut short before its Pixel Data and refused 0xC000,
   over DIMSE and STOW-RS alike; an image (Rows and Bits Allocated) without
   Pixel Data is still refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from .conftest import Backend, PacsServer, dataset_bytes

MR_SPECTROSCOPY = "1.2.840.10008.5.1.4.1.1.4.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CANNOT_UNDERSTAND = 0xC000


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    tmp = tmp_path_factory.mktemp("review-ingest")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {})).start()
    yield server
    server.stop()


def _stow(server: PacsServer, data: bytes) -> httpx.Response:
    boundary = "review-ingest-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    with server.http() as client:
        return client.post("/dicom-web/studies", content=body, timeout=300, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})


def scu_store_file(server: PacsServer, path: Path) -> int:
    """C-STORE a Part 10 file's data set bytes exactly as they are (no
    re-encoding; the File Meta alone is read, so a cut object goes as cut)."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status is not None and "Status" in status, "no C-STORE response"
    return int(status.Status)


def _stored(server: PacsServer, sop_uid: str) -> bytes:
    found = list((server.data_dir / "objects").rglob(f"{sop_uid}.dcm"))
    assert len(found) == 1, found
    return found[0].read_bytes()


# -- 1. MR Spectroscopy --------------------------------------------------------------------------
def _spectroscopy(path: Path) -> Dataset:
    """An MR Spectroscopy object as a scanner writes one: the MR Spectroscopy
    Data module's Rows, Columns and Spectroscopy Data, no Image Pixel module."""
    ds = Dataset()
    ds.SOPClassUID = MR_SPECTROSCOPY
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MRS-1"
    ds.PatientName = "Spectro^Anna"
    ds.Modality = "MR"
    ds.NumberOfFrames = 1
    ds.Rows = 1
    ds.Columns = 1
    ds.DataPointRows = 1
    ds.DataPointColumns = 1024
    ds.DataRepresentation = "COMPLEX"
    ds.SignalDomainColumns = "TIME"
    ds.add_new(0x56000020, "OF", bytes(range(256)) * 32)  # Spectroscopy Data: 1024 complex points
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_mr_spectroscopy_is_stored(archive: PacsServer, tmp_path: Path) -> None:
    """storescu and STOW-RS of an MR Spectroscopy object: stored as sent and
    indexed, not refused as an image without Pixel Data."""
    sent = tmp_path / "mrs.dcm"
    ds = _spectroscopy(sent)
    result = archive.storescu(str(sent))
    assert result.returncode == 0, result.stdout + result.stderr
    assert dataset_bytes(_stored(archive, ds.SOPInstanceUID)) == dataset_bytes(sent.read_bytes())

    again = tmp_path / "mrs-stow.dcm"
    other = _spectroscopy(again)
    response = _stow(archive, again.read_bytes())
    assert response.status_code == 200, response.text
    with archive.http() as client:
        found = client.get("/dicom-web/instances", params={"PatientID": "MRS-1"}).json()
    assert {item["00080018"]["Value"][0] for item in found} == {ds.SOPInstanceUID, other.SOPInstanceUID}


def test_image_without_pixel_data_still_refused(archive: PacsServer, tmp_path: Path) -> None:
    """An image (Rows and Bits Allocated, the Image Pixel module) cut where its
    Pixel Data starts is refused 0xC000, as before."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "CUT-1"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "cut.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert scu_store_file(archive, path) == CANNOT_UNDERSTAND
