"""Studies as a DICOM file-set for a patient's CD, DVD or USB stick (PS3.10,
PS3.11; IHE PDI): ``pacs export --media`` and ``GET
/api/studies/{study}/media`` (a zip streamed as it is written).

Layout::

    DICOMDIR                              the directory (:mod:`pacs.dicomdir`)
    README.TXT                            what is on the media, who wrote it, when
    DICOM/PAT00001/STU00001/SER00001/IMG00001
    DICOM/PAT00001/STU00001/SER00002/...  one folder per patient, study, series

File IDs are PS3.10's: at most 8 components of at most 8 characters of A-Z,
0-9 and _, no extension. Folders are numbered in the order of the export:
patients as their studies come in the command, studies in that order,
series and files as the index lists the study (the order objects arrived),
so a rerun into the same folder gives every object the name it had.

Objects are kept in their stored transfer syntax, or (``uncompressed``)
written in Explicit VR Little Endian (the STD-GEN-CD profile) by the
retrieval's own conversions (:mod:`pacs.transcode`: header re-encoded,
compressed frames decoded one at a time); an object that cannot be decoded
here (a video) is written as stored and said in the report's warnings. The
index's corrections (HIS reconciliation) are applied as retrieval applies
them; de-identified exports use :mod:`pacs.deidentify` as plain exports do.

Each object is written whole to a temporary file first (never held in
memory), its header read back from that file (large values left on disk)
for its directory record, then moved into the folder or copied into the
zip. The records therefore say exactly what the files say. The DICOMDIR and
README.TXT are written last; a folder export that stops (a full disk, an
interruption) leaves its complete files, and the next run keeps each one
whose header names the object (and syntax) expected at that place, with
the index's current corrections (a de-identified one: its patient's
pseudonym, and only if it may still be released), and writes the DICOMDIR
again; files of its studies that it no longer lists (objects deleted
since) are removed. A folder whose
DICOMDIR, or whose files under DICOM/ (an export that did not finish),
hold another export's studies is refused: numbering starts again with every
export, and its files would be overwritten, the rest left on this media.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, UID

from ..app import Pacs
from ..deidentify import Deidentifier, may_release
from ..dicomdir import FileSet, Place, fileset_id
from ..reads import StoredInstance
from ..query.results import as_written
from ..timezones import hospital_now
from ..transcode import TransferSyntaxError, prepared_bytes
from .common import NullProgress, prune_files
from .export import (
    CHUNK,
    ExportReport,
    Withheld,
    _Counts,
    _export_all,
    _retrieve_item,
    deid_edit,
    edited_object,
    pixel_offset,
)

log = logging.getLogger(__name__)
ROOT_FOLDER = "DICOM"
DICOMDIR = "DICOMDIR"
README = "README.TXT"
# Header values larger than this are left on disk when a written file is
# read back (an encapsulated PDF's document, a large SR's content).
HEADER_DEFER = 64 * 1024


class MediaConflict(Exception):
    """The destination folder holds another export's file-set."""


def component(prefix: str, number: int) -> str:
    """The *number*-th folder or file of its level: PAT00001 ... PAT99999,
    then 00100000 and up (8 digits), always a valid File ID component."""
    if number < 100_000:
        return f"{prefix}{number:05d}"
    if number < 100_000_000:
        return f"{number:08d}"
    raise ValueError(f"more than 99999999 {prefix} entries on one media")


