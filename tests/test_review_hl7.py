"""The HIS link under a reviewer's findings (HIS/RIS/EMR interoperability):
an empty line between segments, birth dates a HIS database holds with
an unknown month or day (1945-00-00) or that are no day of the calendar,
the visit events (A02, A03...) a HIS broadcasts and a patient ID in PID-2.

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


# -- 2: birth dates with an unknown month or day, and impossible ones -------------------------
def test_a_birth_date_of_zeros_for_the_unknown_month_or_day_is_a_partial_date(
        server: PacsServer, tmp_path: Path) -> None:
    """PID-7 19450000 (a HIS database's 1945-00-00: the patient knows the
    year alone) is the year 1945, 19450300 March 1945: as PID-7 1945 and
    194503 are read. Stored as sent, it went to the modality as a Patient's
    Birth Date (DA) that is no date."""
    assert msa(send(server, orm("BZ1", "RBZ001", pid="BN8200^^^BVDK^PI").replace("|19850101|", "|19450000|"))) \
        == ("AA", "BZ1")
    assert birth_date(server, tmp_path, "RBZ001") == ""  # a year alone: no day invented
    # A stored date the year agrees with stays; a year and month of zeros for the day, too.
    pid = "PID|1||BN8200^^^BVDK^PI||Nguyễn^Văn An||{}|M"
    assert msa(send(server, adt("BZ2", "A08", pid.format("19450312"))))[0] == "AA"
    assert birth_date(server, tmp_path, "RBZ001") == "19450312"
    assert msa(send(server, adt("BZ3", "A08", pid.format("19450000"))))[0] == "AA"
    assert msa(send(server, adt("BZ4", "A08", pid.format("19450300"))))[0] == "AA"
    assert birth_date(server, tmp_path, "RBZ001") == "19450312"


def test_a_birth_date_that_is_no_day_is_refused_not_stored(server: PacsServer, tmp_path: Path) -> None:
    """PID-7 19851301 (month 13), 19850230: refused AE 102 as a malformed
    PID-7 is, the stored date kept; the JSON orders API refuses it too (422)."""
    assert msa(send(server, orm("BX1", "RBX001", pid="BN8300^^^BVDK^PI")))[0] == "AA"
    pid = "PID|1||BN8300^^^BVDK^PI||Nguyễn^Văn An||{}|M"
    for control, value in (("BX2", "19851301"), ("BX3", "19850230"), ("BX4", "198513")):
        ack = send(server, adt(control, "A08", pid.format(value)))
        assert msa(ack) == ("AE", control) and fields(ack, "ERR")[3].startswith("102^"), ack
    assert birth_date(server, tmp_path, "RBX001") == "19850101"
    with server.http() as http:
        refused = http.post("/api/orders", json={
            "patient": {"id": "BN8301", "name": "Lê^Thị Hoa", "birth_date": "19851301"},
            "accession_number": "RBX002", "modality": "CT"})
        assert refused.status_code == 422, refused.text
        assert "PatientBirthDate" in refused.text
        assert http.get("/api/orders/RBX002").status_code == 404


def patient_name(server: PacsServer, tmp_path: Path, accession: str) -> str:
    items = worklist(server, tmp_path, f"AccessionNumber={accession}", "PatientName", "PatientID")
    assert len(items) == 1, items
    return str(items[0].PatientName)


# -- 3: the visit events a HIS broadcasts, and a patient ID in PID-2 ----------------------------
def test_visit_events_update_the_patient_and_are_acknowledged(server: PacsServer, tmp_path: Path) -> None:
    """A HIS broadcasting every ADT event to its subscribers (transfer A02,
    discharge A03, their cancellations A11-A13) got AR 201 for each: it
    resends an AR and holds its queue for this link behind it. Their PID is
    the patient as the HIS has it now, applied as an A08's is."""
    assert msa(send(server, orm("VE1", "RVE001", pid="BN8400^^^BVDK^PI")))[0] == "AA"
    for n, (trigger, name) in enumerate((("A02", "Nguyễn^Văn Bình"), ("A03", "Nguyễn^Văn Cường"),
                                         ("A06", "Nguyễn^Văn Dũng"), ("A07", "Nguyễn^Văn Đạt"),
                                         ("A11", "Nguyễn^Văn Giang"), ("A12", "Nguyễn^Văn Hải"),
                                         ("A13", "Nguyễn^Văn Khoa"))):
        ack = send(server, adt(f"VE{n + 2}", trigger, f"PID|1||BN8400^^^BVDK^PI||{name}||19850101|M\rPV1|1|I"))
        assert msa(ack) == ("AA", f"VE{n + 2}"), (trigger, ack)
        assert patient_name(server, tmp_path, "RVE001") == name, trigger
    # An event that is no patient update (A29: delete person information) is still not one.
    ack = send(server, adt("VE20", "A29", "PID|1||BN8400^^^BVDK^PI||Ai^Đó"))
    assert msa(ack) == ("AR", "VE20") and fields(ack, "ERR")[3].startswith("201^"), ack
    assert patient_name(server, tmp_path, "RVE001") == "Nguyễn^Văn Khoa"


def test_a_patient_id_in_pid_2_alone_is_the_patient_id(server: PacsServer, tmp_path: Path) -> None:
    """A HIS of HL7 v2.2/2.3 may send its number in PID-2 (Patient ID
    (External)) and leave PID-3 empty: refused AE 101, its orders never
    reached the worklist. PID-3 wins when both are sent."""
    message = orm("P21", "RP2001", pid="").replace("PID|1||", "PID|1|BN8500^^^BVDK^PI|")
    assert msa(send(server, message)) == ("AA", "P21")
    items = worklist(server, tmp_path, "AccessionNumber=RP2001", "PatientID", "IssuerOfPatientID")
    assert [(i.PatientID, i.IssuerOfPatientID) for i in items] == [("BN8500", "BVDK")]
    both = orm("P22", "RP2002", pid="BN8501^^^BVDK^PI").replace("PID|1||", "PID|1|OLD77^^^BVDK|")
    assert msa(send(server, both)) == ("AA", "P22")
    items = worklist(server, tmp_path, "AccessionNumber=RP2002", "PatientID")
    assert [i.PatientID for i in items] == ["BN8501"]
