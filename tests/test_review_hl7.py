"""The HIS link under a reviewer's findings (HIS/RIS/EMR interoperability):
an empty line between segments, and birth dates a HIS database holds with
an unknown month or day (1945-00-00) or that are no day of the calendar.

Everything over real sockets: one `pacs serve` for the module, raw MLLP
frames, DCMTK findscu for the worklist and the JSON orders API over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Backend, PacsServer
from .test_hl7_review import adt, exchange, fields, msa, orm, send
from .test_worklist_ris import worklist

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path_factory.mktemp("review-hl7") / "data", Backend("sqlite", None, None, {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def birth_date(server: PacsServer, tmp_path: Path, accession: str) -> str:
    items = worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientBirthDate")
    assert len(items) == 1, items
    return str(items[0].PatientBirthDate)


# -- 1: an empty line between segments --------------------------------------------------------
def test_an_empty_line_between_segments_is_no_segment(server: PacsServer, tmp_path: Path) -> None:
    """A HIS writing its segments CRLF with a blank line between them (or a
    blank line in its template) sends an empty segment: python-hl7 failed on
    it and the order was answered AR "unparsable message" -- resent
    unchanged, refused forever, the exam never on the worklist."""
    blank_cr = orm("BLK1", "RBLK01", pid="BN8100^^^BVDK^PI").replace("\rPV1|", "\r\rPV1|")
    ack = send(server, blank_cr)
    assert msa(ack) == ("AA", "BLK1"), ack
    crlf = orm("BLK2", "RBLK02", pid="BN8101^^^BVDK^PI").replace("\r", "\r\n\r\n") + "\r\n\r\n"
    ack = exchange(server, VT + crlf.encode() + FS + CR)
    assert msa(ack) == ("AA", "BLK2"), ack
    for accession in ("RBLK01", "RBLK02"):
        items = worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientID",
                         "ScheduledProcedureStepSequence[0].Modality")
        assert [i.ScheduledProcedureStepSequence[0].Modality for i in items] == ["CT"], accession
