"""Patient media (IHE PDI): `pacs export --media` and `GET
/api/studies/{study}/media`, against real tools.

The synthetic sample studies (a Vietnamese-named patient with two studies,
a multi-frame ultrasound, JPEG 2000 / JPEG-LS / RLE compressed MR) plus an
encapsulated PDF made by DCMTK's pdf2dcm (without a Study ID: the DICOMDIR
must invent one), a presentation state made by DCMTK's dcmpsmk, pydicom's
structured report and ECG waveform; the radiograph's study is reconciled
with an HIS order of another patient, so the index corrects it. Each media
is read back with pydicom's FileSet (every record against the file it
references), with `dcmdump`, and with DCMTK's `dcmmkdir`, which finds every
file already listed in our DICOMDIR; a copy imported by our own `pacs
import` into a fresh archive has the same objects, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

from .conftest import pydicom_file
from .dicomfiles import H264, as_h264_clip, make_ct
from .peers import Backend, PacsServer, dataset_bytes, run_dcmtk, wait_until

MINIMAL_PDF = (b"%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n2 0 obj <</Type/Pages/Kids[3 0 R]/Count 1>>"
               b" endobj\n3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>> endobj\ntrailer <</Root 1 0 R>>\n"
               b"%%EOF\n")
ORDER_PATIENT = {"id": "079300000777", "issuer": "CCCD", "name": "Hoàng^Thị Mai", "birth_date": "19900101",
                 "sex": "F"}
COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
HUGE_STUDY = "1.2.826.0.1.3680043.9.7134.78.1"
CLIP = "1.2.826.0.1.3680043.9.7134.79.1"
MB = 1 << 20
EXPECTED_TYPES = {
    "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",
    "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR DOCUMENT",
    "1.2.840.10008.5.1.4.1.1.9.1.1": "WAVEFORM",
}
# The Type 1 keys of each record type here (PS3.3 F.5): always with a value,
# invented by the DICOMDIR where the object has none.
TYPE_1 = {
    "PATIENT": {"PatientID"},
    "STUDY": {"StudyDate", "StudyTime", "StudyID", "StudyInstanceUID"},
    "SERIES": {"Modality", "SeriesInstanceUID", "SeriesNumber"},
    "IMAGE": {"InstanceNumber"},
    "ENCAP DOC": {"InstanceNumber", "MIMETypeOfEncapsulatedDocument"},
    "PRESENTATION": {"PresentationCreationDate", "PresentationCreationTime", "InstanceNumber", "ContentLabel"},
    "SR DOCUMENT": {"InstanceNumber", "CompletionFlag", "VerificationFlag", "ContentDate", "ContentTime",
                    "ConceptNameCodeSequence"},
    "WAVEFORM": {"InstanceNumber", "ContentDate", "ContentTime"},
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Iterator[PacsServer]:
    """A server with the sample studies, the extra objects, a big study of
    ~1 MB noise images for the full-disk test, and one corrected study."""
    work = tmp_path_factory.mktemp("media")
    extra = work / "extra"
    extra.mkdir()
    first_ct = sorted((samples / "ct").glob("*.dcm"))[0]
    (work / "report.pdf").write_bytes(MINIMAL_PDF)
    for tool, *args in (
        ("pdf2dcm", "+st", str(first_ct), "+t", "Kết quả CT", "-k", "0008,0005=ISO_IR 192", str(work / "report.pdf"),
         str(extra / "report.dcm")),
        ("dcmpsmk", str(first_ct), str(extra / "gsps.dcm")),
    ):
        made = run_dcmtk(tool, *args)
        assert made.returncode == 0, made.stderr
    for name in ("test-SR.dcm", "waveform_ecg.dcm"):
        (extra / name).write_bytes(pydicom_file(name).read_bytes())
    # An H.264 clip in the ultrasound study: nothing here decodes it.
    clip = dcmread(next((samples / "us").glob("*.dcm")))
    clip.SOPInstanceUID = clip.file_meta.MediaStorageSOPInstanceUID = CLIP
    clip.SeriesInstanceUID, clip.SeriesNumber, clip.BurnedInAnnotation = CLIP + ".1", 2, "NO"
    as_h264_clip(clip, 20000).save_as(extra / "clip.dcm", enforce_file_format=True)
    big = work / "big"
    big.mkdir()
    study, series = "1.2.826.0.1.3680043.9.7134.77.1", "1.2.826.0.1.3680043.9.7134.77.2"
    for i in range(24):
        make_ct(big / f"{i:03d}.dcm", sop_uid=f"1.2.826.0.1.3680043.9.7134.77.3.{i + 1}", StudyInstanceUID=study,
                SeriesInstanceUID=series, Rows=512, Columns=1024, InstanceNumber=i + 1,
                PixelData=np.random.default_rng(i).integers(0, 4096, 512 * 1024, dtype=np.uint16).tobytes())
    huge = work / "huge"  # one 64 MB multi-frame object
    huge.mkdir()
    make_ct(huge / "huge.dcm", sop_uid="1.2.826.0.1.3680043.9.7134.78.3", StudyInstanceUID=HUGE_STUDY,
            SeriesInstanceUID="1.2.826.0.1.3680043.9.7134.78.2", Rows=512, Columns=512, NumberOfFrames=128,
            PixelData=np.random.default_rng(78).integers(0, 4096, 512 * 512 * 128, dtype=np.uint16).tobytes())
    server = PacsServer(work / "data", Backend("sqlite-fs", None, None, {}))
    for folder in (samples, extra, big, huge):
        server.cli("import", str(folder))
    server.start()
    manifest = json.loads((samples / "manifest.json").read_text())
    server.studies = {s["name"]: s["study_instance_uid"] for s in manifest["studies"]}  # type: ignore[attr-defined]
    server.studies["sr"] = str(dcmread(extra / "test-SR.dcm").StudyInstanceUID)  # type: ignore[attr-defined]
    server.studies["ecg"] = str(dcmread(extra / "waveform_ecg.dcm").StudyInstanceUID)  # type: ignore[attr-defined]
    server.studies["big"] = study  # type: ignore[attr-defined]
    server.work = work  # type: ignore[attr-defined]
    # The radiograph turns out to be another patient's (an HIS order): retrieval corrects it.
    with server.http() as http:
        order = http.post("/api/orders", json={"patient": ORDER_PATIENT, "accession_number": "ACCMEDIA1",
                                               "modality": "DX", "start_date": "20240806", "start_time": "160000"})
        assert order.status_code == 201, order.text
    server.cli("orders", "match", server.studies["dx"], "ACCMEDIA1")  # type: ignore[attr-defined]
    yield server
    server.stop()


def _studies(server: PacsServer, *names: str) -> list[str]:
    return [server.studies[n] for n in names]  # type: ignore[attr-defined]


SAMPLE_STUDIES = ("ct", "compressed", "dx", "us", "sr", "ecg")


def _stored(server: PacsServer, study_uids: list[str]) -> dict[str, Any]:
    """The index's instances of *study_uids*: SOP Instance UID -> StoredInstance."""
    core = server.core()
    try:
        return {i.sop_uid: i for s in study_uids for i in core.reader.iter_stored(s)}
    finally:
        core.close()


