"""Which DICOM attributes can be matched and returned, and where they live.

One table for C-FIND (all levels, both information models), QIDO-RS and the
worklist's patient keys: keyword -> level, index column, matching kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import Table

from ..index.models import Instance, Patient, Series, Study

patients: Table = Patient.__table__  # type: ignore[assignment]
studies: Table = Study.__table__  # type: ignore[assignment]
series: Table = Series.__table__  # type: ignore[assignment]
instances: Table = Instance.__table__  # type: ignore[assignment]


class Level(str, Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return ["PATIENT", "STUDY", "SERIES", "IMAGE"].index(self.value)


class Kind(str, Enum):
    """How a key is matched (PS3.4 C.2.2.2)."""

    TEXT = "text"  # single value, wildcards, list of values
    PN = "pn"  # person name: folded, diacritic- and case-insensitive
    PATIENT_ID = "patient_id"  # also matches other patient IDs
    UID = "uid"  # single value or list of UIDs
    DATE = "date"  # single value or range
    TIME = "time"
    INT = "int"
    MODALITIES = "modalities"  # ModalitiesInStudy: any series of the modality
    COMPUTED = "computed"  # return only


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    kind: Kind
    column: Any = None  # the returned column (None: computed)
    match_column: Any = None  # the searched column, when it differs


def _a(keyword: str, level: Level, kind: Kind, column: Any = None, match_column: Any = None) -> Attribute:
    return Attribute(keyword, level, kind, column, match_column)


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in [
        _a("PatientName", P, Kind.PN, patients.c.name),
        _a("PatientID", P, Kind.PATIENT_ID, patients.c.patient_id),
        _a("IssuerOfPatientID", P, Kind.TEXT, patients.c.issuer),
        _a("PatientBirthDate", P, Kind.DATE, patients.c.birth_date),
        _a("PatientSex", P, Kind.TEXT, patients.c.sex),
        _a("OtherPatientIDsSequence", P, Kind.COMPUTED),
        _a("OtherPatientIDs", P, Kind.COMPUTED),  # retired, still asked for by older SCUs
        _a("NumberOfPatientRelatedStudies", P, Kind.COMPUTED),
        _a("NumberOfPatientRelatedSeries", P, Kind.COMPUTED),
        _a("NumberOfPatientRelatedInstances", P, Kind.COMPUTED),
        _a("StudyInstanceUID", ST, Kind.UID, studies.c.study_uid),
        _a("StudyDate", ST, Kind.DATE, studies.c.study_date),
        _a("StudyTime", ST, Kind.TIME, studies.c.study_time),
        _a("AccessionNumber", ST, Kind.TEXT, studies.c.accession_number),
        _a("StudyID", ST, Kind.TEXT, studies.c.study_id),
        _a("ReferringPhysicianName", ST, Kind.PN, studies.c.referring_physician, studies.c.referring_physician_folded),
        _a("StudyDescription", ST, Kind.TEXT, studies.c.description),
        _a("InstitutionName", ST, Kind.TEXT, studies.c.institution),
        _a("ModalitiesInStudy", ST, Kind.MODALITIES, studies.c.modalities),
        _a("SOPClassesInStudy", ST, Kind.COMPUTED),
        _a("NumberOfStudyRelatedSeries", ST, Kind.INT, studies.c.num_series),
        _a("NumberOfStudyRelatedInstances", ST, Kind.INT, studies.c.num_instances),
        _a("SeriesInstanceUID", SE, Kind.UID, series.c.series_uid),
        _a("Modality", SE, Kind.TEXT, series.c.modality),
        _a("SeriesNumber", SE, Kind.INT, series.c.series_number),
        _a("SeriesDescription", SE, Kind.TEXT, series.c.description),
        _a("BodyPartExamined", SE, Kind.TEXT, series.c.body_part),
        _a("StationName", SE, Kind.TEXT, series.c.station_name),
        _a("SeriesDate", SE, Kind.DATE, series.c.series_date),
        _a("SeriesTime", SE, Kind.TIME, series.c.series_time),
        _a("NumberOfSeriesRelatedInstances", SE, Kind.INT, series.c.num_instances),
        _a("SOPInstanceUID", IM, Kind.UID, instances.c.sop_uid),
        _a("SOPClassUID", IM, Kind.UID, instances.c.sop_class_uid),
        _a("InstanceNumber", IM, Kind.INT, instances.c.instance_number),
        _a("Rows", IM, Kind.INT, instances.c.rows),
        _a("Columns", IM, Kind.INT, instances.c.columns),
        _a("BitsAllocated", IM, Kind.INT, instances.c.bits_allocated),
        _a("NumberOfFrames", IM, Kind.INT, instances.c.frames),
        _a("ContentDate", IM, Kind.DATE, instances.c.content_date),
        _a("ContentTime", IM, Kind.TIME, instances.c.content_time),
        _a("AvailableTransferSyntaxUID", IM, Kind.UID, instances.c.transfer_syntax_uid),
    ]
}

# Attributes of an identifier that are no matching keys at all: they qualify
# the query (Timezone Offset From UTC qualifies its dates and times, PS3.4
# C.2.2.2.5; Query/Retrieve View, C.6.1.1.1) or are answer attributes an SCU
# may echo (Retrieve AE Title, Instance Availability). Accepted with any
# value and never matched.
QUALIFIERS = frozenset({
    "SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC", "QueryRetrieveView",
    "RetrieveAETitle", "InstanceAvailability",
})


def matchable(keyword: str) -> bool:
    """Whether the archive matches on *keyword* (else a value given for it is
    ignored for matching and the key is only returned, PS3.4 C.2.2.1.3)."""
    attribute = ATTRIBUTES.get(keyword)
    return attribute is not None and attribute.kind is not Kind.COMPUTED


# The unique key of each level (PS3.4 C.3).
UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Keys every response at a level carries even when not asked (QIDO-RS
# defaults, PS3.18 Table 10.6.3-3 to 10.6.3-5: an instance's include Rows,
# Columns, Bits Allocated and Number of Frames, which a DICOMweb viewer
# chooses its decoding from; C-FIND adds the unique keys).
DEFAULT_RETURN = {
    Level.PATIENT: ["PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"],
    Level.STUDY: [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
        "PatientName", "PatientID", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", "StudyDescription", "PatientBirthDate", "PatientSex",
    ],
    Level.SERIES: [
        "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
        "NumberOfSeriesRelatedInstances", "BodyPartExamined", "SeriesDate", "SeriesTime",
    ],
    Level.IMAGE: ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                  "NumberOfFrames"],
}
