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

from pacs.deidentify import BASIC_PROFILE, Action, Deidentifier, Release, UidMap, deidentify, may_release

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


# -- leaks found by exploratory testing ---------------------------------------------------
NAME, CCCD = "Nguyễn^Văn Thành", "079075001234"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _strings(ds: Dataset) -> str:
    """Every value of *ds* as text, bytes included (raw document content too)."""
    out = []
    for e in ds.iterall():
        if e.VR == "SQ":
            continue
        value = e.value
        out.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return " ".join(out)


def _pdf_report() -> Dataset:
    ds = _series(1)[0]
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    body = (b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n4 0 obj<</Length 60>>stream\n"
            b"BT (Benh nhan NGUYEN VAN THANH CCCD 079075001234) Tj ET\nendstream endobj\n"
            b"5 0 obj<</Author(Pham Minh Duc)>>endobj\ntrailer<</Root 1 0 R/Info 5 0 R>>\n%%EOF\n")
    ds.DocumentTitle = "Kết quả CT - " + NAME
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = body + b"\n" * (len(body) % 2)
    ds.EncapsulatedDocumentLength = len(ds.EncapsulatedDocument)
    ds.BurnedInAnnotation = "YES"  # the document's content identifies the patient
    return ds


def test_encapsulated_document_is_replaced_by_a_blank_one(tmp_path: Path) -> None:
    original = _pdf_report()
    body = original.EncapsulatedDocument
    back = _roundtrip(Deidentifier(SALT).apply(copy.deepcopy(original)), tmp_path / "pdf.dcm")
    document = back.EncapsulatedDocument
    assert document.startswith(b"%PDF-") and b"%%EOF" in document and len(document) % 2 == 0
    for needle in (b"THANH", b"079075001234", b"Pham", b"Author", b"BT "):
        assert needle not in document
    assert document != body and body not in (tmp_path / "pdf.dcm").read_bytes()
    assert back.EncapsulatedDocumentLength == len(document)
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert not back.get("DocumentTitle")
    assert "Document replaced" in " ".join(back.DeidentificationMethod)
    # The blank document identifies nobody: the object is de-identified and may go out.
    assert back.BurnedInAnnotation == "NO" and back.PatientIdentityRemoved == "YES"
    assert may_release(original).allowed
    assert "Thành" not in _strings(back) and CCCD not in _strings(back)


def test_sequences_the_table_replaces_keep_no_original_content() -> None:
    ds = _series(1)[0]
    # GSPS free text, a physician's licence number and name in a sequence the
    # table does not list, a department's name in a local code.
    text = Dataset()
    text.UnformattedTextValue = "Nguyễn Văn Thành - nốt phổi"
    text.AnchorPointAnnotationUnits, text.AnchorPoint, text.AnchorPointVisibility = "PIXEL", [10.0, 12.0], "N"
    annotation = Dataset()
    annotation.GraphicLayer = "LAYER1"
    annotation.GraphicLayerDescription = "ghi chú BS Phạm"  # LO: only a strict pass replaces it
    annotation.TextObjectSequence = Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    # Names and free text in attributes the table does not list.
    ds.EvaluatorName = "Phạm^Minh Đức"
    ds.InstructionPerformanceComment = "Nguyễn Văn Thành did not hold his breath"
    ds.ContentLabel, ds.ContentDescription = "NGUYEN", "Ghi chú của BS Phạm Minh Đức"
    physician = Dataset()
    physician.PersonIdentificationCodeSequence = Sequence([_code("BS-CCHN-004455", "L", "Bùi Thanh Tâm")])
    ds.RequestingPhysicianIdentificationSequence = Sequence([physician])
    ds.RequestingServiceCodeSequence = Sequence([_code("HOHAP", "99CHORAY", "Khoa Hô Hấp Chợ Rẫy")])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    item.TextValue = "Bệnh nhân Nguyễn Văn Thành"
    ds.ContentSequence = Sequence([item])
    ds.add_new(0x00189004, "CS", "RESEARCH")  # unrelated attributes stay
    back = _roundtrip(Deidentifier(SALT).apply(ds))
    values = _strings(back)
    for phi in ("Thành", "NGUYEN", "Phạm", "BS-CCHN", "Bùi", "HOHAP", "Chợ Rẫy"):
        assert phi not in values, phi
    # The skeleton stays valid: layer, coordinates, SR structure and public codes.
    annotation = back.GraphicAnnotationSequence[0]
    assert annotation.GraphicLayer == "LAYER1"
    assert list(annotation.TextObjectSequence[0].AnchorPoint) == [10.0, 12.0]
    assert back.ContentSequence[0].ValueType == "TEXT"
    assert back.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    assert back.ContentLabel and back.ContentLabel != "NGUYEN"
    code = back.RequestingPhysicianIdentificationSequence[0].PersonIdentificationCodeSequence[0]
    assert code.CodingSchemeDesignator == "L" and code.CodeValue and code.CodeValue != "BS-CCHN-004455"
    assert back[0x00189004].value == "RESEARCH"