def _stored_bytes(server: PacsServer, key: str) -> bytes:
    core = server.core()
    try:
        return core.store.read_bytes(key)
    finally:
        core.close()


def _export(server: PacsServer, *args: str, rc: int = 0) -> dict[str, Any]:
    result = server.cli("export", *args, "--json", check=False)
    assert result.returncode == rc, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def _text(value: Any) -> str:
    return str(value if value is not None else "").strip()


def _same_keys(record: Dataset, ds: Dataset, where: str) -> None:
    """Every key of *record* says what the file says (a key the DICOMDIR had
    to invent only where the file has no value); Type 1 keys have values."""
    for keyword in TYPE_1[record.DirectoryRecordType]:
        assert keyword in record and record[keyword].VM, (where, record.DirectoryRecordType, keyword)
    for elem in record:
        if elem.tag.group == 0x0004 or elem.keyword == "SpecificCharacterSet":
            continue
        keyword = elem.keyword
        if keyword in ds and ds[keyword].VR == "SQ":
            assert len(elem.value) <= len(ds[keyword].value), (where, keyword)
            continue
        if keyword == "VerificationDateTime":
            continue  # from the latest verifying observer, checked by the SR test
        file_value = _text(ds.get(keyword))
        if file_value:
            assert _text(elem.value) == file_value, (where, keyword, elem.value, file_value)


