"""A small, fully known archive for query/retrieve tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    JPEG2000Lossless,
    MRImageStorage,
    UltrasoundImageStorage,
)

from .dicomfiles import image_dataset

ROOT = "1.2.826.0.1.3680043.9.7134."  # test UIDs under a fixed root


@dataclass(frozen=True)
class P:
    key: str
    name: str
    pid: str
    other: str = ""


@dataclass(frozen=True)
class S:
    key: str
    patient: str
    date: str
    time: str
    accession: str
    referring: str
    description: str
    series: tuple[tuple[str, int, bool], ...]  # (modality, instances, compressed)


PATIENTS = {
    p.key: p
    for p in [
        P("P1", "Nguyễn^Văn An", "001085012345", "DN4797912345678"),
        P("P2", "Nguyễn^Thị Hoa", "079190000111"),
        P("P3", "Trần^Văn Bình", "001077000222"),
        P("P4", "NGUYEN^VAN AN", "OLD123"),
        P("P5", "Lê^Đức Thắng", "038095000333"),
    ]
}

STUDIES = {
    s.key: s
    for s in [
        S("S1", "P1", "20240115", "083000", "ACC001", "Đỗ^Thanh Tùng", "CT ngực", (("CT", 2, False), ("MR", 1, True))),
        S("S2", "P1", "20240220", "101500", "ACC002", "Hoàng^Minh", "X-quang ngực", (("DX", 1, False),)),
        S("S3", "P2", "20240301", "140000", "ACC003", "Hoàng^Minh", "Siêu âm bụng", (("US", 1, False),)),
        S("S4", "P3", "20231231", "230000", "XYZ999", "Phạm^An", "CT sọ não", (("CT", 1, False),)),
        S("S5", "P4", "20240115", "120000", "ACC005", "Phạm^An", "CR", (("DX", 1, False),)),
        S("S6", "P5", "20240610", "160000", "ACC006", "Phạm^An", "MR cột sống", (("MR", 2, True),)),
    ]
}

_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage, "DX": DigitalXRayImageStorageForPresentation,
            "US": UltrasoundImageStorage}


def study_uid(key: str) -> str:
    return ROOT + "1." + key[1:]


def series_uid(study: str, index: int) -> str:
    return ROOT + "2." + study[1:] + "." + str(index + 1)


def sop_uid(study: str, series_index: int, instance: int) -> str:
    return ROOT + "3." + study[1:] + "." + str(series_index + 1) + "." + str(instance + 1)


def write_corpus(out: Path) -> list[Path]:
    """Write every instance of the corpus; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in STUDIES.values():
        patient = PATIENTS[s.patient]
        for si, (modality, count, compressed) in enumerate(s.series):
            for ii in range(count):
                ds = image_dataset(
                    _CLASSES[modality], sop_uid(s.key, si, ii), SpecificCharacterSet="ISO_IR 192",
                    StudyInstanceUID=study_uid(s.key), SeriesInstanceUID=series_uid(s.key, si),
                    PatientName=patient.name, PatientID=patient.pid, IssuerOfPatientID="CCCD",
                    PatientBirthDate="19850101", PatientSex="M", StudyDate=s.date, StudyTime=s.time,
                    SeriesDate=s.date, SeriesTime=s.time, AccessionNumber=s.accession,
                    ReferringPhysicianName=s.referring, StudyDescription=s.description, StudyID=s.key,
                    Modality=modality, SeriesNumber=si + 1, InstanceNumber=ii + 1, Rows=32, Columns=32,
                    PixelData=((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * (ii + 1)) % 4096).tobytes())
                if patient.other:
                    item = Dataset()
                    item.PatientID = patient.other
                    item.IssuerOfPatientID = "BHYT"
                    item.TypeOfPatientID = "TEXT"
                    ds.OtherPatientIDsSequence = Sequence([item])
                if compressed:
                    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
                path = out / f"{s.key}_{si}_{ii}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


def studies_of(*keys: str) -> set[str]:
    return {study_uid(k) for k in keys}


def import_corpus(server: Any, out: Path) -> None:
    """Write the corpus into *out* and `pacs import` it into *server*'s archive (before it starts)."""
    write_corpus(out)
    server.cli("import", str(out))