class MediaLayout:
    """Where each object of a media export goes, and the file-set's
    directory as the files are written."""

    def __init__(self, *, uncompressed: bool = False) -> None:
        self.target: str | None = str(ExplicitVRLittleEndian) if uncompressed else None
        self.fileset = FileSet()
        self._patients: dict[tuple[str, str], str] = {}
        self._studies: dict[str, tuple[str, str]] = {}
        self._study_count: dict[str, int] = {}
        self._series: dict[tuple[str, str], tuple[str, int]] = {}
        self._series_count: dict[str, int] = {}
        self._images: dict[tuple[str, str], int] = {}
        # The File IDs this run lists and the studies it writes (check_folder):
        # a file of those studies that it does not list is an earlier run's.
        self.listed: set[str] = set()
        self.studies: set[str] = set()

    def describe(self) -> str:
        return "media (uncompressed)" if self.target else "media"

    def place(self, patient: tuple[str, str], study_uid: str, series_uid: str) -> Place:
        """The File ID of the next object of *series_uid* (of the index's
        *patient*, of *study_uid*)."""
        pat = self._patients.setdefault(patient, component("PAT", len(self._patients) + 1))
        if study_uid not in self._studies:
            self._study_count[pat] = self._study_count.get(pat, 0) + 1
            self._studies[study_uid] = (pat, component("STU", self._study_count[pat]))
        pat, stu = self._studies[study_uid]
        key = (study_uid, series_uid)
        if key not in self._series:
            self._series_count[study_uid] = self._series_count.get(study_uid, 0) + 1
            self._series[key] = (component("SER", self._series_count[study_uid]), self._series_count[study_uid])
        ser, series_number = self._series[key]
        self._images[key] = image = self._images.get(key, 0) + 1
        return Place((ROOT_FOLDER, pat, stu, ser, component("IMG", image)), series_number, image)

    def check_folder(self, out: Path, study_uids: Iterable[str]) -> None:
        """Refuse a folder whose DICOMDIR, or whose files under DICOM/, hold
        studies this export does not write (:class:`MediaConflict`): a rerun
        of the same export (or one with more studies) may write there,
        another would overwrite it."""
        wanted = self.studies = set(study_uids)
        if out.suffix.lower() == ".zip":
            return
        self._check_dicomdir(out, wanted)
        # An export that stopped (Ctrl-C, a full stick) has no DICOMDIR yet,
        # it is written last: another export would overwrite some of its
        # files and leave the rest, another patient's images listed nowhere
        # on this patient's media but taken by any import of the folder.
        others = _folder_studies(out / ROOT_FOLDER) - wanted
        if others:
            raise MediaConflict(
                f"{out / ROOT_FOLDER} already holds files of {len(others)} other study(ies) "
                f"({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}), from an export that did "
                "not finish: export into an empty folder, or name its studies again in this export")

    @staticmethod
    def _check_dicomdir(out: Path, wanted: set[str]) -> None:
        dicomdir = out / DICOMDIR
        if not dicomdir.is_file():
            return
        try:
            ds = dcmread(dicomdir)
            listed = {str(r.StudyInstanceUID) for r in ds.DirectoryRecordSequence
                      if r.DirectoryRecordType == "STUDY" and "StudyInstanceUID" in r}
        except Exception as exc:
            raise MediaConflict(f"{dicomdir} is not a DICOMDIR this export can read ({exc}): "
                                "export into an empty folder") from None
        others = listed - wanted
        if others:
            raise MediaConflict(
                f"{out} already holds a DICOM file-set with {len(others)} other study(ies) "
                f"({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}): export into an empty "
                "folder, or name its studies again in this export to write them all together")


def _study_of(path: Path) -> str:
    """The Study Instance UID of the DICOM file *path*; "" when it cannot be
    read (one an interrupted run cut short is written again)."""
    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                   .get("StudyInstanceUID", "") or "")
    except Exception:
        return ""


def _folder_studies(root: Path) -> set[str]:
    """The Study Instance UIDs of the DICOM files under *root*."""
    if not root.is_dir():
        return set()
    return {_study_of(path) for path in root.rglob("*") if path.is_file()} - {""}


def _remove_stale(out: Path, layout: MediaLayout) -> None:
    """Remove the files under DICOM/ of this export's studies that it does
    not list, and the folders they leave empty: an earlier run's copies of
    objects deleted since (sent in error, often another patient's) or
    withheld now, which any import of the folder would take again."""
    prune_files(out / ROOT_FOLDER, lambda path: "/".join(path.relative_to(out).parts) not in layout.listed
                and _study_of(path) in layout.studies, keep_root=True)


