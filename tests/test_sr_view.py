"""Structured Reports in the viewer: the content tree of an SR as a JSON
document, the radiation dose of a study's RDSR, and both in the browser.

A real `pacs serve`; the objects are built here with pydicom (a
Comprehensive SR with nested containers, measurements with units, codes,
Vietnamese text in ISO_IR 192, an image reference and a by-reference
relationship; a CT X-Ray Radiation Dose SR of two irradiation events; a Key
Object Selection), checked by DCMTK's dsrdump and sent with DCMTK's
storescu. The sample studies are left alone: tests count their instances
and series (tests/test_cli.py, the viewer's walk-throughs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .peers import ROOT, Backend, PacsServer, run_dcmtk, wait_until
from .test_web_viewer import HEIGHT, USERNAME, WIDTH, assert_no_horizontal_scroll, watched_page

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
PATIENT = ("Nguyễn^Thị Mai", "SR-0001")
REFERRER = "Lê^Văn Hùng"
OTHER_REFERRER = "Phạm^Văn Tâm"
FINDING = "Khối giảm âm ở thùy phải gan, bờ đều, kích thước 23,5 × 14 mm. Đề nghị theo dõi."
KO_NOTE = "Ảnh chính cho hội chẩn: tổn thương gan"
PROTOCOL_1 = "Ngực không cản quang"
ARTIFACTS = ROOT / "test-artifacts" / "sr-view"  # screenshots of the browser walk-through


# -- building SR objects (PS3.3 C.17.3) ----------------------------------------------------------
def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def content(relationship: str, value_type: str, concept: Dataset | None, **values: Any) -> Dataset:
    """One content item: its relationship, value type, concept name and value attributes."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    if concept is not None:
        item.ConceptNameCodeSequence = Sequence([concept])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def container(relationship: str, concept: Dataset, children: list[Dataset], template: str = "") -> Dataset:
    item = content(relationship, "CONTAINER", concept, ContinuityOfContent="SEPARATE")
    if template:
        item.ContentTemplateSequence = Sequence([_template(template)])
    item.ContentSequence = Sequence(children)
    return item


def _template(tid: str) -> Dataset:
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = tid
    return template


def num(relationship: str, concept: Dataset, value: str, unit: str, unit_meaning: str = "") -> Dataset:
    measured = Dataset()
    measured.NumericValue = value
    measured.MeasurementUnitsCodeSequence = Sequence([code(unit, "UCUM", unit_meaning or unit)])
    return content(relationship, "NUM", concept, MeasuredValueSequence=Sequence([measured]))


def coded(relationship: str, concept: Dataset, value: Dataset) -> Dataset:
    return content(relationship, "CODE", concept, ConceptCodeSequence=Sequence([value]))


def image(relationship: str, concept: Dataset | None, sop_uid: str, frames: list[int] | None = None) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_IMAGE
    ref.ReferencedSOPInstanceUID = sop_uid
    if frames:
        ref.ReferencedFrameNumber = frames
    return content(relationship, "IMAGE", concept, ReferencedSOPSequence=Sequence([ref]))


