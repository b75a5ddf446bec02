"""Fresh-eyes review of the reading worklist (priority, claims): each test a bug found.

- An HL7 order "as needed" (PRN, table 0027) was read by its first letter
  as P (pre-op, HIGH): listed first and counted as urgent.
"""

from __future__ import annotations

import pytest

from ris_bridge.hl7v2 import orders_from, parse

from .test_reading_worklist import _orm


@pytest.mark.parametrize(("code", "term"), [
    ("PRN", "LOW"), ("prn ", "LOW"), ("S", "STAT"), ("STAT", "STAT"), ("A", "HIGH"), ("P", "HIGH"),
    ("R", "ROUTINE"), ("TS30", "MEDIUM"), ("HIGH", "HIGH"), ("LOW", "LOW"), ("MEDIUM", "MEDIUM"), ("", ""),
])
def test_hl7_priority_codes(code: str, term: str) -> None:
    """OBR-27.6 as HIS send it: PRN is not urgent; DICOM's own words are read as such."""
    message = _orm("MSG1", "ACC1", "BN1", "", code).replace("\n", "\r")
    orders = orders_from(parse(message.encode())[0])
    assert [info.priority for _, info in orders] == [term]
