"""Small DICOM corpora for the harness, generated once and cached.

- ``query_corpus(studies, per_study)``: studies of tiny images (16x16) with the
  same kind of content as bench/synthetic.py (Vietnamese names with realistic
  family-name frequencies, 12-digit citizen IDs, five years of dates, accession
  numbers, weighted modalities), for loading a peer over DICOM (storescu) when
  bulk-loading its index is not possible. A ``manifest.json`` lists each study's
  values so queries can be drawn from what the peer holds. It also holds the
  Vietnamese-name check study (patient ID ``VNCHECK0001``).
- ``split(folder, parts)``: a folder's files split into *parts* folders (hard
  links) for concurrent associations.
"""

from __future__ import annotations

import json
import os
import random
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .common import CACHE
from .synthetic import MODALITIES, SOP_CLASS, _weighted, patient_name

VN_CHECK_NAME = "Nguyễn^Thị Hằng"
VN_CHECK_ID = "VNCHECK0001"
UID_ROOT = "1.2.826.0.1.3680043.9.7135.5."


def _dataset(study: dict[str, Any], series_uid: str, sop_uid: str, number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[study["modality"]]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study["study_uid"]
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.IssuerOfPatientID = "CCCD"
    ds.PatientBirthDate = study["birth_date"]
    ds.PatientSex = study["sex"]
    ds.StudyDate = study["study_date"]
    ds.StudyTime = study["study_time"]
    ds.SeriesDate = study["study_date"]
    ds.AccessionNumber = study["accession"]
    ds.StudyID = study["study_id"]
    ds.ReferringPhysicianName = "Đỗ^Thanh Tùng"
    ds.StudyDescription = f"{study['modality']} study"
    ds.InstitutionName = "BV Synthetic"
    ds.Modality = study["modality"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype=np.uint16) * (number % 7 + 1)).tobytes()
    return ds


def query_corpus(studies: int, per_study: int = 2, seed: int = 17) -> Path:
    """A folder of studies x per_study tiny instances plus manifest.json (cached)."""
    out = CACHE / f"query-corpus-{studies}x{per_study}-{seed}"
    manifest = out / "manifest.json"
    if manifest.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_patients = max(1, studies // 3)
    patients = []
    for i in range(n_patients):
        patients.append({
            "patient_name": patient_name(rng),
            "patient_id": f"{rng.randint(1, 96):03d}{rng.randint(0, 1)}{rng.randint(40, 99):02d}{i % 1_000_000:06d}",
            "birth_date": f"19{rng.randint(40, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "sex": rng.choice("MF"),
        })
    start, rows = date(2021, 1, 1), []
    for i in range(studies):
        patient = patients[rng.randrange(n_patients)] if i else {
            "patient_name": VN_CHECK_NAME, "patient_id": VN_CHECK_ID, "birth_date": "19800101", "sex": "F"}
        day = start + timedelta(days=rng.randrange(5 * 365))
        rows.append({
            **patient,
            "study_uid": f"{UID_ROOT}{seed}.1.{i}",
            "study_date": day.strftime("%Y%m%d"),
            "study_time": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
            "accession": f"B{i:09d}",
            "study_id": str(i),
            "modality": "CT" if i == 0 else _weighted(rng, MODALITIES),
        })
    for i, study in enumerate(rows):
        series_uid = f"{UID_ROOT}{seed}.2.{i}"
        for n in range(per_study):
            ds = _dataset(study, series_uid, f"{UID_ROOT}{seed}.3.{i}.{n}", n + 1)
            ds.save_as(out / f"{i:06d}-{n}.dcm", enforce_file_format=True)
    tmp = manifest.with_suffix(".partial")
    tmp.write_text(json.dumps({"studies": rows, "per_study": per_study}, ensure_ascii=False))
    tmp.rename(manifest)
    return out


def vn_check_file(corpus: Path) -> Path:
    """The corpus file of the Vietnamese-name check study."""
    return corpus / "000000-0.dcm"


def split(folder: Path, parts: int) -> list[Path]:
    """The *.dcm files of *folder* split into *parts* sub-folders (hard links, cached)."""
    files = sorted(folder.glob("*.dcm"))
    base = folder.parent / f"{folder.name}-split{parts}"
    outs = [base / f"part{i}" for i in range(parts)]
    if sum(len(list(o.glob("*.dcm"))) for o in outs) == len(files):
        return outs
    for i, out in enumerate(outs):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.dcm"):
            old.unlink()
        for f in files[i::parts]:
            os.link(f, out / f.name)
    return outs


def query_plans(corpus: Path, rng: random.Random, repeat: int) -> dict[str, list[dict[str, str]]]:
    """The five reader queries, drawn from the corpus so each has matches.

    Names are given as Orthanc can match them (family^middle given-prefix*, with
    the diacritics: Orthanc drops Vietnamese letters it cannot map to Latin-1).
    """
    studies = [s for s in json.loads((corpus / "manifest.json").read_text())["studies"]
               if s["patient_id"] != VN_CHECK_ID]
    picks = [rng.choice(studies) for _ in range(repeat)]
    days = [date.fromisoformat(f"{s['study_date'][:4]}-{s['study_date'][4:6]}-{s['study_date'][6:]}") for s in picks]
    names = []
    for s in picks:
        family, rest = s["patient_name"].split("^")
        names.append(f"{family}^{rest.split()[0]} {rest.split()[1][:2]}*")
    return {
        "patient name prefix": [{"PatientName": n} for n in names],
        "patient ID (citizen ID)": [{"PatientID": s["patient_id"]} for s in picks],
        "study date (one day)": [{"StudyDate": d.strftime("%Y%m%d")} for d in days],
        "accession number": [{"AccessionNumber": s["accession"]} for s in picks],
        "modality + date (one week)": [
            {"ModalitiesInStudy": "CT", "StudyDate": f"{d:%Y%m%d}-{d + timedelta(days=6):%Y%m%d}"} for d in days
        ],
    }


__all__ = ["VN_CHECK_ID", "VN_CHECK_NAME", "generate_uid", "query_corpus", "query_plans", "split", "vn_check_file"]