def _header(path: Path) -> Dataset | None:
    """The header of the written file *path* (File Meta included), its large
    values left on disk; None when it cannot be read."""
    try:
        return dcmread(path, stop_before_pixels=True, defer_size=HEADER_DEFER)
    except Exception:  # a file cut short by an interrupted run is written again
        return None


def _is(header: Dataset, sop_uid: str, syntax: str) -> bool:
    meta = header.file_meta
    return (str(meta.get("MediaStorageSOPInstanceUID", "")) == sop_uid
            and str(meta.get("TransferSyntaxUID", "")) == syntax)


def _carries(header: Dataset, overrides: tuple[tuple[str, str], ...]) -> bool:
    """Whether a file an earlier run wrote has the index's current corrected
    values: the study may have been reconciled with the HIS since, and the
    file kept would still name the patient the modality had."""
    return all(str(header.get(keyword, "") or "").strip()
               == str(as_written(dictionary_VR(keyword), value) or "").strip()  # None: the index has no value
               for keyword, value in overrides)


def _pseudonymous(header: Dataset, deid: Deidentifier, patient: tuple[str, str]) -> bool:
    """Whether a de-identified file an earlier run wrote has the pseudonym
    of the index's patient of its study (reconciled with the HIS since, the
    study is another patient's)."""
    if not patient[0].strip():
        return True  # the object's own attributes gave the pseudonym (Deidentifier.apply)
    return str(header.get("PatientID", "") or "") == deid.pseudonym(patient[0], issuer=patient[1])


