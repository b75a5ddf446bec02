"""Generate synthetic (non-patient) DICOM studies for demos, tests and benchmarks.

Everything written here is made up: the patients, identifiers and pixel data are
produced from a seed, so the same seed always gives byte-identical files.  Every
object is a DICOM Part 10 file written with ``enforce_file_format=True`` so that
the preamble, ``DICM`` prefix and File Meta Information group are always present.

Studies and patients written by :func:`generate_all`:

========== =================== ========================================== ==========
folder     patient             content                                    modality
========== =================== ========================================== ==========
ct         Nguyễn^Văn An       CT chest-abdomen, 512x512 int16, N slices  CT
compressed Nguyễn^Văn An       MR brain, 3 series: JPEG 2000 Lossless,    MR
                               JPEG-LS Lossless, RLE Lossless
dx         Trần^Thị Bích Ngọc  chest PA radiograph, 16-bit, For Presentation DX
us         Lê^Đức Thắng        abdominal cine loop, RGB multi-frame        US
========== =================== ========================================== ==========

The CT patient deliberately owns two studies so that patient-level queries can be
tested against a patient with more than one study.  ``Phạm^Thị Hương`` and
``Đặng^Quốc Bảo`` are defined too (see :func:`get_patients`) for callers such as
benchmarks that want a patient who does not collide with the default studies.

Command line::

    python -m sample_studies.generate --out DIR [--ct-slices N] [--quick] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

__all__ = [
    "DEFAULT_SEED",
    "MANIFEST_NAME",
    "Patient",
    "StudyInfo",
    "build_manifest",
    "generate_all",
    "generate_compressed",
    "generate_ct",
    "generate_dx",
    "generate_us",
    "get_patients",
    "main",
    "make_ct_series",
    "make_uid",
    "write_manifest",
]

DEFAULT_SEED: Final = 20240615
MANIFEST_NAME: Final = "manifest.json"
MANIFEST_FORMAT: Final = "filmless-pacs/sample-studies-manifest"
MANIFEST_VERSION: Final = 1

# A fixed namespace makes UIDs stable across machines and Python versions, unlike
# pydicom's generate_uid(prefix=None), which ignores entropy_srcs and is random.
_UID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:filmless-pacs:sample-studies:v1")

_CHARSET: Final = "ISO_IR 192"  # UTF-8, needed for Vietnamese diacritics.
_TIMEZONE: Final = "+0700"  # Asia/Ho_Chi_Minh, no DST.
_INSTITUTION: Final = "Bệnh viện Đa khoa Tỉnh"
_DEPARTMENT: Final = "Khoa Chẩn đoán hình ảnh"
_MANUFACTURER: Final = "Filmless Synthetic"
_SOFTWARE_VERSION: Final = "sample_studies 1.0"
_REFERRING_PHYSICIANS: Final = (
    "Hoàng^Minh Tuấn",
    "Vũ^Thị Lan",
    "Bùi^Văn Hải",
    "Đỗ^Thanh Tùng",
)
_OPERATORS: Final = ("Ngô^Thị Mai", "Dương^Văn Phúc", "Lý^Thu Trang")

_FILE_PATTERN: Final = "[0-9][0-9][0-9][0-9]*.dcm"

PathLike = str | Path
Photometric = Literal["MONOCHROME1", "MONOCHROME2"]


# --------------------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------------------


def make_uid(seed: int, *parts: object) -> str:
    """Return a deterministic DICOM UID for ``seed`` and the given parts.

    The UID is ``2.25.<decimal of a name-based (v5) UUID>``, the ISO/IEC 9834-8
    form that needs no registered root; it is at most 44 characters, digits and
    dots only, with no leading zeros in any component.
    """
    name = "\x1f".join([str(seed), *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _rng(seed: int, *parts: object) -> random.Random:
    # random.Random seeds str deterministically (SHA-512), unlike hash(), which
    # is salted per process; so identifiers do not depend on PYTHONHASHSEED.
    return random.Random("\x1f".join(["sample_studies", str(seed), *map(str, parts)]))


def _np_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(_rng(seed, "numpy", *parts).getrandbits(128))


@dataclass(frozen=True, slots=True)
class Patient:
    """A synthetic patient.

    ``patient_id`` is a 12-digit Vietnamese citizen ID (CCCD: province code,
    sex/century digit, two-digit birth year, six random digits) and ``bhyt`` a
    15-character health-insurance card number (BHYT: beneficiary group, benefit
    level, province, 10-digit social-insurance number).  Both are fictitious.
    """

    name: str
    sex: Literal["M", "F"]
    birth_date: date
    patient_id: str
    bhyt: str
    height_m: float
    weight_kg: float

    @property
    def birth_date_da(self) -> str:
        """Birth date as a DICOM DA value (YYYYMMDD)."""
        return self.birth_date.strftime("%Y%m%d")

    def age_at(self, when: date) -> str:
        """Age at ``when`` as a DICOM AS value, e.g. ``"038Y"``."""
        years = when.year - self.birth_date.year
        if (when.month, when.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return f"{years:03d}Y"


# (name, sex, birth-year range, CCCD province code, BHYT group code, benefit level)
_PATIENT_TEMPLATES: Final[tuple[tuple[str, Literal["M", "F"], tuple[int, int], str, str, int], ...]] = (
    ("Nguyễn^Văn An", "M", (1978, 1990), "001", "DN", 4),  # Hà Nội, employee
    ("Trần^Thị Bích Ngọc", "F", (1965, 1980), "079", "GD", 4),  # TP.HCM, household
    ("Lê^Đức Thắng", "M", (1950, 1962), "048", "HT", 3),  # Đà Nẵng, retired
    ("Phạm^Thị Hương", "F", (1985, 1998), "031", "DN", 4),  # Hải Phòng, employee
    ("Đặng^Quốc Bảo", "M", (2003, 2007), "092", "HS", 4),  # Cần Thơ, student
)


def _make_patient(seed: int, index: int) -> Patient:
    name, sex, (y0, y1), province, group, level = _PATIENT_TEMPLATES[index]
    rng = _rng(seed, "patient", index)
    birth = date(rng.randint(y0, y1), 1, 1) + timedelta(days=rng.randint(0, 364))
    # CCCD digit 4 encodes sex and century: 0/1 = male/female born 19xx, 2/3 = 20xx.
    century_sex = (0 if birth.year < 2000 else 2) + (0 if sex == "M" else 1)
    cccd = f"{province}{century_sex}{birth.year % 100:02d}{rng.randrange(10**6):06d}"
    bhyt = f"{group}{level}{int(province):02d}{rng.randrange(10**10):010d}"
    height = round(rng.uniform(1.55, 1.75) if sex == "M" else rng.uniform(1.48, 1.65), 2)
    weight = round(rng.uniform(52.0, 78.0) if sex == "M" else rng.uniform(44.0, 65.0), 1)
    return Patient(name, sex, birth, cccd, bhyt, height, weight)


def get_patients(seed: int = DEFAULT_SEED) -> list[Patient]:
    """Return the five synthetic patients for ``seed`` (always the same names).

    Index 0 owns the ``ct`` and ``compressed`` studies, 1 the ``dx`` study,
    2 the ``us`` study; 3 and 4 are unused by :func:`generate_all`.
    """
    return [_make_patient(seed, i) for i in range(len(_PATIENT_TEMPLATES))]


@dataclass(frozen=True, slots=True)
class StudyInfo:
    """Study-level values shared by every instance of one synthetic study."""

    key: str
    patient: Patient
    study_uid: str
    frame_of_reference_uid: str
    study_date: date
    study_time: str
    accession_number: str
    study_id: str
    description: str
    referring_physician: str
    operator: str
    body_part: str

    @property
    def study_date_da(self) -> str:
        """Study date as a DICOM DA value."""
        return self.study_date.strftime("%Y%m%d")


def _make_study(
    seed: int,
    key: str,  # names the variant: different content must never share UIDs
    patient: Patient,
    *,
    id_prefix: str,
    description: str,
    body_part: str,
    day_offset: int = 0,
) -> StudyInfo:
    rng = _rng(seed, "study", key, patient.patient_id)
    # A fixed base plus a seed-dependent shift keeps dates plausible and stable.
    base = date(2024, 3, 4) + timedelta(days=_rng(seed, "base-date").randint(0, 180))
    study_date = base + timedelta(days=day_offset)
    study_time = f"{rng.randint(7, 16):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
    return StudyInfo(
        key=key,
        patient=patient,
        study_uid=make_uid(seed, "study", key, patient.patient_id),
        frame_of_reference_uid=make_uid(seed, "frame-of-reference", key, patient.patient_id),
        study_date=study_date,
        study_time=study_time,
        accession_number=f"ACC{study_date:%y%m%d}{rng.randrange(10**4):04d}",
        study_id=f"{id_prefix}{rng.randrange(10**5):05d}",
        description=description,
        referring_physician=rng.choice(_REFERRING_PHYSICIANS),
        operator=rng.choice(_OPERATORS),
        body_part=body_part,
    )


# --------------------------------------------------------------------------------------
# Dataset construction and writing
# --------------------------------------------------------------------------------------


def _ds(value: float, places: int = 6) -> str:
    # DS is limited to 16 characters; repr() of a float such as -179.64999999999998
    # would overflow it, so format explicitly and strip redundant zeros.
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        raise ValueError(f"{value!r} does not fit a DS value")
    return text


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _base_dataset(
    *,
    seed: int,
    study: StudyInfo,
    sop_class_uid: str,
    sop_instance_uid: str,
    modality: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    instance_number: int,
    content_time: str,
    manufacturer_model: str,
) -> Dataset:
    """Patient, study, series, equipment, image and SOP Common attributes."""
    patient = study.patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    # SOP Common: the character set must precede any UTF-8 text when encoding,
    # pydicom reads it from the dataset at write time.
    ds.SpecificCharacterSet = _CHARSET
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = study.study_date_da
    ds.InstanceCreationTime = content_time
    ds.TimezoneOffsetFromUTC = _TIMEZONE

    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "CCCD"
    ds.TypeOfPatientID = "TEXT"
    ds.PatientBirthDate = patient.birth_date_da
    ds.PatientSex = patient.sex
    other = Dataset()
    other.PatientID = patient.bhyt
    other.IssuerOfPatientID = "BHYT"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])

    # Patient Study
    ds.PatientAge = patient.age_at(study.study_date)
    ds.PatientSize = _ds(patient.height_m)
    ds.PatientWeight = _ds(patient.weight_kg)

    # General Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date_da
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.StudyDescription = study.description

    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = study.study_date_da
    ds.SeriesTime = study.study_time
    ds.BodyPartExamined = study.body_part
    ds.OperatorsName = study.operator

    # General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = manufacturer_model
    ds.InstitutionName = _INSTITUTION
    ds.InstitutionalDepartmentName = _DEPARTMENT
    ds.StationName = f"{modality}01"
    ds.DeviceSerialNumber = f"SYN-{modality}-{make_uid(seed, 'device', modality)[-6:]}"
    ds.SoftwareVersions = _SOFTWARE_VERSION

    # General Image
    ds.InstanceNumber = instance_number
    ds.ContentDate = study.study_date_da
    ds.ContentTime = content_time
    ds.AcquisitionDate = study.study_date_da
    ds.AcquisitionTime = content_time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _offset_time(hhmmss: str, seconds: float) -> str:
    start = datetime.strptime(hhmmss, "%H%M%S")
    return (start + timedelta(seconds=seconds)).strftime("%H%M%S.%f")[:9]


def _set_pixel_data(ds: Dataset, arr: np.ndarray) -> None:
    # The VR is set explicitly rather than left as "OB or OW" for pydicom to
    # resolve; 16-bit data is OW, 8-bit OB, as PS3.5 A.2 describes.
    vr = "OW" if arr.dtype.itemsize == 2 else "OB"
    ds.add_new(Tag(0x7FE0, 0x0010), vr, arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def _write(ds: Dataset, path: Path) -> Path:
    # enforce_file_format writes the preamble and a conformant File Meta group
    # (group length, version, implementation UID) and checks the SOP UIDs in it.
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _prepare_dir(path: Path) -> Path:
    """Create ``path`` and drop stale NNNN.dcm files from an earlier, larger run.

    Without this a 300-slice run followed by an 8-slice run would leave 292 old
    files beside the new ones and the manifest would disagree with the folder.
    """
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob(_FILE_PATTERN):
        if old.is_file():
            old.unlink()
    return path


def _file_name(index: int) -> str:
    return f"{index:04d}.dcm"


# --------------------------------------------------------------------------------------
# Raster helpers
# --------------------------------------------------------------------------------------


class _Canvas:
    """A float32 image with physical coordinates and cheap ellipse painting.

    Painting only touches the ellipse's bounding box and builds the mask from two
    1-D distance vectors by broadcasting, so a 512x512 phantom slice with a few
    dozen shapes costs well under a millisecond per shape.
    """

    def __init__(self, rows: int, cols: int, spacing: float, fill: float) -> None:
        self.rows, self.cols, self.spacing = rows, cols, spacing
        # Pixel centres, origin at the image centre: x to the right, y downwards.
        self.xs = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing).astype(np.float32)
        self.ys = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing).astype(np.float32)
        self.img = np.full((rows, cols), fill, dtype=np.float32)

    def reset(self, fill: float) -> None:
        self.img.fill(fill)

    def mask(
        self, cx: float, cy: float, a: float, b: float, angle: float = 0.0
    ) -> tuple[slice, slice, np.ndarray] | None:
        """Bounding-box slices and boolean mask of an ellipse (semi-axes a, b)."""
        if a <= 0 or b <= 0:
            return None
        r = max(a, b) if angle else None
        ra, rb = (r, r) if r is not None else (a, b)
        sp = self.spacing
        j0 = max(0, int(np.floor((cx - ra - self.xs[0]) / sp)))
        j1 = min(self.cols, int(np.ceil((cx + ra - self.xs[0]) / sp)) + 1)
        i0 = max(0, int(np.floor((cy - rb - self.ys[0]) / sp)))
        i1 = min(self.rows, int(np.ceil((cy + rb - self.ys[0]) / sp)) + 1)
        if j0 >= j1 or i0 >= i1:
            return None
        dx = self.xs[j0:j1] - cx
        dy = self.ys[i0:i1] - cy
        if angle:
            c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            u = dx[None, :] * c + dy[:, None] * s
            v = dy[:, None] * c - dx[None, :] * s
            m = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        else:
            m = ((dy / b) ** 2)[:, None] + ((dx / a) ** 2)[None, :] <= 1.0
        return slice(i0, i1), slice(j0, j1), m

    def fill(self, cx: float, cy: float, a: float, b: float, value: float, angle: float = 0.0) -> None:
        hit = self.mask(cx, cy, a, b, angle)
        if hit is not None:
            rs, cs, m = hit
            self.img[rs, cs][m] = value

    def fill_field(
        self, cx: float, cy: float, a: float, b: float, field: np.ndarray, angle: float = 0.0
    ) -> None:
        """Fill an ellipse from a full-size ``field`` (e.g. a textured value map)."""
        hit = self.mask(cx, cy, a, b, angle)
        if hit is not None:
            rs, cs, m = hit
            self.img[rs, cs][m] = field[rs, cs][m]


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise normalised to unit variance (via FFT)."""
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(rows, cols)).astype(np.float32)
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    return out


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------