def check_media(root: Path) -> dict[str, tuple[Dataset, str, Path]]:
    """Read the file-set at *root* with pydicom's FileSet and check each
    record against the file it references: (header, record type, path) by
    SOP Instance UID. Every file under DICOM/ is referenced, every File ID
    is PS3.10's, records with non-ASCII text say ISO_IR 192."""
    fileset = FileSet(root / "DICOMDIR")
    found: dict[str, tuple[Dataset, str, Path]] = {}
    for instance in fileset:
        path = Path(instance.path)
        parts = path.relative_to(root).parts
        assert parts[0] == "DICOM" and len(parts) <= 8 and all(COMPONENT.fullmatch(p) for p in parts), parts
        assert path.is_file(), path
        ds = dcmread(path, stop_before_pixels=True)
        leaf = instance.node._record
        series, study, patient = (node._record for node in instance.node.ancestors[:3])
        assert [r.DirectoryRecordType for r in (patient, study, series)] == ["PATIENT", "STUDY", "SERIES"]
        where = "/".join(parts)
        assert leaf.ReferencedSOPInstanceUIDInFile == ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert leaf.ReferencedSOPClassUIDInFile == ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert leaf.ReferencedTransferSyntaxUIDInFile == ds.file_meta.TransferSyntaxUID
        assert leaf.DirectoryRecordType == EXPECTED_TYPES.get(ds.SOPClassUID, "IMAGE"), where
        for record in (patient, study, series, leaf):
            _same_keys(record, ds, where)
            texts = [str(e.value) for e in record.iterall() if isinstance(e.value, str) or e.VR == "PN"]
            utf8 = any(not t.isascii() for t in texts)
            assert (record.get("SpecificCharacterSet") == "ISO_IR 192") == utf8, (where, record.DirectoryRecordType)
        assert study.StudyInstanceUID == ds.StudyInstanceUID and series.SeriesInstanceUID == ds.SeriesInstanceUID
        found[str(ds.SOPInstanceUID)] = (ds, leaf.DirectoryRecordType, path)
    on_disk = {p for p in (root / "DICOM").rglob("*") if p.is_file()}
    assert on_disk == {path for _, _, path in found.values()}
    return found


def check_with_dcmtk(root: Path, *, strict_profile: bool = False, file_lacks: frozenset[str] = frozenset()) -> None:
    """DCMTK reads the DICOMDIR (dcmdump) and, adding the files to it
    (dcmmkdir +A on a copy; +I: a file without a Study ID, as pdf2dcm
    writes them, is not refused), finds each one listed already; with
    *strict_profile* dcmmkdir also accepts every file for the STD-GEN-CD
    profile (Explicit VR Little Endian, names, required attributes).
    *file_lacks*: attributes a file may miss (dcmmkdir then refuses that
    file for itself; the DICOMDIR invented them)."""
    dump = run_dcmtk("dcmdump", str(root / "DICOMDIR"))
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "MediaStorageDirectoryStorage" in dump.stdout and "Directory Record" in dump.stdout
    files = sorted(str(p.relative_to(root)) for p in (root / "DICOM").rglob("*") if p.is_file())
    copy = root.parent / f"{root.name}-dcmtk"
    subprocess.run(["cp", "-r", str(root), str(copy)], check=True)
    added = run_dcmtk("dcmmkdir", "+A", "-nb", "-Nxc", "+I", "+r", "+id", str(copy), "+D", str(copy / "DICOMDIR"),
                      "-v", "DICOM")
    assert added.returncode == 0, added.stderr
    listed = re.findall(r"file (\S+): directory record for this SOP instance already exists", added.stderr)
    lacking: dict[str, set[str]] = {}
    for attribute, name in re.findall(r"E: required attribute (\w+) \S+ (?:missing|empty) in file: (\S+)",
                                      added.stderr):
        lacking.setdefault(name, set()).add(attribute)
    assert all(attributes <= file_lacks for attributes in lacking.values()), lacking
    assert sorted([*(str(Path(p).relative_to(copy)) for p in listed), *lacking]) == files, added.stderr[-3000:]
    if strict_profile:
        checked = run_dcmtk("dcmmkdir", "-Pgp", "-w", "+I", "+r", "+id", str(root), "DICOM")
        assert checked.returncode == 0 and "E:" not in checked.stderr, checked.stderr