def export_media_item(pacs: Pacs, item: StoredInstance, sink: Any, layout: MediaLayout, deid: Deidentifier | None,
                      overrides: tuple[tuple[str, str], ...], report: ExportReport, include_burned_in: bool,
                      patient: tuple[str, str]) -> Iterator[bytes]:
    """Write one object at its place in the media layout and record it in
    the file-set's directory; yields what the sink streams."""
    place = layout.place(patient, item.study_uid, item.series_uid)
    name = "/".join(place.file_id)
    sop_uid = deid.uid_map.map(item.sop_uid) if deid else item.sop_uid
    syntax = layout.target or item.transfer_syntax_uid
    existing = sink.existing(name)
    if existing is not None:
        header = _header(existing)
        plain = deid is None and not overrides and not layout.target
        if (header is not None and _is(header, sop_uid, syntax)
                and (not plain or existing.stat().st_size == item.size)
                and (_carries(header, overrides) if deid is None else _pseudonymous(header, deid, patient))
                # Written by a run with --include-burned-in: this one may not release it.
                and (deid is None or may_release(header, include_burned_in=include_burned_in).allowed)):
            layout.fileset.add(place, header)
            layout.listed.add(name)
            report.kept += 1
            return
    tmp = sink.temp_file()
    try:
        if not _write_object(pacs, item, tmp, layout, deid, overrides, report, include_burned_in, patient):
            tmp.unlink(missing_ok=True)  # an earlier run's copy (--include-burned-in) goes in finish_media
            return
        header = _header(tmp)
        if header is None:
            raise ValueError(f"the copy of {item.sop_uid} written for the media cannot be read back")
        # Recorded now, while the file is where its header was read from
        # (values left on disk are read from there), kept only once published.
        entry = layout.fileset.prepare(place, header)
        size = tmp.stat().st_size
        yield from sink.publish(tmp, name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    layout.fileset.commit(entry)
    layout.listed.add(name)
    report.instances += 1
    report.bytes += size


def _write_object(pacs: Pacs, item: StoredInstance, out: Path, layout: MediaLayout, deid: Deidentifier | None,
                  overrides: tuple[tuple[str, str], ...], report: ExportReport, include_burned_in: bool,
                  patient: tuple[str, str]) -> bool:
    """The object as the media holds it, written to *out*; False when a
    de-identified export may not release it (burned-in annotation)."""
    target = layout.target
    try:
        if deid is None:
            # What retrieval sends: as stored, corrected, or converted.
            _write_chunks(out, prepared_bytes(pacs, _retrieve_item(item, pixel_offset(pacs, item.sop_uid), overrides),
                                              target))
            return True
        return _write_deidentified(pacs, item, out, deid, overrides, report, include_burned_in, patient, target)
    except TransferSyntaxError as exc:
        if target is None:
            raise
        # A video, an object no codec here decodes, one too large to convert
        # whole: on the media as stored rather than not at all.
        report.warnings.add({"sop_uid": item.sop_uid,
                             "detail": f"written as stored ({UID(item.transfer_syntax_uid).name}): {exc}"})
        out.unlink(missing_ok=True)
        if deid is None:
            _write_chunks(out, prepared_bytes(pacs, _retrieve_item(item, pixel_offset(pacs, item.sop_uid), overrides),
                                              None))
            return True
        return _write_deidentified(pacs, item, out, deid, overrides, report, include_burned_in, patient, None)


def _write_deidentified(pacs: Pacs, item: StoredInstance, out: Path, deid: Deidentifier,
                        overrides: tuple[tuple[str, str], ...], report: ExportReport, include_burned_in: bool,
                        patient: tuple[str, str], target: str | None) -> bool:
    edit = deid_edit(item, deid, report, include_burned_in, patient, [])
    try:
        with edited_object(pacs, item, overrides, edit, target) as write:
            write(out)
    except Withheld as exc:
        report.not_exported_burned_in.add({"sop_uid": item.sop_uid, "detail": str(exc)})
        return False
    return True


def _write_chunks(out: Path, chunks: Iterable[bytes]) -> None:
    with open(out, "wb") as dest:
        for chunk in chunks:
            dest.write(chunk)


def finish_media(pacs: Pacs, layout: MediaLayout, sink: Any) -> Iterator[bytes]:
    """Write the DICOMDIR and README.TXT of the file-set (last: they list
    what was written); yields what the sink streams."""
    folder = sink.folder()
    if folder is not None:
        _remove_stale(folder, layout)
    settings = pacs.settings
    written = hospital_now(settings)
    ae_title = str(settings.ae_title)
    for name, data in ((DICOMDIR, layout.fileset.dicomdir(fileset_id(ae_title), ae_title)),
                       (README, readme(layout.fileset, ae_title, written.strftime("%Y-%m-%d %H:%M %z")))):
        tmp = sink.temp_file()
        try:
            tmp.write_bytes(data)
            yield from sink.publish(tmp, name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _date(value: str) -> str:
    value = value.strip()
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def _name(value: str) -> str:
    """A DICOM person name as people write it: "Nguyễn^Văn An" -> "Nguyễn Văn An"."""
    alphabetic = value.split("=", 1)[0]
    return " ".join(part for part in alphabetic.replace("^", " ").split()) or "-"


def readme(fileset: FileSet, writer: str, written: str) -> bytes:
    """README.TXT: what the media holds and how to open it, who wrote it and
    when, in Vietnamese and English. UTF-8 with a byte order mark and CRLF
    line ends: the computers it goes to are mostly Windows, whose older
    Notepad guesses another code page without the mark (and shows the
    names' diacritics as garbage)."""
    lines = [
        "HÌNH ẢNH Y TẾ DICOM / DICOM MEDICAL IMAGES",
        "=========================================",
        "",
        "Đĩa (hoặc USB) này chứa hình ảnh chẩn đoán theo chuẩn DICOM (PS3.10, IHE PDI).",
        "Mở tệp DICOMDIR bằng phần mềm xem ảnh DICOM, hoặc nhập (import) vào hệ thống PACS",
        "của bệnh viện: mọi ảnh nằm trong thư mục DICOM.",
        "",
        "This disc (or USB stick) holds diagnostic images in DICOM format (PS3.10, IHE PDI).",
        "Open the DICOMDIR file with a DICOM viewer, or import it into a hospital PACS:",
        "every image is under the DICOM folder.",
        "",
        f"Nơi ghi / Written by: {writer} (filmless-pacs)",
        f"Ngày ghi / Date written: {written}",
        f"Số tệp / Files: {fileset.files}",
        "",
        "Bệnh nhân và ca chụp / Patients and studies:",
    ]
    for patient, studies in fileset.patients():
        about = [f"ID {patient.get('PatientID', '') or '-'}", _date(patient.get("PatientBirthDate", "")),
                 patient.get("PatientSex", "")]
        lines.append("")
        lines.append(f"* {_name(patient.get('PatientName', ''))}  ({', '.join(a for a in about if a)})")
        for study, files, modalities in studies:
            parts = [_date(study.get("StudyDate", "")) or "-", "/".join(m for m in modalities if m) or "-"]
            if study.get("StudyDescription"):
                parts.append(study["StudyDescription"])
            if study.get("AccessionNumber"):
                parts.append(f"#{study['AccessionNumber']}")
            parts.append(f"{files} tệp / files")
            lines.append("    " + "  ".join(parts))
    return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")


# -- the zip of GET /api/studies/{study}/media ------------------------------------------------
class _Pipe:
    """Where a zip written for a response goes: bytes kept until drained."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class ZipStream:
    """A media export's sink for an HTTP answer: a zip written to a stream
    that cannot seek (sizes and checksums after each file's data, zip64
    where it must), each file copied in from its temporary file a chunk at
    a time and handed on as it is written: never the whole zip, nor a
    whole object, in memory."""

    def __init__(self, stack: ExitStack) -> None:
        self.pipe = _Pipe()
        self.zip = zipfile.ZipFile(self.pipe, "w", zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[arg-type]
        self.tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pacs-media-")))
        self._when = time.localtime()[:6]

    def existing(self, name: str) -> Path | None:
        return None

    def folder(self) -> Path | None:
        return None

    def temp_file(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=self.tmp_dir)
        os.close(fd)
        return Path(name)

    def publish(self, tmp: Path, name: str) -> Iterator[bytes]:
        size = tmp.stat().st_size
        info = zipfile.ZipInfo(name, date_time=self._when)  # type: ignore[arg-type]
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        info.external_attr = 0o644 << 16
        with open(tmp, "rb") as src, self.zip.open(info, "w", force_zip64=size > 0x7FFFFFFF) as dest:
            while chunk := src.read(CHUNK):
                dest.write(chunk)
                yield self.pipe.drain()
        tmp.unlink()
        yield self.pipe.drain()

    def finish(self) -> bytes:
        """The zip's central directory (its last bytes)."""
        self.zip.close()
        return self.pipe.drain()

    def discard(self) -> None:
        """An answer broken off: no central directory is written (the client
        must not get a zip that looks whole)."""
        self.zip.fp = None


@dataclass
class MediaDownload:
    """What a media download did, for its audit event."""

    detail: str = ""
    complete: bool = False


def media_zip(pacs: Pacs, study_uid: str, *, uncompressed: bool = False,
              outcome: MediaDownload | None = None) -> Iterator[bytes]:
    """The study as a media zip (the file-set of ``pacs export --media``),
    bytes as they are written. Any object that cannot be written stops it
    (raises): the client then gets a broken answer, never a media that
    looks complete without it. *outcome* gets the audit detail."""
    outcome = outcome or MediaDownload()
    layout = MediaLayout(uncompressed=uncompressed)
    report = ExportReport(out="HTTP download", deidentified=False)

    def audit(uid: str, patient_id: str, counts: _Counts, stopped: str = "") -> None:
        outcome.detail = f"{layout.describe()} export (zip download): {counts.describe()}" + (
            f"; {stopped}" if stopped else "")

    with ExitStack() as stack:
        sink = ZipStream(stack)
        finished = False
        try:
            yield from _export_all(pacs, [study_uid], sink, None, False, NullProgress(), report, audit,
                                   layout=layout, strict=True)
            yield from finish_media(pacs, layout, sink)
            yield sink.finish()
            finished = True
            outcome.complete = True
        finally:
            if not finished:
                sink.discard()
    if report.warnings.count:
        log.info("media download of %s: %d warning(s), e.g. %s", study_uid, report.warnings.count,
                 report.warnings.items[0]["detail"])
