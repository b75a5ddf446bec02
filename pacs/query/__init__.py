"""The one query model: DICOM matching to SQL for C-FIND, QIDO-RS, worklist."""

from .attributes import ATTRIBUTES, DEFAULT_RETURN, UNIQUE_KEY, Attribute, Kind, Level
from .engine import PATIENT_SHOWN, READABLE, Query, build_select, count_query, run_query
from .matching import QueryError

__all__ = [
    "PATIENT_SHOWN",
    "READABLE",
    "ATTRIBUTES",
    "DEFAULT_RETURN",
    "UNIQUE_KEY",
    "Attribute",
    "Kind",
    "Level",
    "Query",
    "QueryError",
    "build_select",
    "count_query",
    "run_query",
]