def test_media_folder_as_stored_reads_back_and_imports_byte_identical(archive: PacsServer, tmp_path: Path) -> None:
    studies = _studies(archive, *SAMPLE_STUDIES)
    out = tmp_path / "cd"
    report = _export(archive, *studies, "--out", str(out), "--media")
    stored = _stored(archive, studies)
    assert report["studies"] == len(studies) and report["instances"] == len(stored) and report["failed"]["count"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["DICOM", "DICOMDIR", "README.TXT"]

    media = check_media(out)
    check_with_dcmtk(out)
    assert set(media) == set(stored)
    kinds = {kind for _, kind, _ in media.values()}
    assert kinds == {"IMAGE", "ENCAP DOC", "PRESENTATION", "SR DOCUMENT", "WAVEFORM"}
    # Several patients, each in its own folder; the Vietnamese patient's two studies under one.
    patients = {path.relative_to(out).parts[1] for _, _, path in media.values()}
    assert len(patients) == 5
    nguyen = {path.relative_to(out).parts[1:3] for ds, _, path in media.values() if ds.PatientID == "001079918801"}
    assert len({p for p, _ in nguyen}) == 1 and len(nguyen) == 2

    # As stored: every file is the stored object, byte for byte, but the
    # corrected study's, which carry the index's values (as retrieval does).
    dx = archive.studies["dx"]  # type: ignore[attr-defined]
    for sop, (ds, _, path) in media.items():
        if ds.StudyInstanceUID == dx:
            assert str(ds.PatientName) == ORDER_PATIENT["name"] and ds.PatientID == ORDER_PATIENT["id"]
            assert _sha(path.read_bytes()) != stored[sop].sha256
        else:
            assert _sha(path.read_bytes()) == stored[sop].sha256, path
    # ... and so do their DICOMDIR records.
    directory = dcmread(out / "DICOMDIR")
    names = [str(r.PatientName) for r in directory.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert ORDER_PATIENT["name"] in names and "Nguyễn^Văn An" in names and "Trần^Thị Bích Ngọc" not in names

    # The PDF had no Study ID (pdf2dcm leaves it empty): its study record has
    # the CT's (the first file of the study) and the PDF is an ENCAP DOC.
    pdf = next(ds for ds, kind, _ in media.values() if kind == "ENCAP DOC")
    assert str(pdf.DocumentTitle) == "Kết quả CT" and not pdf.get("StudyID")

    readme = (out / "README.TXT").read_bytes()
    assert readme.startswith(b"\xef\xbb\xbf") and b"\r\n" in readme
    text = readme.decode("utf-8-sig")
    assert "Nguyễn Văn An" in text and "Hoàng Thị Mai" in text and "FILMLESS" in text and "DICOMDIR" in text

    # Our own import of the folder (as from the CD) into a fresh archive: the
    # same objects, their stored datasets byte-identical; the DICOMDIR is skipped.
    fresh = PacsServer(tmp_path / "fresh", Backend("sqlite-fs", None, None, {}))
    imported = json.loads(fresh.cli("import", str(out), "--json").stdout)
    assert imported["stored"] == len(stored) and imported["skipped"] == 1 and imported["failed"] == 0, imported
    again = _stored(fresh, studies)
    assert set(again) == set(stored)
    for sop, item in again.items():
        assert dataset_bytes(_stored_bytes(fresh, item.storage_key)) == dataset_bytes(media[sop][2].read_bytes())

    # The export is audited per study, as a media export by whoever ran it.
    core = archive.core()
    try:
        from pacs import audit

        assert wait_until(lambda: len([e for e in audit.query(core.engine, action="export")
                                       if "media export" in e["detail"] and str(out) in e["detail"]])
                          == len(studies), timeout=10)
    finally:
        core.close()


def test_media_folder_resumes_and_refuses_another_exports_folder(archive: PacsServer, tmp_path: Path) -> None:
    ct, us = _studies(archive, "ct", "us")
    out = tmp_path / "usb"
    first = _export(archive, ct, "--out", str(out), "--media")
    files = sorted(p for p in (out / "DICOM").rglob("*") if p.is_file())
    assert first["instances"] == len(files) > 2
    # An interrupted run: a file cut short, one missing, no DICOMDIR yet.
    files[0].write_bytes(files[0].read_bytes()[:500])
    files[1].unlink()
    (out / "DICOMDIR").unlink()
    again = _export(archive, ct, "--out", str(out), "--media")
    assert again["already_there"] == len(files) - 2 and again["instances"] == 2
    assert len(check_media(out)) == len(files)
    # The same export again, with one more study: kept, and the new one added.
    more = _export(archive, ct, us, "--out", str(out), "--media")
    added = len(_stored(archive, [us]))
    assert more["already_there"] == len(files) and more["instances"] == added
    assert len(check_media(out)) == len(files) + added
    # Another export into it would overwrite its files: refused, nothing touched.
    before = (out / "DICOMDIR").read_bytes()
    refused = archive.cli("export", us, "--out", str(out), "--media", check=False)
    assert refused.returncode == 2 and "other study" in refused.stderr, refused.stderr
    assert (out / "DICOMDIR").read_bytes() == before
    usage = archive.cli("export", us, "--out", str(tmp_path / "x"), "--uncompressed", check=False)
    assert usage.returncode == 2 and "--media" in usage.stderr


def test_media_zip_deidentified_records_carry_the_pseudonyms(archive: PacsServer, tmp_path: Path) -> None:
    studies = _studies(archive, "ct", "compressed", "us", "dx")
    out = tmp_path / "research.zip"
    report = _export(archive, *studies, "--out", str(out), "--media", "--deidentify", "--salt", "media-1")
    # The report PDF is on it, blanked (its text would name the patient).
    assert [w["detail"] for w in report["warnings"]["items"]] == ["encapsulated document replaced by a blank one"]
    assert report["failed"]["count"] == 0
    assert not out.with_name(out.name + ".partial").exists()
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert "DICOMDIR" in names and "README.TXT" in names
        zf.extractall(tmp_path / "unzipped")
    media = check_media(tmp_path / "unzipped")
    # De-identification removes the presentation state's creation date and
    # time (Type 1 in its IOD): DCMTK refuses that file for itself, the
    # DICOMDIR's record has them invented.
    check_with_dcmtk(tmp_path / "unzipped",
                     file_lacks=frozenset({"PresentationCreationDate", "PresentationCreationTime"}))
    stored = _stored(archive, studies)
    assert len(media) == len(stored) and not set(media) & set(stored)  # every UID is a new one
    assert {ds.StudyInstanceUID for ds, _, _ in media.values()} == set(report["study_map"].values())
    directory = dcmread(tmp_path / "unzipped" / "DICOMDIR")
    identifying = {"Nguyễn^Văn An", ORDER_PATIENT["name"], "Lê^Đức Thắng", "001079918801", ORDER_PATIENT["id"]}
    values = {str(e.value) for r in directory.DirectoryRecordSequence for e in r.iterall()}
    assert not values & identifying
    assert all(ds.PatientIdentityRemoved == "YES" for ds, _, _ in media.values())
    readme = (tmp_path / "unzipped" / "README.TXT").read_text("utf-8-sig")
    assert "Nguyễn" not in readme and "Hoàng" not in readme


def test_media_uncompressed_is_explicit_little_endian_with_the_decoded_pixels(archive: PacsServer,
                                                                              tmp_path: Path) -> None:
    studies = _studies(archive, "compressed", "us", "ct")
    out = tmp_path / "gen-cd"
    report = _export(archive, *studies, "--out", str(out), "--media", "--uncompressed")
    assert report["failed"]["count"] == 0
    # The clip stays as stored (on the media rather than not at all), and says so.
    assert [w["sop_uid"] for w in report["warnings"]["items"]] == [CLIP]
    assert "written as stored" in report["warnings"]["items"][0]["detail"]
    media = check_media(out)
    assert media[CLIP][0].file_meta.TransferSyntaxUID == H264
    media[CLIP][2].unlink()  # not STD-GEN-CD: the profile check below is of the rest
    check_with_dcmtk(out, strict_profile=True)
    media.pop(CLIP)
    stored = _stored(archive, studies)
    assert set(media) == set(stored) - {CLIP}
    compressed = 0
    for sop, (_, _, path) in media.items():
        written = dcmread(path)
        assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        if "PixelData" not in written:
            continue
        original = dcmread(io.BytesIO(_stored_bytes(archive, stored[sop].storage_key)))
        compressed += original.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(written.pixel_array, original.pixel_array), path
        assert written.get("NumberOfFrames") == original.get("NumberOfFrames")
    assert compressed == 30  # the three MR series: JPEG 2000, JPEG-LS and RLE

    # De-identified too: the header edited, the frames decoded one at a time.
    from pacs.deidentify import Deidentifier

    mr = archive.studies["compressed"]  # type: ignore[attr-defined]
    _export(archive, mr, "--out", str(tmp_path / "research"), "--media", "--uncompressed", "--deidentify",
            "--salt", "media-2")
    media = check_media(tmp_path / "research")
    new_uid = Deidentifier("media-2").uid_map.map
    for sop in _stored(archive, [mr]):
        written = dcmread(media[new_uid(sop)][2])
        assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and written.PatientIdentityRemoved == "YES"
        original = dcmread(io.BytesIO(_stored_bytes(archive, stored[sop].storage_key)))
        assert np.array_equal(written.pixel_array, original.pixel_array)


def _download(server: PacsServer, token: str, study_uid: str, out: Path, **params: str) -> Any:
    """GET the study's media zip into *out*, chunk by chunk; the answer's headers."""
    with server.http(token=token) as http, http.stream("GET", f"/api/studies/{study_uid}/media",
                                                         params=params, timeout=120) as answer:
        assert answer.status_code == 200, answer.read()
        with open(out, "wb") as f:
            for chunk in answer.iter_bytes():
                f.write(chunk)
        return answer.headers


def _unzipped(archive_file: Path, into: Path) -> Path:
    """*archive_file* checked and extracted by Info-ZIP's unzip (a real client of our zip)."""
    tested = subprocess.run(["unzip", "-t", str(archive_file)], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout, tested.stdout + tested.stderr
    subprocess.run(["unzip", "-q", str(archive_file), "-d", str(into)], check=True)
    return into


def test_http_media_zip_is_streamed_guarded_and_audited(archive: PacsServer, tmp_path: Path) -> None:
    from pacs import audit

    ct, dx, compressed = _studies(archive, "ct", "dx", "compressed")
    reader = archive.make_token("bs.media", "radiologist", "BS. Phạm Media")
    headers = _download(archive, reader, ct, tmp_path / "ct.zip")
    assert headers["content-type"] == "application/zip"
    assert headers["content-disposition"] == f'attachment; filename="DICOM-{ct}.zip"'
    assert "content-length" not in headers and headers.get("transfer-encoding") == "chunked"  # streamed
    root = _unzipped(tmp_path / "ct.zip", tmp_path / "ct")
    assert sorted(p.name for p in root.iterdir()) == ["DICOM", "DICOMDIR", "README.TXT"]
    media = check_media(root)
    check_with_dcmtk(root)
    stored = _stored(archive, [ct])
    assert set(media) == set(stored)
    assert all(_sha(path.read_bytes()) == stored[sop].sha256 for sop, (_, _, path) in media.items())
    assert {kind for _, kind, _ in media.values()} == {"IMAGE", "ENCAP DOC", "PRESENTATION"}

    # The index's corrections are in the files and the records, as in any retrieval.
    _download(archive, reader, dx, tmp_path / "dx.zip")
    media = check_media(_unzipped(tmp_path / "dx.zip", tmp_path / "dx"))
    assert {(str(ds.PatientName), ds.PatientID) for ds, _, _ in media.values()} == {
        (ORDER_PATIENT["name"], ORDER_PATIENT["id"])}
    patient = next(r for r in dcmread(tmp_path / "dx" / "DICOMDIR").DirectoryRecordSequence
                   if r.DirectoryRecordType == "PATIENT")
    assert (str(patient.PatientName), patient.PatientID, patient.SpecificCharacterSet) == (
        ORDER_PATIENT["name"], ORDER_PATIENT["id"], "ISO_IR 192")

    # Uncompressed (STD-GEN-CD) on request.
    _download(archive, reader, compressed, tmp_path / "mr.zip", uncompressed="true")
    media = check_media(_unzipped(tmp_path / "mr.zip", tmp_path / "mr"))
    assert {ds.file_meta.TransferSyntaxUID for ds, _, _ in media.values()} == {ExplicitVRLittleEndian}

    # Who may: the roles that read the study in the viewer; bad requests are 4xx.
    modality = archive.make_token("ct-room-media", "modality")
    with archive.http(token=modality) as http:
        refused = http.get(f"/api/studies/{ct}/media")
        assert refused.status_code == 403 and "error" in refused.json()
    with archive.http(token=reader) as http:
        assert http.get("/api/studies/1.2.3.999999/media").status_code == 404
        assert http.get("/api/studies/not-a-uid/media").status_code == 400
        assert http.get(f"/api/studies/{ct}/media", params={"uncompressed": "perhaps"}).status_code in (400, 422)

    # Audited as exports, by whom, with what was written.
    core = archive.core()
    try:
        def events() -> list[dict[str, Any]]:
            return [e for e in audit.query(core.engine, action="export", study_uid=ct) if e["protocol"] == "http"]

        assert wait_until(lambda: len(events()) >= 2, timeout=10)
        done = [e for e in events() if e["user"] == "bs.media" and e["outcome"] == "success"]
        assert len(done) == 1 and done[0]["role"] == "radiologist"
        assert f"media export (zip download): {len(stored)} instances written" in done[0]["detail"]
        assert done[0]["patient_id"] == "001079918801^^^CCCD"
        denied = [e for e in events() if e["user"] == "ct-room-media"]
        assert len(denied) == 1 and denied[0]["outcome"] == "denied"
    finally:
        core.close()


def test_media_export_to_a_full_disk_stops_once_and_resumes_with_room(archive: PacsServer, tmp_path: Path) -> None:
    from .test_disk_full import tmpfs

    big = archive.studies["big"]  # type: ignore[attr-defined]  # 24 objects of 1 MB
    with tmpfs(tmp_path / "out", 12) as out:
        # A zip: one message, non-zero exit, no .partial left to keep the disk full.
        result = archive.cli("export", big, "--out", str(out / "cd.zip"), "--media", check=False)
        said = result.stdout + result.stderr
        assert result.returncode != 0 and "disk full" in said and said.count("No space left on device") == 1, said
        assert list(out.iterdir()) == []
        # A folder keeps its complete files, no temporary one, and no DICOMDIR yet ...
        result = archive.cli("export", big, "--out", str(out / "cd"), "--media", check=False)
        said = result.stdout + result.stderr
        assert result.returncode != 0 and "disk full" in said and said.count("No space left on device") == 1, said
        kept = [p for p in (out / "cd").rglob("*") if p.is_file()]
        assert kept and all(p.parent.name == "SER00001" and p.stat().st_size > 1024 * 1024 for p in kept), kept
        # ... and a rerun with room resumes where it stopped.
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        report = _export(archive, big, "--out", str(out / "cd"), "--media")
        assert report["already_there"] == len(kept) and report["instances"] == 24 - len(kept)
        assert len(check_media(out / "cd")) == 24


def test_viewer_button_downloads_the_study_for_a_cd(archive: PacsServer, tmp_path: Path) -> None:
    """The study screen's "Download for CD/USB" (in Vietnamese first) gets
    the media zip with the browser's session, in a real Chromium."""
    from playwright.sync_api import expect

    from .test_web_viewer import browsing, sign_in

    archive.cli("user", "add", "bs.dia", "--role", "radiologist", "--password", "Secret-123",
                "--display-name", "BS. Đỗ Đĩa")
    ct = archive.studies["ct"]  # type: ignore[attr-defined]
    with browsing(archive, accept_downloads=True) as (page, errors):
        sign_in(page, "bs.dia", "Secret-123")
        expect(page).to_have_url(re.compile(r"#/worklist$"))
        page.goto(f"/#/study/{ct}")
        button = page.locator("#study-media")
        expect(button).to_have_text("Tải về ghi đĩa/USB")
        expect(button).to_be_in_viewport()
        page.click("#lang-toggle")
        expect(page.locator("#study-media")).to_have_text("Download for CD/USB")
        with page.expect_download() as started:
            page.click("#study-media")
        download = started.value
        assert download.suggested_filename == f"DICOM-{ct}.zip"
        download.save_as(tmp_path / "from-viewer.zip")
        assert not errors, errors
    media = check_media(_unzipped(tmp_path / "from-viewer.zip", tmp_path / "viewer"))
    assert set(media) == set(_stored(archive, [ct]))


def test_a_download_broken_off_is_audited_as_such_and_leaves_nothing_behind(archive: PacsServer) -> None:
    from pacs import audit

    big = archive.studies["big"]  # type: ignore[attr-defined]  # 24 MB: far more than one chunk
    spool = Path(tempfile.gettempdir())
    before = set(spool.glob("pacs-media-*"))
    reader = archive.make_token("bs.gone", "radiologist")
    with archive.http(token=reader) as http, http.stream("GET", f"/api/studies/{big}/media") as answer:
        assert answer.status_code == 200
        first = next(answer.iter_raw())
        assert first.startswith(b"PK\x03\x04")  # a zip's first local header, sent before the study is written
        assert set(spool.glob("pacs-media-*")) - before  # the objects' temporary files, one at a time
    # The client went away: the server stops writing, removes its temporary
    # files and records the export as broken off.
    assert wait_until(lambda: set(spool.glob("pacs-media-*")) <= before, timeout=20)
    core = archive.core()
    try:
        def gone() -> list[dict[str, Any]]:
            return [e for e in audit.query(core.engine, action="export", study_uid=big) if e["user"] == "bs.gone"]

        assert wait_until(lambda: len(gone()) == 1, timeout=20)
        assert gone()[0]["outcome"] == "failure" and "broken off" in gone()[0]["detail"], gone()
    finally:
        core.close()
    with archive.http(token=reader) as http:
        assert http.get("/health").status_code == 200


def _peak_kb(pid: int, reset: bool = False) -> int:
    """The server's peak RSS (VmHWM) in kB; *reset*: start a new peak from now (its current RSS)."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_a_big_object_goes_into_the_zip_without_being_held_in_memory(archive: PacsServer, tmp_path: Path) -> None:
    """A 64 MB object (and a 24 MB study) downloaded as media: the server's
    peak memory grows by far less than either (chunks of 1 MB go through)."""
    assert archive.proc is not None
    pid = archive.proc.pid
    reader = archive.make_token("bs.memory", "radiologist")
    _download(archive, reader, archive.studies["ct"], tmp_path / "warm.zip")  # type: ignore[attr-defined]
    for study, size in ((HUGE_STUDY, 64 * MB), (archive.studies["big"], 24 * MB)):  # type: ignore[attr-defined]
        before = _peak_kb(pid, reset=True)
        _download(archive, reader, study, tmp_path / "media.zip")
        grown = (_peak_kb(pid) - before) * 1024
        assert grown < size // 3, f"peak RSS grew by {grown // MB} MB for {size // MB} MB of objects"
        with zipfile.ZipFile(tmp_path / "media.zip") as zf:
            files = [i for i in zf.infolist() if i.filename.startswith("DICOM/")]
            assert sum(i.file_size for i in files) > size and zf.testzip() is None