def test_attributes_of_the_2024b_table_and_every_uid_are_handled() -> None:
    ds = _series(1)[0]
    ds.StationAETitle, ds.RetrieveAETitle = "CHORAY_CT01AE", "CHORAY_PACS"
    ds.GPSLatitudeRef, ds.GPSLatitude, ds.GPSLongitude = "N", "10.7579", "106.6596"
    ds.AcquisitionUID, ds.PyramidUID = "1.2.826.0.1.3680043.8.498.1900", "1.2.826.0.1.3680043.8.498.1901"
    ds.PyramidLabel, ds.PyramidDescription = "NGUYEN slide", "THANH biopsy"
    ds.add_new(0x300A000B, "LO", "NGUYEN left lung")  # Treatment Sites
    ds.add_new(0x003A0329, "ST", "Filter by NGUYEN")  # Waveform Filter Description
    ds.add_new(0x21000140, "AE", "CHORAY_PRT")  # Destination AE
    ds.add_new(0x00120022, "LO", "CHORAY-IRB")  # Issuer of Clinical Trial Protocol ID
    ds.PatientBirthDateInAlternativeCalendar = "1975-02-01 AMLICH"
    ds.PatientDeathDateInAlternativeCalendar = "2024-02-01 AMLICH"
    ds.PatientAlternativeCalendar = "LUNAR"
    ds.RetrieveLocationUID = "1.2.826.0.1.3680043.8.498.77"  # not in the table: an organisation's UID
    ds.ReferencedSOPClassUID = "1.3.12.2.1107.5.9.1"  # a vendor's class UID stays
    back = _roundtrip(Deidentifier(SALT).apply(ds))
    for keyword in ("StationAETitle", "RetrieveAETitle", "GPSLatitudeRef", "GPSLatitude", "GPSLongitude",
                    "PyramidLabel", "PyramidDescription", "TreatmentSites", "WaveformFilterDescription",
                    "IssuerOfClinicalTrialProtocolID", "PatientBirthDateInAlternativeCalendar",
                    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar"):
        assert keyword not in back, keyword
    assert back.DestinationAE and back.DestinationAE != "CHORAY_PRT"
    for keyword in ("AcquisitionUID", "PyramidUID", "RetrieveLocationUID"):
        assert back[keyword].value.startswith("2.25."), keyword
    assert back.AcquisitionUID == UidMap(SALT).map("1.2.826.0.1.3680043.8.498.1900")  # consistent
    assert back.ReferencedSOPClassUID == "1.3.12.2.1107.5.9.1"
    assert back.SOPClassUID == ds.SOPClassUID
    assert "CHORAY" not in _strings(back) and "AMLICH" not in _strings(back)


def test_pseudonym_takes_the_issuer_into_account() -> None:
    def pseudonym(issuer: str | None) -> str:
        (ds,) = _series(1, patient_id="BN2024")
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        assert issuer is not None or "IssuerOfPatientID" not in ds
        return deidentify(ds, UidMap(SALT)).PatientID

    at_a, at_b = pseudonym("CHORAY-HIS"), pseudonym("BACHMAI-HIS")
    assert at_a != at_b  # same local ID, two hospitals: two patients
    assert at_a == pseudonym("CHORAY-HIS")  # deterministic
    assert at_a == Deidentifier(SALT).pseudonym("BN2024", issuer="CHORAY-HIS")
    # Without an issuer: the pseudonym earlier versions gave (ID alone).
    assert pseudonym(None) == pseudonym("") == Deidentifier(SALT).pseudonym("BN2024") != at_a


def test_may_release_judges_burned_in_annotation() -> None:
    ct = _series(1)[0]
    assert may_release(ct) == Release(True, "")
    burned = copy.deepcopy(ct)
    burned.BurnedInAnnotation = "YES"
    verdict = may_release(burned)
    assert not verdict.allowed and "burned-in" in verdict.reason
    assert may_release(burned, include_burned_in=True).allowed
    # A face in the pixels is held back as burned-in text is.
    face = copy.deepcopy(ct)
    face.RecognizableVisualFeatures = "YES"
    verdict = may_release(face)
    assert not verdict.allowed and "recognizable visual features" in verdict.reason
    assert may_release(face, include_burned_in=True).allowed
    # Written anyway, it does not claim to be de-identified.
    out = Deidentifier(SALT).apply(copy.deepcopy(burned))
    assert out.PatientIdentityRemoved == "NO" and may_release(out).allowed is False
    for sop_class in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"):
        risky = copy.deepcopy(ct)
        risky.SOPClassUID = sop_class
        verdict = may_release(risky)
        assert verdict.allowed and "likely" in verdict.reason, sop_class
        risky.BurnedInAnnotation = "NO"
        assert may_release(risky) == Release(True, "")


def test_deidentified_export_leaves_out_burned_in_objects(tmp_path: Path) -> None:
    from .test_maintenance import Cli

    src = tmp_path / "in"
    src.mkdir()
    ct, burned, capture = _series(1)[0], _series(1)[0], _series(1)[0]
    for i, (ds, sop_class, flag) in enumerate([(ct, None, None), (burned, "1.2.840.10008.5.1.4.1.1.7", "YES"),
                                               (capture, "1.2.840.10008.5.1.4.1.1.7", None)]):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.7134.88.{i}"
        if sop_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        if flag:
            ds.BurnedInAnnotation = flag
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    cli = Cli(tmp_path / "data")
    assert cli.json("import", str(src))["stored"] == 3
    study = ct.StudyInstanceUID

    report = cli.json("export", study, "--out", str(tmp_path / "deid"), "--deidentify", "--salt", SALT, rc=1)
    assert report["instances"] == 2
    assert [i["sop_uid"] for i in report["not_exported_burned_in"]["items"]] == [burned.SOPInstanceUID]
    assert [i["sop_uid"] for i in report["warnings"]["items"]] == [capture.SOPInstanceUID]
    written = [dcmread(p) for p in (tmp_path / "deid").rglob("*.dcm")]
    assert len(written) == 2 and all(ds.get("BurnedInAnnotation") != "YES" for ds in written)

    forced = cli.json("export", study, "--out", str(tmp_path / "all"), "--deidentify", "--salt", SALT,
                      "--include-burned-in")
    assert forced["instances"] == 3
    assert [i["sop_uid"] for i in forced["burned_in_included"]["items"]] == [burned.SOPInstanceUID]
    flagged = [dcmread(p) for p in (tmp_path / "all").rglob("*.dcm")]
    assert [ds.PatientIdentityRemoved for ds in flagged if ds.get("BurnedInAnnotation") == "YES"] == ["NO"]
    assert cli("export", study, "--out", str(tmp_path / "x"), "--include-burned-in").returncode == 2
