"""De-identification, PS3.15 Annex E Basic Application Level Confidentiality
Profile: PHI gone, private tags gone, UIDs remapped consistently (also inside
sequences), pixel data untouched, and the result is valid DICOM (pydicom and
DCMTK read it back)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs.deidentify import BASIC_PROFILE, Action, Deidentifier, UidMap, deidentify

from .conftest import pydicom_file, run_dcmtk

SALT = "test-salt-for-deidentification"

# Basic Profile attributes with their action, set on the synthetic series.
PHI = {
    "PatientName": "Nguyễn^Văn An",
    "PatientID": "001085012345",
    "PatientBirthDate": "19850101",
    "PatientSex": "M",
    "PatientAge": "039Y",
    "PatientWeight": "70",
    "PatientAddress": "12 Lê Lợi, Hà Nội",
    "PatientTelephoneNumbers": "0912345678",
    "OtherPatientNames": "NGUYEN^VAN AN",
    "PatientComments": "allergic to iodine",
    "InstitutionName": "Bệnh viện Đa khoa",
    "InstitutionAddress": "1 Trần Hưng Đạo",
    "ReferringPhysicianName": "Đỗ^Thanh Tùng",
    "PerformingPhysicianName": "Hoàng^Minh",
    "OperatorsName": "Phạm^An",
    "AccessionNumber": "ACC001",
    "StudyID": "S1",
    "StudyDate": "20240115",
    "StudyTime": "083000",
    "SeriesDate": "20240115",
    "AcquisitionDate": "20240115",
    "ContentDate": "20240115",
    "InstanceCreationDate": "20240115",
    "StudyDescription": "CT ngực",
    "SeriesDescription": "axial",
    "ImageComments": "patient moved",
    "DeviceSerialNumber": "SN-4711",
    "StationName": "CT_ROOM1",
    "ProtocolName": "chest routine",
    "RequestingPhysician": "Lê^Đức",
}
REMOVED = {"PatientAge", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientNames",
           "PatientComments", "InstitutionAddress", "PerformingPhysicianName", "StudyDescription",
           "SeriesDescription", "ImageComments", "RequestingPhysician"}
EMPTIED = {"PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID", "StudyDate",
           "StudyTime"}


def _series(count: int = 3, patient_id: str = "001085012345") -> list[Dataset]:
    """A CT series with PHI everywhere, private tags, an overlay, a curve and
    references between its instances (in sequences, two levels deep)."""
    base = dcmread(pydicom_file("CT_small.dcm"))
    study, series, frame = "1.2.826.0.1.3680043.9.7134.77.1", "1.2.826.0.1.3680043.9.7134.77.2", "1.2.826.0.1.3680043.9.7134.77.3"
    out = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.PatientID = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7134.77.4.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = "DN4797912345678", "BHYT"
        ds.OtherPatientIDsSequence = Sequence([other])
        if i:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.9.7134.77.4.{i}"
            ds.ReferencedImageSequence = Sequence([ref])
            source = Dataset()
            source.ReferencedSOPClassUID = ds.SOPClassUID
            source.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.9.7134.77.4.{i}"
            ds.SourceImageSequence = Sequence([source])
        # A kept sequence whose items hold UIDs two levels down.
        sop = Dataset()
        sop.ReferencedSOPClassUID = ds.SOPClassUID
        sop.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.9.7134.77.4.1"
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = series
        ref_series.ReferencedInstanceSequence = Sequence([sop])
        evidence = Dataset()
        evidence.StudyInstanceUID = study
        evidence.ReferencedSeriesSequence = Sequence([ref_series])
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
        request = Dataset()
        request.RequestedProcedureID = "RP-1"
        request.ScheduledProcedureStepID = "SPS-1"
        ds.RequestAttributesSequence = Sequence([request])
        ds.add_new(0x60000010, "US", 4)
        ds.add_new(0x60000011, "US", 4)
        ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)
        ds.add_new(0x60004000, "LT", "overlay with the patient's name")
        ds.add_new(0x50003000, "OB", b"curve data")
        ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "LO", "Nguyễn^Văn An")
        out.append(ds)
    return out


def _roundtrip(ds: Dataset, path: Path | None = None) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return dcmread(io.BytesIO(buffer.getvalue()))


def _all_values(ds: Dataset) -> list[str]:
    return [str(e.value) for e in ds.iterall() if e.VR not in ("SQ", "OB", "OW")]


def test_basic_profile_table_is_encoded_as_data() -> None:
    assert len(BASIC_PROFILE) > 400
    assert BASIC_PROFILE[0x00100010] is Action.Z  # Patient's Name
    assert BASIC_PROFILE[0x00080050] is Action.Z  # Accession Number
    assert BASIC_PROFILE[0x00080080] is Action.XZD  # Institution Name
    assert BASIC_PROFILE[0x0020000D] is Action.U  # Study Instance UID
    assert BASIC_PROFILE[0x00101002] is Action.X  # Other Patient IDs Sequence
    assert BASIC_PROFILE[0x00081140] is Action.XZU  # Referenced Image Sequence


def test_no_phi_left_and_profile_recorded(tmp_path: Path) -> None:
    originals = _series()
    pixels = [ds.PixelData for ds in originals]
    deid = Deidentifier(SALT)
    results = [_roundtrip(deid.apply(copy.deepcopy(ds))) for ds in originals]
    for ds, pixel_data in zip(results, pixels, strict=True):
        for keyword in REMOVED:
            assert keyword not in ds, keyword
        for keyword in EMPTIED:
            assert keyword in ds and not ds[keyword].value, keyword
        for keyword in ("InstitutionName", "OperatorsName", "DeviceSerialNumber", "StationName", "SeriesDate",
                        "AcquisitionDate", "ContentDate", "InstanceCreationDate", "ProtocolName"):
            # X/Z/D, X/D, Z/D (and dates the table does not list): a dummy.
            assert keyword not in ds or str(ds[keyword].value) != PHI[keyword], keyword
        for forbidden in ("OtherPatientIDsSequence", "RequestAttributesSequence"):
            assert forbidden not in ds
        values = " ".join(_all_values(ds))
        for phi in ("Nguyễn", "001085012345", "DN4797912345678", "Bệnh viện", "ACC001", "SN-4711", "CT_ROOM1",
                    "Đỗ", "20240115", "RP-1", "1985"):
            assert phi not in values, phi
        assert str(ds.PatientName) == ds.PatientID and ds.PatientID.startswith("ANON")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        # Private tags, overlay planes and curves are gone, at every depth.
        assert not any(e.tag.is_private for e in ds.iterall())
        assert not any(e.tag.group in (0x5000, 0x6000) for e in ds.iterall())
        # Pixel data untouched.
        assert ds.PixelData == pixel_data
        assert ds.file_meta.TransferSyntaxUID == originals[0].file_meta.TransferSyntaxUID


def test_uids_are_remapped_consistently_across_the_series_and_runs() -> None:
    originals = _series()
    deid = Deidentifier(SALT)
    results = [deid.apply(copy.deepcopy(ds)) for ds in originals]
    studies = {ds.StudyInstanceUID for ds in results}
    series = {ds.SeriesInstanceUID for ds in results}
    frames = {ds.FrameOfReferenceUID for ds in results}
    assert len(studies) == len(series) == len(frames) == 1
    assert studies.isdisjoint({originals[0].StudyInstanceUID})
    new_sops = [ds.SOPInstanceUID for ds in results]
    assert len(set(new_sops)) == 3
    for uid in (*studies, *series, *frames, *new_sops):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    for ds in results:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # References inside sequences point at the new UIDs of the instances referenced.
    for i, ds in enumerate(results[1:], start=1):
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_sops[i - 1]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == new_sops[i - 1]
        assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == originals[i].SOPClassUID  # classes stay
    for ds in results:
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == ds.StudyInstanceUID
        ref_series = evidence.ReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == ds.SeriesInstanceUID
        assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == new_sops[0]
    # Same salt, another run (another Deidentifier): the same UIDs and pseudonym.
    again = Deidentifier(SALT).apply(copy.deepcopy(originals[2]))
    assert (again.SOPInstanceUID, again.StudyInstanceUID, again.PatientID) == (
        new_sops[2], results[2].StudyInstanceUID, results[2].PatientID)
    # Another salt: nothing in common.
    other = Deidentifier("another salt").apply(copy.deepcopy(originals[2]))
    assert other.SOPInstanceUID != new_sops[2] and other.PatientID != results[2].PatientID


def test_pseudonym_follows_the_patient() -> None:
    uid_map = UidMap(SALT)
    a1, a2 = (deidentify(ds, uid_map) for ds in _series(2, patient_id="PATIENT-A"))
    (b,) = (deidentify(ds, uid_map) for ds in _series(1, patient_id="PATIENT-B"))
    assert a1.PatientID == a2.PatientID == str(a1.PatientName)
    assert b.PatientID != a1.PatientID
    assert Deidentifier(SALT).pseudonym("PATIENT-A") == a1.PatientID
    explicit = deidentify(_series(1)[0], uid_map, pseudonym="SUBJECT-007")
    assert explicit.PatientID == "SUBJECT-007" and str(explicit.PatientName) == "SUBJECT-007"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "test-SR.dcm", "US1_J2KR.dcm"])
def test_real_files_stay_valid_dicom(name: str, tmp_path: Path) -> None:
    original = dcmread(pydicom_file(name))
    pixel_data = original.get("PixelData")
    ds = Deidentifier(SALT).apply(copy.deepcopy(original))
    out = tmp_path / "deid.dcm"
    back = _roundtrip(ds, out)
    assert back.get("PixelData") == pixel_data
    assert back.SOPInstanceUID != original.SOPInstanceUID
    assert back.StudyInstanceUID != original.StudyInstanceUID
    assert not any(e.tag.is_private for e in back.iterall())
    assert not any(e.tag.group == 0x6000 for e in back.iterall())
    assert back.PatientIdentityRemoved == "YES"
    if original.get("PatientName"):
        assert str(original.PatientName) not in " ".join(_all_values(back))
    if name == "test-SR.dcm":
        # UID references deep in the content tree are remapped, not dropped.
        refs = [e.value for e in back.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
        assert refs and all(r.startswith("2.25.") for r in refs)
    result = run_dcmtk("dcmdump", "+E", str(out))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("E:", "F:"))], result.stderr


def test_every_value_representation_written_by_the_profile_reads_back(tmp_path: Path) -> None:
    ds = _series(1)[0]
    # Attributes whose D action needs a dummy of their VR.
    ds.ContentCreatorName = "Lê^Đức"  # Z/D on PN
    ds.AcquisitionDateTime = "20240115083000"  # X/Z/D on DT
    ds.ContentTime = "083000"  # Z/D on TM
    ds.ClinicalTrialSponsorName = "sponsor"  # D on LO
    ds.VerifyingObserverName = "Hoàng^Minh"  # D on PN
    result = Deidentifier(SALT).apply(ds)
    out = tmp_path / "vr.dcm"
    back = _roundtrip(result, out)
    assert back.AcquisitionDateTime == "19000101000000"
    assert back.ContentTime == "000000"
    assert back.ClinicalTrialSponsorName and back.ClinicalTrialSponsorName != "sponsor"
    assert "Đức" not in str(back.ContentCreatorName)
    check = run_dcmtk("dcmdump", "+E", str(out))
    assert check.returncode == 0 and "E:" not in check.stderr, check.stderr
