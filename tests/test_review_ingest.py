"""Reviewer findings on what the archive accepts and how it reads it, each
against a real `pacs serve` over real sockets (DCMTK storescu, a pynetdicom
SCU sending file bytes as they are, STOW-RS):

1. an MR Spectroscopy object (Rows and Columns, no Bits Allocated, its data
   in Spectroscopy Data (5600,0020), PS3.3 C.8.14.4) is stored: it was
   taken for an image cut short before its Pixel Data and refused 0xC000,
   over DIMSE and STOW-RS alike; an image (Rows and Bits Allocated) without
   Pixel Data is still refused;
2. a Deflated Explicit VR Little Endian object is read as it is inflated:
   pydicom inflated the whole data set in memory first, so a 1 MB object of
   deflated zeros took the server 2 GB (an 8 MB one, 16 GB: the kernel kills
   the server and every association on it); a deflated object cut short is
   still refused 0xC000.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from .conftest import Backend, PacsServer, dataset_bytes
from .test_dimse_failures import scu_store_file
from .test_multiframe_review import _peak, _reset_peak

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


# -- 2. deflated data sets -----------------------------------------------------------------------
INFLATED_PIXELS = 1 << 30  # 1 GB of zeros: about 1 MB deflated


def _deflated(path: Path, pixel_bytes: int) -> Dataset:
    """A Deflated Explicit VR Little Endian Part 10 object whose Pixel Data
    holds *pixel_bytes* zero bytes, written without ever holding them."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "DEFLATED-1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1024, 1024, pixel_bytes // (1024 * 1024)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(header.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes))]
    zeros = bytes(1 << 20)
    for offset in range(0, pixel_bytes, len(zeros)):
        parts.append(deflater.compress(zeros[:pixel_bytes - offset]))
    parts.append(deflater.flush())
    body = b"".join(parts)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta)
    # An odd-length deflated data set is padded with one byte (PS3.5 A.5).
    path.write_bytes(out.getvalue() + body + (b"\0" if len(body) % 2 else b""))
    return ds


def test_deflated_object_read_in_bounded_memory(archive: PacsServer, tmp_path: Path) -> None:
    """A deflated object that inflates to 1 GB, over DIMSE (its bytes as
    sent) and over STOW-RS: stored as sent, indexed, and the server's memory
    grows by far less than the inflated size (it grew by 2 GB)."""
    sent = tmp_path / "deflated.dcm"
    ds = _deflated(sent, INFLATED_PIXELS)
    assert sent.stat().st_size < 8 << 20  # held in memory by the receiver, as a small object is
    before = _reset_peak(archive)
    assert scu_store_file(archive, sent) == 0
    assert _peak(archive) - before < 256 << 20
    assert dataset_bytes(_stored(archive, ds.SOPInstanceUID)) == dataset_bytes(sent.read_bytes())

    again = tmp_path / "deflated-stow.dcm"
    other = _deflated(again, INFLATED_PIXELS)
    before = _reset_peak(archive)
    response = _stow(archive, again.read_bytes())
    assert response.status_code == 200, response.text
    assert _peak(archive) - before < 256 << 20
    with archive.http() as client:
        found = client.get("/dicom-web/instances", params={"PatientID": "DEFLATED-1"}).json()
    assert {item["00080018"]["Value"][0] for item in found} == {ds.SOPInstanceUID, other.SOPInstanceUID}
    assert all(item["00280008"]["Value"][0] == 1024 for item in found)  # Number of Frames indexed
    assert archive.alive()


def test_deflated_object_cut_short_refused(archive: PacsServer, tmp_path: Path) -> None:
    """A deflated object cut inside its deflate stream (its Pixel Data
    incomplete) is refused 0xC000, over DIMSE and STOW-RS."""
    whole = tmp_path / "whole.dcm"
    ds = _deflated(whole, 64 << 20)
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) - 64])
    assert scu_store_file(archive, cut) == CANNOT_UNDERSTAND
    response = _stow(archive, cut.read_bytes())
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
    with archive.http() as client:
        found = client.get("/dicom-web/instances", params={"SOPInstanceUID": ds.SOPInstanceUID})
    assert found.status_code == 204 or found.json() == []
