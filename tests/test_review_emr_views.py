"""Every view of a patient agrees after the HIS or a person corrects them
(HIS/EMR integration review), against one real `pacs serve` on SQLite:
HL7 over MLLP (python-hl7), DCMTK findscu and getscu, WADO-RS and QIDO-RS,
FHIR R4.

- an order the HIS moves to another patient (ORC XO with another PID) takes
  its study along, retrieved without the first patient's birth date and sex
  when the patient it now belongs to has none registered (as `pacs patient
  move-study` does): C-FIND showed the new patient, C-GET and WADO-RS the new
  name with the other person's birth date and sex;
- the FHIR DiagnosticReport of a study the HIS refiled after the signature
  names the new patient as its subject, and no longer offers the signed PDF
  (presentedForm) that prints the patient it was signed for: the EMR filed
  another person's name, ID and birth date in this patient's chart (the
  share page withholds it already, until an amendment signs a new one);
- deleting the last study of a patient the HIS registered (`pacs delete`,
  `DELETE /api/studies/{uid}`: the images sent in error) keeps the patient,
  as moving it away does: their demographics, other IDs and merged-away IDs
  went with it, and the next study under the ID the technologist typed
  without diacritics, or under the merged-away emergency ID, was a patient
  of its own, unknown to FHIR by the citizen ID;
- two studies received without issuer and merged into one patient are
  retrieved alike, with that patient's ID and issuer: the one whose patient
  the HIS had given its issuer (an A08 first) went out with the surviving
  ID and no issuer, C-FIND answering the issuer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from .conftest import Backend, PacsServer, run_dcmtk
from .dicomfiles import make_ct
from .test_merge_review import _c_get, _metadata, _qido, _store
from .test_worklist_ris import msa, send

_count = [0]


def _msh(kind: str) -> str:
    _count[0] += 1
    return f"MSH|^~\\&|HIS|BVDK|PACS|BVDK|20261205100000||{kind}|EMR{_count[0]}|P|2.5|||||VN|UNICODE UTF-8\n"


def _aa(server: PacsServer, message: str) -> None:
    ack = send(server, message)
    assert msa(ack)[0] == "AA", ack


def _orm(control: str, pid3: str, name: str, birth: str, sex: str, accession: str, study_uid: str) -> str:
    return (_msh("ORM^O01") + f"PID|1||{pid3}||{name}||{birth}|{sex}\n"
            f"ORC|{control}|P{accession}|{accession}\n"
            f"OBR|1|P{accession}|{accession}|CT01^CT ngực^L||||||||||||||{accession}|RP{accession}|||||CT\n"
            f"ZDS|{study_uid}^100^Application^DICOM\n")


def _study_find(server: PacsServer, tmp: Path, study_uid: str) -> list[dict[str, str]]:
    """The patient attributes DCMTK findscu (Study Root) answers for *study_uid*."""
    tmp.mkdir()
    keys = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
    args = ["-S", "-aec", server.ae_title, "-X", "-od", str(tmp), "-k", "QueryRetrieveLevel=STUDY",
            "-k", "SpecificCharacterSet=ISO_IR 192", "-k", f"StudyInstanceUID={study_uid}"]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk("findscu", *args, "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    return [{k: str(dcmread(p).get(k, "")) for k in keys} for p in sorted(tmp.iterdir())]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsServer]:
    server = PacsServer(tmp_path_factory.mktemp("emr-views") / "data", Backend("sqlite", None, None, {}))
    server.start()
    server.radiologist = server.make_token("bs.an", "radiologist", "Đỗ^Văn An")  # type: ignore[attr-defined]
    yield server
    server.stop()


def _sign(server: PacsServer, study_uid: str, findings: str) -> None:
    with server.http(server.radiologist) as http:  # type: ignore[attr-defined]
        saved = http.put(f"/api/studies/{study_uid}/report", json={"findings": findings, "impression": "Theo dõi."})
        assert saved.status_code == 200, saved.text
        signed = http.post(f"/api/studies/{study_uid}/report/sign")
        assert signed.status_code == 200, signed.text


def _pdf_forms(report: dict[str, Any]) -> list[str]:
    return [form["url"] for form in report.get("presentedForm", []) if form["contentType"] == "application/pdf"]


def test_an_order_moved_to_another_patient_takes_none_of_the_first_ones_demographics(
        archive: PacsServer, tmp_path: Path) -> None:
    """The HIS placed the CT for Trần Văn A; the technologist picked it from
    the worklist (A's name, birth date and sex in every image) and scanned
    Lê Thị Bích, whom the HIS registered with her name only; the HIS moves
    the order to her (XO). Every view shows her, none A's birth date or sex."""
    uid = "1.2.826.0.1.3680043.8.498.77001"
    _aa(archive, _orm("NW", "BNA1^^^BVDK^PI", "Trần^Văn A", "19500101", "M", "XO1", uid))
    _aa(archive, _msh("ADT^A08") + "EVN|A08|20261205\nPID|1||BNB1^^^BVDK^PI||Lê^Thị Bích\n")
    study = _store(archive, make_ct(tmp_path / "x.dcm", PatientID="BNA1", PatientName="Trần^Văn A",
                                    PatientBirthDate="19500101", PatientSex="M", StudyInstanceUID=uid,
                                    AccessionNumber="XO1", SpecificCharacterSet="ISO_IR 192"))
    _aa(archive, _orm("XO", "BNB1^^^BVDK^PI", "Lê^Thị Bích", "", "", "XO1", uid))
    her = {"PatientName": "Lê^Thị Bích", "PatientID": "BNB1", "IssuerOfPatientID": "BVDK",
           "PatientBirthDate": "", "PatientSex": ""}
    assert _study_find(archive, tmp_path / "find", study) == [her]
    assert _qido(archive, study) == [("Lê^Thị Bích", "BNB1")]
    assert _metadata(archive, study) == [her]
    assert _c_get(archive, study, tmp_path / "got") == [her]


def test_a_report_refiled_under_another_patient_offers_no_pdf_naming_the_first(
        archive: PacsServer, tmp_path: Path) -> None:
    """Signed for Ngô Văn Tám, the study turns out to be Đặng Văn Chín's and
    the HIS moves the order (XO). FHIR shows the report as hers (subject),
    with its text, but not the PDF printed for him; a report signed for the
    patient it is filed under keeps its PDF."""
    kept = "1.2.826.0.1.3680043.8.498.77010"
    _aa(archive, _orm("NW", "BNK1^^^BVDK^PI", "Ngô^Thị Kim", "19610101", "F", "RF0", kept))
    _store(archive, make_ct(tmp_path / "k.dcm", PatientID="BNK1", PatientName="Ngô^Thị Kim", StudyInstanceUID=kept,
                            AccessionNumber="RF0", SpecificCharacterSet="ISO_IR 192"))
    _sign(archive, kept, "Bình thường.")
    uid = "1.2.826.0.1.3680043.8.498.77011"
    _aa(archive, _orm("NW", "BNT1^^^BVDK^PI", "Ngô^Văn Tám", "19500101", "M", "RF1", uid))
    _aa(archive, _msh("ADT^A08") + "EVN|A08|20261205\nPID|1||BNC1^^^BVDK^PI||Đặng^Thị Chín||19600101|F\n")
    study = _store(archive, make_ct(tmp_path / "t.dcm", PatientID="BNT1", PatientName="Ngô^Văn Tám",
                                    StudyInstanceUID=uid, AccessionNumber="RF1", SpecificCharacterSet="ISO_IR 192"))
    _sign(archive, study, "Nốt mờ 3 mm thùy trên phổi phải.")
    with archive.http() as http:
        before = http.get(f"/fhir/DiagnosticReport/{study}").json()
    assert before["subject"]["reference"] == "Patient/BVDK.BNT1" and len(_pdf_forms(before)) == 1, before

    _aa(archive, _orm("XO", "BNC1^^^BVDK^PI", "Đặng^Thị Chín", "19600101", "F", "RF1", uid))
    with archive.http() as http:
        read = http.get(f"/fhir/DiagnosticReport/{study}").json()
        found = http.get("/fhir/DiagnosticReport", params={"patient": "Patient/BVDK.BNC1"}).json()
        version = http.get(f"/fhir/DiagnosticReport/{study}/_history/1").json()
        other = http.get(f"/fhir/DiagnosticReport/{kept}").json()
    (searched,) = [e["resource"] for e in found["entry"]]
    for report in (read, searched, version):
        assert report["subject"]["reference"] == "Patient/BVDK.BNC1", report
        assert report["subject"]["display"] == "Đặng Thị Chín"
        assert _pdf_forms(report) == [], report
        assert [f["contentType"] for f in report["presentedForm"]] == ["text/plain; charset=utf-8"]
    # Not every report lost its PDF: the one signed for the patient it is filed under.
    assert len(_pdf_forms(other)) == 1, other


def test_deleting_a_registered_patients_last_study_keeps_the_patient(archive: PacsServer, tmp_path: Path) -> None:
    """The HIS registered Nguyễn Văn Dũng (with his citizen ID) and merged the
    emergency desk's CC-D1 into him; both studies were sent in error and
    deleted. The next studies, under BND1 typed without diacritics and
    under CC-D1, are his, with his registered name, and FHIR finds him by
    his citizen ID."""
    _aa(archive, _msh("ADT^A08") + "EVN|A08|20261205\n"
        "PID|1||BND1^^^BVDK^PI~079080001111^^^CCCD^NI||Nguyễn^Văn Dũng||19800101|M\n")
    first = _store(archive, make_ct(tmp_path / "1.dcm", PatientID="BND1", PatientName="NGUYEN^VAN DUNG"))
    urgent = _store(archive, make_ct(tmp_path / "2.dcm", PatientID="CC-D1", PatientName="CAP CUU^NAM"))
    _aa(archive, _msh("ADT^A40") + "EVN|A40|20261205\nPID|1||BND1^^^BVDK^PI||Nguyễn^Văn Dũng\nMRG|CC-D1\n")
    with archive.http() as http:
        for study in (first, urgent):
            deleted = http.delete(f"/api/studies/{study}", params={"reason": "gửi nhầm"})
            assert deleted.status_code == 200, deleted.text
    again = _store(archive, make_ct(tmp_path / "3.dcm", PatientID="BND1", PatientName="NGUYEN^VAN DUNG"))
    late = _store(archive, make_ct(tmp_path / "4.dcm", PatientID="CC-D1", PatientName="CAP CUU^NAM"))
    his = {"PatientName": "Nguyễn^Văn Dũng", "PatientID": "BND1", "IssuerOfPatientID": "BVDK",
           "PatientBirthDate": "19800101", "PatientSex": "M"}
    for study in (again, late):
        assert _study_find(archive, tmp_path / f"find-{study[-6:]}", study) == [his]
        assert _metadata(archive, study)[0]["PatientName"] == "Nguyễn^Văn Dũng"
    with archive.http() as http:
        found = http.get("/fhir/Patient", params={"identifier": "CCCD|079080001111"}).json()
        studies = http.get("/fhir/ImagingStudy", params={"patient.identifier": "CCCD|079080001111"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["BVDK.BND1"], found
    assert studies["total"] == 2, studies


def test_studies_merged_into_one_patient_go_out_with_its_id_and_issuer(archive: PacsServer, tmp_path: Path) -> None:
    """Modalities sent CH1 and CH2 without issuer; the HIS updated CH2 (its
    PID-3 with the assigning authority: the patient takes BVDK), then merged
    CH1 and CH2 into CH3. Both studies are CH3 of BVDK wherever they are
    read."""
    one = _store(archive, make_ct(tmp_path / "1.dcm", PatientID="CH1", PatientName="CHANH^MOT"))
    two = _store(archive, make_ct(tmp_path / "2.dcm", PatientID="CH2", PatientName="CHANH^HAI"))
    _aa(archive, _msh("ADT^A08") + "EVN|A08|20261205\nPID|1||CH2^^^BVDK^PI||Chánh^Hai\n")
    _aa(archive, _msh("ADT^A40") + "EVN|A40|20261205\nPID|1||CH3^^^BVDK^PI||Chánh^Ba||19700101|M\n"
        "MRG|CH1\nPID|2||CH3^^^BVDK^PI||Chánh^Ba||19700101|M\nMRG|CH2^^^BVDK\n")
    surviving = {"PatientName": "Chánh^Ba", "PatientID": "CH3", "IssuerOfPatientID": "BVDK",
                 "PatientBirthDate": "19700101", "PatientSex": "M"}
    for study in (one, two):
        assert _study_find(archive, tmp_path / f"find-{study[-6:]}", study) == [surviving]
        assert _metadata(archive, study) == [surviving]
        assert _c_get(archive, study, tmp_path / f"got-{study[-6:]}") == [surviving]


def test_a_patient_of_withdrawn_images_only_is_no_fhir_search_match(archive: PacsServer, tmp_path: Path) -> None:
    """The technologist typed SAI1 for Bùi Văn Sáu's CT, and the images were
    withdrawn (113038, Incorrect Modality Worklist Entry). C-FIND at patient
    level and FHIR Patient searches leave SAI1 out; Bùi Văn Sáu, whose CT
    came again under his ID, and a withdrawn study of his, is still found."""
    wrong = _store(archive, make_ct(tmp_path / "w.dcm", PatientID="SAI1", PatientName="BUI^VAN SAU"))
    _store(archive, make_ct(tmp_path / "r.dcm", PatientID="BNS1", PatientName="Bùi^Văn Sáu",
                                    SpecificCharacterSet="ISO_IR 192"))
    also = _store(archive, make_ct(tmp_path / "a.dcm", PatientID="BNS1", PatientName="Bùi^Văn Sáu",
                                   SpecificCharacterSet="ISO_IR 192"))
    with archive.http() as http:
        for study in (wrong, also):
            rejected = http.post("/api/rejections/reject",
                                 json={"study_uid": study, "code": "113038", "reason": "nhập sai mã bệnh nhân"})
            assert rejected.status_code == 200, rejected.text
    out = tmp_path / "patients"
    out.mkdir()
    found = run_dcmtk("findscu", "-P", "-aec", archive.ae_title, "-X", "-od", str(out), "-k", "QueryRetrieveLevel=PATIENT",
                      "-k", "PatientName=bui*", "-k", "PatientID", "-k", "NumberOfPatientRelatedStudies",
                      "127.0.0.1", str(archive.dicom_port))
    assert found.returncode == 0, found.stderr
    patients = [(d.PatientID, str(d.NumberOfPatientRelatedStudies)) for d in map(dcmread, sorted(out.iterdir()))]
    assert patients == [("BNS1", "1")]
    with archive.http() as http:
        for params in ({"name": "bui van sau"}, {"family": "bui"}, {"identifier": "SAI1,BNS1"}, {"_id": "SAI1,BNS1"}):
            bundle = http.get("/fhir/Patient", params=params).json()
            assert ([e["resource"]["id"] for e in bundle.get("entry", [])], bundle["total"]) == (["BNS1"], 1), params
        # Read by its id it still is, as the withdrawn study is.
        assert http.get("/fhir/Patient/SAI1").status_code == 200


def test_a_name_padded_by_the_his_is_found_by_every_search(archive: PacsServer, tmp_path: Path) -> None:
    """The HIS reads the name from a CHAR(40) column and sends it padded
    (PUT /api/patients), as another HIS sends it over HL7."""
    study = _store(archive, make_ct(tmp_path / "p.dcm", PatientID="BNP1", PatientName="TRINH^VAN TU"))
    with archive.http() as http:
        put = http.put("/api/patients/BNP1", json={"name": "Trịnh ^ Văn Tư" + " " * 26, "reason": "HIS"})
    assert put.status_code == 200, put.text
    assert put.json()["name"] == "Trịnh^Văn Tư"
    for name in ("Trịnh^Văn Tư", "trinh^van*"):
        out = tmp_path / f"find-{len(name)}"
        out.mkdir()
        found = run_dcmtk("findscu", "-S", "-aec", archive.ae_title, "-X", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "SpecificCharacterSet=ISO_IR 192", "-k", f"PatientName={name}", "-k", "PatientID",
                          "-k", "StudyInstanceUID", "127.0.0.1", str(archive.dicom_port))
        assert found.returncode == 0, found.stderr
        assert [d.StudyInstanceUID for d in map(dcmread, sorted(out.iterdir()))] == [study], name
    assert _metadata(archive, study)[0]["PatientName"] == "Trịnh^Văn Tư"


def test_padded_issuers_and_other_ids_over_json_name_the_registered_patient(archive: PacsServer) -> None:
    """The HIS registered Lò Văn Một over HL7; its REST interface then sends
    his birth date and citizen ID with the issuers as its CHAR columns hold
    them. The patient HL7 registered is updated; no second one is made."""
    _aa(archive, _msh("ADT^A08") + "EVN|A08|20261205\nPID|1||BNI1^^^BVDK^PI||Lò^Văn Một\n")
    with archive.http() as http:
        put = http.put("/api/patients/BNI1", json={"issuer": "BVDK   ", "birth_date": "19700101",
                                                    "other_ids": [{"value": "079070001212 ", "issuer": " CCCD  "}]})
        assert put.status_code == 200, put.text
        assert {k: put.json()[k] for k in ("id", "issuer", "name", "birth_date", "other_ids")} == {
            "id": "BNI1", "issuer": "BVDK", "name": "Lò^Văn Một", "birth_date": "19700101",
            "other_ids": [{"value": "079070001212", "issuer": "CCCD", "type": ""}]}
        for identifier in ("BNI1", "CCCD|079070001212"):
            bundle = http.get("/fhir/Patient", params={"identifier": identifier}).json()
            assert [e["resource"]["id"] for e in bundle.get("entry", [])] == ["BVDK.BNI1"], identifier
