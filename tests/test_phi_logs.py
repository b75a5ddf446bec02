"""PHI protection (issue 8): at INFO level the server log names no patient.

Every entry point is exercised with a patient whose name, citizen ID and
insurance number are distinctive, including failure paths (refused stores,
rejected HL7, bad queries), and the log is then searched for them.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from tests.dicomfiles import make_ct
from tests.peers import Backend, PacsServer, run_dcmtk
from tests.test_worklist_ris import msa, orm, send

NAME = "Phạm^Thị Quỳnh"
NAME_ASCII = "PHAM"
CCCD = "079204987654"
INSURANCE = "DN4797912345678"
ACCESSION = "ACCPHI77"


def test_no_patient_identifiers_in_the_info_log(tmp_path: Path) -> None:
    server = PacsServer(tmp_path / "data", Backend("sqlite-fs", None, None, {}),
                        extra_env={"PACS_LOG_LEVEL": "INFO"}).start()
    try:
        study = generate_uid()
        # HL7: an order, a malformed one, and a merge naming an unknown patient.
        assert msa(send(server, orm("P1", ACCESSION, name=NAME, pid=CCCD, study_uid=study)))[0] == "AA"
        assert msa(send(server, orm("P2", ACCESSION, name=NAME, pid=CCCD)))[0] != "AA"  # duplicate order
        merge = (f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20241120083000||ADT^A40|P3|P|2.5|||||VN|UNICODE UTF-8\n"
                 f"PID|1||{CCCD}^^^CCCD^NI||{NAME}\nMRG|999{CCCD}^^^CCCD^NI")
        assert msa(send(server, merge))[0] != "AA"
        # DICOM: a good store, one refused for a bad UID, worklist and Q/R queries.
        good = make_ct(tmp_path / "good.dcm", PatientName=NAME, PatientID=CCCD, AccessionNumber=ACCESSION,
                       StudyInstanceUID=study, SpecificCharacterSet="ISO_IR 192")
        assert server.storescu(str(good)).returncode == 0
        bad = make_ct(tmp_path / "bad.dcm", PatientName=NAME, PatientID=CCCD, SOPInstanceUID="1.2.abc")
        server.storescu(str(bad))
        for args in (["-W", "-k", f"PatientName={NAME_ASCII}*", "-k", "PatientID"],
                     ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={CCCD}", "-k", "PatientName"]):
            run_dcmtk("findscu", *args, "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
        # HTTP: searches by name and IDs, a bad parameter, an unknown patient.
        with server.http() as client:
            assert client.get("/dicom-web/studies", params={"PatientName": NAME_ASCII + "*"}).status_code == 200
            assert client.get("/dicom-web/studies", params={"PatientID": CCCD}).status_code == 200
            assert client.get("/dicom-web/studies", params={"StudyDate": f"{CCCD}-x"}).status_code == 400
            client.get(f"/fhir/Patient?identifier={INSURANCE}")
            client.get(f"/api/worklist?q={NAME_ASCII}")
            client.get(f"/fhir/Patient/{CCCD}")
    finally:
        server.stop()
    log = server.log_text()
    assert log.strip(), "the server wrote no log at all"
    for secret in (NAME, NAME.split("^")[0], "Quỳnh", CCCD, INSURANCE, ACCESSION):
        assert secret not in log, f"{secret!r} appears in the INFO log:\n{log[-3000:]}"