_CT_THICKNESSES: Final = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0)


def _ct_slice_thickness(slices: int) -> float:
    # Pick the thickest common reconstruction that keeps coverage near a
    # chest-abdomen scan (~400 mm); short test series simply use 10 mm.
    fitting = [t for t in _CT_THICKNESSES if t * slices <= 400.0]
    return fitting[-1] if fitting else _CT_THICKNESSES[0]


class _CTPhantom:
    """Chest-to-abdomen phantom in HU; anatomy is a function of t in [0, 1].

    t = 0 is the lung apices and t = 1 the lower abdomen, so any slice count
    shows the whole trunk.  Image x runs to the patient's left and y to the
    posterior (LPS, head-first supine), matching ImageOrientationPatient 1\\0\\0\\0\\1\\0.
    """

    def __init__(self, size: int, spacing: float, rng: np.random.Generator) -> None:
        self.canvas = _Canvas(size, size, spacing, -1000.0)
        # Texture and noise fields are computed once; per-slice work is only
        # painting and a couple of whole-image additions.
        self.texture = [_smooth_noise(rng, size, size, 3.0 / spacing) for _ in range(4)]
        self.noise = [rng.standard_normal((size, size), dtype=np.float32) * 9.0 for _ in range(8)]
        self.table = self._table_mask()

    def _table_mask(self) -> np.ndarray:
        c = self.canvas
        # A curved carbon-fibre couch below the patient, constant along z.
        y = c.ys[:, None] - (160.0 + 0.0006 * c.xs[None, :] ** 2)
        return (np.abs(y) < 4.0) & (np.abs(c.xs[None, :]) < 190.0)

    def _tex(self, t: float) -> np.ndarray:
        # Blend neighbouring fields so lung vessels drift smoothly between slices.
        pos = t * (len(self.texture) - 1)
        k = min(int(pos), len(self.texture) - 2)
        w = np.float32(pos - k)
        return self.texture[k] * (1 - w) + self.texture[k + 1] * w

    def slice_hu(self, t: float, z_mm: float, index: int) -> np.ndarray:
        c = self.canvas
        c.reset(-1000.0)
        c.img[self.table] = 250.0
        bulge = float(np.sin(np.pi * t))
        a, b, cy = 150.0 + 18.0 * bulge, 105.0 + 12.0 * bulge, 15.0
        c.fill(0.0, cy, a, b, -100.0)  # subcutaneous fat
        c.fill(0.0, cy, a - 14.0, b - 12.0, 45.0)  # muscle and viscera

        if t < 0.68:  # ribs: cross-sections come and go as oblique ribs pass
            phase = z_mm / 24.0
            for side in (-1.0, 1.0):
                for k in range(9):
                    ang = np.deg2rad(25.0 + 16.0 * k + 6.0 * np.sin(2 * np.pi * phase + k))
                    if np.cos(2 * np.pi * (phase + 0.13 * k)) < -0.2:
                        continue
                    rx = side * (a - 20.0) * np.sin(ang)
                    ry = cy - (b - 18.0) * np.cos(ang)
                    c.fill(float(rx), float(ry), 7.0, 4.5, 700.0, angle=float(side * ang))

        tex = self._tex(t)
        # Lungs: apex at t=0, bases at ~0.5 (right, raised by the liver) / 0.55;
        # texture peaks stand in for vessels (~ -80 HU).
        lung_field = -860.0 + 35.0 * tex + np.where(tex > 1.7, 780.0, 0.0).astype(np.float32)
        for side, base in ((-1.0, 0.50), (1.0, 0.55)):
            if t < base:
                s = float(np.sin(np.pi * (0.1 + 0.8 * t / base)) ** 0.6)
                c.fill_field(side * 68.0, cy - 5.0, 55.0 * s + 4.0, 82.0 * s + 6.0, lung_field)

        if 0.18 < t < 0.52:  # heart, left-anterior
            h = float(np.sin(np.pi * (t - 0.18) / 0.34))
            c.fill(22.0, cy - 30.0, 58.0 * h + 5.0, 46.0 * h + 5.0, 42.0, angle=-0.5)
        if 0.08 < t < 0.45:  # sternum
            c.fill(0.0, cy - b + 16.0, 14.0, 6.0, 650.0)
        if 0.45 < t < 0.88:  # liver on the patient's right (image left)
            l = float(np.sin(np.pi * (t - 0.45) / 0.43))
            liver = 62.0 + 4.0 * tex
            c.fill_field(-55.0, cy - 5.0, 80.0 * l + 8.0, 70.0 * l + 8.0, liver)
        if 0.48 < t < 0.72:  # spleen
            c.fill(85.0, cy + 25.0, 30.0, 38.0, 50.0, angle=0.6)
        if 0.66 < t < 0.92:  # kidneys, cortex and hypodense sinus
            k = float(np.sin(np.pi * (t - 0.66) / 0.26))
            for side in (-1.0, 1.0):
                c.fill(side * 70.0, cy + 45.0, 24.0 * k + 3.0, 32.0 * k + 3.0, 35.0, angle=side * 0.4)
                c.fill(side * 64.0, cy + 45.0, 8.0 * k, 12.0 * k, 5.0, angle=side * 0.4)
        if t > 0.74:  # bowel gas pockets
            gas = np.where(tex < -1.6, -950.0, 30.0 + 8.0 * tex).astype(np.float32)
            c.fill_field(0.0, cy - 20.0, 75.0, 45.0, gas)

        c.fill(18.0, cy + 35.0, 12.5, 12.5, 45.0)  # descending aorta
        # Spine: vertebral body alternating with discs every 30 mm along z.
        disc = (z_mm % 30.0) < 6.0
        c.fill(0.0, cy + 62.0, 19.0, 17.0, 90.0 if disc else 1050.0)
        if not disc:
            c.fill(0.0, cy + 62.0, 16.0, 14.0, 680.0)
        c.fill(0.0, cy + 92.0, 13.0, 12.0, 760.0)  # posterior arch
        c.fill(0.0, cy + 90.0, 7.5, 7.0, 10.0)  # spinal canal (CSF)
        c.fill(0.0, cy + 110.0, 5.0, 9.0, 720.0)  # spinous process

        img = c.img + self.noise[index % len(self.noise)]
        return img