def by_reference(relationship: str, target: list[int]) -> Dataset:
    """A by-reference relationship (no value type: it names another item by its position)."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ReferencedContentItemIdentifier = target
    return item


@dataclass
class Study:
    uid: str
    ct_series: str
    ct_sops: list[str]
    referrer: str = REFERRER


def _header(ds: Dataset, study: Study, sop_class: str, modality: str, series_uid: str, number: int) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName, ds.PatientID = PATIENT
    ds.PatientBirthDate, ds.PatientSex = "19800412", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240815", "093000", "SR-ACC-1"
    ds.ReferringPhysicianName = study.referrer
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.Manufacturer = "filmless-pacs tests"
    ds.ContentDate, ds.ContentTime = "20240815", "094512"


def _write(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _evidence(study: Study) -> Sequence:
    """Current Requested Procedure Evidence: the CT slices the documents refer to."""
    series = Dataset()
    series.SeriesInstanceUID = study.ct_series
    refs = []
    for sop in study.ct_sops:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE, sop
        refs.append(ref)
    series.ReferencedSOPSequence = Sequence(refs)
    item = Dataset()
    item.StudyInstanceUID = study.uid
    item.ReferencedSeriesSequence = Sequence([series])
    return Sequence([item])


def _sr_document(ds: Dataset, title: Dataset, children: list[Dataset], template: str) -> None:
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentTemplateSequence = Sequence([_template(template)])
    ds.ContentSequence = Sequence(children)
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()


def ct_slices(study: Study, out: Path) -> list[Path]:
    """Three small CT slices (64 x 64) of the study: the images the reports refer to."""
    paths = []
    for index, sop in enumerate(study.ct_sops, start=1):
        ds = Dataset()
        _header(ds, study, CT_IMAGE, "CT", study.ct_series, 1)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = index
        ds.SeriesDescription = "Bụng có cản quang"
        ds.ImagePositionPatient = [0, 0, float(index * 5)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 5
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        yy, xx = np.mgrid[0:64, 0:64]
        pixels = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < (10 + 4 * index) ** 2, 1100, 24).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        paths.append(_write(ds, out / f"ct{index}.dcm"))
    return paths


def comprehensive_sr(study: Study, out: Path) -> Path:
    """A measurement report (TID 1500 in spirit): observer, nested containers,
    NUM with UCUM units, CODE, Vietnamese TEXT, a SCOORD on an IMAGE, an
    IMAGE reference to the second CT slice and a by-reference INFERRED FROM
    from the conclusion to the long-axis measurement (item 1.3.1.1)."""
    ds = Dataset()
    _header(ds, study, COMPREHENSIVE_SR, "SR", generate_uid(), 90)
    ds.SeriesDescription = "Báo cáo đo đạc"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = "Trần^Văn An"
    observer.VerifyingOrganization = "Bệnh viện Đa khoa Tỉnh"
    observer.VerificationDateTime = "20240815100000"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study)
    scoord = content("INFERRED FROM", "SCOORD", None, GraphicType="POLYLINE",
                     GraphicData=[10.0, 12.0, 33.5, 12.0])
    scoord.ContentSequence = Sequence([image("SELECTED FROM", None, study.ct_sops[1])])
    long_axis = num("CONTAINS", code("103339001", "SCT", "Long Axis"), "23.5", "mm", "millimeter")
    long_axis.ContentSequence = Sequence([scoord])
    group = container("CONTAINS", code("125007", "DCM", "Measurement Group"), [
        long_axis,
        num("CONTAINS", code("103340004", "SCT", "Short Axis"), "14", "mm", "millimeter"),
        coded("HAS CONCEPT MOD", code("363698007", "SCT", "Finding Site"), code("10200004", "SCT", "Liver")),
        content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue=FINDING),
        image("CONTAINS", code("121112", "DCM", "Source of Measurement"), study.ct_sops[1]),
    ])
    conclusion = content("CONTAINS", "TEXT", code("121077", "DCM", "Conclusion"), TextValue="Theo dõi sau 3 tháng.")
    conclusion.ContentSequence = Sequence([by_reference("INFERRED FROM", [1, 3, 1, 1])])
    _sr_document(ds, code("126000", "DCM", "Imaging Measurement Report"), [
        coded("HAS CONCEPT MOD", code("121049", "DCM", "Language of Content Item and Descendants"),
              code("vi", "RFC5646", "Vietnamese")),
        content("HAS OBS CONTEXT", "PNAME", code("121008", "DCM", "Person Observer Name"), PersonName="Trần^Văn An"),
        container("CONTAINS", code("126010", "DCM", "Imaging Measurements"), [group]),
        container("CONTAINS", code("121076", "DCM", "Conclusions"), [conclusion]),
    ], "1500")
    return _write(ds, out / "comprehensive.dcm")


def _ct_event(protocol: str, region: Dataset, length: str, ctdivol: str, dlp: str) -> Dataset:
    return container("CONTAINS", code("113819", "DCM", "CT Acquisition"), [
        content("CONTAINS", "TEXT", code("125203", "DCM", "Acquisition Protocol"), TextValue=protocol),
        coded("CONTAINS", code("123014", "DCM", "Target Region"), region),
        coded("CONTAINS", code("113820", "DCM", "CT Acquisition Type"),
              code("116152004", "SCT", "Spiral Acquisition")),
        content("CONTAINS", "UIDREF", code("113769", "DCM", "Irradiation Event UID"), UID=generate_uid()),
        container("CONTAINS", code("113822", "DCM", "CT Acquisition Parameters"), [
            num("CONTAINS", code("113824", "DCM", "Exposure Time"), "6.1", "s", "second"),
            num("CONTAINS", code("113825", "DCM", "Scanning Length"), length, "mm", "millimeter"),
        ]),
        container("CONTAINS", code("113829", "DCM", "CT Dose"), [
            num("CONTAINS", code("113830", "DCM", "Mean CTDIvol"), ctdivol, "mGy", "mGy"),
            coded("CONTAINS", code("113835", "DCM", "CTDIw Phantom Type"),
                  code("113691", "DCM", "IEC Body Dosimetry Phantom")),
            num("CONTAINS", code("113838", "DCM", "DLP"), dlp, "mGy.cm", "mGy.cm"),
        ]),
    ])


def ct_dose_sr(study: Study, out: Path) -> Path:
    """A CT Radiation Dose report (TID 10011): two irradiation events and the accumulated DLP."""
    ds = Dataset()
    _header(ds, study, XRAY_DOSE_SR, "SR", generate_uid(), 99)
    ds.SeriesDescription = "Dose Report"
    # The Enhanced General Equipment module of the dose report.
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "SYN-CT", "SN-0042", "1.0"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    _sr_document(ds, code("113701", "DCM", "X-Ray Radiation Dose Report"), [
        coded("HAS CONCEPT MOD", code("121058", "DCM", "Procedure reported"),
              code("77477000", "SCT", "Computed Tomography X-Ray")),
        coded("HAS OBS CONTEXT", code("121005", "DCM", "Observer Type"), code("121007", "DCM", "Device")),
        content("HAS OBS CONTEXT", "UIDREF", code("121012", "DCM", "Device Observer UID"), UID=generate_uid()),
        content("HAS OBS CONTEXT", "DATETIME", code("113809", "DCM", "Start of X-Ray Irradiation"),
                DateTime="20240815093512"),
        content("HAS OBS CONTEXT", "DATETIME", code("113810", "DCM", "End of X-Ray Irradiation"),
                DateTime="20240815094020"),
        container("CONTAINS", code("113811", "DCM", "CT Accumulated Dose Data"), [
            num("CONTAINS", code("113812", "DCM", "Total Number of Irradiation Events"), "2", "{events}", "events"),
            num("CONTAINS", code("113813", "DCM", "CT Dose Length Product Total"), "612.3", "mGy.cm", "mGy.cm"),
        ]),
        _ct_event(PROTOCOL_1, code("51185008", "SCT", "Chest"), "350", "8.5", "297.5"),
        _ct_event("Abdomen with contrast", code("818981001", "SCT", "Abdomen"), "420", "7.5", "314.8"),
    ], "10011")
    return _write(ds, out / "rdsr.dcm")


def _xa_event(event_type: Dataset, dap: str, dose_rp: str) -> Dataset:
    return container("CONTAINS", code("113706", "DCM", "Irradiation Event X-Ray Data"), [
        coded("CONTAINS", code("113764", "DCM", "Acquisition Plane"), code("113622", "DCM", "Single Plane")),
        content("CONTAINS", "UIDREF", code("113769", "DCM", "Irradiation Event UID"), UID=generate_uid()),
        content("CONTAINS", "DATETIME", code("111526", "DCM", "DateTime Started"), DateTime="20240815101500"),
        coded("CONTAINS", code("113721", "DCM", "Irradiation Event Type"), event_type),
        content("CONTAINS", "TEXT", code("125203", "DCM", "Acquisition Protocol"), TextValue="Chụp mạch gan"),
        coded("CONTAINS", code("123014", "DCM", "Target Region"), code("818981001", "SCT", "Abdomen")),
        num("CONTAINS", code("122130", "DCM", "Dose Area Product"), dap, "Gy.m2", "Gy.m2"),
        num("CONTAINS", code("113738", "DCM", "Dose (RP)"), dose_rp, "Gy", "Gy"),
    ])


def projection_dose_sr(study: Study, out: Path) -> Path:
    """A projection X-ray dose report (TID 10001): accumulated totals (TID 10002/10004) and two events (TID 10003)."""
    ds = Dataset()
    _header(ds, study, XRAY_DOSE_SR, "SR", generate_uid(), 94)
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "SYN-XA", "SN-0043", "1.0"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    _sr_document(ds, code("113701", "DCM", "X-Ray Radiation Dose Report"), [
        coded("HAS CONCEPT MOD", code("121058", "DCM", "Procedure reported"),
              code("113704", "DCM", "Projection X-Ray")),
        coded("HAS OBS CONTEXT", code("121005", "DCM", "Observer Type"), code("121007", "DCM", "Device")),
        content("HAS OBS CONTEXT", "UIDREF", code("121012", "DCM", "Device Observer UID"), UID=generate_uid()),
        container("CONTAINS", code("113702", "DCM", "Accumulated X-Ray Dose Data"), [
            coded("CONTAINS", code("113764", "DCM", "Acquisition Plane"), code("113622", "DCM", "Single Plane")),
            num("CONTAINS", code("113722", "DCM", "Dose Area Product Total"), "0.00355", "Gy.m2", "Gy.m2"),
            num("CONTAINS", code("113725", "DCM", "Dose (RP) Total"), "0.033", "Gy", "Gy"),
            num("CONTAINS", code("113726", "DCM", "Fluoro Dose Area Product Total"), "0.00125", "Gy.m2", "Gy.m2"),
            num("CONTAINS", code("113730", "DCM", "Total Fluoro Time"), "95", "s", "s"),
            num("CONTAINS", code("113731", "DCM", "Total Number of Radiographic Frames"), "12", "1", "no units"),
        ], "10002"),
        _xa_event(code("P5-06000", "SRT", "Fluoroscopy"), "0.00125", "0.012"),
        _xa_event(code("113611", "DCM", "Stationary Acquisition"), "0.0023", "0.021"),
    ], "10001")
    return _write(ds, out / "xa-rdsr.dcm")


def key_objects(study: Study, out: Path) -> Path:
    """A Key Object Selection (TID 2010) flagging the first and third CT slices."""
    ds = Dataset()
    _header(ds, study, KEY_OBJECT_SELECTION, "KO", generate_uid(), 98)
    ds.SeriesDescription = "Ảnh chính"
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study)
    _sr_document(ds, code("113000", "DCM", "Of Interest"), [
        content("CONTAINS", "TEXT", code("113012", "DCM", "Key Object Description"), TextValue=KO_NOTE),
        image("CONTAINS", None, study.ct_sops[0]),
        image("CONTAINS", None, study.ct_sops[2]),
    ], "2010")
    del ds.PerformedProcedureCodeSequence  # not in the Key Object Document module
    return _write(ds, out / "ko.dcm")


def hostile_sr(study: Study, out: Path) -> Path:
    """What a broken or malicious sender may write: content nested deeper
    than the viewer shows, a by-reference relationship naming its own
    ancestor (a loop if it were followed), one to an item that does not
    exist, and more items than a document shows."""
    ds = Dataset()
    _header(ds, study, COMPREHENSIVE_SR, "SR", generate_uid(), 97)
    ds.CompletionFlag, ds.VerificationFlag = "PARTIAL", "UNVERIFIED"
    deepest = content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue="tầng sâu nhất")
    chain = deepest
    # 12 containers below the first: the text 14 levels below the root, which the viewer
    # shows 12 deep (the ingest takes 16: 32 levels of sequences and items).
    for _ in range(12):
        chain = container("CONTAINS", code("125007", "DCM", "Measurement Group"), [chain])
    looping = content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue="vòng lặp")
    looping.ContentSequence = Sequence([by_reference("INFERRED FROM", [1, 2]), by_reference("INFERRED FROM", [9, 9])])
    flood = [content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue=f"mục {n}")
             for n in range(MANY_ITEMS)]
    _sr_document(ds, code("126000", "DCM", "Imaging Measurement Report"), [
        container("CONTAINS", code("126010", "DCM", "Imaging Measurements"), [chain]),
        looping,
        *flood,
    ], "1500")
    return _write(ds, out / "hostile.dcm")


def oversized_sr(study: Study, out: Path) -> Path:
    """A Basic Text SR of 33 MB (one long text): larger than an SR is read."""
    ds = Dataset()
    _header(ds, study, "1.2.840.10008.5.1.4.1.1.88.11", "SR", generate_uid(), 96)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    _sr_document(ds, code("18748-4", "LN", "Diagnostic Imaging Report"), [
        content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"), TextValue="x" * (33 << 20)),
    ], "2000")
    return _write(ds, out / "oversized.dcm")


def mislabelled_sr(study: Study, out: Path) -> Path:
    """An Enhanced SR from a modality that writes UTF-8 and declares no
    character set (as Vietnamese ultrasound machines do): read as UTF-8, as
    the index reads such names. Sent deflated (storescu -xd)."""
    ds = Dataset()
    _header(ds, study, "1.2.840.10008.5.1.4.1.1.88.22", "SR", generate_uid(), 95)
    del ds.SpecificCharacterSet
    ds.PatientName = "Hoang^Anh"
    ds.ReferringPhysicianName = ""
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    text = content("CONTAINS", "TEXT", code("121071", "DCM", "Finding"))
    text.add_new(0x0040A160, "UT", US_NOTE.encode("utf-8"))  # Text Value, its UTF-8 bytes as the machine sent them
    _sr_document(ds, code("125100", "DCM", "Vascular Ultrasound Procedure Report"), [
        num("CONTAINS", code("11727-5", "LN", "Body weight"), "52", "kg", "kilogram"),
        text,
    ], "5100")
    return _write(ds, out / "mislabelled.dcm")


US_NOTE = "Dòng chảy tĩnh mạch đùi bình thường"
MANY_ITEMS = 20_050  # past pacs.sr_content.MAX_ITEMS
ROLES = ["modality", "radiologist", "referring", "emr", "his", "admin", "monitor"]
READERS = {"radiologist", "admin", "emr", "referring"}
SR_BASE = "/api/instances/{}/sr"


@dataclass
class Archive:
    server: PacsServer
    study: Study
    files: dict[str, Path]
    sops: dict[str, str]
    series: dict[str, str]
    tokens: dict[str, str]
    other: Study  # referred by someone else; its SR refers to an image of `study`
    hostile: Study  # the broken and oversized objects


def _sop(path: Path) -> tuple[str, str]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)


def _new_study() -> Study:
    return Study(generate_uid(), generate_uid(), [generate_uid() for _ in range(3)])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("sr")
    objects = tmp / "objects"
    study, other, hostile = _new_study(), _new_study(), _new_study()
    files = {f"ct{n}": path for n, path in enumerate(ct_slices(study, objects / "main"), start=1)}
    files.update(comprehensive=comprehensive_sr(study, objects / "main"), rdsr=ct_dose_sr(study, objects / "main"),
                 ko=key_objects(study, objects / "main"))
    # Another patient visit, referred by another physician, whose report cites the first study's image.
    other_report = Study(other.uid, other.ct_series, study.ct_sops, referrer=OTHER_REFERRER)
    files["other_sr"] = comprehensive_sr(other_report, objects / "other")
    files["hostile"] = hostile_sr(hostile, objects / "hostile")
    files["oversized"] = oversized_sr(hostile, objects / "hostile")
    files["xa_rdsr"] = projection_dose_sr(hostile, objects / "hostile")
    server = PacsServer(tmp / "data", Backend("sqlite-fs", None, None, {}))
    server.start()
    try:
        sent = server.storescu(*(str(p) for p in files.values()))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        files["mislabelled"] = mislabelled_sr(hostile, objects / "deflated")
        sent = server.storescu("-xd", str(files["mislabelled"]))  # stored deflated, as sent
        assert sent.returncode == 0, sent.stdout + sent.stderr
        tokens = {role: server.make_token(f"sr-{role}", role, display_name=REFERRER) for role in ROLES}
        tokens["other-referring"] = server.make_token("sr-other-referring", "referring", display_name=OTHER_REFERRER)
        tokens[USERNAME] = server.make_token(USERNAME, "radiologist", "BS. Trần Văn An")
        sops, series = {}, {}
        for name, path in files.items():
            sops[name], series[name] = _sop(path)
        yield Archive(server, study, files, sops, series, tokens, other, hostile)
    finally:
        server.stop()


def _get(archive: Archive, path: str, role: str = "radiologist") -> Any:
    with archive.server.http(token=archive.tokens[role]) as http:
        return http.get(path)


def _items(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from _items(child)


def _by_concept(document: dict[str, Any], meaning: str) -> list[dict[str, Any]]:
    return [i for i in _items(document["content"]) if i["concept"] and i["concept"]["meaning"] == meaning]


# -- the test data itself -----------------------------------------------------------------------
def test_dcmtk_reads_the_test_reports(archive: Archive) -> None:
    """DCMTK's dsrdump parses every SR built here (the test data is valid SR,
    not only what our reader accepts), and numbers the content items as our
    ids do (1.3.1.1 is the long axis a by-reference relationship names)."""
    for name in ("comprehensive", "rdsr", "ko", "other_sr", "xa_rdsr"):
        dump = run_dcmtk("dsrdump", "+Pl", "+Pn", "+Pc", "+Pu", str(archive.files[name]))
        assert dump.returncode == 0, (name, dump.stderr)
        errors = [line for line in dump.stderr.splitlines() if line.startswith(("E:", "F:"))]
        assert not errors, (name, errors)
    comprehensive = run_dcmtk("dsrdump", "+Pl", "+Pn", "+Pc", str(archive.files["comprehensive"])).stdout
    assert FINDING in comprehensive
    assert re.search(r'^1\.3\.1\.1\s+<contains NUM:\(103339001,SCT,"Long Axis"\)="23\.5"', comprehensive, re.M)
    assert re.search(r"inferred from 1\.3\.1\.1>", comprehensive)
    rdsr = run_dcmtk("dsrdump", "+Pl", "+Pc", str(archive.files["rdsr"])).stdout
    assert '(113813,DCM,"CT Dose Length Product Total")="612.3" (mGy.cm,UCUM,"mGy.cm")' in rdsr
    assert PROTOCOL_1 in rdsr
    assert "Key Object Selection Document" in run_dcmtk("dsrdump", "+Pl", str(archive.files["ko"])).stdout


# -- 1. a Comprehensive SR as a document ------------------------------------------------------------
def test_comprehensive_sr_is_a_typed_tree(archive: Archive) -> None:
    answer = _get(archive, SR_BASE.format(archive.sops["comprehensive"]))
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert (doc["sop_uid"], doc["study_uid"], doc["series_uid"]) == (
        archive.sops["comprehensive"], archive.study.uid, archive.series["comprehensive"])
    assert doc["sop_class"] == "Comprehensive SR"
    assert doc["title"] == {"value": "126000", "scheme": "DCM", "meaning": "Imaging Measurement Report"}
    assert (doc["completion"], doc["verification"]) == ("COMPLETE", "VERIFIED")
    assert doc["verifying_observers"] == [
        {"name": "Trần^Văn An", "organization": "Bệnh viện Đa khoa Tỉnh", "at": "20240815100000"}]
    assert doc["observers"] == ["Trần^Văn An"]
    assert (doc["content_date"], doc["content_time"]) == ("20240815", "094512")
    assert doc["truncated"] is False and doc["items"] == 15
    root = doc["content"]
    assert root["id"] == "1" and root["value_type"] == "CONTAINER" and root["template"] == "1500"

    # Nested containers: Imaging Measurements > Measurement Group > measurements.
    measurements = root["children"][2]
    assert (measurements["id"], measurements["relationship"], measurements["concept"]["meaning"]) == (
        "1.3", "CONTAINS", "Imaging Measurements")
    group = measurements["children"][0]
    assert group["concept"]["meaning"] == "Measurement Group" and group["value_type"] == "CONTAINER"
    long_axis, short_axis, site, finding, source = group["children"]
    assert long_axis["id"] == "1.3.1.1" and long_axis["value_type"] == "NUM"
    assert long_axis["concept"] == {"value": "103339001", "scheme": "SCT", "meaning": "Long Axis"}
    assert long_axis["value"] == {"number": "23.5", "float": 23.5, "qualifier": None,
                                  "unit": {"value": "mm", "scheme": "UCUM", "meaning": "millimeter"}}
    assert short_axis["value"]["float"] == 14.0
    assert site["relationship"] == "HAS CONCEPT MOD"
    assert site["value"] == {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}
    # Vietnamese in ISO_IR 192, exactly as written.
    assert finding["value_type"] == "TEXT" and finding["value"] == FINDING
    # A spatial coordinate: its type and a summary of its data, on the image it was selected from.
    scoord = long_axis["children"][0]
    assert scoord["value_type"] == "SCOORD" and scoord["relationship"] == "INFERRED FROM"
    assert scoord["value"] == {"graphic_type": "POLYLINE", "points": 2, "data": [10.0, 12.0, 33.5, 12.0]}
    # Image references resolve to the archive's instance (study and series), for the viewer to open.
    ct2 = {"study_uid": archive.study.uid, "series_uid": archive.study.ct_series}
    for ref in (source, scoord["children"][0]):
        assert ref["value_type"] == "IMAGE"
        assert ref["value"]["sop_uid"] == archive.study.ct_sops[1]
        assert ref["value"]["sop_class_uid"] == CT_IMAGE
        assert ref["value"]["location"] == ct2
    # The by-reference relationship is shown as a reference to 1.3.1.1, not followed.
    conclusion = root["children"][3]["children"][0]
    assert conclusion["value"] == "Theo dõi sau 3 tháng."
    reference = conclusion["children"][0]
    assert reference["value_type"] == "REFERENCE" and reference["relationship"] == "INFERRED FROM"
    assert reference["value"] == {"target": "1.3.1.1", "found": True, "value_type": "NUM",
                                  "concept": {"value": "103339001", "scheme": "SCT", "meaning": "Long Axis"}}
    assert reference["children"] == []
    assert doc["dose"] is None


# -- 2. the dose report and the study's dose ---------------------------------------------------------
def test_ct_dose_report_and_study_dose(archive: Archive) -> None:
    rdsr = _get(archive, SR_BASE.format(archive.sops["rdsr"])).json()
    assert rdsr["sop_class"] == "X-Ray Radiation Dose SR"
    assert rdsr["title"]["meaning"] == "X-Ray Radiation Dose Report"
    assert (rdsr["completion"], rdsr["verification"]) == ("COMPLETE", "UNVERIFIED")
    assert rdsr["dose"]["dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}
    assert _by_concept(rdsr, "Acquisition Protocol")[0]["value"] == PROTOCOL_1

    answer = _get(archive, f"/api/studies/{archive.study.uid}/dose")
    assert answer.status_code == 200, answer.text
    dose = answer.json()
    assert dose["study_uid"] == archive.study.uid
    assert dose["ct_dlp_total"] == {"value": 612.3, "unit": "mGy.cm"}
    (report,) = dose["reports"]
    assert (report["sop_uid"], report["series_uid"]) == (archive.sops["rdsr"], archive.series["rdsr"])
    assert report["modality"] == "CT" and report["procedure"] == "Computed Tomography X-Ray"
    assert report["dlp_total"] == {"value": 612.3, "unit": "mGy.cm"} and report["dlp_total_computed"] is False
    assert report["events_total"] == 2
    chest, abdomen = report["events"]
    assert (chest["protocol"], chest["target_region"], chest["kind"]) == (PROTOCOL_1, "Chest", "Spiral Acquisition")
    assert chest["ctdivol"] == {"value": 8.5, "unit": "mGy"}
    assert chest["dlp"] == {"value": 297.5, "unit": "mGy.cm"}
    assert chest["scanning_length"] == {"value": 350.0, "unit": "mm"}
    assert chest["phantom"] == "IEC Body Dosimetry Phantom" and chest["uid"]
    assert (abdomen["protocol"], abdomen["target_region"]) == ("Abdomen with contrast", "Abdomen")
    assert abdomen["ctdivol"]["value"] == 7.5 and abdomen["dlp"]["value"] == 314.8
    assert abdomen["scanning_length"]["value"] == 420.0

    # A study without a dose report: an empty list; unknown and malformed studies.
    none = _get(archive, f"/api/studies/{archive.other.uid}/dose").json()
    assert none == {"study_uid": archive.other.uid, "reports": [], "ct_dlp_total": None, "dap_total": None,
                    "unread": 0}
    assert _get(archive, "/api/studies/1.2.3.404/dose").status_code == 404
    assert _get(archive, "/api/studies/not-a-uid/dose").status_code == 400


def test_projection_dose_report(archive: Archive) -> None:
    """A projection X-ray report: Dose Area Product and dose at the reference
    point per event and accumulated (the study's other SRs are no dose reports)."""
    dose = _get(archive, f"/api/studies/{archive.hostile.uid}/dose").json()
    assert dose["ct_dlp_total"] is None
    (report,) = dose["reports"]
    assert report["sop_uid"] == archive.sops["xa_rdsr"]
    assert report["modality"] == "projection" and report["procedure"] == "Projection X-Ray"
    assert report["dap_total"] == {"value": 0.00355, "unit": "Gy.m2"}
    assert report["dose_rp_total"] == {"value": 0.033, "unit": "Gy"}
    assert report["fluoro_dap_total"] == {"value": 0.00125, "unit": "Gy.m2"}
    assert report["fluoro_time_total"] == {"value": 95.0, "unit": "s"}
    assert report["frames_total"] == 12
    assert report["planes"] == [{"plane": "Single Plane", "dap_total": {"value": 0.00355, "unit": "Gy.m2"},
                                 "dose_rp_total": {"value": 0.033, "unit": "Gy"},
                                 "fluoro_time_total": {"value": 95.0, "unit": "s"}, "frames_total": 12}]
    fluoro, acquisition = report["events"]
    assert (fluoro["kind"], fluoro["plane"], fluoro["protocol"], fluoro["target_region"]) == (
        "Fluoroscopy", "Single Plane", "Chụp mạch gan", "Abdomen")
    assert fluoro["dap"] == {"value": 0.00125, "unit": "Gy.m2"} and fluoro["dose_rp"] == {"value": 0.012, "unit": "Gy"}
    assert fluoro["started"] == "20240815101500"
    assert acquisition["kind"] == "Stationary Acquisition" and acquisition["dap"]["value"] == 0.0023


# -- 3. a Key Object Selection ---------------------------------------------------------------------
def test_key_object_selection(archive: Archive) -> None:
    ko = _get(archive, SR_BASE.format(archive.sops["ko"])).json()
    assert ko["sop_class"] == "Key Object Selection Document"
    assert ko["title"] == {"value": "113000", "scheme": "DCM", "meaning": "Of Interest"}
    assert ko["completion"] == "" and ko["verification"] == ""  # not in a Key Object Document
    note, first, third = ko["content"]["children"]
    assert (note["concept"]["meaning"], note["value"]) == ("Key Object Description", KO_NOTE)
    assert [i["value"]["sop_uid"] for i in (first, third)] == [archive.study.ct_sops[0], archive.study.ct_sops[2]]
    assert all(i["concept"] is None and i["value"]["location"]["study_uid"] == archive.study.uid
               for i in (first, third))


# -- 4. errors --------------------------------------------------------------------------------------
def test_not_an_sr_unknown_and_malformed(archive: Archive) -> None:
    ct = _get(archive, SR_BASE.format(archive.study.ct_sops[0]))
    assert ct.status_code == 409, ct.text
    assert "not a structured report" in ct.json()["error"]
    assert _get(archive, SR_BASE.format("1.2.3.404")).status_code == 404
    for bad in ("not-a-uid", "1.2..3", "1.2.3*"):
        assert _get(archive, SR_BASE.format(bad)).status_code == 400, bad
    # Larger than an SR is read: refused with the reason, not parsed in memory.
    big = _get(archive, SR_BASE.format(archive.sops["oversized"]))
    assert big.status_code == 422 and "larger than 32 MB" in big.json()["error"], big.text


def test_a_hostile_report_is_bounded(archive: Archive) -> None:
    """Nesting past the shown depth and items past the shown count are cut
    (marked truncated); a by-reference relationship to its own ancestor is a
    reference, not a loop; one to no item says so."""
    answer = _get(archive, SR_BASE.format(archive.sops["hostile"]))
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["truncated"] is True and doc["items"] == 20_000
    depth, node = 0, doc["content"]["children"][0]
    while node["children"]:
        node, depth = node["children"][0], depth + 1
    assert node["truncated"] is True and node["value_type"] == "CONTAINER" and depth == 11
    assert "tầng sâu nhất" not in answer.text
    looping = doc["content"]["children"][1]
    assert looping["value"] == "vòng lặp"
    assert [r["value"]["target"] for r in looping["children"]] == ["1.2", "9.9"]
    assert [r["value"]["found"] for r in looping["children"]] == [True, False]
    assert doc["content"]["truncated"] is True and len(doc["content"]["children"]) < MANY_ITEMS


def test_deflated_sr_in_utf8_without_a_character_set(archive: Archive) -> None:
    with archive.server.http() as admin:
        detail = admin.get(f"/api/studies/{archive.hostile.uid}").json()
    stored = [i for s in detail["series"] for i in s["instances"] if i["sop_uid"] == archive.sops["mislabelled"]]
    assert stored[0]["transfer_syntax_uid"] == "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
    doc = _get(archive, SR_BASE.format(archive.sops["mislabelled"])).json()
    assert doc["sop_class"] == "Enhanced SR" and doc["title"]["meaning"] == "Vascular Ultrasound Procedure Report"
    weight, finding = doc["content"]["children"]
    assert weight["value"]["float"] == 52.0 and weight["value"]["unit"]["meaning"] == "kilogram"
    assert finding["value"] == US_NOTE


# -- 5. who may read ---------------------------------------------------------------------------------
def test_roles_and_referring_physicians(archive: Archive) -> None:
    paths = [SR_BASE.format(archive.sops["comprehensive"]), f"/api/studies/{archive.study.uid}/dose"]
    for path in paths:
        with archive.server.http(token="none") as anonymous:
            anonymous.headers.pop("Authorization", None)
            assert anonymous.get(path).status_code == 401, path
        for role in ROLES:
            code = _get(archive, path, role).status_code
            assert (code == 200) if role in READERS else (code == 403), (path, role, code)
        # A referring physician reads the studies they referred, nothing else.
        assert _get(archive, path, "other-referring").status_code == 403, path
    # An unknown instance tells a referring physician no more than one not theirs.
    assert _get(archive, SR_BASE.format("1.2.3.404"), "referring").status_code == 403
    # The other study's report cites an image of a study its referring physician may not see:
    # the reference is shown, its place in the archive is not.
    other = SR_BASE.format(archive.sops["other_sr"])
    cited = [i["value"] for i in _items(_get(archive, other, "other-referring").json()["content"])
             if i["value_type"] == "IMAGE"]
    assert cited and all(v["sop_uid"] == archive.study.ct_sops[1] and v["location"] is None for v in cited)
    cited = [i["value"] for i in _items(_get(archive, other, "radiologist").json()["content"])
             if i["value_type"] == "IMAGE"]
    assert cited and all(v["location"] == {"study_uid": archive.study.uid, "series_uid": archive.study.ct_series}
                         for v in cited)


def test_reads_are_audited(archive: Archive) -> None:
    _get(archive, SR_BASE.format(archive.sops["ko"]), "emr")
    _get(archive, f"/api/studies/{archive.study.uid}/dose", "emr")
    _get(archive, SR_BASE.format(archive.sops["ko"]), "other-referring")

    def events() -> list[dict[str, Any]]:
        with archive.server.http() as admin:
            return admin.get("/api/audit", params={"study": archive.study.uid, "limit": 5000}).json()

    def wanted(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in found if e["user"] in ("sr-emr", "sr-other-referring") and "/sr" in e["detail"]
                or e["user"] == "sr-emr" and e["detail"].endswith("/dose")]

    assert wait_until(lambda: len(wanted(events())) >= 3, timeout=20)
    found = wanted(events())
    read = next(e for e in found if e["user"] == "sr-emr" and "/sr" in e["detail"])
    assert (read["action"], read["outcome"], read["patient_id"]) == ("view", "success", PATIENT[1])
    dose = next(e for e in found if e["detail"].endswith("/dose"))
    assert (dose["action"], dose["outcome"], dose["study_uid"]) == ("view", "success", archive.study.uid)
    refused = next(e for e in found if e["user"] == "sr-other-referring")
    assert refused["outcome"] == "denied" and refused["study_uid"] == archive.study.uid


def test_on_postgresql_and_s3(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The same reads on PostgreSQL and an S3 store (SeaweedFS): the object
    streamed from the bucket, its references located by the index."""
    from .conftest import make_backend

    study = _new_study()
    files = [*ct_slices(study, tmp_path / "objects"), comprehensive_sr(study, tmp_path / "objects"),
             ct_dose_sr(study, tmp_path / "objects")]
    server = PacsServer(tmp_path / "data", make_backend("pg-s3", request))
    server.start()
    try:
        sent = server.storescu(*(str(p) for p in files))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        with server.http() as http:
            doc = http.get(SR_BASE.format(_sop(files[3])[0])).json()
            dose = http.get(f"/api/studies/{study.uid}/dose").json()
            not_sr = http.get(SR_BASE.format(study.ct_sops[0]))
        source = _by_concept(doc, "Source of Measurement")[0]["value"]
        assert source["location"] == {"study_uid": study.uid, "series_uid": study.ct_series}
        assert _by_concept(doc, "Finding")[0]["value"] == FINDING
        assert dose["ct_dlp_total"] == {"value": 612.3, "unit": "mGy.cm"} and len(dose["reports"][0]["events"]) == 2
        assert not_sr.status_code == 409
    finally:
        server.stop()


# -- 6. in the browser ---------------------------------------------------------------------------------
@contextmanager
def browser_page(archive: Archive) -> Iterator[tuple[Any, list[str]]]:
    """Headless Debian Chromium on the archive's viewer, and the list its
    script errors and Content Security Policy refusals are collected in."""
    with watched_page(viewport={"width": WIDTH, "height": HEIGHT},
                      base_url=f"http://127.0.0.1:{archive.server.http_port}") as watched:
        yield watched


def test_viewer_shows_reports_and_dose(archive: Archive) -> None:
    """The SR series opens as a document (headings, "concept: value unit"
    rows, Vietnamese text, flags); its image link opens the CT image in the
    viewer; a by-reference row points at its target; the Key Object
    Selection's links open their slices; the study shows its total DLP;
    both languages; no script error nor CSP refusal."""
    from playwright.sync_api import expect

    study = archive.study
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(archive) as (page, problems):
        page.goto(f"/#/study/{study.uid}")
        expect(page).to_have_url(re.compile(r"#/login$"))
        page.fill("#username", USERNAME)
        page.fill("#password", "test-password-123")  # PacsServer.make_token's
        page.press("#password", "Enter")
        expect(page.locator("#patient-name")).to_have_text("Nguyễn Thị Mai")
        image = page.locator("#viewer-image")
        expect(image).to_have_attribute("src", re.compile(re.escape(study.ct_sops[0]) + r"/rendered"))

        # The study's radiation dose: total DLP and events, the events' figures when opened.
        box = page.locator("#dose-summary")
        expect(box).to_be_visible()
        expect(page.locator("#dose-total-dlp")).to_have_text("612.3 mGy·cm")
        expect(page.locator("#dose-event-count")).to_have_text("2 lần chiếu xạ")
        expect(box.locator("summary")).to_contain_text("Liều bức xạ · DLP tổng 612.3 mGy·cm")
        box.locator("summary").click()
        events = box.locator("tr.dose-event")
        expect(events).to_have_count(2)
        expect(events.first).to_contain_text(PROTOCOL_1)
        expect(events.first).to_contain_text("Chest")
        # The figures' units are in the headings (CTDIvol in mGy, DLP in mGy·cm, the length in mm).
        expect(box.locator("th")).to_have_text(["Giao thức", "Vùng chiếu", "CTDIvol (mGy)", "DLP (mGy·cm)",
                                               "Chiều dài quét (mm)"])
        expect(events.first.locator("td")).to_have_text([PROTOCOL_1, "Chest", "8.5", "297.5", "350"])
        expect(events.nth(1).locator("td")).to_have_text(["Abdomen with contrast", "Abdomen", "7.5", "314.8", "420"])
        page.screenshot(path=str(ARTIFACTS / "1-dose.png"))

        # The measurement report as a document.
        page.click(f'[data-testid="series-thumb"][data-series-uid="{archive.series["comprehensive"]}"]')
        document = page.locator("#sr-documents")
        expect(document).to_be_visible()
        expect(document.locator(".sr-title")).to_have_text("Imaging Measurement Report")
        expect(document.locator('[data-flag="completion"]')).to_have_text("Hoàn tất")
        expect(document.locator('[data-flag="verification"]')).to_have_text("Đã xác nhận")
        expect(document.locator(".sr-observers")).to_contain_text("Trần Văn An")
        expect(document.locator("h3.sr-heading").first).to_have_text("Imaging Measurements")
        expect(document.locator("h4.sr-heading")).to_have_text("Measurement Group")
        expect(document.locator('.sr-row[data-item-id="1.3.1.1"]')).to_have_text("Long Axis: 23.5 millimeter")
        expect(document.locator('.sr-row[data-item-id="1.3.1.3"]')).to_have_text(
            re.compile(r"Finding Site: Liver$"))
        expect(document.locator('.sr-row[data-item-id="1.3.1.4"]')).to_have_text(f"Finding: {FINDING}")
        expect(document).to_contain_text("Theo dõi sau 3 tháng.")
        assert_no_horizontal_scroll(page)
        page.screenshot(path=str(ARTIFACTS / "2-report.png"))
        # The by-reference row points at the long axis; following it highlights that row.
        reference = document.locator(".sr-ref")
        expect(reference).to_have_text("xem mục Long Axis (1.3.1.1)")
        reference.click()
        expect(document.locator('.sr-row[data-item-id="1.3.1.1"]')).to_have_class(re.compile(r"\bsr-flash\b"))
        # The image link opens the CT slice it names (the second) in the viewer.
        link = document.locator('.sr-row[data-item-id="1.3.1.5"] .sr-image-link')
        expect(link).to_have_text("Mở ảnh")
        link.click()
        expect(page.locator("#sr-documents")).to_have_count(0)
        expect(image).to_have_attribute("src", re.compile(re.escape(study.ct_sops[1]) + r"/rendered"))
        expect(image).to_be_visible()
        expect(page.locator("#slice-label")).to_have_text("Lát cắt 2 / 3")
        ct_thumb = page.locator(f'[data-testid="series-thumb"][data-series-uid="{study.ct_series}"]')
        expect(ct_thumb).to_have_class(re.compile(r"\bactive\b"))

        # The key images: the second link opens the third slice.
        page.click(f'[data-testid="series-thumb"][data-series-uid="{archive.series["ko"]}"]')
        expect(document.locator(".sr-title")).to_have_text("Of Interest")
        expect(document).to_contain_text(KO_NOTE)
        links = document.locator(".sr-image-link")
        expect(links).to_have_count(2)
        page.screenshot(path=str(ARTIFACTS / "3-key-images.png"))
        links.nth(1).click()
        expect(image).to_have_attribute("src", re.compile(re.escape(study.ct_sops[2]) + r"/rendered"))
        expect(page.locator("#slice-label")).to_have_text("Lát cắt 3 / 3")

        # The dose report itself reads as a document too; English labels.
        page.click("#lang-toggle")
        expect(page.locator("#dose-event-count")).to_have_text("2 irradiation events")
        expect(box.locator("summary")).to_contain_text("Radiation dose · Total DLP 612.3 mGy·cm")
        page.click(f'[data-testid="series-thumb"][data-series-uid="{archive.series["rdsr"]}"]')
        expect(document.locator(".sr-title")).to_have_text("X-Ray Radiation Dose Report")
        expect(document.locator('[data-flag="verification"]')).to_have_text("Unverified")
        expect(document.locator("h3.sr-heading").first).to_have_text("CT Accumulated Dose Data")
        expect(document).to_contain_text("CT Dose Length Product Total: 612.3 mGy·cm")
        page.screenshot(path=str(ARTIFACTS / "4-dose-report-en.png"))
        page.click("#lang-toggle")
        assert not problems, problems
