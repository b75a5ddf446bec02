"""Review findings on de-identification (PS3.15 Annex E), each through the
real `pacs import` and `pacs export --deidentify` CLI: what the copies
written to the export folder say about coding schemes."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from .test_maintenance import Cli

SALT = "review-deid-salt"
ROOT = "1.2.826.0.1.3680043.9.7134.92"
SNOMED_UID = "2.16.840.1.113883.6.96"  # HL7's OID of SNOMED CT
HOSPITAL_SCHEME_UID = f"{ROOT}.99"  # a local scheme under the hospital's own root


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _scheme(designator: str, uid: str, name: str) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodingSchemeUID, item.CodingSchemeName = designator, uid, name
    return item


def _report(path: Path, study: str) -> None:
    """An Enhanced SR as a Vietnamese hospital's reporting system writes it:
    SNOMED CT findings, and the hospital's own codes under "99CHORAY"."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.3"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{ROOT}.2"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Modality, ds.PatientName, ds.PatientID = "SR", "Nguyễn^Văn Thành", "079075001234"
    ds.CodingSchemeIdentificationSequence = Sequence([
        _scheme("SCT", SNOMED_UID, "SNOMED CT"),
        _scheme("99CHORAY", HOSPITAL_SCHEME_UID, "Bệnh viện Chợ Rẫy"),
    ])
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "CODE"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    nodule = _code("27925004", "SCT", "Nodule")
    nodule.CodingSchemeUID = SNOMED_UID
    finding.ConceptCodeSequence = Sequence([nodule])
    ds.ContentSequence = Sequence([finding])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM", "Imaging Measurement Report")])
    ds.RequestingServiceCodeSequence = Sequence([_code("HOHAP", "99CHORAY", "Khoa Hô Hấp")])
    ds.ProcedureCodeSequence = Sequence([_code("CT-NGUC", "L", "CT ngực")])
    ds.save_as(path, enforce_file_format=True)


def _exported(tmp_path: Path, study: str) -> tuple[Dataset, bytes]:
    src = tmp_path / "in"
    src.mkdir()
    _report(src / "sr.dcm", study)
    cli = Cli(tmp_path / "data")
    assert cli.json("import", str(src))["stored"] == 1
    report = cli.json("export", study, "--out", str(tmp_path / "out"), "--deidentify", "--salt", SALT)
    assert report["instances"] == 1
    (path,) = (tmp_path / "out").rglob("*.dcm")
    return dcmread(path), path.read_bytes()


def test_public_coding_scheme_uids_stay_in_the_copy(tmp_path: Path) -> None:
    back, raw = _exported(tmp_path, f"{ROOT}.1")
    schemes = {item.CodingSchemeUID: item for item in back.CodingSchemeIdentificationSequence}
    # SNOMED CT is SNOMED CT in the copy too: its OID is vocabulary, not an
    # instance to hide (it was remapped to a random 2.25 UID, and a receiver
    # no longer knew which terminology "SCT" was).
    assert schemes[SNOMED_UID].CodingSchemeDesignator == "SCT"
    code = back.ContentSequence[0].ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodingSchemeUID) == ("27925004", "SCT", SNOMED_UID)
    # The hospital's own scheme's UID (under the hospital's root) is remapped.
    assert HOSPITAL_SCHEME_UID.encode() not in raw
    assert [uid for uid in schemes if uid != SNOMED_UID][0].startswith("2.25.")


def test_a_private_coding_schemes_designator_does_not_name_the_hospital(tmp_path: Path) -> None:
    back, raw = _exported(tmp_path, f"{ROOT}.4")
    # "99CHORAY" spells the hospital's name (Institution Name is X/Z/D): it
    # went out in every local code of a de-identified copy.
    assert b"CHORAY" not in raw
    schemes = {item.CodingSchemeDesignator: item for item in back.CodingSchemeIdentificationSequence}
    assert set(schemes) == {"SCT", "99ANONYMIZED"}
    assert schemes["99ANONYMIZED"].CodingSchemeName != "Bệnh viện Chợ Rẫy"
    service = back.RequestingServiceCodeSequence[0]
    assert service.CodingSchemeDesignator == "99ANONYMIZED" and service.CodeValue != "HOHAP"
    # "L" (PS3.16 local codes) names nobody and stays; its value still goes.
    procedure = back.ProcedureCodeSequence[0]
    assert procedure.CodingSchemeDesignator == "L" and procedure.CodeValue != "CT-NGUC"


def test_a_presentation_state_keeps_its_creation_date_and_time(tmp_path: Path) -> None:
    """Presentation Creation Date and Time (X in the Basic Profile table) were
    removed, but every presentation state IOD requires them (Type 1): DCMTK
    refused the de-identified state on a patient's CD. They get dummy values."""
    import subprocess

    from pacs.deidentify import Deidentifier
    from tests.dicomfiles import make_ct

    ct = make_ct(tmp_path / "ct.dcm")
    state = tmp_path / "gsps.dcm"
    subprocess.run(["dcmpsmk", str(ct), str(state)], check=True, capture_output=True)
    original = dcmread(state)
    assert original.PresentationCreationDate and original.PresentationCreationTime
    cleaned = Deidentifier(SALT).apply(original)
    assert cleaned.PresentationCreationDate == "19000101" and cleaned.PresentationCreationTime == "000000"
    cleaned.save_as(tmp_path / "clean.dcm", enforce_file_format=True)
    # DCMTK's presentation state checker: the de-identified state is a valid one again.
    checked = subprocess.run(["dcmpschk", str(tmp_path / "clean.dcm")], capture_output=True, text=True)
    assert checked.returncode == 0 and "Presentation Creation" not in checked.stdout + checked.stderr, checked.stdout
