"""Reading priority: how urgent a study is to report.

A study's priority is its HIS order's (HL7 ORC-7.6 / OBR-27.6 / TQ1-9,
kept on the order as the DICOM term, see ris_bridge.hl7v2), else the one
the modality wrote in the images (Requested Procedure Priority, or a
Scheduled Procedure Step Priority), as one of DICOM's terms: STAT, HIGH,
ROUTINE, MEDIUM, LOW, or '' for none. The index keeps it per study
(``studies.priority``, triggers of migrations 0032 and 0033 follow the
order), so the worklist sorts and filters on a column. Only an examination
arriving gives its images' priority, never old data (an import, this
archive's own retrieve: see pacs.ingest.Origin.examination); an order the
HIS withdrew (every step cancelled or discontinued) makes its study ROUTINE.

The worklist shows STAT as "Cấp cứu / STAT" and HIGH as "Khẩn / Urgent";
both are urgent: an urgent study not yet reported comes first.
"""

from __future__ import annotations

from typing import Final

STAT: Final = "STAT"
HIGH: Final = "HIGH"
# Urgent: listed first while unreported, counted in the worklist's header.
URGENT: Final = (STAT, HIGH)
# What each spelling a sender uses means. HL7 table 0027 codes as dcm4chee
# maps them (A ASAP, P preop, C callback: HIGH; T timing critical: MEDIUM);
# the DICOM terms themselves; the words the JSON orders API may be given.
_TERMS: Final = {
    "S": STAT, "STAT": STAT,
    "A": HIGH, "P": HIGH, "C": HIGH, "ASAP": HIGH, "URGENT": HIGH, "HIGH": HIGH,
    "R": "ROUTINE", "ROUTINE": "ROUTINE",
    "T": "MEDIUM", "MEDIUM": "MEDIUM",
    "LOW": "LOW",
}
# The worklist's priority filter: its values and the priorities each takes
# (None: every study that is not urgent, those without a priority too).
FILTERS: Final[dict[str, tuple[str, ...] | None]] = {
    "stat": (STAT,), "high": (HIGH,), "urgent": URGENT, "routine": None,
}


def normalized(value: str) -> str:
    """The DICOM term for a priority as a sender wrote it ('' if unknown)."""
    return _TERMS.get((value or "").strip().upper(), "")


def hl7_term(code: str) -> str:
    """The DICOM term for an HL7 priority (TQ1-9, OBR-27.6, ORC-7.6: tables
    0485 / 0027), '' if unknown. A HIS sending DICOM's words (HIGH, LOW) is
    read as such; a code by its first letter (S, A, R, P, C, T, and TS30,
    TM5... timing critical), except PRN ("as needed"): read as P (pre-op),
    an as-needed order was listed first and counted as urgent."""
    value = (code or "").strip().upper()
    if value == "PRN":
        return "LOW"
    return normalized(value) or normalized(value[:1])


def sql_term(column: str) -> str:
    """An SQL expression giving :func:`normalized` of *column* (the
    triggers', for an order's priority, which the JSON API takes as sent)."""
    cases = " ".join(f"WHEN '{word}' THEN '{term}'" for word, term in _TERMS.items())
    return f"(CASE UPPER(TRIM({column})) {cases} ELSE '' END)"
