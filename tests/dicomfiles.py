"""Test data helpers: pick real DICOM files and send them as they are, and
build small ones (:func:`image_dataset`, :func:`make_ct`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

# storescu flag that proposes exactly the file's own syntax first.
STORESCU_FLAG = {
    ExplicitVRLittleEndian: "-xe",
    ExplicitVRBigEndian: "-xb",
    ImplicitVRLittleEndian: "-xi",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}

# Real files bundled with pydicom / pydicom-data, one per syntax (distinct
# SOP Instance UIDs), including non-image objects and a multi-frame US.
PYDICOM_FILES = [
    "CT_small.dcm",
    "waveform_ecg.dcm",
    "test-SR.dcm",
    "ExplVR_BigEnd.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "image_dfl.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "examples_ybr_color.dcm",
    "JPGExtended.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "US1_J2KR.dcm",
    "693_J2KI.dcm",
    "OBXXXX1A_rle.dcm",
]


def what_storescu_sends(files: list[Path], workdir: Path) -> dict[str, bytes]:
    """The dataset bytes DCMTK's storescu puts on the wire for each file.

    storescu re-encodes what it reads (it drops trailing padding, group
    lengths...), so "byte-identical to what was sent" is checked against a
    DCMTK storescp in bit-preserving mode (+B), fed the same way.
    Returns {SOP Instance UID: dataset bytes}.
    """
    from .peers import dataset_bytes, dcmtk, free_port, run_dcmtk, wait_port

    sent: dict[str, bytes] = {}
    for flag, group in group_by_flag(files).items():
        out = workdir / f"storescp{flag}"
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", f"+{flag[1:]}", "-od", str(out), "-aet", "REFSCP", str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, proc=proc)
            result = run_dcmtk("storescu", flag, "-aec", "REFSCP", "127.0.0.1", str(port), *map(str, group))
            assert result.returncode == 0, result.stderr
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        for f in out.iterdir():
            data = f.read_bytes()
            uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
            sent[str(uid)] = dataset_bytes(data)
    return sent


def transfer_syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def group_by_flag(files: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        groups[STORESCU_FLAG[transfer_syntax(f)]].append(f)
    return dict(groups)


def jpegls_near_lossless(out_dir: Path) -> Path:
    """pydicom's JPEG-LS near-lossless sample lacks study/series UIDs: add them."""
    from .conftest import pydicom_file

    ds = dcmread(pydicom_file("JPEGLSNearLossless_16.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    out = out_dir / "jpegls_near_lossless.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def copy_files(names: list[str], out_dir: Path) -> list[Path]:
    from .conftest import pydicom_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        target = out_dir / name
        shutil.copy(pydicom_file(name), target)
        paths.append(target)
    return paths


def frame_pixels(number: int, rows: int, columns: int) -> bytes:
    """The RGB pixels of frame *number* (1-based) of :func:`multiframe_rgb`:
    a pattern that differs from frame to frame."""
    import numpy as np

    pattern = (np.arange(rows * columns * 3, dtype=np.uint32) * 7 + number * 31) % 251
    return pattern.astype(np.uint8).tobytes()


def multiframe_rgb(path: Path, frames: int, rows: int, columns: int) -> tuple[str, str, str]:
    """Write an uncompressed US Multi-frame object of *frames* RGB frames
    (a cine clip, :func:`frame_pixels` each) to *path*; return its study,
    series and SOP Instance UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US Multi-frame
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "079000123456", "TRAN^CINE"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 33.3
    ds.PixelData = b"".join(frame_pixels(n, rows, columns) for n in range(1, frames + 1))
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


# -- objects built here ---------------------------------------------------------------------
def image_dataset(sop_class: str = CTImageStorage, sop_uid: str | None = None, **overrides: object) -> Dataset:
    """A small valid image object: a CT unless *sop_class* says otherwise,
    under *sop_uid* (a new UID if None), in a new study and series, with its
    file meta (Explicit VR Little Endian) naming both; one 16x16 16-bit
    MONOCHROME2 frame of zeros. Keyword overrides then set elements, or
    leave them out (None): the file meta keeps naming *sop_class* and *sop_uid*
    (a test of a mismatch overrides SOPInstanceUID alone)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^BAD INPUT"
    ds.PatientID = "BAD1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(16 * 16 * 2)
    for key, value in overrides.items():
        if value is not None:
            setattr(ds, key, value)
        elif key in ds:
            delattr(ds, key)
    return ds


def make_ct(path: Path, sop_class: str = CTImageStorage, sop_uid: str | None = None, **overrides: object) -> Path:
    """:func:`image_dataset` written as a Part 10 file at *path*."""
    image_dataset(sop_class, sop_uid, **overrides).save_as(path, enforce_file_format=True)
    return path


def encode_dataset(ds: Dataset, *, implicit_vr: bool = False) -> bytes:
    """*ds* without file meta, little endian: what the data set PDVs of a
    C-STORE carry, or a file written without preamble and "DICM"."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, ds)
    return buffer.getvalue()


H264 = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264 High Profile / Level 4.1: no decoder here


def as_h264_clip(ds: Dataset, payload: int) -> Dataset:
    """*ds* made a 75-frame 640x480 cine clip stored as H.264 (lossy; nothing
    here decodes it), as ultrasound and endoscopy systems send them; *payload*
    bytes of stream after its start code."""
    from pydicom.encaps import encapsulate

    ds.Rows, ds.Columns, ds.SamplesPerPixel = 480, 640, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_PARTIAL_420", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = 75, 40.0, 0x00181063
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67" + os.urandom(payload)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = H264
    return ds