def make_ct_series(
    out_dir: PathLike,
    slices: int = 120,
    patient: Patient | None = None,
    seed: int = DEFAULT_SEED,
    *,
    size: int = 512,
    study_key: str | None = None,
) -> list[Path]:
    """Write one axial CT series of ``slices`` images into ``out_dir/NNNN.dcm``.

    CT Image Storage, ``size`` x ``size`` (default 512), signed 16-bit, rescale
    -1024/1, Explicit VR Little Endian, ~512 KiB per file at 512x512.  Existing
    ``NNNN.dcm`` files in ``out_dir`` are removed first.

    ``patient`` defaults to ``get_patients(seed)[0]``.  UIDs and accession are
    derived from seed, patient and ``study_key``, which defaults to one naming
    the slice count and size: the same arguments give the same objects, and a
    300-slice benchmark series never shares a UID with the 120-slice demo CT.
    Pass a distinct ``study_key`` to get another study with the same content.
    Returns the written paths in instance order.
    """
    if slices < 1:
        raise ValueError("slices must be >= 1")
    if size < 64:
        raise ValueError("size must be >= 64")
    out = _prepare_dir(Path(out_dir))
    patient = patient or get_patients(seed)[0]
    key = study_key or f"ct-{slices}x{size}"
    study = _make_study(
        seed, key, patient, id_prefix="CT", description="CT ngực - bụng không tiêm thuốc cản quang",
        body_part="CHEST",
    )
    series_uid = make_uid(seed, "series", study.study_uid, 1)
    spacing = 358.4 / size  # 0.7 mm at 512, i.e. a 35.8 cm reconstruction FOV
    thickness = _ct_slice_thickness(slices)
    first_pixel = -(size - 1) / 2 * spacing
    z_start = 40.0  # table position of the first (most cranial) slice
    phantom = _CTPhantom(size, spacing, _np_rng(seed, "ct", key))

    paths: list[Path] = []
    for i in range(slices):
        t = i / (slices - 1) if slices > 1 else 0.5
        z = z_start - i * thickness
        hu = phantom.slice_hu(t, z, i)
        # Stored value = HU - intercept; clip to the signed 16-bit range.
        stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)

        sop_uid = make_uid(seed, "instance", series_uid, i + 1)
        ds = _base_dataset(
            seed=seed, study=study, sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid,
            modality="CT", series_uid=series_uid, series_number=1,
            series_description=f"Ngực-bụng {_ds(thickness)}mm", instance_number=i + 1,
            content_time=_offset_time(study.study_time, 60 + 0.25 * i),
            manufacturer_model="Phantom CT 64",
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ProtocolName = "Thorax-Abdomen"
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        # Image Plane
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [_ds(first_pixel), _ds(first_pixel), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.SliceThickness = _ds(thickness)
        ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
        # CT Image
        ds.KVP = "120"
        ds.XRayTubeCurrent = 220
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = _ds(spacing * size)
        ds.DataCollectionDiameter = "500"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ScanOptions = "HELICAL MODE"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        _set_pixel_data(ds, stored)
        paths.append(_write(ds, out / _file_name(i + 1)))
    return paths


def generate_ct(
    out_dir: PathLike,
    slices: int = 120,
    *,
    seed: int = DEFAULT_SEED,
    patient: Patient | None = None,
) -> list[Path]:
    """Write the ``ct`` study (patient 0) into ``out_dir/ct/``; see :func:`make_ct_series`."""
    return make_ct_series(Path(out_dir) / "ct", slices, patient, seed)


# --------------------------------------------------------------------------------------
# DX
# --------------------------------------------------------------------------------------


def _chest_radiograph(size: int, rng: np.random.Generator) -> np.ndarray:
    """PA chest radiograph as relative attenuation in [0, 1] (1 = most opaque).

    Coordinates are u (viewer's right = patient's left, as a PA chest is read)
    and v (down), both in [-1, 1]; every structure has soft edges so the image
    does not look aliased at 2048 pixels.
    """
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    u = lin[None, :]
    v = lin[:, None]
    au = np.abs(u)
    edge = 4.0 / size

    def ellipse(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        r = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2
        return _smoothstep(1.0 + edge * 8, 1.0 - edge * 8, r)

    # Trunk: neck at the top, shoulders sloping out to the arms, slight waist.
    half_width = 0.20 + 0.76 * _smoothstep(-0.93, -0.60, v) - 0.08 * _smoothstep(0.3, 1.0, v)
    body = _smoothstep(0.0, 0.03, half_width - au)
    att = 0.42 * body

    # Lungs above the diaphragm domes; the right dome (viewer's left) sits higher.
    dome = np.where(u < 0, 0.42, 0.50) - 0.55 * (au - 0.42) ** 2
    below = _smoothstep(-0.02, 0.02, v - dome)
    heart = ellipse(0.10, 0.27, 0.30, 0.25)
    lungs = (ellipse(-0.40, -0.05, 0.30, 0.66) + ellipse(0.40, -0.02, 0.31, 0.66))
    lungs = lungs * (1.0 - below) * (1.0 - heart)  # the heart border cuts the left lung
    texture = _smooth_noise(rng, size, size, size / 400.0)
    hilar = np.exp(-(((au - 0.17) / 0.18) ** 2) - ((v + 0.05) / 0.25) ** 2)
    att -= lungs * (0.30 - 0.05 * hilar - 0.02 * texture)
    att += 0.16 * below * body  # liver / abdomen below the diaphragm

    # Mediastinum, heart (to the patient's left), aortic knob.
    att += 0.16 * _smoothstep(0.16, 0.10, au) * _smoothstep(-0.95, -0.85, v) * body * (1.0 - heart)
    att += 0.16 * heart
    att += 0.06 * ellipse(0.13, -0.30, 0.08, 0.07)

    # Spine with vertebral modulation along v.
    spine = _smoothstep(0.07, 0.05, au) * (0.75 + 0.25 * np.cos(2 * np.pi * v * 9.0) ** 2)
    att += 0.14 * spine * body

    # Ribs: one expression yields all posterior ribs (curving up laterally) and
    # fainter anterior ribs (sloping down medially) as periodic bands.
    chest = (_smoothstep(0.06, 0.10, au) * _smoothstep(0.92, 0.80, au) * _smoothstep(-0.78, -0.68, v)
             * _smoothstep(0.62, 0.50, v) * body)
    posterior = (v + 0.45 * au - 0.55 * au**2) * 9.0
    anterior = (v - 0.35 * au) * 7.0
    att += chest * 0.10 * _smoothstep(0.55, 0.85, np.cos(2 * np.pi * posterior))
    att += chest * 0.05 * _smoothstep(0.65, 0.9, np.cos(2 * np.pi * anterior))

    # Clavicles rising laterally, tapering at both ends.
    clav_dist = np.abs(v - (-0.70 + 0.16 * au))
    clav_extent = _smoothstep(0.04, 0.08, au) * _smoothstep(0.58, 0.50, au)
    att += 0.13 * _smoothstep(0.035, 0.025, clav_dist) * clav_extent * body

    att += 0.012 * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(att, 0.0, 1.0)


def generate_dx(
    out_dir: PathLike,
    size: int = 2048,
    *,
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    seed: int = DEFAULT_SEED,
    patient: Patient | None = None,
) -> list[Path]:
    """Write the ``dx`` study: one PA chest radiograph into ``out_dir/dx/0001.dcm``.

    Digital X-Ray Image Storage - For Presentation, ``size`` x ``size`` unsigned
    16-bit with ``bits_stored`` (12 or 14) significant bits.  With
    ``photometric="MONOCHROME1"`` the pixel values are inverted (bone low) and
    PresentationLUTShape is INVERSE, as PS3.3 C.8.11.3 requires.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if bits_stored not in (12, 14):
        raise ValueError("bits_stored must be 12 or 14")
    out = _prepare_dir(Path(out_dir) / "dx")
    patient = patient or get_patients(seed)[1]
    study = _make_study(
        seed, f"dx-{size}-{photometric}-{bits_stored}", patient, id_prefix="DX",
        description="X-quang ngực thẳng (PA)",
        body_part="CHEST", day_offset=7,
    )
    att = _chest_radiograph(size, _np_rng(seed, "dx"))
    max_value = (1 << bits_stored) - 1
    # Attenuation -> presentation values: bone/mediastinum bright in MONOCHROME2.
    values = np.rint((0.04 + 0.92 * att) * max_value).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (max_value - values).astype(np.uint16)

    series_uid = make_uid(seed, "series", study.study_uid, 1)
    sop_uid = make_uid(seed, "instance", series_uid, 1)
    ds = _base_dataset(
        seed=seed, study=study, sop_class_uid=DigitalXRayImageStorageForPresentation,
        sop_instance_uid=sop_uid, modality="DX", series_uid=series_uid, series_number=1,
        series_description="Ngực thẳng PA", instance_number=1,
        content_time=_offset_time(study.study_time, 90), manufacturer_model="Phantom DR",
    )
    spacing = 430.0 / size  # a 43 cm flat panel
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # DX Series
    ds.PresentationIntentType = "FOR PRESENTATION"
    # DX Anatomy Imaged / positioning
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("816094009", "SCT", "Chest")])
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "postero-anterior")])
    ds.PositionerType = "COLUMN"  # chest wall stand
    ds.PatientOrientation = ["L", "F"]
    ds.AcquisitionContextSequence = DicomSequence()
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.ImagerPixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.DistanceSourceToDetector = "1800"
    # Acquisition
    ds.KVP = "125"
    ds.ExposureTime = 8
    ds.XRayTubeCurrent = 320
    ds.ExposureInuAs = 2560
    # DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # Sign -1: higher values mean less X-ray intensity (MONOCHROME2, bone bright).
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.WindowCenter = str(max_value // 2 + 1)
    ds.WindowWidth = str(max_value + 1)
    _set_pixel_data(ds, values)
    return [_write(ds, out / _file_name(1))]


# --------------------------------------------------------------------------------------
# US
# --------------------------------------------------------------------------------------


def _us_frames(frames: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """An abdominal sector scan loop (liver, kidney, colour-Doppler vessels), RGB."""
    canvas = _Canvas(rows, cols, 1.0, 0.0)
    xs, ys = canvas.xs, canvas.ys
    apex_y = ys[0] - 0.06 * rows
    dx = xs[None, :]
    dy = ys[:, None] - apex_y
    radius = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dx, dy)
    r_min, r_max = 0.09 * rows, 1.0 * rows
    sector = (np.abs(theta) < 0.62) & (radius > r_min) & (radius < r_max)
    # Depth attenuation only partly undone by TGC, as on a real scanner.
    gain = (1.0 - 0.35 * (radius / r_max) ** 1.5).astype(np.float32)
    near = radius < r_min + 0.12 * rows
    # Speckle: Rayleigh amplitude, smeared along the beam's lateral direction.
    speckle_bank = []
    for _ in range(3):
        raw = rng.rayleigh(0.6, (rows, cols + 8)).astype(np.float32)
        speckle_bank.append((raw[:, :-8] + raw[:, 1:-7] + raw[:, 2:-6]) / 3.0)

    pixels = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    s = rows / 480.0  # geometry below is designed at 480 rows
    for f in range(frames):
        phase = 2 * np.pi * f / max(frames, 1)
        breath = 8.0 * s * np.sin(phase)  # organs slide with respiration
        cardiac = 0.5 + 0.5 * np.cos(2 * np.pi * f / 20.0)  # 75 bpm at 25 frames/s
        canvas.reset(0.55)
        canvas.fill(-150 * s, 95 * s + breath, 55 * s, 32 * s, 0.0, angle=0.3)  # gallbladder, anechoic
        canvas.fill(60 * s, 70 * s + breath, 150 * s, 70 * s, 0.32, angle=-0.35)  # kidney cortex
        canvas.fill(60 * s, 70 * s + breath, 110 * s, 32 * s, 0.95, angle=-0.35)  # renal sinus fat
        artery_r = (16.0 + 3.0 * cardiac) * s
        canvas.fill(-110 * s, -20 * s + breath, artery_r, artery_r, 0.0)
        canvas.fill(-60 * s, -60 * s + breath, 22 * s, 14 * s, 0.0)  # vein
        echo = canvas.img.copy()
        echo[near] = 0.75 + 0.2 * np.sin(radius[near] / 5.0)  # skin / fat / muscle layers
        speckle = np.roll(speckle_bank[f % 3], shift=f, axis=1)
        gray = np.clip(echo * speckle * gain, 0.0, 1.0) ** 0.7 * 235.0
        gray = np.where(sector, gray, 0.0).astype(np.uint8)
        frame = pixels[f]
        frame[...] = gray[..., None]

        # Colour Doppler: red towards the probe in the artery, blue away in the vein.
        for cx, cy, a, b, colour, amp in (
            (-110 * s, -20 * s + breath, artery_r, artery_r, (1.0, 0.15, 0.05), 0.6 + 0.4 * cardiac),
            (-60 * s, -60 * s + breath, 22 * s, 14 * s, (0.1, 0.35, 1.0), 0.7),
        ):
            hit = canvas.mask(cx, cy, a, b)
            if hit is None:
                continue
            rs, cs, m = hit
            # Parabolic (laminar) velocity profile: fastest in the centre.
            yy = (ys[rs][:, None] - cy) / b
            xx = (xs[cs][None, :] - cx) / a
            vel = np.clip(1.0 - (xx * xx + yy * yy), 0.0, 1.0) * amp
            block = frame[rs, cs]
            for ch in range(3):
                val = np.clip(80.0 + 175.0 * vel * colour[ch], 0, 255).astype(np.uint8)
                block[..., ch] = np.where(m, val, block[..., ch])

        # Depth ruler: a tick per centimetre (the image spans 16 cm of depth).
        for depth_cm in range(1, 16):
            yy = int(depth_cm * rows / 16.0)
            if yy < rows - 2:
                frame[yy : yy + 2, cols - 24 : cols - 20] = 220
    return pixels


def generate_us(
    out_dir: PathLike,
    frames: int = 20,
    *,
    rows: int = 480,
    cols: int = 640,
    seed: int = DEFAULT_SEED,
    patient: Patient | None = None,
) -> list[Path]:
    """Write the ``us`` study: one RGB cine loop into ``out_dir/us/0001.dcm``.

    Ultrasound Multi-frame Image Storage, ``frames`` frames of ``rows`` x ``cols``,
    RGB color-by-pixel (PlanarConfiguration 0), 25 frames/s, Explicit VR LE.
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    out = _prepare_dir(Path(out_dir) / "us")
    patient = patient or get_patients(seed)[2]
    study = _make_study(
        seed, f"us-{frames}x{rows}x{cols}", patient, id_prefix="US", description="Siêu âm ổ bụng tổng quát",
        body_part="ABDOMEN", day_offset=14,
    )
    pixels = _us_frames(frames, rows, cols, _np_rng(seed, "us"))
    series_uid = make_uid(seed, "series", study.study_uid, 1)
    sop_uid = make_uid(seed, "instance", series_uid, 1)
    ds = _base_dataset(
        seed=seed, study=study, sop_class_uid=UltrasoundMultiFrameImageStorage,
        sop_instance_uid=sop_uid, modality="US", series_uid=series_uid, series_number=1,
        series_description="Gan - thận phải", instance_number=1,
        content_time=_offset_time(study.study_time, 120), manufacturer_model="Phantom US",
    )
    # US Image: value 3 is the anatomic region, value 4 the mode bit mask (0001 = 2D).
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.PatientOrientation = ""  # Type 2C: US images carry no patient-based plane.
    ds.TransducerType = "CURVED LINEAR"
    # Cine / Multi-frame
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # -> FrameTime
    ds.FrameTime = "40"
    ds.CineRate = 25
    ds.RecommendedDisplayFrameRate = 25
    ds.EffectiveDuration = _ds(frames * 0.04)
    ds.ActualFrameDuration = 40
    # US Region Calibration: lets viewers measure in cm (0.03 cm per pixel here).
    delta_cm = 16.0 / rows
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = cols - 1
    region.RegionLocationMaxY1 = rows - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = delta_cm
    region.PhysicalDeltaY = delta_cm
    region.TransducerFrequency = 3500  # kHz
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    _set_pixel_data(ds, pixels)
    return [_write(ds, out / _file_name(1))]


# --------------------------------------------------------------------------------------
# MR, compressed
# --------------------------------------------------------------------------------------

# Signal levels (arbitrary 12-bit units) per tissue for each weighting.
_MR_TISSUES: Final[dict[str, dict[str, float]]] = {
    "T1": {"fat": 3000, "bone": 120, "csf": 350, "gm": 1400, "wm": 2000, "lesion": 1700},
    "T2": {"fat": 2200, "bone": 100, "csf": 3600, "gm": 2000, "wm": 1350, "lesion": 2900},
    "FLAIR": {"fat": 1800, "bone": 100, "csf": 180, "gm": 1750, "wm": 1250, "lesion": 3100},
}


def _mr_brain(weighting: str, t: float, size: int, spacing: float, bias: np.ndarray,
              noise: np.ndarray) -> np.ndarray:
    """Axial brain slice at relative height t (0 = skull base, 1 = vertex)."""
    lv = _MR_TISSUES[weighting]
    c = _Canvas(size, size, spacing, 0.0)
    s = float(np.sqrt(max(1.0 - (0.95 * t) ** 2, 0.05)))
    a, b = 72.0 * s + 6.0, 92.0 * s + 6.0
    c.fill(0.0, 0.0, a, b, lv["fat"])  # scalp
    c.fill(0.0, 0.0, a - 4.0, b - 4.0, lv["bone"])  # skull
    c.fill(0.0, 0.0, a - 10.0, b - 10.0, lv["csf"])  # subarachnoid CSF
    c.fill(0.0, 0.0, a - 12.0, b - 12.0, lv["gm"])  # cortex
    c.fill(0.0, 0.0, a - 18.0, b - 18.0, lv["wm"])  # white matter
    if b > 40:
        c.fill(0.0, 0.0, 1.5, b - 14.0, lv["csf"])  # interhemispheric fissure
    if 0.25 < t < 0.75:  # lateral ventricles
        v = float(np.sin(np.pi * (t - 0.25) / 0.5))
        for side in (-1.0, 1.0):
            c.fill(side * 9.0, -5.0, 6.0 * v + 1.0, 28.0 * v + 2.0, lv["csf"], angle=side * 0.2)
        c.fill(-20.0, -12.0, 5.0 * v + 1.0, 5.0 * v + 1.0, lv["gm"])  # caudate / thalamus hint
        c.fill(20.0, -12.0, 5.0 * v + 1.0, 5.0 * v + 1.0, lv["gm"])
    if 0.45 < t < 0.7:  # a small periventricular white-matter lesion
        c.fill(28.0, 20.0, 5.0, 4.0, lv["lesion"])
    img = c.img * bias
    # Rician-like background: magnitude of signal plus complex noise.
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


_MR_SERIES: Final = (
    # (weighting, series description, transfer syntax, encoding plugin,
    #  TR, TE, TI, echo train length, ScanningSequence, SequenceVariant)
    ("T1", "T1 SE ax (JPEG 2000 Lossless)", JPEG2000Lossless, "pylibjpeg",
     500.0, 12.0, None, 1, ["SE"], ["NONE"]),
    ("T2", "T2 TSE ax (JPEG-LS Lossless)", JPEGLSLossless, "pyjpegls",
     4000.0, 95.0, None, 12, ["SE"], ["SK"]),
    ("FLAIR", "FLAIR ax (RLE Lossless)", RLELossless, "",  # "" = first available RLE encoder
     9000.0, 100.0, 2500.0, 16, ["SE", "IR"], ["SK"]),
)


def generate_compressed(
    out_dir: PathLike,
    slices: int = 10,
    *,
    size: int = 256,
    include_rle: bool = True,
    seed: int = DEFAULT_SEED,
    patient: Patient | None = None,
) -> list[Path]:
    """Write the ``compressed`` study: an MR brain into ``out_dir/compressed/NNNN.dcm``.

    Three axial series of ``slices`` images each (``size`` x ``size``, 12-bit
    unsigned): T1 encoded JPEG 2000 Lossless (openjpeg via pylibjpeg), T2 encoded
    JPEG-LS Lossless (pyjpegls) and, with ``include_rle``, FLAIR encoded RLE
    Lossless.  File numbering continues across series.  Owned by patient 0 by
    default, so that patient has two studies.
    """
    if slices < 1:
        raise ValueError("slices must be >= 1")
    out = _prepare_dir(Path(out_dir) / "compressed")
    patient = patient or get_patients(seed)[0]
    study = _make_study(
        seed, f"mr-{slices}x{size}-{include_rle}", patient, id_prefix="MR",
        description="MRI sọ não không tiêm thuốc",
        body_part="HEAD", day_offset=21,
    )
    spacing = 240.0 / size
    thickness, gap = 5.0, 6.0
    first_pixel = -(size - 1) / 2 * spacing
    rng = _np_rng(seed, "mr")
    # Coil sensitivity falls off from the top of the image: a smooth bias field.
    ys = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    bias = (1.05 - 0.12 * (ys[:, None] + 1.0) / 2.0 - 0.05 * ys[None, :] ** 2).astype(np.float32)

    paths: list[Path] = []
    number = 0
    series_list = _MR_SERIES if include_rle else _MR_SERIES[:2]
    for series_index, (weighting, desc, syntax, plugin, tr, te, ti, etl, ss, sv) in enumerate(series_list, 1):
        series_uid = make_uid(seed, "series", study.study_uid, series_index)
        for i in range(slices):
            number += 1
            t = 0.15 + 0.75 * (i / (slices - 1) if slices > 1 else 0.5)
            z = -30.0 + i * gap  # inferior to superior
            noise = rng.standard_normal((2, size, size), dtype=np.float32) * 18.0
            pixels = _mr_brain(weighting, t, size, spacing, bias, noise)
            sop_uid = make_uid(seed, "instance", series_uid, i + 1)
            ds = _base_dataset(
                seed=seed, study=study, sop_class_uid=MRImageStorage, sop_instance_uid=sop_uid,
                modality="MR", series_uid=series_uid, series_number=series_index,
                series_description=desc, instance_number=i + 1,
                content_time=_offset_time(study.study_time, 300 * series_index + 5 * i),
                manufacturer_model="Phantom MR 1.5T",
            )
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.PatientPosition = "HFS"
            ds.ProtocolName = f"Brain {weighting}"
            ds.FrameOfReferenceUID = study.frame_of_reference_uid
            ds.PositionReferenceIndicator = ""
            ds.AcquisitionNumber = 1
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.ImagePositionPatient = [_ds(first_pixel), _ds(first_pixel), _ds(z)]
            ds.SliceLocation = _ds(z)
            ds.SliceThickness = _ds(thickness)
            ds.SpacingBetweenSlices = _ds(gap)
            ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
            # MR Image
            ds.ScanningSequence = ss
            ds.SequenceVariant = sv
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = _ds(tr)
            ds.EchoTime = _ds(te)
            if ti is not None:
                ds.InversionTime = _ds(ti)
            ds.EchoTrainLength = etl
            ds.NumberOfAverages = "1"
            ds.ImagingFrequency = "63.87"
            ds.ImagedNucleus = "1H"
            ds.MagneticFieldStrength = "1.5"
            ds.FlipAngle = "90"
            ds.SequenceName = f"{weighting.lower()}_ax"
            ds.WindowCenter = str(int(np.percentile(pixels, 95) // 2))
            ds.WindowWidth = str(int(max(np.percentile(pixels, 99), 2)))
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = size
            ds.Columns = size
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            # compress() encapsulates the frame (with an empty Basic Offset Table)
            # and sets the transfer syntax; keep our deterministic SOP Instance UID.
            ds.compress(syntax, pixels, encoding_plugin=plugin, generate_instance_uid=False)
            paths.append(_write(ds, out / _file_name(number)))
    return paths


# --------------------------------------------------------------------------------------
# Manifest and orchestration
# --------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def build_manifest(out_dir: PathLike, studies: Mapping[str, Sequence[Path]]) -> dict[str, Any]:
    """Describe written studies by reading their headers back.

    Reading the files (rather than echoing generator parameters) guarantees the
    manifest states exactly what an indexer will see.  ``studies`` maps a study
    name to its files, as returned by the ``generate_*`` functions.
    """
    root = Path(out_dir)
    entries: list[dict[str, Any]] = []
    patients: dict[str, dict[str, Any]] = {}
    for name, paths in studies.items():
        if not paths:
            continue
        series: dict[str, dict[str, Any]] = {}
        first: Dataset | None = None
        frames = 0
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if first is None:
                first = ds
            if ds.StudyInstanceUID != first.StudyInstanceUID:
                raise ValueError(f"{path} belongs to another study than {paths[0]}")
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            frames += n_frames
            entry = series.setdefault(
                ds.SeriesInstanceUID,
                {
                    "series_instance_uid": ds.SeriesInstanceUID,
                    "series_number": int(ds.SeriesNumber),
                    "modality": ds.Modality,
                    "series_description": str(ds.get("SeriesDescription", "")),
                    "body_part_examined": str(ds.get("BodyPartExamined", "")),
                    "sop_class_uid": ds.SOPClassUID,
                    "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
                    "rows": int(ds.Rows),
                    "columns": int(ds.Columns),
                    "instance_count": 0,
                    "frame_count": 0,
                    "files": [],
                },
            )
            entry["instance_count"] += 1
            entry["frame_count"] += n_frames
            entry["files"].append(_rel(path, root))
        assert first is not None
        other = first.OtherPatientIDsSequence[0]
        patient = {
            "name": str(first.PatientName),
            "id": first.PatientID,
            "issuer_of_patient_id": first.IssuerOfPatientID,
            "other_patient_ids": [
                {"id": other.PatientID, "issuer": other.IssuerOfPatientID, "type": other.TypeOfPatientID}
            ],
            "birth_date": first.PatientBirthDate,
            "sex": first.PatientSex,
        }
        patients.setdefault(first.PatientID, {**patient, "studies": []})["studies"].append(name)
        modalities = sorted({s["modality"] for s in series.values()})
        entries.append(
            {
                "name": name,
                "directory": _rel(Path(paths[0]).parent, root),
                "patient_name": patient["name"],
                "patient_id": patient["id"],
                "patient": patient,
                "study_instance_uid": first.StudyInstanceUID,
                "accession_number": first.AccessionNumber,
                "study_id": first.StudyID,
                "study_date": first.StudyDate,
                "study_time": first.StudyTime,
                "study_description": str(first.StudyDescription),
                "referring_physician_name": str(first.ReferringPhysicianName),
                "institution_name": str(first.InstitutionName),
                "modality": modalities[0] if len(modalities) == 1 else "\\".join(modalities),
                "modalities_in_study": modalities,
                "series_count": len(series),
                "instance_count": len(paths),
                "frame_count": frames,
                "series": sorted(series.values(), key=lambda s: s["series_number"]),
            }
        )
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "patient_count": len(patients),
        "study_count": len(entries),
        "instance_count": sum(e["instance_count"] for e in entries),
        "patients": list(patients.values()),
        "studies": entries,
    }


def write_manifest(out_dir: PathLike, studies: Mapping[str, Sequence[Path]], **extra: Any) -> Path:
    """Write ``out_dir/manifest.json`` (UTF-8, names unescaped) and return its path.

    ``extra`` keys (e.g. ``seed``, ``quick``) are added at the top level.
    """
    manifest = {**build_manifest(out_dir, studies), **extra}
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def generate_all(
    out_dir: PathLike,
    ct_slices: int | None = None,
    quick: bool = False,
    seed: int = DEFAULT_SEED,
    *,
    dx_photometric: Photometric = "MONOCHROME2",
) -> dict[str, list[Path]]:
    """Generate every sample study under ``out_dir`` and write ``manifest.json``.

    ``ct_slices`` defaults to 120, or 8 when ``quick``.  ``quick`` also shrinks
    the radiograph to 1024x1024 and the cine loop to 4 frames; the patients,
    the UID scheme and the content types stay the same.  Returns ``{study name: paths}``
    for ``ct``, ``dx``, ``us`` and ``compressed``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slices = ct_slices if ct_slices is not None else (8 if quick else 120)
    patients = get_patients(seed)
    studies: dict[str, list[Path]] = {
        "ct": generate_ct(out, slices, seed=seed, patient=patients[0]),
        "dx": generate_dx(out, 1024 if quick else 2048, photometric=dx_photometric, seed=seed,
                          patient=patients[1]),
        "us": generate_us(out, 4 if quick else 20, seed=seed, patient=patients[2]),
        "compressed": generate_compressed(out, 10, seed=seed, patient=patients[0]),
    }
    write_manifest(out, studies, seed=seed, quick=quick, generator="sample_studies.generate")
    return studies


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_studies.generate",
        description="Generate synthetic DICOM sample studies (no real patient data).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--ct-slices", type=int, default=None,
                        help="CT slice count (default 120, or 8 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small, fast variant for tests")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    parser.add_argument("--dx-monochrome1", action="store_true",
                        help="write the radiograph as MONOCHROME1 (inverted) instead of MONOCHROME2")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.ct_slices is not None and args.ct_slices < 1:
        parser.error("--ct-slices must be >= 1")

    started = time.perf_counter()
    studies = generate_all(
        args.out, ct_slices=args.ct_slices, quick=args.quick, seed=args.seed,
        dx_photometric="MONOCHROME1" if args.dx_monochrome1 else "MONOCHROME2",
    )
    elapsed = time.perf_counter() - started
    for name, paths in studies.items():
        size = sum(p.stat().st_size for p in paths)
        print(f"{name:<11} {len(paths):4d} files {size / 2**20:8.1f} MiB  {args.out / name}")
    print(f"manifest    {args.out / MANIFEST_NAME}")
    print(f"done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
